"""JPEG, WebP and AVIF through Pillow, measured like the learned codecs.

``bytes`` is the whole file Pillow wrote, container headers included (as CompressAI's
``codecs`` benchmarks count it); quality on the decoded 8-bit image
(:func:`~alice_lib.evaluation.metrics.image_quality`); times are Pillow's save and
open + load. Rows have the learned codecs' schema, with ``quality`` set and ``lmbda`` NaN.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from PIL import features as pil_features
from torch import Tensor

from ..data import list_images, read_image
from .coding import coded_row, tqdm
from .metrics import image_quality
from .tables import CLASSICAL_CSV, RowWriter, read_results

__all__ = ["CLASSICAL_CODECS", "ClassicalCoded", "avif_available", "usable_codecs", "encode_classical",
           "decode_classical", "code_classical", "code_classical_image", "evaluate_classical",
           "classical_descriptions"]

#: Pillow format, fixed save options and the default quality sweep of each codec.
#: JPEG: libjpeg(-turbo), 4:4:4 (``subsampling=0``), optimised Huffman tables, baseline.
#: WebP: libwebp lossy (VP8), which only codes 4:2:0; ``method=6`` (slowest, best RD).
#: AVIF: libavif (AV1, usually libaom), 4:4:4, full range, ``speed=6`` (Pillow's default).
#: The sweeps cover about 0.1-1.5 bpp on Kodak (JPEG 4:4:4 cannot go much below 0.2).
CLASSICAL_CODECS: dict[str, dict] = {
    "jpeg": {"format": "JPEG", "options": {"subsampling": 0, "optimize": True},
             "qualities": (3, 5, 8, 10, 15, 20, 30, 40, 50, 65, 80)},
    "webp": {"format": "WEBP", "options": {"method": 6},
             "qualities": (0, 2, 5, 10, 20, 30, 40, 50, 60, 75, 90)},
    "avif": {"format": "AVIF", "options": {"subsampling": "4:4:4", "speed": 6, "range": "full"},
             "qualities": (5, 10, 15, 20, 30, 40, 50, 60, 70)},
}


def avif_available() -> bool:
    """Whether Pillow can write AVIF (built in since Pillow 11.2; else ``pillow-avif-plugin``)."""
    if pil_features.check("avif"):
        return True
    try:  # pragma: no cover - depends on the environment
        import pillow_avif  # noqa: F401
    except ImportError:
        return False
    return "AVIF" in Image.SAVE


def usable_codecs(codecs: Sequence[str]) -> list[str]:
    """The requested codecs this Pillow can write; unknown names raise, missing support warns and skips."""
    usable = []
    for codec in codecs:
        if codec not in CLASSICAL_CODECS:
            raise ValueError(f"unknown codec {codec!r}; known: {sorted(CLASSICAL_CODECS)}")
        if codec == "avif" and not avif_available():
            warnings.warn("Pillow has no AVIF support (install pillow-avif-plugin): skipping AVIF", stacklevel=2)
        elif codec == "webp" and not pil_features.check("webp"):
            warnings.warn("Pillow has no WebP support: skipping WebP", stacklevel=2)
        else:
            usable.append(codec)
    return usable


@dataclass(frozen=True, eq=False)  # holds a tensor: compared by identity
class ClassicalCoded:
    """One image through a classical codec: the file, what it decodes to, and its result-row fields."""

    data: bytes            # the whole file Pillow wrote
    reconstruction: Tensor  # uint8 [3, H, W]
    row: dict              # the metric fields of a result row (:func:`code_classical`)


def encode_classical(image: Tensor, codec: str, quality: int, options: Mapping | None = None) -> bytes:
    """The whole file Pillow writes for a ``uint8 [3, H, W]`` image (no decoding, no metric).

    Alone because a size is all a search over qualities needs (``alice_lib.explore``
    sizes every JPEG quality of an image once); ``options`` override the
    :data:`CLASSICAL_CODECS` save options.
    """
    spec = CLASSICAL_CODECS[codec]
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), mode="RGB")
    buf = io.BytesIO()
    pil.save(buf, spec["format"], quality=int(quality), **{**spec["options"], **(options or {})})
    return buf.getvalue()


def decode_classical(data: bytes) -> Tensor:
    """A classical file's image as ``uint8 [3, H, W]`` RGB."""
    with Image.open(io.BytesIO(data)) as decoded:
        decoded.load()
        rgb = np.array(decoded.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def code_classical_image(image: Tensor, codec: str, quality: int, options: Mapping | None = None) -> ClassicalCoded:
    """Encode and decode one ``uint8 [3, H, W]`` image with Pillow, keeping the file and its reconstruction."""
    h, w = image.shape[-2:]
    start = time.perf_counter()
    data = encode_classical(image, codec, quality, options)
    enc_time = time.perf_counter() - start
    start = time.perf_counter()
    recon = decode_classical(data)
    dec_time = time.perf_counter() - start
    if recon.shape != image.shape:
        raise RuntimeError(f"{codec} decoded {tuple(recon.shape)} from {tuple(image.shape)}")
    row = {"height": h, "width": w, "bytes": len(data), "bpp": 8.0 * len(data) / (h * w),
           "bpp_estimated": math.nan, "enc_time_s": enc_time, "dec_time_s": dec_time, "padding": "none"}
    row.update(image_quality(image, recon))
    return ClassicalCoded(data, recon, row)


def code_classical(image: Tensor, codec: str, quality: int, options: Mapping | None = None) -> dict:
    """Encode and decode one ``uint8 [3, H, W]`` image with Pillow; the metric fields of a result row.

    ``options`` override the :data:`CLASSICAL_CODECS` save options.
    """
    return code_classical_image(image, codec, quality, options).row


def classical_descriptions(codecs: Iterable[str], options: Mapping[str, Mapping] | None = None) -> dict[str, str]:
    """What each codec ran as (library, format, options): the ``description`` of its CompressAI JSON."""
    options = options or {}
    return {c: f"Pillow {Image.__version__}, {CLASSICAL_CODECS[c]['format']} "
               f"{ {**CLASSICAL_CODECS[c]['options'], **options.get(c, {})} }" for c in codecs}


def evaluate_classical(
    image_dir: str | Path,
    out_dir: str | Path,
    codecs: Sequence[str] = ("jpeg", "webp", "avif"),
    qualities: Mapping[str, Iterable[int]] | None = None,
    *,
    options: Mapping[str, Mapping] | None = None,
    csv_name: str = CLASSICAL_CSV,
    progress: bool = True,
) -> pd.DataFrame:
    """Every usable codec at every quality on every image of a folder, one row each in ``out_dir/csv_name``.

    ``qualities``: codec -> qualities (default the :data:`CLASSICAL_CODECS` sweeps).
    Model names are ``<codec>-q<quality>``, method the codec. The CSV is rewritten each
    call (the sweep takes seconds); failures are rows with ``error`` set.
    """
    images = list_images(image_dir)
    qualities, options = dict(qualities or {}), dict(options or {})
    usable = usable_codecs(codecs)
    csv_path = Path(out_dir) / csv_name
    with RowWriter(csv_path, append=False) as writer:
        for path in tqdm(images, desc="classical codecs", disable=not progress, leave=False):
            try:
                image = read_image(path)
            except Exception as exc:  # noqa: BLE001 - an unreadable file is a row, not the end of the run
                warnings.warn(f"image {path.name}: {exc}", stacklevel=2)
                for codec in usable:
                    writer.write({"method": codec, "model": codec, "image": path.name,
                                  "error": f"{exc.__class__.__name__}: {exc}"})
                continue
            for codec in usable:
                for q in qualities.get(codec, CLASSICAL_CODECS[codec]["qualities"]):
                    row = {"method": codec, "model": f"{codec}-q{int(q)}", "lmbda": math.nan, "quality": int(q),
                           "image": path.name, "height": image.shape[1], "width": image.shape[2], "error": ""}
                    coded_row(writer, row, f"{codec} q={q}, image {path.name}",
                              lambda image=image, codec=codec, q=q: code_classical(image, codec, q,
                                                                                   options.get(codec)))
    return read_results(csv_path)
