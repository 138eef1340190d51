"""Low-rank adapters for STF: ALICE, its vanilla baseline, and MALICE merging.

ALICE (Buysse et al., "ALICE: Adapt your Learnable Image Compression modEl for
variable bitrates", VCIP 2024) keeps one fixed-rate STF frozen and, for every
other rate, trains low-rank adapters (LoRA: Hu et al., "LoRA: Low-Rank
Adaptation of Large Language Models", ICLR 2022) on the MLP layers of the Swin
blocks. "Vanilla" adaptation fine-tunes the same layers directly; MALICE merges
the adapters into the weights so that inference costs what the plain model costs.

The adapters know nothing about STF beyond the names of the layers they target:
``layers.<i>.blocks.<j>.mlp.fc1`` (encoder stage ``i``) and
``syn_layers.<i>.blocks.<j>.mlp.fc1`` (decoder stage ``i``), likewise ``fc2`` and,
optionally, ``attn.qkv`` / ``attn.proj`` and, beyond the published layout, each stage's
resampling linear ``downsample.reduction`` (a probe of what MLP-only adapters cannot
reach; off by default). Parameter names reproduce the published
ALICE checkpoints: an adapted layer ``L`` stores ``L.linear.weight``,
``L.linear.bias``, ``L.lora.W_a`` (``[in, r]``) and ``L.lora.W_b`` (``[r, out]``),
and computes ``linear(x) + alpha * (x @ W_a @ W_b)`` (alpha is *not* divided by
the rank, unlike the LoRA paper's ``alpha / r``). Adapter files are :mod:`alice_lib.adapter_files`.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import yaml
from torch import Tensor, nn

__all__ = [
    "MODES",
    "LoRAConfig", "LoRAAdapter", "LoRALinear",
    "target_names", "inject_lora", "config_of", "lora_modules", "has_lora",
    "trainable_names", "mark_trainable",
    "merge_lora", "unmerge_lora", "strip_lora", "merged_state_dict", "base_state_dict",
    "lora_state_dict", "load_lora_state_dict", "base_weights_hash",
    "lora_delta", "remove_lora",
    "count_parameters", "parameter_table",
]

MODES = ("lora", "vanilla", "full")

# Buffers that CompressAI's entropy models rebuild with ``update()``: they depend on the
# weights but are not weights, and they are empty before ``update()``, so hashing them
# would make the "same base" test depend on whether update() was called.
_CODER_BUFFER_SUFFIXES = ("_offset", "_quantized_cdf", "_cdf_length", "scale_table")

# <stack>.<stage>.blocks.<block>.<layer>, where <stack> is the encoder or the decoder. A
# leading prefix is allowed so that wrapped models (DDP's "module.", torch.compile's
# "_orig_mod.") are recognised too.
_TARGET_RE = re.compile(r"(?:^|\.)(layers|syn_layers)\.(\d+)\."
                        r"(?:blocks\.\d+\.(mlp\.fc1|mlp\.fc2|attn\.qkv|attn\.proj)|(downsample\.reduction))$")
_STACK_FIELD = {"layers": "encoder", "syn_layers": "decoder"}
_LAYER_FIELD = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "attn.qkv": "attn_qkv", "attn.proj": "attn_proj",
                "downsample.reduction": "downsample_reduction"}
# Spellings accepted when reading YAML (the published file has no attention keys).
_YAML_ALIASES = {"qkv": "attn_qkv", "proj": "attn_proj", "rank": "r"}


# ---------------------------------------------------------------------------- config
@dataclass
class LoRAConfig:
    """Which layers get adapters, and their rank / scale (the published ``lora_8_8.yml``).

    ``encoder[i]`` / ``decoder[i]`` switch the adapters of encoder stage ``layers.i`` /
    decoder stage ``syn_layers.i`` on or off.
    """

    r: int = 8
    alpha: float = 8.0
    mlp_fc1: bool = True
    mlp_fc2: bool = True
    attn_qkv: bool = False
    attn_proj: bool = False
    downsample_reduction: bool = False  # not in the paper: PatchMerging / PatchSplit's linear, per stage
    encoder: list[bool] = field(default_factory=lambda: [True] * 4)
    decoder: list[bool] = field(default_factory=lambda: [True] * 4)

    def __post_init__(self) -> None:
        if int(self.r) != self.r or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        self.r = int(self.r)
        self.alpha = float(self.alpha)
        self.encoder = [bool(b) for b in self.encoder]
        self.decoder = [bool(b) for b in self.decoder]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        data = {_YAML_ALIASES.get(k, k): v for k, v in dict(data).items()}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown LoRA config keys: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> LoRAConfig:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of LoRA settings")
        return cls.from_dict(data)

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Write in the published layout; the optional targets only when switched on."""
        # An integral alpha is written as an int, as in the published file ("alpha: 8").
        alpha = int(self.alpha) if self.alpha.is_integer() else self.alpha
        data: dict[str, Any] = {"r": self.r, "alpha": alpha, "mlp_fc1": self.mlp_fc1,
                                "mlp_fc2": self.mlp_fc2}
        if self.attn_qkv:
            data["attn_qkv"] = True
        if self.attn_proj:
            data["attn_proj"] = True
        if self.downsample_reduction:
            data["downsample_reduction"] = True
        data["encoder"], data["decoder"] = list(self.encoder), list(self.decoder)
        with open(path, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------------------- modules
class LoRAAdapter(nn.Module):
    """The low-rank update ``alpha * (x @ W_a @ W_b)`` (Hu et al., ICLR 2022; ALICE layout)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float,
                 generator: torch.Generator | None = None, device=None, dtype=None):
        super().__init__()
        self.r, self.alpha = int(r), float(alpha)
        # W_a ~ N(0, 1/r), W_b = 0: the adapted layer starts equal to the frozen one.
        w_a = torch.randn(in_features, r, generator=generator, dtype=torch.float32) / math.sqrt(r)
        self.W_a = nn.Parameter(w_a.to(device=device, dtype=dtype or torch.float32))
        self.W_b = nn.Parameter(torch.zeros(r, out_features, device=device, dtype=dtype or torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return self.alpha * ((x @ self.W_a) @ self.W_b)

    def delta_weight(self) -> Tensor:
        """The update in ``nn.Linear`` layout ``[out, in]``."""
        return lora_delta(self.W_a, self.W_b, self.alpha)


def lora_delta(w_a: Tensor, w_b: Tensor, alpha: float) -> Tensor:
    """``alpha * (W_a @ W_b)^T``: an adapter's merged update in ``nn.Linear`` layout (MALICE)."""
    return alpha * (w_a @ w_b).T

    def extra_repr(self) -> str:
        return f"in={self.W_a.shape[0]}, out={self.W_b.shape[1]}, r={self.r}, alpha={self.alpha}"


class LoRALinear(nn.Module):
    """An ``nn.Linear`` (frozen in ALICE) plus a :class:`LoRAAdapter`.

    ``merge()`` folds the adapter into ``linear.weight`` (MALICE) and disables the
    adapter path; ``unmerge()`` restores the exact pre-merge weight from a copy taken
    at merge time, so any number of merge / unmerge cycles cannot drift the base
    weights (subtracting the update back would accumulate float rounding).
    Changes made to ``linear.weight`` while merged are discarded by ``unmerge()``.
    """

    def __init__(self, linear: nn.Linear, r: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.linear = linear
        self.lora = LoRAAdapter(linear.in_features, linear.out_features, r, alpha, generator,
                                device=linear.weight.device, dtype=linear.weight.dtype)
        # Non-persistent: the backup must move with .to() but never enter a state dict.
        self.register_buffer("premerge_weight", None, persistent=False)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def merged(self) -> bool:
        return self.premerge_weight is not None

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.linear(x)
        return self.linear(x) + self.lora(x)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``alpha * (W_a @ W_b).T`` into ``linear.weight``; a no-op when already merged."""
        if self.merged:
            return
        weight = self.linear.weight
        self.premerge_weight = weight.detach().clone()
        weight.add_(self.lora.delta_weight().to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weight saved by :meth:`merge`; a no-op when not merged."""
        if not self.merged:
            return
        self.linear.weight.copy_(self.premerge_weight)
        self.premerge_weight = None

    @torch.no_grad()
    def base_weight(self) -> Tensor:
        """The frozen weight the adapter sits on, merged or not."""
        return self.premerge_weight if self.merged else self.linear.weight.detach()

    @torch.no_grad()
    def effective_weight(self) -> Tensor:
        """The weight of an equivalent plain ``nn.Linear``."""
        if self.merged:
            return self.linear.weight.detach()
        return self.linear.weight.detach() + self.lora.delta_weight().to(self.linear.weight.dtype)


# ---------------------------------------------------------------------------- injection
def _target_of(name: str) -> tuple[str, int, str] | None:
    """``(stack, stage, layer)`` of a layer an adapter could target, e.g. ``("layers", 2, "mlp.fc1")``."""
    match = _TARGET_RE.search(name)
    if match is None:
        return None
    return match.group(1), int(match.group(2)), match.group(3) or match.group(4)


def target_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Dotted names of the layers ``config`` targets, in module order.

    Both plain ``nn.Linear`` and already adapted :class:`LoRALinear` layers are
    listed, so the same call serves injection and vanilla fine-tuning.
    """
    names = []
    for name, module in model.named_modules():
        target = _target_of(name)
        if target is None or not isinstance(module, (nn.Linear, LoRALinear)):
            continue
        stack, stage, layer = target
        stages = getattr(config, _STACK_FIELD[stack])
        if stage >= len(stages):
            raise ValueError(f"{name}: the LoRA config lists {len(stages)} {_STACK_FIELD[stack]} "
                             f"stages but the model has a stage {stage}")
        if stages[stage] and getattr(config, _LAYER_FIELD[layer]):
            names.append(name)
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every adapted layer of ``model`` by dotted name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def inject_lora(model: nn.Module, config: LoRAConfig, generator: torch.Generator | None = None) -> nn.Module:
    """Replace every targeted ``nn.Linear`` by a :class:`LoRALinear`, in place (ALICE).

    ``generator`` seeds the ``W_a`` draws (layers are visited in module order), so
    two injections with equally seeded generators give identical adapters.
    """
    names = target_names(model, config)
    if not names:
        raise ValueError("the LoRA config targets no layer of this model")
    already = [n for n in names if isinstance(model.get_submodule(n), LoRALinear)]
    if already:
        raise ValueError(f"model already has adapters (e.g. {already[0]}); load or reset them instead")
    for name in names:
        linear = model.get_submodule(name)
        _set_submodule(model, name, LoRALinear(linear, config.r, config.alpha, generator))
    return model


def config_of(model: nn.Module) -> LoRAConfig | None:
    """The config of the adapters present in ``model`` (None when there are none)."""
    found = lora_modules(model)
    if not found:
        return None
    first = next(iter(found.values())).lora
    cfg = LoRAConfig(r=first.r, alpha=first.alpha, mlp_fc1=False, mlp_fc2=False,
                     encoder=[False] * 4, decoder=[False] * 4)
    for name in found:
        stack, stage, layer = _target_of(name)  # type: ignore[misc]
        setattr(cfg, _LAYER_FIELD[layer], True)
        stages = getattr(cfg, _STACK_FIELD[stack])
        stages.extend([False] * (stage + 1 - len(stages)))
        stages[stage] = True
    return cfg


# ---------------------------------------------------------------------------- training modes
def _adapter_names(model: nn.Module) -> list[str]:
    return [f"{name}.lora.{p}" for name in lora_modules(model) for p in ("W_a", "W_b")]


def trainable_names(model: nn.Module, mode: str, config: LoRAConfig | None = None,
                    also: Sequence[str] = ()) -> list[str]:
    """Names of the parameters that train in ``mode`` (without changing the model).

    ``lora``: only the adapters (entropy models and everything else frozen, as in
    ALICE). ``vanilla``: only the weights and biases of the targeted layers (the
    ALICE baseline); the targets come from ``config``, else from the adapters
    present, else the default config. ``full``: every parameter.

    ``also`` (ablations, not the paper's methods): top-level module names whose
    parameters train as well, e.g. ``SymmetricalTransFormer.ENTROPY_MODEL``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}; expected one of {MODES}")
    all_names = [n for n, _ in model.named_parameters()]
    if mode == "full":
        return all_names
    if also:
        modules = set(also)
        unknown = sorted(modules - {n for n, _ in model.named_children()})
        if unknown:
            raise ValueError(f"no top-level module named {unknown} in {type(model).__name__}")
        extra = {n for n in all_names if n.split(".", 1)[0] in modules}
        chosen = set(trainable_names(model, mode, config)) | extra
        return [n for n in all_names if n in chosen]
    if mode == "lora":
        if not has_lora(model):
            raise ValueError("mode 'lora' needs adapters: call inject_lora(model, config) first")
        adapters = set(_adapter_names(model))
        return [n for n in all_names if n in adapters]
    config = config or config_of(model) or LoRAConfig()
    modules = dict(model.named_modules())
    wanted: set[str] = set()
    for name in target_names(model, config):
        # An adapted layer keeps its frozen weights in .linear.
        owner = f"{name}.linear" if isinstance(modules[name], LoRALinear) else name
        wanted.update(f"{owner}.{p}" for p, _ in modules[owner].named_parameters(recurse=False))
    return [n for n in all_names if n in wanted]


def mark_trainable(model: nn.Module, mode: str, config: LoRAConfig | None = None,
                   also: Sequence[str] = ()) -> list[str]:
    """Set ``requires_grad`` for ``mode`` (see :func:`trainable_names`); return the trainable names."""
    names = trainable_names(model, mode, config, also)
    chosen = set(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return names


# ---------------------------------------------------------------------------- MALICE merging
def merge_lora(model: nn.Module, strip: bool = False) -> nn.Module:
    """Fold every adapter into its linear layer, in place (MALICE).

    With ``strip=True`` the adapted layers are then replaced by their plain
    ``nn.Linear`` (see :func:`strip_lora`), which cannot be undone.
    """
    for module in lora_modules(model).values():
        module.merge()
    return strip_lora(model) if strip else model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (without strip), restoring the exact base weights."""
    for module in lora_modules(model).values():
        module.unmerge()
    return model


def strip_lora(model: nn.Module) -> nn.Module:
    """Merge and replace every :class:`LoRALinear` by its ``nn.Linear``, in place.

    The result is an ordinary model whose state dict loads, strictly, into the
    plain architecture (e.g. a fresh ``SymmetricalTransFormer``).
    """
    for name, module in lora_modules(model).items():
        module.merge()
        module.premerge_weight = None  # the backup is useless once the adapter is gone
        _set_submodule(model, name, module.linear)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop every adapter (unmerged first), in place: the frozen base model as an ordinary STF."""
    for name, module in lora_modules(model).items():
        module.unmerge()
        _set_submodule(model, name, module.linear)
    return model


def _plain_state_dict(model: nn.Module, weight_of: Callable[[LoRALinear], Tensor]) -> dict[str, Tensor]:
    """The state dict with adapted layers renamed to plain ``nn.Linear`` keys, in order."""
    adapted = lora_modules(model)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        owner, _, sub = prefix.rpartition(".")
        if owner in adapted and sub == "lora":
            continue
        if owner in adapted and sub == "linear":
            out[f"{owner}.{leaf}"] = weight_of(adapted[owner]) if leaf == "weight" else value
        else:
            out[key] = value
    return out


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A plain state dict with the adapters folded in; the model is left as it is."""
    return _plain_state_dict(model, LoRALinear.effective_weight)


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A plain state dict of the frozen base model (adapters ignored, merged or not)."""
    return _plain_state_dict(model, LoRALinear.base_weight)


# ---------------------------------------------------------------------------- adapter tensors
def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors, keyed as in the full state dict (``<layer>.lora.W_a`` ...)."""
    out: dict[str, Tensor] = {}
    for name, module in lora_modules(model).items():
        out[f"{name}.lora.W_a"] = module.lora.W_a.detach()
        out[f"{name}.lora.W_b"] = module.lora.W_b.detach()
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Copy adapter tensors into ``model`` (keys and shapes must match exactly).

    Merged layers are re-merged with the new adapters, so a merged model switches
    rate without ever touching the base weights (the merge backup is restored first).
    """
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter keys do not match the model: missing {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''} ({len(missing)}), unexpected "
                         f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''} ({len(unexpected)})")
    for key, target in expected.items():
        if tuple(state_dict[key].shape) != tuple(target.shape):
            raise ValueError(f"{key}: shape {tuple(state_dict[key].shape)} != model's {tuple(target.shape)}")
    for name, module in lora_modules(model).items():
        was_merged = module.merged
        module.unmerge()
        module.lora.W_a.copy_(state_dict[f"{name}.lora.W_a"])
        module.lora.W_b.copy_(state_dict[f"{name}.lora.W_b"])
        if was_merged:
            module.merge()


def _is_coder_buffer(name: str) -> bool:
    return name.endswith(_CODER_BUFFER_SUFFIXES)


def base_weights_hash(model: nn.Module, length: int = 16) -> str:
    """SHA-256 (first ``length`` hex digits) of the frozen base weights.

    Keys are the plain model's (``.linear.`` dropped), adapters and the entropy
    coder's derived buffers are left out, and merged layers count with their
    pre-merge weights: a plain model, the same model with adapters, and the same
    model merged all hash alike. Names, dtypes and shapes are hashed with the bytes
    so that a reshaped or renamed tensor cannot collide.
    """
    digest = hashlib.sha256()
    state = base_state_dict(model)
    for name in sorted(state):
        if _is_coder_buffer(name):
            continue
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:length]


# ---------------------------------------------------------------------------- accounting
def _numel(params: Iterable[Tensor]) -> int:
    return sum(p.numel() for p in params)


def count_parameters(model: nn.Module, mode: str, config: LoRAConfig | None = None) -> dict[str, int]:
    """Parameter counts for the figures.

    ``total``: the base model (adapters excluded); ``trainable``: what trains in
    ``mode``; ``stored_per_rate``: what must be stored for each extra rate (lora: the
    adapters; vanilla: the targeted layers; full: a whole model). On a model without
    adapters the lora counts are computed from ``config`` (``r * (in + out)`` per
    targeted layer) without injecting anything.
    """
    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}; expected one of {MODES}")
    params = dict(model.named_parameters())
    adapters = set(_adapter_names(model))
    total = _numel(p for n, p in params.items() if n not in adapters)
    if mode == "full":
        # Everything trains (adapters too, if present); a whole base model is stored per rate.
        trainable, stored = _numel(params.values()), total
    elif mode == "vanilla":
        trainable = stored = _numel(params[n] for n in trainable_names(model, "vanilla", config))
    elif adapters:
        trainable = stored = _numel(params[n] for n in adapters)
    else:
        config = config or LoRAConfig()
        modules = dict(model.named_modules())
        trainable = stored = sum(config.r * (modules[n].in_features + modules[n].out_features)
                                 for n in target_names(model, config))
    return {"total": total, "trainable": trainable, "stored_per_rate": stored}


def parameter_table(model: nn.Module | Callable[[], nn.Module],
                    config: LoRAConfig | None = None) -> list[dict[str, Any]]:
    """One row per mode (lora, vanilla, full) with counts and the stored fraction of the base.

    ``model`` may be a model or a factory returning one (called once).
    """
    if not isinstance(model, nn.Module):
        model = model()
    config = config or config_of(model) or LoRAConfig()
    rows = []
    for mode in MODES:
        counts = count_parameters(model, mode, config)
        rows.append({"mode": mode, **counts, "stored_fraction": counts["stored_per_rate"] / counts["total"]})
    return rows
