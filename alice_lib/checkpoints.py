"""Loading and saving STF weights: the published checkpoints and this project's own files.

Published STF files (Zou et al., CVPR 2022) come as ``{"state_dict": ...}`` or a
bare state dict, sometimes with DataParallel's ``module.`` prefix and with the
older CompressAI ``EntropyBottleneck`` layout (``_matrix0``, ``_bias0``,
``_factor0``). This project writes training checkpoints (``alice_lib.train``)
and safetensors model files whose metadata carries the :class:`STFConfig`.

Every file is read with ``torch.load(..., weights_only=True)`` or safetensors, the
whole state dict is checked against the model before anything is copied, and a
mismatch names the first differing keys and shapes: nothing is ever loaded in part.
"""

from __future__ import annotations

import json
import math
import re
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn

from .lora import base_weights_hash
from .models.stf import STFConfig, SymmetricalTransFormer
from .utils import atomic_write

# Entropy-coder tables: their shapes depend on the weights (filled by ``update()``).
CODER_BUFFERS = ("_offset", "_quantized_cdf", "_cdf_length", "scale_table")
_OLD_BOTTLENECK_KEY = re.compile(r"^(entropy_bottleneck)\._(matrix|bias|factor)(\d+)$")
_PLURAL = {"matrix": "matrices", "bias": "biases", "factor": "factors"}


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into (another architecture or size)."""


@dataclass
class LoadReport:
    """What :func:`load_state_dict_checked` did besides copying the weights."""

    source: str
    renamed: int = 0
    unused_keys: list[str] = field(default_factory=list)


def is_coder_buffer(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in CODER_BUFFERS


def normalise_keys(state_dict: dict[str, Tensor]) -> tuple[OrderedDict, int]:
    """Strip ``module.`` prefixes and rename the old EntropyBottleneck layout; returns (dict, renamed)."""
    out, renamed = OrderedDict(), 0
    for key, value in state_dict.items():
        new = key
        while new.startswith("module."):
            new = new[len("module."):]
        match = _OLD_BOTTLENECK_KEY.match(new)
        if match:
            new = f"{match[1]}.{_PLURAL[match[2]]}.{match[3]}"
        renamed += new != key
        out[new] = value
    return out, renamed


def unwrap_checkpoint(obj: dict) -> dict[str, Tensor]:
    """The state dict inside a published or own checkpoint object."""
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], dict):
            return obj[key]
    if all(isinstance(v, Tensor) for v in obj.values()):
        return obj
    raise CheckpointMismatchError(f"no state dict found in checkpoint (top-level keys: {list(obj)[:8]})")


def _describe(items: list[str], limit: int = 5) -> str:
    return "; ".join(items[:limit]) + (f"; ... ({len(items)} in all)" if len(items) > limit else "")


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, Tensor],
                            source: str = "checkpoint") -> LoadReport:
    """Copy ``state_dict`` into ``model`` after checking every key and shape; all or nothing.

    Keys the model lacks are reported (``LoadReport.unused_keys``, and a warning)
    rather than failing, as published files may carry modules STF does not use;
    keys the model needs but the file lacks, and any shape difference, raise
    :class:`CheckpointMismatchError`. Entropy-coder tables may differ in shape or be
    absent (``update()`` rebuilds them).
    """
    state_dict, renamed = normalise_keys(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not is_coder_buffer(k)]
    unused = [k for k in state_dict if k not in expected]
    wrong = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items()
             if k in state_dict and not is_coder_buffer(k) and state_dict[k].shape != v.shape]
    if missing or wrong:
        problems = []
        if wrong:
            problems.append(f"shape mismatches: {_describe(wrong)}")
        if missing:
            problems.append(f"missing keys: {_describe(missing)}")
        raise CheckpointMismatchError(
            f"{source} does not fit this {type(model).__name__}; nothing was loaded. " + " | ".join(problems))
    if unused:
        warnings.warn(f"{source}: ignoring {len(unused)} key(s) the model does not use: {_describe(unused)}",
                      stacklevel=2)
    usable = OrderedDict((k, v) for k, v in state_dict.items() if k in expected)
    for key in expected:  # absent coder tables stay empty until update()
        usable.setdefault(key, expected[key])
    model.load_state_dict(usable)
    return LoadReport(source=source, renamed=renamed, unused_keys=unused)


def infer_config(state_dict: dict[str, Tensor]) -> STFConfig:
    """Recover an :class:`STFConfig` from the shapes of an STF state dict."""
    sd, _ = normalise_keys(state_dict)
    try:
        embed_dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
        stages = sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.")})
        depths = [len({k.split(".")[3] for k in sd if k.startswith(f"layers.{i}.blocks.")}) for i in stages]
        heads = [sd[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1] for i in stages]
        table = sd["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
        fc1 = sd.get("layers.0.blocks.0.mlp.fc1.weight", sd.get("layers.0.blocks.0.mlp.fc1.linear.weight"))
        slices = len({k.split(".")[1] for k in sd if k.startswith("cc_mean_transforms.")})
        entropy, latent = sd["h_a.0.weight"].shape[:2]
    except (KeyError, IndexError, AttributeError) as error:
        raise CheckpointMismatchError(f"not an STF state dict: cannot find {error}") from error
    return STFConfig(embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(heads),
                     window_size=(int(math.isqrt(table)) + 1) // 2, mlp_ratio=fc1.shape[0] / embed_dim,
                     num_slices=slices, patch_size=patch,
                     entropy_channels=None if entropy == latent else int(entropy))


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], STFConfig | None, dict]:
    """State dict, configuration (if the file records one) and metadata of a checkpoint file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        state_dict = load_file(str(path))
        config = metadata.get("model_config")
        return state_dict, STFConfig(**json.loads(config)) if config else None, metadata
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors, truncated zip files, foreign objects
        raise CheckpointMismatchError(f"{path} is not a readable PyTorch checkpoint: {error}") from error
    if not isinstance(obj, dict):
        raise CheckpointMismatchError(f"{path} holds a {type(obj).__name__}, not a state dict")
    config = obj.get("model_config") if isinstance(obj.get("model_config"), dict) else None
    metadata = {k: v for k, v in obj.items() if isinstance(v, (str, int, float))}
    return unwrap_checkpoint(obj), STFConfig(**config) if config else None, metadata


def load_stf(path: str | Path, config: STFConfig | None = None, *, update: bool = True) -> SymmetricalTransFormer:
    """Build an STF and load a published or own checkpoint into it, in eval mode.

    The configuration comes from ``config``, else from the file's metadata, else
    from the shapes of the weights (published files carry none). ``update=True``
    fills entropy-coder tables the file does not carry, so ``compress`` works at once.
    """
    state_dict, file_config, _ = read_checkpoint(path)
    model = SymmetricalTransFormer(config or file_config or infer_config(state_dict))
    load_state_dict_checked(model, state_dict, source=str(path))
    if update:
        model.update()
    return model.eval()


def save_stf(path: str | Path, model: SymmetricalTransFormer, metadata: dict | None = None,
             dtype: torch.dtype = torch.float32) -> Path:
    """Save weights as safetensors with the model configuration in the metadata (written atomically).

    ``dtype=torch.float16`` stores the parameters in half precision (half the bytes);
    call it on a model whose coder tables were built from those rounded values
    (:func:`round_weights_`), so that encoder and decoder load the same numbers. Buffers
    keep their precision: the entropy model's constants (scale table, likelihood bound
    1e-9, which float16 would round to 0 and a later fine-tune turn into an infinite rate).
    """
    # Coder tables are saved too: decoding then uses exactly the encoder's CDFs.
    return _write_model_file(path, _stored_tensors(model, dtype), model, {"format": "alice-stf-v1"}, metadata)


def _stored_tensors(model: SymmetricalTransFormer, dtype: torch.dtype) -> dict[str, Tensor]:
    """The state dict as a file stores it: parameters in ``dtype``, buffers (constants, coder tables) at
    their precision, integer constants narrowed losslessly (:func:`_narrowed`)."""
    parameters = {name for name, _ in model.named_parameters()}
    return {k: (v.to(dtype) if k in parameters and v.is_floating_point() else _narrowed(k, v)).detach().contiguous()
            for k, v in model.state_dict().items()}


def _narrowed(key: str, value: Tensor) -> Tensor:
    """An integer constant that is not a coder table in int16 when its values fit, else as it is.

    The window attention's ``relative_position_index`` is int64 in the model and holds values
    below (2 * window - 1)^2: int16 stores it exactly in a quarter of the bytes (0.2 MB of the
    CPU model's float16 file, in a package with a size budget); loading copies it back into
    the model's int64 buffer. Coder tables keep the types CompressAI gives them.
    """
    if value.is_floating_point() or is_coder_buffer(key) or value.element_size() <= 2 or not value.numel():
        return value  # already 16 bits or fewer (int16, int8, uint8, bool), or nothing to narrow
    info = torch.iinfo(torch.int16)
    return value.to(torch.int16) if info.min <= int(value.min()) and int(value.max()) <= info.max else value


def _write_model_file(path: str | Path, tensors: dict[str, Tensor], model: SymmetricalTransFormer,
                      header: dict[str, str], metadata: dict | None) -> Path:
    """A safetensors file (written atomically) whose metadata holds ``header``, the model's
    configuration and ``metadata`` (values that are not strings as JSON)."""
    meta = {**header, "model_config": json.dumps(model.config.to_dict())}
    meta.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in (metadata or {}).items()})
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def ship_stf(path: str | Path, model: SymmetricalTransFormer, metadata: dict | None = None,
             dtype: torch.dtype = torch.float16) -> Path:
    """Save a model as it ships: weights rounded to ``dtype`` in place, coder tables rebuilt, then saved.

    The tables are built from exactly the stored values, so a file's encoder and decoder
    (and any machine loading it) read the same numbers and bitstreams stay decodable.
    """
    return save_stf(path, stored_as(model, dtype), {**(metadata or {}), "storage": str(dtype)}, dtype=dtype)


def stored_as(model: SymmetricalTransFormer, dtype: torch.dtype) -> SymmetricalTransFormer:
    """``model`` as a ``dtype`` file will hold it, in place: parameters rounded, coder tables rebuilt from them."""
    round_weights_(model, dtype)
    model.eval().update(force=True)
    return model


WEIGHT_DELTA_FORMAT = "alice-stf-delta-v1"


def save_weight_delta(path: str | Path, model: SymmetricalTransFormer, base: SymmetricalTransFormer,
                      metadata: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Save only what of ``model`` differs from ``base``: parameters in ``dtype``, buffers as they are.

    How a model fine-tuned from the anchor ships: ``vanilla`` changes ``fc1``/``fc2``
    only (about two fifths of the CPU-scale model), a ``full`` fine-tune every parameter
    but none of the constants (window indexes, the Gaussian coder's table). Call it on a
    model rounded to ``dtype`` with its coder tables rebuilt (:func:`stored_as`): tables
    that differ from the base's are stored, so a file decodes with exactly the tables it
    was encoded with. Tied to its base by the hash of the base's weights
    (:func:`~alice_lib.lora.base_weights_hash`), like an adapter file;
    :func:`load_weight_delta` rebuilds the model on that base and refuses any other.
    """
    if model.config != base.config:
        raise ValueError(f"the model ({model.config}) and its base ({base.config}) differ in architecture")
    base_state, stored = base.state_dict(), _stored_tensors(model, dtype)
    changed = {key: stored[key] for key, value in model.state_dict().items()
               if value.shape != base_state[key].shape or not torch.equal(value, base_state[key])}
    if not changed:
        raise ValueError("the model does not differ from its base: nothing to save")
    header = {"format": WEIGHT_DELTA_FORMAT, "base_hash": base_weights_hash(base), "storage": str(dtype)}
    return _write_model_file(path, changed, model, header, metadata)


def load_weight_delta(path: str | Path, base: SymmetricalTransFormer) -> SymmetricalTransFormer:
    """The model of a :func:`save_weight_delta` file, rebuilt on ``base`` (left unchanged), in eval mode.

    Refused, before anything is built, when ``base`` is not the model the file was saved
    against (another architecture or other weights). The coder tables are the file's
    where it has them and the base's otherwise: nothing is recomputed.
    """
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != WEIGHT_DELTA_FORMAT:
        raise ValueError(f"{path} is not a weight-delta file (format {meta.get('format')!r})")
    if STFConfig(**json.loads(meta["model_config"])) != base.config:
        raise ValueError(f"{path} was saved for another architecture than the base model's")
    if meta["base_hash"] != base_weights_hash(base):
        raise ValueError(f"{path}: saved against base weights with hash {meta['base_hash']}, but the base "
                         f"model's weights hash to {base_weights_hash(base)}; load the matching base model")
    state = base.state_dict()
    delta = load_file(str(path))
    unknown = sorted(set(delta) - set(state))
    if unknown:
        raise ValueError(f"{path}: tensors the model does not have: {_describe(unknown)}")
    state.update({k: v.to(state[k].dtype) for k, v in delta.items()})
    model = SymmetricalTransFormer(base.config)
    load_state_dict_checked(model, state, source=str(path))
    return model.eval()


def round_weights_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Round every floating-point parameter to ``dtype`` and back, in place (buffers, constants, stay)."""
    with torch.no_grad():
        for tensor in model.parameters():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype))
    return model


def deterministic_weights_(model: nn.Module) -> nn.Module:
    """Set the weights by the rule of ``shared/conformance/README.md`` (name- and shape-seeded).

    The published implementation computed the golden outputs with these weights;
    ``.linear.`` is dropped from names so adapted layers keep the plain weights.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("entropy_bottleneck."):
                if ".biases." in name:
                    p.zero_()
                continue
            seed = zlib.crc32(name.replace(".linear.", ".").encode())
            r = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(r / math.sqrt(p[0].numel()))
            elif name.endswith(".weight"):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.1 * r)
    return model


# ----------------------------------------------------------------------------- the shipped CPU models
#: Where the package ships the CPU profile's models (``profiles/cpu.yaml``).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_ANCHOR = "cpu_anchor.safetensors"
_SHIPPED_ADAPTER = re.compile(r"^cpu_alice_(\d+(?:\.\d+)?(?:e-?\d+)?)\.safetensors$")


def shipped_weights(weights_dir: str | Path | None = None) -> tuple[Path, list[Path]]:
    """The CPU profile's shipped anchor and ALICE adapter files (``cpu_alice_<lambda>.safetensors``), by lambda.

    Here, below the codec's users, so that the command line and the notebooks find the
    default weights the same way. ``FileNotFoundError`` when the anchor is absent.
    """
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    anchor = weights_dir / SHIPPED_ANCHOR
    if not anchor.is_file():
        raise FileNotFoundError(f"the shipped CPU model {anchor} is missing (reinstall the package)")
    adapters = sorted((p for p in weights_dir.glob("cpu_alice_*.safetensors") if _SHIPPED_ADAPTER.match(p.name)),
                      key=lambda p: float(_SHIPPED_ADAPTER.match(p.name).group(1)))
    return anchor, adapters
