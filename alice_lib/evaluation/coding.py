"""Learned codecs through real bitstreams: one image (:func:`code_image`), a folder (:func:`evaluate_models`).

Per image (one row of :data:`~alice_lib.evaluation.tables.RESULT_COLUMNS`):

* ``bytes`` / ``bpp``: the length of every ``y`` and ``z`` string ``compress`` returned,
  ``bpp = 8 * bytes / (H * W)`` on the *original* pixel count whatever the padding. As in
  CompressAI's ``eval_model``, the few header bytes a file also needs (latent shape, image
  size) are not counted.
* ``bpp_estimated``: ``sum(-log2 likelihoods) / (H * W)`` from ``model(x)`` in eval mode on
  the same (padded) input: the rate the entropy model predicts; the gap to ``bpp`` is the
  coder's overhead.
* ``psnr`` / ``ms_ssim`` / ``ms_ssim_db``: :func:`~alice_lib.evaluation.metrics.image_quality`
  on the reconstruction cropped to the original size and rounded to 8 bits.
* ``enc_time_s`` / ``dec_time_s``: wall time of ``compress`` / ``decompress``, entropy
  coding included, CUDA synchronised.

Padding (``padding``), because a transform with stride 64 needs a multiple of 64:

* ``"replicate"``: the image as it is; STF's ``compress`` replicates the right and bottom
  edges up to a multiple of 64 and ``decompress`` crops them away (this workbook's codec).
* ``"reference"``: the ALICE reference's evaluation (``src/evaluate/eval.py``): zeros,
  centred, up to a multiple of 128, added here before ``compress``, and the reconstruction
  cropped back to the centre. Kodak (768x512) needs no padding, so both give the same
  numbers there; on CLIC or Tecnick they differ. The paper profile uses ``"reference"``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import list_images, read_image
from ..utils import bpp_from_likelihoods, model_device, to_uint8
from .metrics import image_quality
from .tables import RESULTS_CSV, RowWriter, done_pairs, read_results

try:  # progress bars are a convenience, never a requirement
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    def tqdm(iterable, **_kwargs):
        return iterable

__all__ = ["Padding", "PADDINGS", "REFERENCE_MULTIPLE", "pad_reference", "crop_reference", "image_batch",
           "run_decompress", "synchronize", "code_image", "evaluate_models", "coded_row"]

Padding = Literal["reference", "replicate"]
PADDINGS: tuple[str, ...] = ("reference", "replicate")
#: The ALICE reference pads evaluation images to a multiple of this.
REFERENCE_MULTIPLE = 128


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a wall-clock time covers the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def image_batch(image: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """A ``uint8 [3, H, W]`` (or float ``[1, 3, H, W]`` in [0, 1]) image as the float batch a codec takes."""
    if image.dtype == torch.uint8:
        image = image.float().div(255)
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"expected an image [3, H, W] or [1, 3, H, W], got {tuple(image.shape)}")
    return image.to(device)


def _reference_pads(h: int, w: int, multiple: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding that centres an ``h x w`` image in a multiple of ``multiple``."""
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


def pad_reference(x: Tensor, multiple: int = REFERENCE_MULTIPLE) -> tuple[Tensor, tuple[int, int, int, int]]:
    """Zero-pad a batch ``[N, C, H, W]`` centred to a multiple of ``multiple``; returns it and the pads."""
    pads = _reference_pads(x.shape[-2], x.shape[-1], multiple)
    return (F.pad(x, pads, mode="constant", value=0.0) if any(pads) else x), pads


def crop_reference(x: Tensor, pads: tuple[int, int, int, int]) -> Tensor:
    """Undo :func:`pad_reference`: the centre of a padded batch."""
    left, right, top, bottom = pads
    return x[..., top: x.shape[-2] - bottom, left: x.shape[-1] - right]


def run_decompress(model: nn.Module, coded: Mapping) -> Tensor:
    """``x_hat`` from a ``compress`` result, passing ``image_size`` when the model takes it (CompressAI's do not)."""
    if "image_size" in coded:
        try:
            return model.decompress(coded["strings"], coded["shape"], coded["image_size"])["x_hat"]
        except TypeError:
            pass
    return model.decompress(coded["strings"], coded["shape"])["x_hat"]


def _count_bytes(strings) -> int:
    """Total length of a (nested) list of byte strings."""
    if isinstance(strings, (bytes, bytearray)):
        return len(strings)
    return sum(_count_bytes(s) for s in strings)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


@torch.no_grad()
def code_image(model: nn.Module, image: Tensor, *, padding: Padding = "replicate",
               estimate_bpp: bool = True) -> dict:
    """Encode and decode one ``uint8 [3, H, W]`` image with a real bitstream; the metric fields of a row.

    The model must be in eval mode with its entropy tables updated (``update(force=True)``).
    ``padding``: see the module doc; bpp is always over the original ``H * W``.
    """
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3, H, W] image, got {image.dtype} {tuple(image.shape)}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    device = model_device(model)
    h, w = image.shape[-2:]
    x = image_batch(image, device)
    pads = (0, 0, 0, 0)
    if padding == "reference":
        x, pads = pad_reference(x)
    coded, enc_time = _timed(lambda: model.compress(x), device)
    x_hat, dec_time = _timed(lambda: run_decompress(model, coded), device)
    x_hat = crop_reference(x_hat, pads)[0, :, :h, :w]
    n_bytes = _count_bytes(coded["strings"])
    row = {"height": h, "width": w, "bytes": n_bytes, "bpp": 8.0 * n_bytes / (h * w), "bpp_estimated": math.nan,
           "enc_time_s": enc_time, "dec_time_s": dec_time, "padding": padding}
    if estimate_bpp:
        likelihoods = {k: v.double() for k, v in model(x)["likelihoods"].items()}
        row["bpp_estimated"] = float(bpp_from_likelihoods(likelihoods, h * w))
    row.update(image_quality(image, to_uint8(x_hat).cpu()))
    return row


def coded_row(writer: RowWriter, row: dict, label: str, code: Callable[[], dict]) -> None:
    """Fill ``row`` with ``code()`` and write it; a failure becomes a row with ``error`` and the run goes on."""
    try:
        row.update(code())
    except Exception as exc:  # noqa: BLE001 - recorded in the row, the other rows still run
        warnings.warn(f"{label}: {exc}", stacklevel=3)
        row = {**row, "error": f"{exc.__class__.__name__}: {exc}"}
    writer.write(row)


def _prepare(model: nn.Module, update: bool) -> None:
    model.eval()
    if update:
        model.update(force=True)


def evaluate_models(
    models: Mapping[str, nn.Module | Callable[[], nn.Module]],
    image_dir: str | Path,
    out_dir: str | Path,
    *,
    methods: Mapping[str, str] | None = None,
    lmbdas: Mapping[str, float] | None = None,
    padding: Padding = "replicate",
    update: bool = True,
    estimate_bpp: bool = True,
    csv_name: str = RESULTS_CSV,
    resume: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Every named learned codec on every image of a folder, one row per (model, image) in ``out_dir/csv_name``.

    ``models``: name -> model, or name -> a function building it (called only when an
    image of that model is still to do, so a resumed run loads nothing it does not need).
    ``methods`` / ``lmbdas``: name -> label / lambda (default: the name; the model's
    ``lmbda`` attribute or NaN). Rows are appended and flushed as they are computed; a model
    or image that fails becomes a row with ``error`` set and the others go on. ``resume``
    keeps the CSV and skips the pairs it holds without error (rows of another ``padding``
    are dropped and recoded). Returns every row of the CSV.
    """
    if not models:
        raise ValueError("no models to evaluate")
    images = list_images(image_dir)
    csv_path = Path(out_dir) / csv_name
    with RowWriter(csv_path, append=resume, padding=padding) as writer:
        done = done_pairs(csv_path) if resume else set()
        for name, source in models.items():
            todo = [p for p in images if (name, p.name) not in done]
            if todo:
                _evaluate_one(writer, name, source, todo, methods or {}, lmbdas or {}, padding, update,
                              estimate_bpp, progress)
    return read_results(csv_path)


def _evaluate_one(writer: RowWriter, name: str, source, todo: list[Path], methods: Mapping, lmbdas: Mapping,
                  padding: Padding, update: bool, estimate_bpp: bool, progress: bool) -> None:
    """One model over the images it still lacks (a model that cannot be built or updated: an error row each)."""
    base = {"method": methods.get(name, name), "model": name, "lmbda": math.nan, "quality": math.nan,
            "padding": padding, "error": ""}
    try:
        model = source if isinstance(source, nn.Module) else source()
        lmbda = lmbdas.get(name, getattr(model, "lmbda", math.nan))
        base["lmbda"] = math.nan if lmbda is None else float(lmbda)
        _prepare(model, update)
    except Exception as exc:  # noqa: BLE001 - recorded, the other models still run
        warnings.warn(f"model {name}: {exc}", stacklevel=3)
        for path in todo:
            writer.write({**base, "image": path.name, "error": f"{exc.__class__.__name__}: {exc}"})
        return
    for path in tqdm(todo, desc=name, disable=not progress, leave=False):
        def code(path: Path = path) -> dict:
            image = read_image(path)
            return {"height": image.shape[1], "width": image.shape[2],
                    **code_image(model, image, padding=padding, estimate_bpp=estimate_bpp)}

        coded_row(writer, {**base, "image": path.name}, f"model {name}, image {path.name}", code)
