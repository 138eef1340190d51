"""Small helpers every other module uses: atomic files, hashing, 8-bit images, rates, devices.

One home for each, so that a file is written safely, an image rounded and a rate
counted the same way in training, evaluation and the codec.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "atomic_write", "atomic_write_bytes", "atomic_save", "atomic_copy", "same_file", "sha256_file",
    "tensors_hash", "state_dict_hash", "to_uint8", "bits_from_likelihoods", "bpp_from_likelihoods",
    "model_device", "psnr_from_mse",
]


# ---------------------------------------------------------------------------- files
def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (a path that does not exist is no file)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None],
                 protect: Iterable[str | os.PathLike | None] = ()) -> Path:
    """``write(tmp)`` a uniquely named temporary file beside ``path``, fsync it, then rename it over ``path``.

    A kill never leaves half a file, and two writers never share a temporary file.
    If ``write`` fails the temporary file is removed and ``path`` keeps its old content.
    ``protect``: paths that ``path`` must not be (an input is never overwritten).
    """
    path = Path(path)
    for other in protect:
        if other is not None and same_file(path, other):
            raise ValueError(f"refusing to overwrite the input file {other}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes,
                       protect: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Write ``data`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), protect=protect)


def atomic_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy a file atomically."""
    return atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))


# ---------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_hash(tensors: Mapping[str, Tensor], *extra: str) -> str:
    """SHA-256 (hex) of named tensors: names, dtypes, shapes and bytes, in name order; equal iff they are.

    ``extra`` strings (e.g. a lambda) are hashed after the tensors.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for item in extra:
        digest.update(f"|{item}".encode())
    return digest.hexdigest()


def state_dict_hash(model: nn.Module) -> str:
    """SHA-256 of a module's state dict (unwrapping DDP): equal iff the weights are."""
    module = model.module if hasattr(model, "module") else model
    return tensors_hash(module.state_dict())


# ---------------------------------------------------------------------------- images and rates
def to_uint8(image: Tensor) -> Tensor:
    """Float image(s) in [0, 1] to 8-bit: clamp, ``round(x * 255)``; the one rounding used everywhere."""
    return image.detach().clamp(0, 1).mul(255).round().to(torch.uint8)


def bits_from_likelihoods(likelihoods: Mapping[str, Tensor] | Iterable[Tensor]) -> Tensor:
    """``sum(-log2 p)`` over every likelihood tensor (a differentiable scalar, float64 when they are)."""
    values = likelihoods.values() if isinstance(likelihoods, Mapping) else likelihoods
    return sum(-torch.log2(lk).sum() for lk in values)


def bpp_from_likelihoods(likelihoods: Mapping[str, Tensor] | Iterable[Tensor], num_pixels: int) -> Tensor:
    """Estimated bits per pixel: :func:`bits_from_likelihoods` over ``num_pixels`` (N * H * W)."""
    return bits_from_likelihoods(likelihoods) / num_pixels


def psnr_from_mse(mse: float, peak: float = 1.0) -> float:
    """PSNR in dB of a mean squared error at the given peak (inf for a perfect match)."""
    import math

    return 10 * math.log10(peak * peak / mse) if mse > 0 else float("inf")


# ---------------------------------------------------------------------------- devices
def model_device(model: nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")
