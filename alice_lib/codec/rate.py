"""Continuous rate control between the anchor and trained ALICE adapters.

ALICE (Buysse et al., VCIP 2024) serves a handful of discrete rates: one frozen STF
at the anchor lambda plus one low-rank adapter set per other lambda. This module
turns those points into a continuous rate, built on :mod:`alice_lib.lora` (files,
checks and the merged update ``dW = alpha * (W_a @ W_b)^T`` all come from there):

* ``mode="interpolate"``: between the two trained rates ``A`` and ``B`` that
  bracket the control value, every adapted layer gets
  ``W = W0 + (1 - t) * dW_A + t * dW_B`` with ``t`` the position of the control
  between the two. The anchor is the point with ``dW = 0``.
* ``mode="alpha"``: the idea of CALICE (one adapter set whose LoRA scale ``alpha``
  is multiplied by a factor): ``W = W0 + s * dW_X`` with ``X`` the trained adapter
  at the far end (seen from the anchor) of the interval that holds the control,
  and ``s`` the control's position between the anchor and ``X`` in log-lambda.

The control value is ``ln(lambda)``. Both modes reproduce the trained adapters (and
the anchor) exactly at their control values, bit for bit equal to
:func:`alice_lib.lora.merge_lora`. The model handed out is an ordinary STF whose
adapted layers are rewritten from a saved copy of the base weights at every switch,
so switching back and forth never accumulates float drift. Only the Swin blocks
carry adapters; the entropy model (and so the rANS tables) is the anchor's.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapter_files import read_adapter_factors, read_adapter_metadata
from ..lora import base_weights_hash, lora_delta, remove_lora
from ..models.stf import SymmetricalTransFormer

__all__ = ["ANCHOR_LMBDA", "RATE_MODES", "RateControl", "adapter_hash"]

ANCHOR_LMBDA = 0.0483
RATE_MODES = ("interpolate", "alpha")


def _identity_digest(tensors: Mapping[str, Tensor], lmbda: float) -> str:
    """The adapter identity stored in ``.alice`` files: frozen by the format, do not change.

    (Not :func:`alice_lib.utils.tensors_hash`: files written since version 1 carry this
    digest, and a different spelling would make them refuse their own adapters.)
    """
    digest = hashlib.sha256(f"lambda|{float(lmbda)!r}\n".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def adapter_hash(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of an adapter file's tensors and lambda (its metadata text is not hashed)."""
    from safetensors.torch import load_file

    return _identity_digest(load_file(str(path)), read_adapter_metadata(path)["lambda"])


@dataclass
class _AdapterSet:
    lmbda: float
    path: str
    alpha: float
    factors: dict[str, tuple[Tensor, Tensor]]  # layer -> (W_a, W_b)
    digest: str

    def delta(self, layer: str) -> Tensor | None:
        """The merged update of ``layer`` (:func:`alice_lib.lora.lora_delta`), or None."""
        if layer not in self.factors:
            return None
        return lora_delta(*self.factors[layer], self.alpha)


def _check_mode(mode: str) -> str:
    if mode not in RATE_MODES:
        raise ValueError(f"unknown rate-control mode {mode!r}; use 'interpolate' or 'alpha'")
    return mode


class RateControl:
    """Continuous rate between the anchor and trained ALICE adapters.

    ``RateControl(anchor_model, adapters, mode)``: ``adapters`` maps lambda -> adapter
    file (or is a list of files, lambdas read from their metadata). Each file must
    have been trained on ``anchor_model`` (same :func:`base_weights_hash`). The control
    value is ``ln(lambda)``; :attr:`range` covers the trained points and the anchor.
    :meth:`model_at` returns the one STF this object owns (a copy of the anchor unless
    ``copy=False``), switched to that control.
    """

    def __init__(self, anchor_model: nn.Module, adapters: Mapping[float, str | os.PathLike] |
                 Sequence[str | os.PathLike] | None = None, mode: str = "interpolate",
                 anchor_lmbda: float = ANCHOR_LMBDA, copy: bool = True):
        self.mode = _check_mode(mode)
        if not (anchor_lmbda > 0 and math.isfinite(anchor_lmbda)):
            raise ValueError(f"anchor lambda must be positive, got {anchor_lmbda!r}")
        self.anchor_lmbda = float(anchor_lmbda)
        model = _copy_module(anchor_model) if copy else anchor_model
        self.model = remove_lora(model).eval()
        self.base_hash = base_weights_hash(self.model)
        if not isinstance(adapters or {}, Mapping):
            adapters = {read_adapter_metadata(p)["lambda"]: p for p in adapters}
        self.sets: dict[float, _AdapterSet] = {}
        for lmbda, path in sorted((adapters or {}).items()):
            self._add(float(lmbda), path)
        self.lmbdas = sorted({self.anchor_lmbda, *self.sets})
        if len(self.lmbdas) != len(self.sets) + 1:
            raise ValueError(f"an adapter set sits at the anchor lambda {self.anchor_lmbda}")
        self.controls = [math.log(x) for x in self.lmbdas]
        self.layers = sorted({name for s in self.sets.values() for name in s.factors})
        self._linears = {name: self.model.get_submodule(name) for name in self.layers}
        self._base = {name: m.weight.detach().clone() for name, m in self._linears.items()}
        self._shared = {"current": None, "twins": {mode: self}}

    def with_mode(self, mode: str) -> RateControl:
        """A RateControl in ``mode`` sharing this one's model and adapters (built once)."""
        twins = self._shared["twins"]
        if _check_mode(mode) not in twins:
            twin = copy.copy(self)
            twin.mode = mode
            twins[mode] = twin
        return twins[mode]

    def _add(self, lmbda: float, path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"adapter file {path} does not exist")
        if not (lmbda > 0 and math.isfinite(lmbda)):
            raise ValueError(f"{path}: lambda must be positive, got {lmbda}")
        meta, tensors, factors = read_adapter_factors(path, self.model)
        if not math.isclose(meta["lambda"], lmbda, rel_tol=1e-6):
            raise ValueError(f"{path}: the file says lambda {meta['lambda']}, it was given as {lmbda}")
        self.sets[lmbda] = _AdapterSet(lmbda, str(path), meta["config"].alpha, factors,
                                       _identity_digest(tensors, lmbda))

    # ------------------------------------------------------------------ the control axis
    @property
    def range(self) -> tuple[float, float]:
        """Covered control values ``(ln lambda_min, ln lambda_max)``."""
        return self.controls[0], self.controls[-1]

    @property
    def anchor_control(self) -> float:
        return math.log(self.anchor_lmbda)

    @staticmethod
    def control_of(lmbda: float) -> float:
        return math.log(lmbda)

    @staticmethod
    def lmbda_of(control: float) -> float:
        return math.exp(control)

    def clamp(self, control: float) -> float:
        lo, hi = self.range
        return min(max(control, lo), hi)

    def _check(self, control: float) -> float:
        control = float(control)
        lo, hi = self.range
        if not math.isfinite(control) or control < lo - 1e-9 or control > hi + 1e-9:
            shown = math.exp(control) if math.isfinite(control) else control
            raise ValueError(f"control {control!r} (lambda {shown}) is outside the covered range "
                             f"[{lo:.6f}, {hi:.6f}] (lambda {self.lmbdas[0]:g} .. {self.lmbdas[-1]:g})")
        return self.clamp(control)

    def coefficients(self, control: float) -> dict[float, float]:
        """Adapter lambda -> weight of its merged update at ``control`` (zero weights left out)."""
        c = self._check(control)
        xs = self.controls
        for i, x in enumerate(xs):  # exactly on a trained point (or the anchor)
            if c == x:
                return {} if self.lmbdas[i] == self.anchor_lmbda else {self.lmbdas[i]: 1.0}
        i = max(j for j in range(len(xs) - 1) if xs[j] <= c)
        lo_l, hi_l = self.lmbdas[i], self.lmbdas[i + 1]
        t = (c - xs[i]) / (xs[i + 1] - xs[i])
        if self.mode == "interpolate":
            out = {lo_l: 1.0 - t, hi_l: t}
        else:
            far = hi_l if c > self.anchor_control else lo_l  # the interval's end away from the anchor
            out = {far: (c - self.anchor_control) / (math.log(far) - self.anchor_control)}
        return {k: w for k, w in out.items() if k != self.anchor_lmbda and w != 0.0}

    def identity(self, control: float) -> str:
        """Hex SHA-256 of the adapter sets involved at ``control``, or ``"none"``."""
        involved = sorted(self.coefficients(control))
        if not involved:
            return "none"
        digest = hashlib.sha256()
        for lmbda in involved:
            digest.update(bytes.fromhex(self.sets[lmbda].digest))
        return digest.hexdigest()

    @torch.no_grad()
    def model_at(self, control: float) -> SymmetricalTransFormer:
        """The STF at ``control`` (ln lambda); rewritten from the saved base at every switch."""
        coeffs = self.coefficients(control)
        key = tuple(sorted(coeffs.items()))
        if key != self._shared["current"]:
            for name, linear in self._linears.items():
                linear.weight.copy_(self._weight(name, coeffs))
            self._shared["current"] = key
        return self.model

    def _weight(self, name: str, coeffs: dict[float, float]) -> Tensor:
        weight = self._base[name].clone()
        for lmbda, w in sorted(coeffs.items()):
            delta = self.sets[lmbda].delta(name)
            if delta is None:
                continue
            if w == 1.0:  # exactly merge_lora's arithmetic at a trained point
                weight.add_(delta.to(weight.dtype))
            else:
                weight.add_(delta.to(weight.dtype), alpha=w)
        return weight

    def __repr__(self) -> str:
        return (f"RateControl(mode={self.mode!r}, lambdas={self.lmbdas}, anchor={self.anchor_lmbda}, "
                f"base_hash={self.base_hash!r})")


def _copy_module(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
