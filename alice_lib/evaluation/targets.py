"""Each adapted model against the reference trained for its lambda: did the adapter reach its target?

An adapted model (ALICE, vanilla, MALICE) and the fixed-rate reference at the same lambda
minimise the same objective, ``R + lambda * 255^2 * MSE`` (the training loss,
:class:`alice_lib.train.RateDistortionLoss`). Three columns compare them on the test images:

* ``rate_ratio`` = ``bpp / ref_bpp``: whether the adapter reached the reference's rate;
* ``psnr_delta_db`` = ``psnr - ref_psnr``;
* ``rd_loss_ratio``: the objective each reaches, measured on real bitstreams (below 1: the
  adapted model is the better one at its own lambda).

On a flat RD curve a model can land at twice the reference's rate and still be within a
few per cent of its objective; the rate ratio alone hides that, the loss ratio alone hides
where on the curve it landed, so the table shows both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..utils import atomic_write

__all__ = ["TARGET_COLUMNS", "TARGETS_CSV", "rd_loss", "target_table", "write_target_table"]

TARGETS_CSV = "targets.csv"
TARGET_COLUMNS = ["method", "reference", "lmbda", "n_images", "bpp", "psnr", "rd_loss", "ref_bpp", "ref_psnr",
                  "ref_rd_loss", "rate_ratio", "psnr_delta_db", "rd_loss_ratio"]


def rd_loss(bpp, psnr, lmbda):
    """``bpp + lmbda * 255^2 * MSE`` of 8-bit images, with the MSE (on [0, 1]) recovered from the PSNR."""
    mse = np.power(10.0, -np.asarray(psnr, dtype=float) / 10.0)
    return np.asarray(bpp, dtype=float) + np.asarray(lmbda, dtype=float) * 255**2 * mse


def _per_lambda(results: pd.DataFrame, method: str) -> pd.DataFrame:
    """Per lambda of ``method``: mean bpp, PSNR and objective over its images, and the image names."""
    rows = results[results["method"] == method].copy()
    for col in ("lmbda", "bpp", "psnr"):
        rows[col] = pd.to_numeric(rows[col], errors="coerce")
    rows = rows.dropna(subset=["lmbda", "bpp", "psnr"])
    # Lambdas pass through CSV and float arithmetic: match them to 6 significant digits.
    rows["key"] = [float(f"{v:.6g}") for v in rows["lmbda"]]
    rows["rd_loss"] = rd_loss(rows["bpp"], rows["psnr"], rows["lmbda"])
    return rows


def target_table(results: pd.DataFrame, methods: Sequence[str] = ("alice", "vanilla", "malice"),
                 reference: str = "fixed-rate") -> pd.DataFrame:
    """One row per (method, lambda) that ``reference`` also has; columns :data:`TARGET_COLUMNS`.

    ``results``: per-image rows (``results.csv``: ``method``, ``lmbda``, ``image``, ``bpp``,
    ``psnr``, ``error``); failed rows are left out. Both sides are averaged over the images
    they share, so a missing image cannot tilt a ratio. Methods absent from ``results``
    give no rows; an absent reference gives an empty table.
    """
    if "error" in results:
        results = results[results["error"].fillna("").astype(str) == ""]
    ref = _per_lambda(results, reference)
    rows = []
    for method in methods:
        test = _per_lambda(results, method)
        for key, group in test.groupby("key", sort=True):
            ref_group = ref[ref["key"] == key]
            common = sorted(set(group["image"]) & set(ref_group["image"]))
            if not common:
                continue
            a = group[group["image"].isin(common)][["bpp", "psnr", "rd_loss"]].mean()
            b = ref_group[ref_group["image"].isin(common)][["bpp", "psnr", "rd_loss"]].mean()
            rows.append({"method": method, "reference": reference, "lmbda": key, "n_images": len(common),
                         "bpp": a["bpp"], "psnr": a["psnr"], "rd_loss": a["rd_loss"],
                         "ref_bpp": b["bpp"], "ref_psnr": b["psnr"], "ref_rd_loss": b["rd_loss"],
                         "rate_ratio": a["bpp"] / b["bpp"], "psnr_delta_db": a["psnr"] - b["psnr"],
                         "rd_loss_ratio": a["rd_loss"] / b["rd_loss"]})
    return pd.DataFrame(rows, columns=TARGET_COLUMNS)


def write_target_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a :func:`target_table` as CSV, atomically."""
    return atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.4f"))
