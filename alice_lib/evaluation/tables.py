"""The tables evaluation writes and reads: per-image rows, summaries, CompressAI JSON, published points.

One function per table, so the pipeline, the notebooks and the tests all get the same
numbers:

* per image: ``results.csv`` (learned) and ``classical.csv`` (Pillow), columns
  :data:`RESULT_COLUMNS`, appended row by row by :class:`RowWriter` so that a crash
  keeps every row already computed;
* per rate point: :func:`summarize` -> ``summary.csv`` (:data:`SUMMARY_COLUMNS`), the
  arithmetic mean over images of bpp, PSNR (dB) and linear MS-SSIM as CompressAI's
  ``eval_model`` averages, with ``ms_ssim_db`` from the mean linear MS-SSIM;
* per method: :func:`write_compressai_json` -> ``<method>.json`` in the layout of
  CompressAI's published results (``results/image/kodak/*.json``);
* :func:`read_tables`: what ``05_figures`` reads back, never recomputing anything.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..utils import atomic_write
from .metrics import ms_ssim_to_db

__all__ = [
    "RESULT_COLUMNS", "SUMMARY_COLUMNS", "RESULTS_CSV", "CLASSICAL_CSV", "SUMMARY_CSV", "BD_CSV",
    "STF_PUBLISHED_KODAK", "STF_PUBLISHED_KODAK_MSSSIM", "RowWriter", "read_results", "done_pairs",
    "summarize", "write_summary", "published_points", "write_compressai_json", "EvaluationTables", "read_tables",
]

#: One row per (model, image); the same schema for learned and classical codecs.
RESULT_COLUMNS = [
    "method", "model", "lmbda", "quality", "image", "height", "width", "bytes", "bpp",
    "bpp_estimated", "psnr", "ms_ssim", "ms_ssim_db", "enc_time_s", "dec_time_s", "padding", "error",
]

#: One row per model (= one rate point) after :func:`summarize`.
SUMMARY_COLUMNS = [
    "method", "model", "lmbda", "quality", "n_images", "bytes", "bpp", "bpp_estimated",
    "psnr", "ms_ssim", "ms_ssim_db", "enc_time_s", "dec_time_s",
]

#: File names of an evaluation folder (``runs/<profile>/eval``) and of a report folder.
RESULTS_CSV, CLASSICAL_CSV, SUMMARY_CSV, BD_CSV = "results.csv", "classical.csv", "summary.csv", "bd_rate.csv"

# ---------------------------------------------------------------------------- published points
#: STF (Zou, Song, Zhang, CVPR 2022), MSE-optimised models, Kodak, six rates: mean bpp and
#: mean RGB PSNR, as released by the authors in https://github.com/Googolxx/STF
#: ``results/stf_mse_Kodak.json`` (commit 0e248043).
STF_PUBLISHED_KODAK = {
    "method": "stf-published",
    "name": "STF (Zou et al., CVPR 2022), published",
    "source": "Zou, Song, Zhang, 'The Devil Is in the Details: Window-based Attention for Image "
              "Compression', CVPR 2022, Kodak results; github.com/Googolxx/STF "
              "results/stf_mse_Kodak.json (commit 0e2480434542af1ac9566e903c57ca0d9d9bf954)",
    "bpp": [0.124, 0.191, 0.298, 0.441, 0.651, 0.903],
    "psnr": [29.14, 30.50, 32.15, 33.97, 35.82, 37.72],
}

#: STF's separately trained MS-SSIM-optimised models on Kodak (MS-SSIM in dB): only
#: comparable with MS-SSIM-trained codecs. Same repository, ``results/stf_ms-ssim_Kodak.json``.
STF_PUBLISHED_KODAK_MSSSIM = {
    "method": "stf-published-msssim",
    "name": "STF (Zou et al., CVPR 2022), MS-SSIM-optimised, published",
    "source": "github.com/Googolxx/STF results/stf_ms-ssim_Kodak.json "
              "(commit 0e2480434542af1ac9566e903c57ca0d9d9bf954)",
    "bpp": [0.109, 0.168, 0.236, 0.340, 0.483, 0.664],
    "ms_ssim_db": [13.63, 14.96, 16.49, 18.17, 20.19, 21.50],
}


def published_points(which: str = "mse") -> pd.DataFrame:
    """Published STF points as a summary-layout table (NaN where not published), ``source`` citing them.

    ``which="mse"``: :data:`STF_PUBLISHED_KODAK`; ``"ms-ssim"``: :data:`STF_PUBLISHED_KODAK_MSSSIM`.
    Concatenate with a :func:`summarize` table to draw them or to use them as a BD reference.
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


# ---------------------------------------------------------------------------- per-image rows
class RowWriter:
    """Appends result rows to a CSV as they are computed, flushed each time: a crash loses no finished row."""

    def __init__(self, path: Path, append: bool, padding: str | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not (append and path.exists() and path.stat().st_size > 0)
        if not new and padding is not None and _other_padding(path, padding):
            warnings.warn(f"{path} holds rows coded with another padding than {padding!r}: "
                          "coding every image again", stacklevel=3)
            new = True
        self._file = path.open("w" if new else "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        if new:
            self._writer.writeheader()
            self._file.flush()

    def write(self, row: Mapping) -> None:
        self._writer.writerow({k: row.get(k, "") for k in RESULT_COLUMNS})
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def _other_padding(path: Path, padding: str) -> bool:
    used = read_results(path)["padding"].astype(str)
    return bool((used != padding).any())


def read_results(path: str | Path) -> pd.DataFrame:
    """A per-image CSV with ``error`` as text ("" for a good row)."""
    df = pd.read_csv(path, keep_default_na=True)
    df["error"] = df["error"].fillna("").astype(str)
    return df


def done_pairs(path: Path) -> set[tuple[str, str]]:
    """``(model, image)`` pairs a per-image CSV already holds without error (what a resumed run skips)."""
    if not path.exists() or path.stat().st_size == 0:
        return set()
    df = read_results(path)
    ok = df[df["error"] == ""]
    return set(zip(ok["model"].astype(str), ok["image"].astype(str)))


# ---------------------------------------------------------------------------- summaries
def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Means per model (= rate point) over its images, error rows left out; sorted by method, then bpp.

    Columns :data:`SUMMARY_COLUMNS`. ``ms_ssim_db`` comes from the mean linear MS-SSIM
    (NaN images skipped), as CompressAI's plots do, not from the mean of per-image dB.
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


def write_summary(summary: pd.DataFrame, path: str | Path) -> Path:
    """Write a summary table atomically (a reader never sees half a table)."""
    return atomic_write(path, lambda tmp: summary.to_csv(tmp, index=False))


def _json_list(values) -> list:
    return [None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v) for v in values]


def write_compressai_json(summary: pd.DataFrame, out_dir: str | Path, *,
                          description: str | Mapping[str, str] = "",
                          names: Mapping[str, str] | None = None) -> list[Path]:
    """One ``<method>.json`` per method of a summary, in the layout of CompressAI's published results.

    ``{"name", "description", "results": {"psnr-rgb", "ms-ssim-rgb", "bpp", "encoding_time",
    "decoding_time"}}``, one entry per model sorted by bpp, NaN as ``null``, so the files
    load in CompressAI's own plotting scripts. ``description``: one string or method -> string.
    """
    out_dir = Path(out_dir)
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
        text = json.dumps(doc, indent=2) + "\n"
        paths.append(atomic_write(out_dir / f"{method}.json", lambda tmp, text=text: tmp.write_text(text)))
    return paths


# ---------------------------------------------------------------------------- reading back
@dataclass
class EvaluationTables:
    """What an evaluation wrote, read back: ``results`` (per image, learned and classical), ``summary``, ``bd``."""

    results: pd.DataFrame
    summary: pd.DataFrame
    bd: pd.DataFrame


def read_tables(folder: str | Path) -> EvaluationTables:
    """The tables of an evaluation or report folder, exactly as written (``05_figures`` recomputes nothing).

    Raises ``FileNotFoundError`` naming the missing file and the notebook that writes it.
    """
    folder = Path(folder)
    for name in (SUMMARY_CSV, BD_CSV):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} not found: run notebooks/04_evaluate.ipynb first")
    frames = [read_results(folder / name) for name in (RESULTS_CSV, CLASSICAL_CSV) if (folder / name).exists()]
    results = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RESULT_COLUMNS)
    return EvaluationTables(results=results, summary=pd.read_csv(folder / SUMMARY_CSV),
                            bd=pd.read_csv(folder / BD_CSV))
