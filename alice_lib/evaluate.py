"""Rate-distortion evaluation from real bitstreams: learned codecs, classical codecs, BD-rate.

What is measured, per image (one CSV row per model and image, see :data:`RESULT_COLUMNS`):

* ``bytes`` / ``bpp``: the length of the bitstreams a model's ``compress`` returned (all
  ``y`` and ``z`` strings), ``bpp = 8 * bytes / (H * W)`` on the original pixel count. As in
  CompressAI's ``eval_model``, the few header bytes a file would also need (latent shape,
  image size) are not counted. For the classical codecs it is the whole file Pillow wrote,
  container headers included (as CompressAI's ``codecs`` benchmarks do).
* ``bpp_estimated``: ``sum(-log2 likelihoods) / (H * W)`` from ``model(x)`` in eval mode,
  the rate the entropy model predicts; the gap to ``bpp`` is the coder's overhead.
* ``psnr``: on 8-bit RGB, original ``uint8`` against the reconstruction rounded to
  ``uint8`` (``round(x_hat * 255)``), MSE over all pixels and channels, peak 255.
* ``ms_ssim``: multi-scale SSIM (Wang, Simoncelli, Bovik 2003) with ``pytorch_msssim``
  (5 scales, 11x11 Gaussian window, data range 1) on the same rounded images scaled to
  [0, 1]; ``ms_ssim_db = -10 log10(1 - ms_ssim)``. Five scales need both sides longer
  than 160 pixels; smaller images get ``NaN`` (with a warning) rather than a different,
  not comparable, metric.
* ``enc_time_s`` / ``dec_time_s``: wall time of ``compress`` / ``decompress`` (including
  entropy coding; CUDA synchronised when on GPU). Classical: Pillow's save / open+load.

Means per model (:func:`summarize`) follow CompressAI's ``eval_model``: the arithmetic
mean over images of bpp, PSNR (dB) and linear MS-SSIM; the summary's ``ms_ssim_db`` is
computed from the mean linear MS-SSIM, as CompressAI's plotting does.

Files written: ``results.csv`` (learned models) / ``classical.csv`` (Pillow codecs), one
row per model and image appended as soon as it is computed, so a crash keeps every row
already done; ``summary.csv``; one ``<method>.json`` per method in the layout of
CompressAI's published results (``{"name", "description", "results": {"psnr-rgb",
"ms-ssim-rgb", "bpp", "encoding_time", "decoding_time"}}``, see
``compressai/results/image/kodak/*.json`` in https://github.com/InterDigitalInc/CompressAI),
one point per model (= rate), sorted by bpp; ``bd_rates.csv`` from :func:`write_bd_table`.

Bjontegaard deltas (Bjontegaard, "Calculation of average PSNR differences between
RD-curves", ITU-T VCEG-M33, 2001) are computed with the maintained ``bjontegaard``
package (Herglotz et al., FAU Erlangen, https://github.com/FAU-LMS/bjontegaard), with
piecewise-cubic Akima interpolation by default (``pchip`` and the original cubic
polynomial fit of VCEG-M33 are available through ``method``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from PIL import features as pil_features
from torch import Tensor, nn

from .data import read_image

try:  # progress bars are a convenience, never a requirement
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    def tqdm(iterable, **_kwargs):
        return iterable

__all__ = [
    "RESULT_COLUMNS", "SUMMARY_COLUMNS", "BD_COLUMNS", "METHODS", "CLASSICAL_CODECS",
    "STF_PUBLISHED_KODAK", "STF_PUBLISHED_KODAK_MSSSIM",
    "find_images", "psnr_rgb", "ms_ssim_rgb", "ms_ssim_to_db",
    "code_image", "code_classical", "evaluate_models", "evaluate_classical", "summarize",
    "published_points", "write_compressai_json", "bd_rate", "bd_psnr", "bd_table",
    "write_bd_table", "run_evaluation", "avif_available",
]

#: Method names used throughout the workbook (plus ``stf-published`` for the paper's points).
METHODS = ("fixed-rate", "alice", "vanilla", "malice", "jpeg", "webp", "avif")

#: One row per (model, image); the same schema for learned and classical codecs.
RESULT_COLUMNS = [
    "method", "model", "lmbda", "quality", "image", "height", "width", "bytes", "bpp",
    "bpp_estimated", "psnr", "ms_ssim", "ms_ssim_db", "enc_time_s", "dec_time_s", "error",
]

#: One row per model (= one rate point) after :func:`summarize`.
SUMMARY_COLUMNS = [
    "method", "model", "lmbda", "quality", "n_images", "bytes", "bpp", "bpp_estimated",
    "psnr", "ms_ssim", "ms_ssim_db", "enc_time_s", "dec_time_s",
]

#: Columns of :func:`bd_table`.
BD_COLUMNS = ["method", "anchor", "metric", "bd_rate_pct", "bd_psnr_db", "n_points", "n_anchor_points"]

# ---------------------------------------------------------------------------------------------
# Published reference points
# ---------------------------------------------------------------------------------------------

#: STF (Zou, Song, Zhang, CVPR 2022), MSE-optimised models, Kodak, six rates: mean bpp and
#: mean RGB PSNR. The numbers of the paper's Kodak table as released by the authors in
#: https://github.com/Googolxx/STF ``results/stf_mse_Kodak.json`` (commit 0e248043).
STF_PUBLISHED_KODAK = {
    "method": "stf-published",
    "name": "STF (Zou et al., CVPR 2022), published",
    "source": "Zou, Song, Zhang, 'The Devil Is in the Details: Window-based Attention for Image "
              "Compression', CVPR 2022, Kodak results; github.com/Googolxx/STF "
              "results/stf_mse_Kodak.json (commit 0e2480434542af1ac9566e903c57ca0d9d9bf954)",
    "bpp": [0.124, 0.191, 0.298, 0.441, 0.651, 0.903],
    "psnr": [29.14, 30.50, 32.15, 33.97, 35.82, 37.72],
}

#: STF's separately trained MS-SSIM-optimised models on Kodak (MS-SSIM in dB). Different
#: models from the MSE ones above: only comparable to MS-SSIM-trained codecs, so the
#: figures do not overlay them by default. Same repository, ``results/stf_ms-ssim_Kodak.json``.
STF_PUBLISHED_KODAK_MSSSIM = {
    "method": "stf-published-msssim",
    "name": "STF (Zou et al., CVPR 2022), MS-SSIM-optimised, published",
    "source": "github.com/Googolxx/STF results/stf_ms-ssim_Kodak.json "
              "(commit 0e2480434542af1ac9566e903c57ca0d9d9bf954)",
    "bpp": [0.109, 0.168, 0.236, 0.340, 0.483, 0.664],
    "ms_ssim_db": [13.63, 14.96, 16.49, 18.17, 20.19, 21.50],
}


def published_points(which: str = "mse") -> pd.DataFrame:
    """Published STF points as a summary-layout DataFrame (NaN where not published).

    ``which="mse"``: :data:`STF_PUBLISHED_KODAK` (method ``stf-published``);
    ``which="ms-ssim"``: :data:`STF_PUBLISHED_KODAK_MSSSIM`. The ``source`` column cites
    where the numbers come from. Concatenate with a :func:`summarize` table to plot or to
    use the published curve as a BD anchor.
    """
    ref = {"mse": STF_PUBLISHED_KODAK, "ms-ssim": STF_PUBLISHED_KODAK_MSSSIM}[which]
    n = len(ref["bpp"])
    df = pd.DataFrame({c: [np.nan] * n for c in SUMMARY_COLUMNS})
    df["method"] = ref["method"]
    df["model"] = [f"{ref['method']}-{i}" for i in range(n)]
    df["bpp"] = ref["bpp"]
    for key in ("psnr", "ms_ssim_db"):
        if key in ref:
            df[key] = ref[key]
    if "ms_ssim_db" in ref:
        df["ms_ssim"] = 1 - 10 ** (-np.asarray(ref["ms_ssim_db"]) / 10)
    df["n_images"] = 24
    df["source"] = ref["source"]
    return df


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def find_images(image_dir: str | Path) -> list[Path]:
    """The image files of a folder, sorted by name; non-images are skipped with a warning.

    Hidden files and sub-folders are ignored. Each candidate is identified by Pillow
    (header only). Raises ``FileNotFoundError`` for a missing folder and ``ValueError``
    when no image is left.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} does not exist")
    images = []
    for path in sorted(image_dir.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018  (identification reads the header)
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            warnings.warn(f"skipping {path.name}: not an image ({exc.__class__.__name__})", stacklevel=2)
            continue
        images.append(path)
    if not images:
        raise ValueError(f"no images found in {image_dir}")
    return images


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def psnr_rgb(original: Tensor, reconstruction: Tensor) -> float:
    """PSNR in dB of two ``uint8 [3, H, W]`` images (peak 255); ``inf`` when identical."""
    if original.shape != reconstruction.shape:
        raise ValueError(f"shapes differ: {tuple(original.shape)} vs {tuple(reconstruction.shape)}")
    mse = (original.double() - reconstruction.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


_MS_SSIM_MIN_SIDE = 161  # pytorch_msssim: smaller side must exceed (11 - 1) * 2**4


def ms_ssim_rgb(original: Tensor, reconstruction: Tensor) -> float:
    """MS-SSIM (5 scales, data range 1) of two ``uint8 [3, H, W]`` images.

    ``NaN`` with a warning when a side is under 161 pixels, where the five-scale
    pyramid of Wang et al. (2003) is not defined.
    """
    from pytorch_msssim import ms_ssim

    if min(original.shape[-2:]) < _MS_SSIM_MIN_SIDE:
        warnings.warn(f"MS-SSIM needs both sides >= {_MS_SSIM_MIN_SIDE} px, image is "
                      f"{tuple(original.shape[-2:])}: reporting NaN", stacklevel=2)
        return math.nan
    a = original.unsqueeze(0).float().div(255)
    b = reconstruction.unsqueeze(0).float().div(255)
    return float(ms_ssim(a, b, data_range=1.0))


def ms_ssim_to_db(value: float) -> float:
    """``-10 log10(1 - MS-SSIM)`` (``inf`` at 1, ``NaN`` propagates)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    return math.inf if value >= 1 else -10 * math.log10(1 - value)


def _quality(original: Tensor, reconstruction: Tensor) -> dict:
    ms = ms_ssim_rgb(original, reconstruction)
    return {"psnr": psnr_rgb(original, reconstruction), "ms_ssim": ms, "ms_ssim_db": ms_ssim_to_db(ms)}


# ---------------------------------------------------------------------------------------------
# Learned codecs
# ---------------------------------------------------------------------------------------------

def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _count_bytes(strings) -> int:
    """Total length of a (nested) list of byte strings."""
    if isinstance(strings, (bytes, bytearray)):
        return len(strings)
    return sum(_count_bytes(s) for s in strings)


def _decompress(model: nn.Module, enc: dict) -> Tensor:
    if "image_size" in enc:
        try:
            return model.decompress(enc["strings"], enc["shape"], enc["image_size"])["x_hat"]
        except TypeError:  # a CompressAI model without the image_size argument
            pass
    return model.decompress(enc["strings"], enc["shape"])["x_hat"]


@torch.no_grad()
def code_image(model: nn.Module, image: Tensor, *, estimate_bpp: bool = True) -> dict:
    """Encode and decode one ``uint8 [3, H, W]`` image with a real bitstream.

    The model must be in eval mode with its entropy tables updated
    (``model.update(force=True)``). Returns the metric fields of :data:`RESULT_COLUMNS`
    (``height``, ``width``, ``bytes``, ``bpp``, ``bpp_estimated``, ``psnr``, ``ms_ssim``,
    ``ms_ssim_db``, ``enc_time_s``, ``dec_time_s``).
    """
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3, H, W] image, got {image.dtype} {tuple(image.shape)}")
    device = _model_device(model)
    h, w = image.shape[-2:]
    x = image.to(device).float().div(255).unsqueeze(0)

    _sync(device)
    t0 = time.perf_counter()
    enc = model.compress(x)
    _sync(device)
    enc_time = time.perf_counter() - t0

    t0 = time.perf_counter()
    x_hat = _decompress(model, enc)
    _sync(device)
    dec_time = time.perf_counter() - t0

    x_hat = x_hat[0, :, :h, :w].clamp(0, 1)
    recon = x_hat.mul(255).round().to(torch.uint8).cpu()
    n_bytes = _count_bytes(enc["strings"])
    row = {"height": h, "width": w, "bytes": n_bytes, "bpp": 8.0 * n_bytes / (h * w),
           "bpp_estimated": math.nan, "enc_time_s": enc_time, "dec_time_s": dec_time}
    if estimate_bpp:
        likelihoods = model(x)["likelihoods"]
        bits = sum(torch.log2(lk.double()).sum().neg() for lk in likelihoods.values())
        row["bpp_estimated"] = float(bits) / (h * w)
    row.update(_quality(image, recon))
    return row


class _RowWriter:
    """Appends result rows to a CSV as they are computed (flushed each time)."""

    def __init__(self, path: Path, append: bool):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not (append and path.exists() and path.stat().st_size > 0)
        self._file = path.open("w" if new else "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        if new:
            self._writer.writeheader()
            self._file.flush()

    def write(self, row: dict) -> None:
        self._writer.writerow({k: row.get(k, "") for k in RESULT_COLUMNS})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _read_results(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, keep_default_na=True)
    df["error"] = df["error"].fillna("").astype(str)
    return df


def _done_pairs(path: Path) -> set[tuple[str, str]]:
    if not path.exists() or path.stat().st_size == 0:
        return set()
    df = _read_results(path)
    ok = df[df["error"] == ""]
    return set(zip(ok["model"].astype(str), ok["image"].astype(str)))


def _error_row(base: dict, exc: BaseException) -> dict:
    return {**base, "error": f"{exc.__class__.__name__}: {exc}"}


def _write_coded(writer: _RowWriter, row: dict, label: str, code) -> None:
    """Fill ``row`` with ``code()`` and write it; a failure becomes an error row and the run goes on."""
    try:
        row.update(code())
    except Exception as exc:  # noqa: BLE001 - recorded in the row, the other rows still run
        warnings.warn(f"{label}: {exc}", stacklevel=3)
        row = _error_row(row, exc)
    writer.write(row)


def evaluate_models(
    models: Mapping[str, nn.Module],
    image_dir: str | Path,
    out_dir: str | Path,
    *,
    methods: Mapping[str, str] | None = None,
    lmbdas: Mapping[str, float] | None = None,
    update: bool = True,
    estimate_bpp: bool = True,
    csv_name: str = "results.csv",
    resume: bool = False,
    write_json: bool = True,
    description: str = "",
    progress: bool = True,
) -> pd.DataFrame:
    """Evaluate named learned codecs on every image of a folder from real bitstreams.

    ``models``: name -> model (e.g. ``{"alice-0.0018": m, ...}``), each on the device it
    should run on. ``methods``: name -> method label (``fixed-rate``, ``alice``,
    ``vanilla``, ``malice``, ...; default: the name itself). ``lmbdas``: name -> lambda
    (default: the model's ``lmbda`` attribute if any, else NaN). With ``update`` each
    model gets ``eval()`` and ``update(force=True)`` once before coding.

    Writes ``out_dir/csv_name`` (one row per model and image, appended and flushed as
    soon as each is done; an image or model that fails becomes a row with ``error`` set
    and the evaluation goes on) and, with ``write_json``, one CompressAI-layout JSON per
    method (``summary.csv`` is written by :func:`run_evaluation`).
    ``resume=True`` keeps an existing CSV and skips the (model, image) pairs it already
    holds without error. Returns every row of the CSV as a DataFrame
    (:data:`RESULT_COLUMNS`).
    """
    if not models:
        raise ValueError("no models to evaluate")
    images = find_images(image_dir)
    out_dir = Path(out_dir)
    csv_path = out_dir / csv_name
    done = _done_pairs(csv_path) if resume else set()
    methods = dict(methods or {})
    lmbdas = dict(lmbdas or {})
    writer = _RowWriter(csv_path, append=resume)
    try:
        for name, model in models.items():
            lmbda = lmbdas.get(name, getattr(model, "lmbda", math.nan))
            base = {"method": methods.get(name, name), "model": name,
                    "lmbda": math.nan if lmbda is None else float(lmbda), "quality": math.nan}
            todo = [p for p in images if (name, p.name) not in done]
            if not todo:
                continue
            try:
                model.eval()
                if update:
                    model.update(force=True)
            except Exception as exc:  # noqa: BLE001 - recorded, the other models still run
                warnings.warn(f"model {name}: update failed: {exc}", stacklevel=2)
                for path in todo:
                    writer.write(_error_row({**base, "image": path.name}, exc))
                continue
            bar = tqdm(todo, desc=name, disable=not progress, leave=False)
            for path in bar:
                def code(path: Path = path) -> dict:
                    image = read_image(path)
                    return {"height": image.shape[1], "width": image.shape[2],
                            **code_image(model, image, estimate_bpp=estimate_bpp)}

                _write_coded(writer, {**base, "image": path.name, "error": ""}, f"model {name}, image {path.name}",
                             code)
    finally:
        writer.close()
    results = _read_results(csv_path)
    if write_json:
        write_compressai_json(summarize(results), out_dir, description=description or "real rANS bitstreams")
    return results


# ---------------------------------------------------------------------------------------------
# Classical codecs (Pillow)
# ---------------------------------------------------------------------------------------------

def avif_available() -> bool:
    """Whether Pillow can write AVIF (built-in since Pillow 11.2; else ``pillow-avif-plugin``)."""
    if pil_features.check("avif"):
        return True
    try:  # pragma: no cover - depends on the environment
        import pillow_avif  # noqa: F401
    except ImportError:
        return False
    return "AVIF" in Image.SAVE


#: Pillow format, fixed save options and the default quality sweep of each codec.
#: JPEG: libjpeg(-turbo), 4:4:4 (``subsampling=0``), optimised Huffman tables, baseline.
#: WebP: libwebp lossy (VP8), which only codes 4:2:0; ``method=6`` (slowest, best RD).
#: AVIF: libavif (AV1, whichever encoder Pillow's libavif has, usually libaom), 4:4:4,
#: full range, ``speed=6`` (Pillow's default; 0 is slowest/best).
#: The sweeps cover about 0.1-1.5 bpp on Kodak (JPEG 4:4:4 cannot go much below 0.2).
CLASSICAL_CODECS: dict[str, dict] = {
    "jpeg": {"format": "JPEG", "options": {"subsampling": 0, "optimize": True},
             "qualities": (3, 5, 8, 10, 15, 20, 30, 40, 50, 65, 80)},
    "webp": {"format": "WEBP", "options": {"method": 6},
             "qualities": (0, 2, 5, 10, 20, 30, 40, 50, 60, 75, 90)},
    "avif": {"format": "AVIF", "options": {"subsampling": "4:4:4", "speed": 6, "range": "full"},
             "qualities": (5, 10, 15, 20, 30, 40, 50, 60, 70)},
}


def code_classical(image: Tensor, codec: str, quality: int, options: Mapping | None = None) -> dict:
    """Encode and decode one ``uint8 [3, H, W]`` image with Pillow; same fields as :func:`code_image`.

    ``bytes`` is the length of the whole file Pillow wrote. ``options`` override
    :data:`CLASSICAL_CODECS` save options.
    """
    spec = CLASSICAL_CODECS[codec]
    opts = {**spec["options"], **(options or {})}
    h, w = image.shape[-2:]
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), mode="RGB")
    buf = io.BytesIO()
    t0 = time.perf_counter()
    pil.save(buf, spec["format"], quality=int(quality), **opts)
    enc_time = time.perf_counter() - t0
    data = buf.getvalue()
    t0 = time.perf_counter()
    with Image.open(io.BytesIO(data)) as dec:
        dec.load()
        rgb = np.asarray(dec.convert("RGB"), dtype=np.uint8)
    dec_time = time.perf_counter() - t0
    recon = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    if recon.shape != image.shape:
        raise RuntimeError(f"{codec} decoded {tuple(recon.shape)} from {tuple(image.shape)}")
    row = {"height": h, "width": w, "bytes": len(data), "bpp": 8.0 * len(data) / (h * w),
           "bpp_estimated": math.nan, "enc_time_s": enc_time, "dec_time_s": dec_time}
    row.update(_quality(image, recon))
    return row


def evaluate_classical(
    image_dir: str | Path,
    out_dir: str | Path,
    codecs: Sequence[str] = ("jpeg", "webp", "avif"),
    qualities: Mapping[str, Iterable[int]] | None = None,
    *,
    options: Mapping[str, Mapping] | None = None,
    csv_name: str = "classical.csv",
    write_json: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """JPEG / WebP / AVIF through Pillow on every image of a folder, one row per (codec, quality, image).

    ``qualities``: codec -> qualities (default :data:`CLASSICAL_CODECS` sweeps);
    ``options``: codec -> save options overriding the defaults. AVIF is skipped with a
    warning when Pillow cannot write it. Rows go to ``out_dir/csv_name`` as they are
    computed (failures are rows with ``error`` set); one CompressAI-layout JSON per codec.
    Model names are ``<codec>-q<quality>``, method is the codec name.
    """
    images = find_images(image_dir)
    out_dir = Path(out_dir)
    qualities = dict(qualities or {})
    options = dict(options or {})
    usable = []
    for codec in codecs:
        if codec not in CLASSICAL_CODECS:
            raise ValueError(f"unknown codec {codec!r}; known: {sorted(CLASSICAL_CODECS)}")
        if codec == "avif" and not avif_available():
            warnings.warn("Pillow has no AVIF support (install pillow-avif-plugin): skipping AVIF", stacklevel=2)
            continue
        if codec == "webp" and not pil_features.check("webp"):
            warnings.warn("Pillow has no WebP support: skipping WebP", stacklevel=2)
            continue
        usable.append(codec)
    csv_path = out_dir / csv_name
    writer = _RowWriter(csv_path, append=False)
    try:
        for path in tqdm(images, desc="classical codecs", disable=not progress, leave=False):
            try:
                image = read_image(path)
            except Exception as exc:  # noqa: BLE001
                warnings.warn(f"image {path.name}: {exc}", stacklevel=2)
                for codec in usable:
                    writer.write(_error_row({"method": codec, "model": codec, "image": path.name}, exc))
                continue
            for codec in usable:
                for q in qualities.get(codec, CLASSICAL_CODECS[codec]["qualities"]):
                    row = {"method": codec, "model": f"{codec}-q{int(q)}", "lmbda": math.nan,
                           "quality": int(q), "image": path.name, "height": image.shape[1],
                           "width": image.shape[2], "error": ""}
                    _write_coded(writer, row, f"{codec} q={q}, image {path.name}",
                                 lambda: code_classical(image, codec, q, options.get(codec)))
    finally:
        writer.close()
    results = _read_results(csv_path)
    if write_json:
        desc = {c: f"Pillow {Image.__version__}, {CLASSICAL_CODECS[c]['format']} "
                   f"{ {**CLASSICAL_CODECS[c]['options'], **options.get(c, {})} }" for c in usable}
        write_compressai_json(summarize(results), out_dir, description=desc)
    return results


# ---------------------------------------------------------------------------------------------
# Summaries and CompressAI JSON
# ---------------------------------------------------------------------------------------------

def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Means per model (= rate point) over its images, rows with an error left out.

    Columns :data:`SUMMARY_COLUMNS`; ``ms_ssim_db`` from the mean linear MS-SSIM (NaN
    images skipped). Sorted by method, then bpp.
    """
    df = results.copy()
    if "error" in df:
        df = df[df["error"].fillna("").astype(str) == ""]
    df = df.dropna(subset=["bpp"])
    if df.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    keys = ["method", "model"]
    values = ["lmbda", "quality", "bytes", "bpp", "bpp_estimated", "psnr", "ms_ssim", "enc_time_s", "dec_time_s"]
    for col in values:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    summary = df.groupby(keys, sort=False)[values].mean().reset_index()
    summary["n_images"] = df.groupby(keys, sort=False).size().to_numpy()
    summary["ms_ssim_db"] = [ms_ssim_to_db(v) for v in summary["ms_ssim"]]
    return summary[SUMMARY_COLUMNS].sort_values(["method", "bpp"], kind="stable").reset_index(drop=True)


def _json_list(values) -> list:
    return [None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v) for v in values]


def write_compressai_json(
    summary: pd.DataFrame,
    out_dir: str | Path,
    *,
    description: str | Mapping[str, str] = "",
    names: Mapping[str, str] | None = None,
) -> list[Path]:
    """One ``<method>.json`` per method in the layout of CompressAI's published results.

    ``{"name": method, "description": ..., "results": {"psnr-rgb", "ms-ssim-rgb", "bpp",
    "encoding_time", "decoding_time"}}``, one entry per model of the method sorted by bpp
    (CompressAI, ``results/image/kodak/*.json``; NaN written as ``null``). ``description``
    may be one string or method -> string. Returns the paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for method, group in summary.groupby("method", sort=False):
        group = group.sort_values("bpp")
        desc = description.get(method, "") if isinstance(description, Mapping) else description
        doc = {
            "name": (names or {}).get(method, method),
            "description": desc,
            "results": {
                "psnr-rgb": _json_list(group["psnr"]),
                "ms-ssim-rgb": _json_list(group["ms_ssim"]),
                "bpp": _json_list(group["bpp"]),
                "encoding_time": _json_list(group["enc_time_s"]),
                "decoding_time": _json_list(group["dec_time_s"]),
            },
        }
        path = out_dir / f"{method}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Bjontegaard deltas
# ---------------------------------------------------------------------------------------------

def _clean_curve(rate, dist, sort_by: str) -> tuple[np.ndarray, np.ndarray]:
    """Finite positive-rate points sorted by ``sort_by`` ("rate" or "dist") with duplicates of it averaged."""
    rate = np.asarray(rate, dtype=float)
    dist = np.asarray(dist, dtype=float)
    ok = np.isfinite(rate) & np.isfinite(dist) & (rate > 0)
    rate, dist = rate[ok], dist[ok]
    key = rate if sort_by == "rate" else dist
    uniq, inverse = np.unique(key, return_inverse=True)
    if len(uniq) < len(key):
        rate = np.bincount(inverse, rate) / np.bincount(inverse)
        dist = np.bincount(inverse, dist) / np.bincount(inverse)
    else:
        order = np.argsort(key)
        rate, dist = rate[order], dist[order]
    return rate, dist


def _bd(kind: str, rate_anchor, dist_anchor, rate_test, dist_test, method: str, min_overlap: float) -> float:
    import bjontegaard

    sort_by = "dist" if kind == "rate" else "rate"  # the interpolation's independent variable
    ra, da = _clean_curve(rate_anchor, dist_anchor, sort_by)
    rt, dt = _clean_curve(rate_test, dist_test, sort_by)
    if len(ra) < 2 or len(rt) < 2:
        warnings.warn("BD needs at least two distinct points per curve: NaN", stacklevel=3)
        return math.nan
    fn = bjontegaard.bd_rate if kind == "rate" else bjontegaard.bd_psnr
    return float(fn(ra, da, rt, dt, method=method, require_matching_points=False, min_overlap=min_overlap))


def bd_rate(rate_anchor, dist_anchor, rate_test, dist_test, *, method: str = "akima",
            min_overlap: float = 0.75) -> float:
    """Bjontegaard-delta rate in percent (negative: the test curve needs fewer bits).

    Thin wrapper over ``bjontegaard.bd_rate`` (FAU-LMS ``bjontegaard`` package; VCEG-M33
    2001 with ``akima`` / ``pchip`` / ``cubic`` interpolation of log-rate over distortion):
    drops non-finite points, sorts each curve by distortion and averages duplicates
    (Akima needs a strictly increasing abscissa), allows different point counts. NaN
    with a warning when a curve has fewer than two points or the curves do not overlap.
    """
    return _bd("rate", rate_anchor, dist_anchor, rate_test, dist_test, method, min_overlap)


def bd_psnr(rate_anchor, dist_anchor, rate_test, dist_test, *, method: str = "akima",
            min_overlap: float = 0.75) -> float:
    """Bjontegaard-delta of the quality metric in its unit (dB for PSNR or MS-SSIM dB), ``bjontegaard.bd_psnr``."""
    return _bd("dist", rate_anchor, dist_anchor, rate_test, dist_test, method, min_overlap)


_METRIC_COLUMNS = {"psnr": "psnr", "ms_ssim_db": "ms_ssim_db", "ms-ssim": "ms_ssim_db", "ms_ssim": "ms_ssim_db"}


def bd_table(
    summary: pd.DataFrame,
    pairs: Sequence[tuple[str, str]] | None = None,
    metric: str = "psnr",
    *,
    anchor: str | None = None,
    method: str = "akima",
    min_overlap: float = 0.0,
) -> pd.DataFrame:
    """BD-rate and BD-metric of method curves against anchor curves.

    ``summary``: a :func:`summarize` table (a per-image results table is summarised
    first), possibly concatenated with :func:`published_points`. ``pairs``: (method,
    anchor) tuples; default: every other method against ``anchor`` (default
    ``fixed-rate`` if present, else the first method). ``metric``: ``psnr`` or
    ``ms_ssim_db`` (``ms-ssim`` / ``ms_ssim`` mean MS-SSIM in dB). Columns
    :data:`BD_COLUMNS`; ``bd_psnr_db`` is the delta of the chosen metric in dB. Partial
    overlap is allowed (``min_overlap=0``): check ``n_points`` and the curves.
    """
    if "image" in summary.columns and "n_images" not in summary.columns:
        summary = summarize(summary)
    column = _METRIC_COLUMNS.get(metric)
    if column is None:
        raise ValueError(f"metric must be one of {sorted(_METRIC_COLUMNS)}, got {metric!r}")
    present = list(dict.fromkeys(summary["method"]))
    if pairs is None:
        anchor = anchor or ("fixed-rate" if "fixed-rate" in present else present[0])
        pairs = [(m, anchor) for m in present if m != anchor]
    rows = []
    for test, ref in pairs:
        for m in (test, ref):
            if m not in present:
                raise KeyError(f"method {m!r} not in the summary (have {present})")
        a = summary[summary["method"] == ref]
        t = summary[summary["method"] == test]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if min_overlap == 0 else "default")
            rate = bd_rate(a["bpp"], a[column], t["bpp"], t[column], method=method, min_overlap=min_overlap)
            dist = bd_psnr(a["bpp"], a[column], t["bpp"], t[column], method=method, min_overlap=min_overlap)
        rows.append({"method": test, "anchor": ref, "metric": column, "bd_rate_pct": rate,
                     "bd_psnr_db": dist, "n_points": int(t[column].notna().sum()),
                     "n_anchor_points": int(a[column].notna().sum())})
    return pd.DataFrame(rows, columns=BD_COLUMNS)


def write_bd_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a :func:`bd_table` (or several concatenated) to CSV; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False, float_format="%.4f")
    return path


# ---------------------------------------------------------------------------------------------
# One call: learned + classical + published, CSV, JSON, BD table, figures
# ---------------------------------------------------------------------------------------------

def run_evaluation(
    models: Mapping[str, nn.Module],
    image_dir: str | Path,
    out_dir: str | Path,
    *,
    methods: Mapping[str, str] | None = None,
    lmbdas: Mapping[str, float] | None = None,
    classical: Sequence[str] = ("jpeg", "webp", "avif"),
    qualities: Mapping[str, Iterable[int]] | None = None,
    anchor: str | None = None,
    published: bool = True,
    figures: bool = True,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Evaluate learned models and classical codecs on a folder and write every artefact.

    Writes ``results.csv``, ``classical.csv``, ``summary.csv`` (all rate points, published
    STF points included when ``published``), one JSON per method, ``bd_rates.csv`` (PSNR
    and MS-SSIM-dB BD against ``anchor``: default ``fixed-rate`` if evaluated, else the
    published STF curve, else the first method) and, with ``figures``, the RD figures
    (``rd_psnr``, ``rd_msssim`` as PNG and PDF). Returns ``{"results", "classical",
    "summary", "bd"}``.
    """
    out_dir = Path(out_dir)
    out: dict[str, pd.DataFrame] = {}
    frames = []
    if models:
        out["results"] = evaluate_models(models, image_dir, out_dir, methods=methods, lmbdas=lmbdas,
                                         progress=progress)
        frames.append(out["results"])
    if classical:
        out["classical"] = evaluate_classical(image_dir, out_dir, classical, qualities, progress=progress)
        frames.append(out["classical"])
    if not frames:
        raise ValueError("nothing to evaluate: no models and no classical codecs")
    summary = summarize(pd.concat(frames, ignore_index=True))
    if published:
        summary = pd.concat([summary, published_points("mse")], ignore_index=True)
    summary.to_csv(out_dir / "summary.csv", index=False)
    out["summary"] = summary

    present = list(dict.fromkeys(summary["method"]))
    if anchor is None:
        anchor = next((m for m in ("fixed-rate", "stf-published") if m in present), present[0])
    tables = [bd_table(summary, [(m, anchor) for m in present if m != anchor], metric="psnr")]
    with_msssim = [m for m in present if m != anchor and summary.loc[summary["method"] == m, "ms_ssim_db"].notna().sum() >= 2]
    if with_msssim and summary.loc[summary["method"] == anchor, "ms_ssim_db"].notna().sum() >= 2:
        tables.append(bd_table(summary, [(m, anchor) for m in with_msssim], metric="ms_ssim_db"))
    out["bd"] = pd.concat(tables, ignore_index=True)
    write_bd_table(out["bd"], out_dir / "bd_rates.csv")

    if figures:
        from .figures import plot_rd_curves

        plot_rd_curves(summary, out_dir)
    return out
