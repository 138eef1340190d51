"""ALICE adapter files: only the LoRA factors of one rate, with the lambda, the LoRA layout
and the hash of the base weights they were trained on (:func:`~alice_lib.lora.base_weights_hash`).

A file is refused, before anything changes, when it meets other base weights or a layout
that does not fit the model: adapters trained on one anchor compute garbage on another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .lora import (LoRAConfig, base_weights_hash, config_of, has_lora, inject_lora, load_lora_state_dict,
                   lora_modules, lora_state_dict, target_names)
from .utils import atomic_write

ADAPTER_FORMAT = "alice-lora"
ADAPTER_FORMAT_VERSION = 1


def save_adapters(path: str | os.PathLike, model: nn.Module, *, lmbda: float, config: LoRAConfig,
                  extra_metadata: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write only the adapter tensors, with metadata, to a safetensors file (atomically).

    ``dtype=torch.float16`` halves the file (how the CPU profile ships them); loading
    casts back to the model's precision.

    Metadata (JSON strings): ``format``, ``format_version``, ``lambda``,
    ``lora_config``, ``base_hash`` (:func:`base_weights_hash` of the model the
    adapters sit on) and ``extra``.
    """
    present = config_of(model)
    if present is None:
        raise ValueError("the model has no adapters to save")
    if (set(target_names(model, config)) != set(lora_modules(model))
            or (present.r, present.alpha) != (config.r, config.alpha)):
        raise ValueError("the given LoRA config does not describe the adapters in the model")
    tensors = {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in lora_state_dict(model).items()}
    metadata = {
        "format": ADAPTER_FORMAT,
        "format_version": json.dumps(ADAPTER_FORMAT_VERSION),
        "lambda": json.dumps(float(lmbda)),
        "lora_config": json.dumps(config.to_dict()),
        "base_hash": base_weights_hash(model),
        "extra": json.dumps(extra_metadata or {}),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Parsed metadata of an adapter file: lambda, config, base_hash, format_version, extra."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if raw.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not an ALICE adapter file (format {raw.get('format')!r})")
    version = json.loads(raw["format_version"])
    if version > ADAPTER_FORMAT_VERSION:
        raise ValueError(f"{path}: adapter format version {version} is newer than this code's "
                         f"({ADAPTER_FORMAT_VERSION})")
    return {
        "lambda": json.loads(raw["lambda"]),
        "config": LoRAConfig.from_dict(json.loads(raw["lora_config"])),
        "base_hash": raw["base_hash"],
        "format_version": version,
        "extra": json.loads(raw.get("extra", "{}")),
    }


def read_adapter_factors(path: str | os.PathLike, model: nn.Module
                         ) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """An adapter file checked against a plain ``model`` without changing it.

    Returns ``(metadata, tensors as stored, {layer: (W_a, W_b)} in float32 on the
    model's device)``. Refuses a file trained on other base weights, one whose tensors
    are not exactly those its config targets in ``model``, and shapes that do not fit.
    """
    meta = _metadata_for(path, model)
    config: LoRAConfig = meta["config"]
    tensors = load_file(str(path))
    names = target_names(model, config)
    expected = {f"{n}.lora.{p}" for n in names for p in ("W_a", "W_b")}
    if set(tensors) != expected:
        raise ValueError(f"{path}: adapter tensors do not match the layers its config targets "
                         f"({len(tensors)} tensors, {len(expected)} expected)")
    factors = {}
    for name in names:
        w_a, w_b = tensors[f"{name}.lora.W_a"].float(), tensors[f"{name}.lora.W_b"].float()
        weight = model.get_submodule(name).weight
        if w_a.shape != (weight.shape[1], config.r) or w_b.shape != (config.r, weight.shape[0]):
            raise ValueError(f"{path}: {name} adapter shapes {tuple(w_a.shape)}, {tuple(w_b.shape)} do not "
                             f"fit the layer {tuple(weight.shape)} at rank {config.r}")
        factors[name] = (w_a.to(weight.device), w_b.to(weight.device))
    return meta, tensors, factors


def _metadata_for(path: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """An adapter file's metadata, refused unless it was trained on exactly ``model``'s base weights."""
    meta = read_adapter_metadata(path)
    model_hash = base_weights_hash(model)
    if model_hash != meta["base_hash"]:
        raise ValueError(f"{path}: these adapters were trained on base weights with hash {meta['base_hash']}, "
                         f"but the model's base weights hash to {model_hash}; load the matching base model")
    return meta


def load_adapters(path: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """Load an adapter file onto ``model`` (injecting adapters first if it has none).

    Refuses, before changing anything, when the model's base weights are not the
    ones the adapters were trained on. Returns :func:`read_adapter_metadata`.
    """
    meta = _metadata_for(path, model)
    config: LoRAConfig = meta["config"]
    if not has_lora(model):
        inject_lora(model, config)
    else:
        present = config_of(model)
        # Same keys but another alpha would load silently and compute something else.
        if (set(target_names(model, config)) != set(lora_modules(model))
                or (present.r, present.alpha) != (config.r, config.alpha)):
            raise ValueError(f"{path}: the model's adapters (r={present.r}, alpha={present.alpha}) do not match "
                             f"the file's config (r={config.r}, alpha={config.alpha}) or its target layers")
    device = next(iter(lora_modules(model).values())).lora.W_a.device
    load_lora_state_dict(model, load_file(str(path), device=str(device)))
    return meta


def file_sizes(adapter_path: str | os.PathLike, checkpoint_path: str | os.PathLike) -> dict[str, Any]:
    """Bytes of an adapter file next to a full checkpoint (ALICE's storage argument)."""
    adapter, checkpoint = os.path.getsize(adapter_path), os.path.getsize(checkpoint_path)
    return {"adapter_bytes": adapter, "checkpoint_bytes": checkpoint, "ratio": adapter / checkpoint}


__all__ = ["ADAPTER_FORMAT", "ADAPTER_FORMAT_VERSION", "save_adapters", "read_adapter_metadata",
           "read_adapter_factors", "load_adapters", "file_sizes"]
