"""Continuous rate control, target-bitrate coding and the ``.alice`` file format.

ALICE (Buysse et al., "ALICE: Adapt your Learnable Image Compression modEl for
variable bitrates", VCIP 2024) serves a handful of discrete rates: one frozen STF
at the anchor lambda plus one low-rank adapter set per other lambda. This module
turns those points into a continuous rate:

* ``mode="interpolate"``: between the two trained rates ``A`` and ``B`` that
  bracket the control value, every adapted layer gets
  ``W = W0 + (1 - t) * dW_A + t * dW_B`` with ``dW = alpha * (W_a @ W_b)^T`` (the
  MALICE merged update) and ``t`` the position of the control between the two.
  The anchor is the point with ``dW = 0``.
* ``mode="alpha"``: the idea of CALICE (continuous-rate ALICE: one adapter set whose
  LoRA scale ``alpha`` is multiplied by a factor): ``W = W0 + s * dW_X`` with ``X``
  the trained adapter at the far end (seen from the anchor) of the interval that
  holds the control, and ``s`` the control's position between the anchor and
  ``X`` in log-lambda. Between the anchor and its neighbouring adapters this is
  exactly alpha scaling; in farther intervals the far adapter is scaled down, so
  the rate jumps at the trained points that do not touch the anchor.

The control value is ``ln(lambda)``: trained points sit at their own log-lambda and
the anchor at ``ln(anchor_lmbda)``. Both modes reproduce the trained adapters (and
the anchor) exactly at their control values; there the merged weights equal
:func:`alice_lib.lora.merge_lora`'s bit for bit. The model handed out is an
ordinary STF whose adapted layers are rewritten from a saved copy of the base
weights at every switch, so switching back and forth never accumulates float drift.
Only the analysis / synthesis Swin blocks carry adapters; the entropy model (and
so the rANS tables) is the anchor's at every control value.

``.alice`` file layout (version 1, little-endian)::

    offset size  field
         0    8  magic  b"\\x89ALICE\\r\\n"
         8    2  version (u16, = 1)
        10    2  header size (u16, = 64: bytes from offset 0 to the first bitstream)
        12    8  base weights hash (8 raw bytes = the 16 hex digits of lora.base_weights_hash)
        20    8  adapter identity (8 raw bytes of a SHA-256; all zero = no adapter involved)
        28    1  mode (0 fixed = anchor only, 1 interpolate, 2 alpha)
        29    1  reserved (0)
        30    2  reserved (0)
        32    8  control value (f64, ln lambda)
        40    4  image height (u32, 1..65536)
        44    4  image width  (u32, 1..65536)
        48    2  z height (u16)
        50    2  z width  (u16)
        52    4  y bitstream length (u32)
        56    4  z bitstream length (u32)
        60    4  reserved (0)
        64    .  y bitstream, then z bitstream
       end-4  4  CRC-32 (zlib.crc32) of every byte before it

A reader checks, in order: size bounds, magic, version, header size, the CRC,
then every field; a file must end exactly after its CRC. Nothing is entropy
decoded before the CRC matched.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .lora import base_weights_hash, lora_modules, read_adapter_metadata, target_names
from .models.stf import SymmetricalTransFormer

__all__ = [
    "ANCHOR_LMBDA", "MAGIC", "VERSION", "MODES", "AliceFormatError", "AliceFile", "RateControl",
    "TargetResult", "compress_to_target", "encode", "decode", "write_alice", "read_alice", "parse_alice",
    "serialize_alice", "adapter_hash", "measure_intermediate", "interpolation_bd_rates", "target_hit_rate",
]

ANCHOR_LMBDA = 0.0483
MAGIC = b"\x89ALICE\r\n"
VERSION = 1
MODES = ("fixed", "interpolate", "alpha")
_HEADER = struct.Struct("<8sHH8s8sBBHdIIHHIII")
HEADER_SIZE = _HEADER.size  # 64
_CRC = struct.Struct("<I")
MAX_SIDE = 1 << 16
MAX_FILE_BYTES = 1 << 30
_NO_ADAPTER = bytes(8)


class AliceFormatError(ValueError):
    """A ``.alice`` file is damaged, foreign, or does not fit the loaded weights."""


# ============================================================================ rate control
def _hash_tensors(tensors: Mapping[str, Tensor], lmbda: float) -> str:
    digest = hashlib.sha256(f"lambda|{float(lmbda)!r}\n".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def adapter_hash(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of an adapter file's tensors and lambda (its metadata text is not hashed)."""
    meta = read_adapter_metadata(path)
    return _hash_tensors(load_file(str(path)), meta["lambda"])


def _plain_copy(model: nn.Module, make_copy: bool) -> nn.Module:
    """The model without adapters (unmerged first), as an ordinary STF."""
    if make_copy:
        model = copy.deepcopy(model)
    for name, module in lora_modules(model).items():
        module.unmerge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.linear)
    return model


@dataclass
class _AdapterSet:
    lmbda: float
    path: str
    alpha: float
    factors: dict[str, tuple[Tensor, Tensor]]  # layer -> (W_a, W_b)
    digest: str

    def delta(self, layer: str) -> Tensor | None:
        """``alpha * (W_a @ W_b)^T`` exactly as :meth:`LoRAAdapter.delta_weight` computes it."""
        if layer not in self.factors:
            return None
        w_a, w_b = self.factors[layer]
        return self.alpha * (w_a @ w_b).T


class RateControl:
    """Continuous rate between the anchor and trained ALICE adapters.

    ``RateControl(anchor_model, adapters, mode)``: ``adapters`` maps lambda -> adapter
    file (or is a list of files, lambdas read from their metadata). Each file must
    have been trained on ``anchor_model`` (same :func:`base_weights_hash`), else a
    ``ValueError`` names both hashes. The control value is ``ln(lambda)``;
    :attr:`range` is ``(ln min lambda, ln max lambda)`` over the trained points and
    the anchor. :meth:`model_at` returns the one STF this object owns (a copy of the
    anchor unless ``copy=False``), switched to that control.
    """

    def __init__(self, anchor_model: nn.Module, adapters: Mapping[float, str | os.PathLike] |
                 Sequence[str | os.PathLike] | None = None, mode: str = "interpolate",
                 anchor_lmbda: float = ANCHOR_LMBDA, copy: bool = True):
        if mode not in ("interpolate", "alpha"):
            raise ValueError(f"unknown rate-control mode {mode!r}; use 'interpolate' or 'alpha'")
        if not (anchor_lmbda > 0 and math.isfinite(anchor_lmbda)):
            raise ValueError(f"anchor lambda must be positive, got {anchor_lmbda!r}")
        self.mode = mode
        self.anchor_lmbda = float(anchor_lmbda)
        self.model = _plain_copy(anchor_model, copy).eval()
        self.base_hash = base_weights_hash(self.model)
        if adapters is None:
            adapters = {}
        if not isinstance(adapters, Mapping):
            adapters = {read_adapter_metadata(p)["lambda"]: p for p in adapters}
        self.sets: dict[float, _AdapterSet] = {}
        for lmbda, path in sorted(adapters.items()):
            self._add(float(lmbda), path)
        lmbdas = sorted({self.anchor_lmbda, *self.sets})
        if len(lmbdas) != len(self.sets) + 1:
            raise ValueError(f"an adapter set sits at the anchor lambda {self.anchor_lmbda}")
        self.lmbdas = lmbdas
        self.controls = [math.log(x) for x in lmbdas]
        self.layers = sorted({name for s in self.sets.values() for name in s.factors})
        modules = dict(self.model.named_modules())
        self._linears = {name: modules[name] for name in self.layers}
        self._base = {name: m.weight.detach().clone() for name, m in self._linears.items()}
        self._shared = {"current": None, "twins": {mode: self}}

    def with_mode(self, mode: str) -> RateControl:
        """A RateControl in ``mode`` sharing this one's model and adapters (built once)."""
        if mode not in ("interpolate", "alpha"):
            raise ValueError(f"unknown rate-control mode {mode!r}; use 'interpolate' or 'alpha'")
        twins = self._shared["twins"]
        if mode not in twins:
            twin = copy.copy(self)
            twin.mode = mode
            twins[mode] = twin
        return twins[mode]

    def _add(self, lmbda: float, path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"adapter file {path} does not exist")
        meta = read_adapter_metadata(path)
        if meta["base_hash"] != self.base_hash:
            raise ValueError(f"{path}: adapters trained on base weights {meta['base_hash']}, but the model's "
                             f"base weights hash to {self.base_hash}; load the matching base model")
        if not math.isclose(meta["lambda"], lmbda, rel_tol=1e-6):
            raise ValueError(f"{path}: the file says lambda {meta['lambda']}, it was given as {lmbda}")
        if not (lmbda > 0 and math.isfinite(lmbda)):
            raise ValueError(f"{path}: lambda must be positive, got {lmbda}")
        tensors = load_file(str(path))
        config = meta["config"]
        modules = dict(self.model.named_modules())
        names = target_names(self.model, config)
        expected = {f"{n}.lora.{p}" for n in names for p in ("W_a", "W_b")}
        if set(tensors) != expected:
            raise ValueError(f"{path}: adapter tensors do not match the layers its config targets "
                             f"({len(tensors)} tensors, {len(expected)} expected)")
        factors = {}
        for name in names:
            w_a, w_b = tensors[f"{name}.lora.W_a"].float(), tensors[f"{name}.lora.W_b"].float()
            weight = modules[name].weight
            if w_a.shape != (weight.shape[1], config.r) or w_b.shape != (config.r, weight.shape[0]):
                raise ValueError(f"{path}: {name} adapter shapes {tuple(w_a.shape)}, {tuple(w_b.shape)} do not "
                                 f"fit the layer {tuple(weight.shape)} at rank {config.r}")
            factors[name] = (w_a.to(weight.device), w_b.to(weight.device))
        self.sets[lmbda] = _AdapterSet(lmbda, str(path), config.alpha, factors, _hash_tensors(tensors, lmbda))

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
            raise ValueError(f"control {control!r} (lambda {math.exp(control) if math.isfinite(control) else control}) "
                             f"is outside the covered range [{lo:.6f}, {hi:.6f}] (lambda {self.lmbdas[0]:g} .. "
                             f"{self.lmbdas[-1]:g})")
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
            s = (c - self.anchor_control) / (math.log(far) - self.anchor_control)
            out = {far: s}
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
                weight = self._base[name].clone()
                for lmbda, w in sorted(coeffs.items()):
                    delta = self.sets[lmbda].delta(name)
                    if delta is not None:
                        if w == 1.0:
                            weight.add_(delta.to(weight.dtype))
                        else:
                            weight.add_(delta.to(weight.dtype), alpha=w)
                linear.weight.copy_(weight)
            self._shared["current"] = key
        return self.model

    def __repr__(self) -> str:
        return (f"RateControl(mode={self.mode!r}, lambdas={self.lmbdas}, anchor={self.anchor_lmbda}, "
                f"base_hash={self.base_hash!r})")


# ============================================================================ file format
@dataclass
class AliceFile:
    """The parsed content of a ``.alice`` file."""

    base_hash: str          # 16 hex digits
    adapter_id: str         # 16 hex digits or "none"
    mode: str               # one of MODES
    control: float          # ln lambda
    height: int
    width: int
    z_shape: tuple[int, int]
    y_string: bytes
    z_string: bytes
    version: int = VERSION
    crc: int | None = None

    @property
    def lmbda(self) -> float:
        return math.exp(self.control)

    @property
    def payload_bytes(self) -> int:
        return len(self.y_string) + len(self.z_string)

    @property
    def bpp(self) -> float:
        """Bits per pixel of the bitstreams (the header and CRC excluded)."""
        return 8.0 * self.payload_bytes / (self.height * self.width)

    def info(self) -> dict:
        total = HEADER_SIZE + self.payload_bytes + _CRC.size
        return {"version": self.version, "base_hash": self.base_hash, "adapter_id": self.adapter_id,
                "mode": self.mode, "control": self.control, "lambda": self.lmbda, "height": self.height,
                "width": self.width, "z_shape": f"{self.z_shape[0]}x{self.z_shape[1]}",
                "y_bytes": len(self.y_string), "z_bytes": len(self.z_string), "file_bytes": total,
                "bpp": self.bpp, "file_bpp": 8.0 * total / (self.height * self.width),
                "crc32": f"{self.crc:08x}" if self.crc is not None else None}


def _hex8(value: str, what: str) -> bytes:
    if value == "none":
        return _NO_ADAPTER
    try:
        raw = bytes.fromhex(value[:16])
    except ValueError:
        raise ValueError(f"{what} {value!r} is not hexadecimal") from None
    if len(raw) != 8:
        raise ValueError(f"{what} {value!r} needs at least 16 hex digits")
    return raw


def serialize_alice(f: AliceFile) -> bytes:
    """The bytes of a ``.alice`` file (checks every field against the reader's bounds)."""
    if f.mode not in MODES:
        raise ValueError(f"unknown mode {f.mode!r}")
    if not math.isfinite(f.control):
        raise ValueError("control value must be finite")
    for side in (f.height, f.width):
        if not 1 <= side <= MAX_SIDE:
            raise ValueError(f"image side {side} outside 1..{MAX_SIDE}")
    if not all(1 <= s < (1 << 16) for s in f.z_shape):
        raise ValueError(f"z shape {f.z_shape} outside 1..65535")
    header = _HEADER.pack(MAGIC, VERSION, HEADER_SIZE, _hex8(f.base_hash, "base hash"),
                          _hex8(f.adapter_id, "adapter identity"), MODES.index(f.mode), 0, 0, float(f.control),
                          f.height, f.width, f.z_shape[0], f.z_shape[1], len(f.y_string), len(f.z_string), 0)
    body = header + bytes(f.y_string) + bytes(f.z_string)
    if len(body) + _CRC.size > MAX_FILE_BYTES:
        raise ValueError("bitstreams too large for a .alice file")
    return body + _CRC.pack(zlib.crc32(body))


def parse_alice(data: bytes, name: str = "file") -> AliceFile:
    """Parse and validate ``.alice`` bytes; every problem raises :class:`AliceFormatError`."""
    def fail(msg: str) -> AliceFormatError:
        return AliceFormatError(f"{name}: {msg}")

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise fail("expected bytes")
    data = bytes(data)
    n = len(data)
    if n > MAX_FILE_BYTES:
        raise fail(f"{n} bytes exceed the limit of {MAX_FILE_BYTES}")
    if n < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise fail("not an .alice file (wrong magic bytes)")
    if n < 12:
        raise fail(f"truncated: {n} bytes, a header needs {HEADER_SIZE}")
    version, header_size = struct.unpack_from("<HH", data, 8)
    if version != VERSION:
        raise fail(f"unsupported .alice version {version} (this reader knows version {VERSION})")
    if header_size != HEADER_SIZE:
        raise fail(f"header size {header_size} != {HEADER_SIZE} for version {VERSION}")
    if n < HEADER_SIZE + _CRC.size:
        raise fail(f"truncated: {n} bytes, a header and CRC need {HEADER_SIZE + _CRC.size}")
    (_, _, _, base, adapter, mode, r0, r1, control, height, width, zh, zw, y_len, z_len,
     r2) = _HEADER.unpack_from(data, 0)
    expected = HEADER_SIZE + y_len + z_len + _CRC.size
    if expected > n:
        raise fail(f"truncated: the header announces {expected} bytes, the file has {n}")
    if expected < n:
        raise fail(f"{n - expected} unexpected byte(s) after the CRC (the header announces {expected} bytes)")
    (stored,) = _CRC.unpack_from(data, n - _CRC.size)
    actual = zlib.crc32(data[: n - _CRC.size])
    if stored != actual:
        raise fail(f"CRC mismatch (stored {stored:08x}, computed {actual:08x}): the file is corrupted")
    if mode >= len(MODES):
        raise fail(f"unknown mode {mode}")
    if r0 or r1 or r2:
        raise fail("reserved header fields are not zero")
    if not math.isfinite(control) or abs(control) > 100:
        raise fail(f"control value {control!r} is not a finite log-lambda")
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise fail(f"image size {height}x{width} outside 1..{MAX_SIDE} per side")
    if not (1 <= zh <= height and 1 <= zw <= width):
        raise fail(f"z shape {zh}x{zw} does not fit a {height}x{width} image")
    if y_len == 0 or z_len == 0:
        raise fail("empty bitstream")
    y = data[HEADER_SIZE:HEADER_SIZE + y_len]
    z = data[HEADER_SIZE + y_len:HEADER_SIZE + y_len + z_len]
    return AliceFile(base_hash=base.hex(), adapter_id="none" if adapter == _NO_ADAPTER else adapter.hex(),
                     mode=MODES[mode], control=control, height=height, width=width, z_shape=(zh, zw),
                     y_string=y, z_string=z, version=version, crc=stored)


def read_alice(path: str | os.PathLike) -> AliceFile:
    """Read and validate a ``.alice`` file (see :func:`parse_alice`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_file():
        raise AliceFormatError(f"{path} is not a regular file")
    with open(path, "rb") as fh:
        data = fh.read(MAX_FILE_BYTES + 1)
    return parse_alice(data, str(path))


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (existing or not)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``data`` to a temporary file beside ``path`` then rename it over ``path``."""
    path = Path(path)
    for other in protect:
        if other is not None and same_file(path, other):
            raise ValueError(f"refusing to overwrite the input file {other}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_alice(path: str | os.PathLike, alice: AliceFile, input_path: str | os.PathLike | None = None) -> Path:
    """Write ``alice`` atomically (temporary file + ``os.replace``); never over ``input_path``."""
    return atomic_write_bytes(path, serialize_alice(alice), protect=[input_path] if input_path else [])


# ============================================================================ coding
def _as_batch(image: Tensor) -> tuple[Tensor, Tensor]:
    """``(uint8 [3, H, W], float [1, 3, H, W] in [0, 1])`` from either form."""
    if image.dtype == torch.uint8:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 [3, H, W] image, got {tuple(image.shape)}")
        return image, image.float().div(255).unsqueeze(0)
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got {tuple(image.shape)}")
    u8 = image.clamp(0, 1).mul(255).round().to(torch.uint8)
    return u8, u8.float().div(255).unsqueeze(0)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode(rate_control: RateControl, image: Tensor, control: float | None = None) -> AliceFile:
    """Code ``image`` (uint8 ``[3, H, W]``) at ``control`` (default: the anchor) into an :class:`AliceFile`."""
    u8, x = _as_batch(image)
    h, w = u8.shape[-2:]
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise ValueError(f"image size {h}x{w} outside 1..{MAX_SIDE} per side")
    control = rate_control.anchor_control if control is None else control
    model = rate_control.model_at(control)
    enc = model.compress(x.to(_device(model)))
    identity = rate_control.identity(control)
    mode = "fixed" if not rate_control.sets else rate_control.mode
    return AliceFile(base_hash=rate_control.base_hash, adapter_id=identity[:16], mode=mode,
                     control=float(control), height=h, width=w, z_shape=tuple(int(s) for s in enc["shape"]),
                     y_string=enc["strings"][0][0], z_string=enc["strings"][1][0])


def decode(rate_control: RateControl, alice: AliceFile) -> Tensor:
    """Decode an :class:`AliceFile` to uint8 ``[3, H, W]`` after checking it fits ``rate_control``."""
    if alice.base_hash != rate_control.base_hash[:16]:
        raise AliceFormatError(f"the file was made with base weights {alice.base_hash}, but the loaded model's "
                               f"base weights are {rate_control.base_hash}; load the matching model")
    if alice.mode != "fixed" and alice.mode != rate_control.mode:
        rate_control = rate_control.with_mode(alice.mode)
    lo, hi = rate_control.range
    if not lo - 1e-9 <= alice.control <= hi + 1e-9:
        raise AliceFormatError(f"the file's lambda {alice.lmbda:g} is outside the loaded adapters' range "
                               f"{rate_control.lmbdas[0]:g} .. {rate_control.lmbdas[-1]:g}; load its adapters")
    identity = rate_control.identity(alice.control)[:16]
    if identity != alice.adapter_id:
        raise AliceFormatError(f"the file was made with adapters {alice.adapter_id}, but the loaded adapters at "
                               f"lambda {alice.lmbda:g} are {identity}; load the adapters it was made with")
    model = rate_control.model_at(alice.control)
    stride = model.config.total_stride
    expected = (-(-alice.height // stride), -(-alice.width // stride))
    if tuple(alice.z_shape) != expected:
        raise AliceFormatError(f"z shape {alice.z_shape} does not match a {alice.height}x{alice.width} image "
                               f"for this model (expected {expected})")
    try:
        out = model.decompress([[alice.y_string], [alice.z_string]], alice.z_shape, (alice.height, alice.width))
    except (RuntimeError, ValueError, IndexError, OverflowError) as error:  # only past a CRC collision
        raise AliceFormatError(f"the bitstream could not be decoded ({type(error).__name__}: {error})") from error
    x_hat = out["x_hat"]
    if x_hat.shape[-2:] != (alice.height, alice.width) or not torch.isfinite(x_hat).all():
        raise AliceFormatError("the bitstream decoded to an invalid image")
    return x_hat[0].mul(255).round().to(torch.uint8).cpu()


# ============================================================================ target coding
@dataclass
class TargetResult:
    """What :func:`compress_to_target` found."""

    alice: AliceFile
    control: float
    achieved_bpp: float
    achieved_psnr: float
    target: float
    target_kind: str          # "bpp" or "psnr"
    hit: bool                 # within the tolerance band
    clamped: bool             # the target lies outside the covered range: coded at the nearest end
    clamped_to: str | None = None   # "low" / "high"
    estimate_calls: int = 0
    coder_calls: int = 0

    @property
    def lmbda(self) -> float:
        return math.exp(self.control)


@torch.no_grad()
def _estimate(model: nn.Module, x: Tensor, u8: Tensor) -> tuple[float, float]:
    """(bpp from the likelihoods of the eval forward, PSNR of its rounded reconstruction)."""
    from .evaluate import psnr_rgb

    out = model(x)
    h, w = u8.shape[-2:]
    bits = sum(torch.log2(lk.double()).sum().neg() for lk in out["likelihoods"].values())
    rec = out["x_hat"][0].clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return float(bits) / (h * w), psnr_rgb(u8, rec)


def _solve(fn: Callable[[float], float], target: float, lo: float, hi: float, f_lo: float, f_hi: float,
           rel_tol: float, abs_tol: float, max_iter: int = 30) -> float:
    """A control with ``fn(control) ~= target`` for increasing ``fn``, ``f_lo <= target <= f_hi``.

    Illinois regula falsi (a bracketing secant: never leaves the bracket) on the log of
    the value for rates, which is close to linear in log-lambda.
    """
    def g(v: float) -> float:
        return v - target

    a, b, ga, gb = lo, hi, g(f_lo), g(f_hi)
    side = 0
    c = 0.5 * (a + b)
    for _ in range(max_iter):
        c = b - gb * (b - a) / (gb - ga) if gb != ga else 0.5 * (a + b)
        if not a < c < b:
            c = 0.5 * (a + b)
        fc = fn(c)
        gc = g(fc)
        if abs(gc) <= max(rel_tol * abs(target), abs_tol) or b - a < 1e-7:
            return c
        if gc > 0:
            b, gb = c, gc
            if side == -1:
                ga /= 2
            side = -1
        else:
            a, ga = c, gc
            if side == 1:
                gb /= 2
            side = 1
    return c


def compress_to_target(rate_control: RateControl, image: Tensor, target_bpp: float | None = None,
                       target_psnr: float | None = None, tol: float = 0.03, psnr_tol: float = 0.1,
                       max_corrections: int = 4) -> TargetResult:
    """Code ``image`` at the control value that meets a bpp or PSNR target.

    1. Search (bracketing secant on log-bpp, or on PSNR, both increasing in lambda)
       on the eval-mode forward's entropy estimate, which costs one forward pass.
    2. Confirm with the real rANS coder; when the real bpp misses the
       ``target * (1 +- tol)`` band (PSNR: ``+- psnr_tol`` dB), correct the target
       of the estimate search by the observed real / estimate ratio (offset for
       PSNR) and search again, up to ``max_corrections`` times, then a few
       bisection steps on the real coder; the closest result is kept.
    3. A target outside what the covered range reaches is coded at the nearest end
       (``clamped=True``, ``clamped_to`` "low" or "high"), never extrapolated.

    The bpp counted is the bitstreams' (header and CRC of the file excluded, 68 bytes).
    """
    from .evaluate import psnr_rgb

    if (target_bpp is None) == (target_psnr is None):
        raise ValueError("give exactly one of target_bpp and target_psnr")
    kind = "bpp" if target_bpp is not None else "psnr"
    target = float(target_bpp if kind == "bpp" else target_psnr)
    if not math.isfinite(target) or (kind == "bpp" and target <= 0):
        raise ValueError(f"invalid {kind} target {target!r}")
    u8, x = _as_batch(image)
    h, w = u8.shape[-2:]
    lo, hi = rate_control.range
    counts = {"est": 0, "real": 0}
    est_cache: dict[float, tuple[float, float]] = {}
    real_cache: dict[float, list] = {}

    def est(c: float) -> float:
        if c not in est_cache:
            model = rate_control.model_at(c)
            counts["est"] += 1
            est_cache[c] = _estimate(model, x.to(_device(model)), u8)
        bpp, psnr = est_cache[c]
        return math.log(bpp) if kind == "bpp" else psnr

    def real(c: float) -> list:
        """[file, real bpp, PSNR of the real decode (computed on demand)]."""
        if c not in real_cache:
            counts["real"] += 1
            f = encode(rate_control, u8, c)
            real_cache[c] = [f, f.bpp, None]
        return real_cache[c]

    def psnr_of(c: float) -> float:
        entry = real(c)
        if entry[2] is None:
            entry[2] = psnr_rgb(u8, decode(rate_control, entry[0]))
        return entry[2]

    def value(c: float) -> float:
        return real(c)[1] if kind == "bpp" else psnr_of(c)

    def within(v: float) -> bool:
        return abs(v / target - 1) <= tol if kind == "bpp" else abs(v - target) <= psnr_tol

    def err(v: float) -> float:
        return abs(math.log(v / target)) if kind == "bpp" else abs(v - target)

    def search_est(goal: float) -> float:
        """Control whose estimate meets ``goal`` (in est() units), clamped to the range."""
        if lo == hi:
            return lo
        f_lo, f_hi = est(lo), est(hi)
        if goal <= f_lo:
            return lo
        if goal >= f_hi:
            return hi
        # On the log scale a relative tolerance tol/4 is an absolute one.
        return _solve(est, goal, lo, hi, f_lo, f_hi, rel_tol=0.0,
                      abs_tol=tol / 4 if kind == "bpp" else psnr_tol / 4)

    goal = math.log(target) if kind == "bpp" else target
    c = search_est(goal)
    tried: list[float] = []
    for _ in range(max_corrections + 1):
        tried.append(c)
        v = value(c)
        if within(v):
            break
        # The real coder differs from the estimate by a nearly constant factor: shift the goal.
        shift = (math.log(v) if kind == "bpp" else v) - est(c)
        c_next = search_est(goal - shift)
        if c_next in tried:
            break
        c = c_next
    best = min(real_cache, key=lambda k: err(value(k)))
    if not within(value(best)) and lo < hi:
        # Bracket the target on the real coder (the ends if needed) and bisect a few times.
        if not any(value(k) > target for k in list(real_cache)):
            value(hi)
        if not any(value(k) < target for k in list(real_cache)):
            value(lo)
        below = [k for k in real_cache if value(k) < target]
        above = [k for k in real_cache if value(k) > target]
        if below and above and max(below) < min(above):
            a, b = max(below), min(above)
            for _ in range(6):
                mid = 0.5 * (a + b)
                v = value(mid)
                if within(v):
                    break
                if v < target:
                    a = mid
                else:
                    b = mid
        best = min(real_cache, key=lambda k: err(value(k)))
    f, bpp = real_cache[best][:2]
    psnr = psnr_of(best)
    v = bpp if kind == "bpp" else psnr
    hit = within(v)
    clamped_to = None
    if not hit and lo < hi:
        if best == hi and v < target:
            clamped_to = "high"
        elif best == lo and v > target:
            clamped_to = "low"
    elif not hit and lo == hi:
        clamped_to = "high" if v < target else "low"
    return TargetResult(alice=f, control=best, achieved_bpp=bpp, achieved_psnr=psnr, target=target,
                        target_kind=kind, hit=hit, clamped=clamped_to is not None, clamped_to=clamped_to,
                        estimate_calls=counts["est"], coder_calls=counts["real"])


# ============================================================================ measurement
def _images(image_dir, max_images: int | None):
    from .data import read_image
    from .evaluate import find_images

    paths = find_images(image_dir)[:max_images] if max_images else find_images(image_dir)
    return [(p.name, read_image(p)) for p in paths]


def measure_intermediate(rate_control: RateControl, image_dir: str | os.PathLike, per_interval: int = 3,
                         modes: Sequence[str] = ("interpolate", "alpha"), max_images: int | None = None,
                         progress: bool = False) -> pd.DataFrame:
    """Real-bitstream bpp and PSNR at the trained points and ``per_interval`` points inside each interval.

    One row per (mode, control, image): ``mode``, ``kind`` ("trained" / "intermediate"),
    ``control``, ``lmbda``, ``image``, ``bytes``, ``bpp``, ``psnr``. Trained points are
    mode-independent and measured once (``mode`` = "trained").
    """
    from .evaluate import psnr_rgb

    images = _images(image_dir, max_images)
    xs = rate_control.controls
    points = [("trained", "trained", c) for c in xs]
    for mode in modes:
        for a, b in zip(xs[:-1], xs[1:]):
            points += [(mode, "intermediate", a + (b - a) * k / (per_interval + 1))
                       for k in range(1, per_interval + 1)]
    rows = []
    iterator = points
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(points, desc="rate points")
    for mode, kind, c in iterator:
        rc = rate_control if mode in ("trained", rate_control.mode) else rate_control.with_mode(mode)
        for name, img in images:
            f = encode(rc, img, c)
            rec = decode(rc, f)
            rows.append({"mode": mode, "kind": kind, "control": c, "lmbda": math.exp(c), "image": name,
                         "bytes": f.payload_bytes, "bpp": f.bpp, "psnr": psnr_rgb(img, rec)})
    return pd.DataFrame(rows)


def interpolation_bd_rates(results: pd.DataFrame) -> pd.DataFrame:
    """BD-rate (%) of each mode's intermediate points against the curve through the trained points.

    Curves are the per-control means of bpp and PSNR over the images. Negative: the
    intermediate points need fewer bits than the trained curve at equal PSNR.
    """
    from .evaluate import bd_rate

    mean = results.groupby(["mode", "control"], as_index=False)[["bpp", "psnr"]].mean()
    trained = mean[mean["mode"] == "trained"]
    rows = []
    for mode in [m for m in mean["mode"].unique() if m != "trained"]:
        pts = mean[mean["mode"] == mode]
        value = bd_rate(trained["bpp"], trained["psnr"], pts["bpp"], pts["psnr"], min_overlap=0.0)
        rows.append({"mode": mode, "bd_rate_pct": value, "n_points": len(pts), "n_trained": len(trained)})
    return pd.DataFrame(rows)


def target_hit_rate(rate_control: RateControl, image_dir: str | os.PathLike, targets: Sequence[float],
                    tol: float = 0.03, max_images: int | None = None, progress: bool = False) -> pd.DataFrame:
    """Per (image, bpp target): achieved bpp, hit (within ``tol``), clamped, calls.

    ``df.attrs["hit_rate"]`` is the fraction of hits among the targets inside the
    covered range for that image (not clamped); ``df.attrs["clamped"]`` counts the others.
    """
    images = _images(image_dir, max_images)
    rows = []
    iterator = [(n, img, t) for n, img in images for t in targets]
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc="targets")
    for name, img, t in iterator:
        r = compress_to_target(rate_control, img, target_bpp=t, tol=tol)
        rows.append({"image": name, "target_bpp": t, "achieved_bpp": r.achieved_bpp, "psnr": r.achieved_psnr,
                     "rel_error": r.achieved_bpp / t - 1, "hit": r.hit, "clamped": r.clamped,
                     "clamped_to": r.clamped_to, "lmbda": r.lmbda, "estimate_calls": r.estimate_calls,
                     "coder_calls": r.coder_calls})
    df = pd.DataFrame(rows)
    inside = df[~df["clamped"]] if len(df) else df
    df.attrs["hit_rate"] = float(inside["hit"].mean()) if len(inside) else math.nan
    df.attrs["inside"] = int(len(inside))
    df.attrs["clamped"] = int(len(df) - len(inside))
    return df
