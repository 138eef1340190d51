"""RD curves and Bjontegaard deltas: which points make a curve, and the one BD table.

Curves (:func:`rd_curves`). Each learned method's curve is made of its own models only:
for ALICE, vanilla and MALICE the adapted models at the target lambdas, for fixed-rate
the separately trained models. The anchor (the frozen base at lambda 0.0483, method
``anchor`` in a summary) is its own point. Appending it to every learned curve, as this
workbook once did, widens the overlap of curves that share it and pulls BD-rate towards
0; ``curves_include_anchor=True`` keeps that variant as extra rows labelled
``curves = "with anchor"``, never in place of the adapted-only rows.

BD (Bjontegaard, "Calculation of average PSNR differences between RD-curves", ITU-T
VCEG-M33, 2001), through the maintained ``bjontegaard`` package (Herglotz et al., FAU
Erlangen, https://github.com/FAU-LMS/bjontegaard):

* ``cubic``: the classic form, as the ALICE reference's ``bd_metrics``: log-rate fitted as
  a cubic polynomial of PSNR (BD-rate) or PSNR as a cubic of log-rate (BD-PSNR), each fit
  integrated over the overlap of the two curves; BD-rate = ``exp(mean difference) - 1``.
  A cubic needs 4 points per curve; with fewer the value is NaN and the row says why.
* ``akima`` (and ``pchip``): piecewise-cubic interpolation through the points, which does
  not overshoot between distant points; the package's recommendation.

The table names the method in its ``bd_method`` column; the paper profile reports both.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..utils import atomic_write

__all__ = ["BD_COLUMNS", "BD_METHODS", "ANCHOR_METHOD", "LEARNED_METHODS", "DEFAULT_BD_PAIRS", "CURVES_ADAPTED",
           "CURVES_WITH_ANCHOR", "bd_rate", "bd_psnr", "bd_value", "rd_curves", "anchor_points", "bd_table",
           "write_bd_table"]

#: Columns of :func:`bd_table` (``anchor``: the reference curve of the comparison).
BD_COLUMNS = ["method", "anchor", "bd_method", "curves", "metric", "bd_rate_pct", "bd_psnr_db", "n_points",
              "n_anchor_points", "note"]
#: BD methods the table knows: ``cubic`` (classic VCEG-M33), ``akima``, ``pchip``.
BD_METHODS: tuple[str, ...] = ("cubic", "akima", "pchip")
#: The method label of the frozen base model in a summary (evaluated once, its own point).
ANCHOR_METHOD = "anchor"
#: Methods whose curves are built from models at the target lambdas (the anchor may join them).
LEARNED_METHODS: tuple[str, ...] = ("fixed-rate", "alice", "vanilla", "malice", "full")
#: The comparisons the paper's claims rest on: (method, reference curve).
DEFAULT_BD_PAIRS: tuple[tuple[str, str], ...] = (
    ("alice", "fixed-rate"), ("vanilla", "fixed-rate"), ("malice", "alice"), ("fixed-rate", "jpeg"),
    ("alice", "jpeg"), ("fixed-rate", "webp"), ("fixed-rate", "avif"), ("full", "fixed-rate"))
CURVES_ADAPTED, CURVES_WITH_ANCHOR = "adapted", "with anchor"

_METRIC_COLUMNS = {"psnr": "psnr", "ms_ssim_db": "ms_ssim_db", "ms-ssim": "ms_ssim_db", "ms_ssim": "ms_ssim_db"}
_MIN_POINTS = {"cubic": 4, "akima": 2, "pchip": 2}


# ---------------------------------------------------------------------------- two curves
def _clean_curve(rate, dist, sort_by: str) -> tuple[np.ndarray, np.ndarray]:
    """Finite positive-rate points sorted by ``sort_by`` ("rate" or "dist"), duplicates of it averaged.

    The interpolators need a strictly increasing abscissa; a duplicated one (two models
    at the same quality) is one point of the curve.
    """
    rate, dist = np.asarray(rate, dtype=float), np.asarray(dist, dtype=float)
    ok = np.isfinite(rate) & np.isfinite(dist) & (rate > 0)
    rate, dist = rate[ok], dist[ok]
    key = rate if sort_by == "rate" else dist
    uniq, inverse = np.unique(key, return_inverse=True)
    if len(uniq) < len(key):
        counts = np.bincount(inverse)
        return np.bincount(inverse, rate) / counts, np.bincount(inverse, dist) / counts
    order = np.argsort(key)
    return rate[order], dist[order]


def bd_value(kind: str, rate_anchor, dist_anchor, rate_test, dist_test, *, method: str = "cubic",
             min_overlap: float = 0.0) -> tuple[float, str]:
    """BD-rate (``kind="rate"``, %) or BD-metric (``kind="dist"``, metric units) and why it is NaN ("" if not)."""
    import bjontegaard

    if method not in BD_METHODS:
        raise ValueError(f"BD method must be one of {BD_METHODS}, got {method!r}")
    sort_by = "dist" if kind == "rate" else "rate"  # the fit's independent variable
    ra, da = _clean_curve(rate_anchor, dist_anchor, sort_by)
    rt, dt = _clean_curve(rate_test, dist_test, sort_by)
    need = _MIN_POINTS[method]
    if min(len(ra), len(rt)) < need:
        return math.nan, f"{method} needs {need} points per curve (have {len(rt)} and {len(ra)})"
    fn = bjontegaard.bd_rate if kind == "rate" else bjontegaard.bd_psnr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(fn(ra, da, rt, dt, method=method, require_matching_points=False, min_overlap=min_overlap))
    messages = [str(w.message) for w in caught if "overlap" in str(w.message).lower()]
    return value, ("; ".join(messages) if messages else "")


def bd_rate(rate_anchor, dist_anchor, rate_test, dist_test, *, method: str = "cubic",
            min_overlap: float = 0.0) -> float:
    """Bjontegaard-delta rate in percent of a test curve against an anchor curve (negative: fewer bits).

    Points need not match in number or be sorted; non-finite points are dropped. NaN
    with a warning when a curve has too few points for ``method`` or the curves do not overlap.
    """
    value, note = bd_value("rate", rate_anchor, dist_anchor, rate_test, dist_test, method=method,
                           min_overlap=min_overlap)
    if note:
        warnings.warn(f"BD-rate: {note}", stacklevel=2)
    return value


def bd_psnr(rate_anchor, dist_anchor, rate_test, dist_test, *, method: str = "cubic",
            min_overlap: float = 0.0) -> float:
    """Bjontegaard delta of the quality metric in its unit (dB for PSNR or MS-SSIM dB); see :func:`bd_rate`."""
    value, note = bd_value("dist", rate_anchor, dist_anchor, rate_test, dist_test, method=method,
                           min_overlap=min_overlap)
    if note:
        warnings.warn(f"BD-PSNR: {note}", stacklevel=2)
    return value


# ---------------------------------------------------------------------------- curves
def anchor_points(summary: pd.DataFrame, anchor_method: str = ANCHOR_METHOD) -> pd.DataFrame:
    """The anchor's rate point(s) of a summary (empty when it was not evaluated)."""
    return summary[summary["method"] == anchor_method]


def rd_curves(summary: pd.DataFrame, *, curves_include_anchor: bool = False, anchor_method: str = ANCHOR_METHOD,
              learned: Sequence[str] = LEARNED_METHODS) -> dict[str, pd.DataFrame]:
    """Method -> its rate points sorted by bpp: the curves the BD table and the figures are built from.

    The anchor is not a curve of its own (see :func:`anchor_points`). With
    ``curves_include_anchor`` its point joins every method in ``learned`` (the variant the
    BD table labels ``"with anchor"``); classical codecs and published points never get it.
    """
    anchor = anchor_points(summary, anchor_method)
    curves = {}
    for method in dict.fromkeys(summary["method"]):
        if method == anchor_method:
            continue
        points = summary[summary["method"] == method]
        if curves_include_anchor and method in learned and len(anchor):
            points = pd.concat([points, anchor.assign(method=method)], ignore_index=True)
        curves[method] = points.sort_values("bpp", kind="stable").reset_index(drop=True)
    return curves


# ---------------------------------------------------------------------------- the table
def _bd_row(curves: dict[str, pd.DataFrame], test: str, ref: str, column: str, bd_method: str,
            label: str, min_overlap: float) -> dict:
    a, t = curves[ref], curves[test]
    rate, note_rate = bd_value("rate", a["bpp"], a[column], t["bpp"], t[column], method=bd_method,
                               min_overlap=min_overlap)
    dist, note_dist = bd_value("dist", a["bpp"], a[column], t["bpp"], t[column], method=bd_method,
                               min_overlap=min_overlap)
    note = "; ".join(f"{what}: {n}" for what, n in (("BD-rate", note_rate), ("BD-PSNR", note_dist)) if n)
    return {"method": test, "anchor": ref, "bd_method": bd_method, "curves": label, "metric": column,
            "bd_rate_pct": rate, "bd_psnr_db": dist, "n_points": int(t[column].notna().sum()),
            "n_anchor_points": int(a[column].notna().sum()), "note": note}


def bd_table(
    summary: pd.DataFrame,
    pairs: Sequence[tuple[str, str]] | None = None,
    *,
    metric: str = "psnr",
    bd_methods: Sequence[str] = ("cubic", "akima"),
    curves_include_anchor: bool = False,
    anchor_method: str = ANCHOR_METHOD,
    min_overlap: float = 0.0,
) -> pd.DataFrame:
    """BD-rate and BD-metric of method curves against reference curves: the one BD table of the workbook.

    ``summary``: a summary table (rate points; the anchor as method ``anchor``), possibly
    with published points. ``pairs``: (method, reference) tuples; default the
    :data:`DEFAULT_BD_PAIRS` whose curves are present. One row per pair and BD method
    (``bd_method``) on adapted-only curves (``curves = "adapted"``); with
    ``curves_include_anchor`` the same rows again on curves through the anchor
    (``curves = "with anchor"``). ``metric``: ``psnr`` or ``ms_ssim_db``. A NaN says why in
    ``note``. Columns :data:`BD_COLUMNS`.
    """
    column = _METRIC_COLUMNS.get(metric)
    if column is None:
        raise ValueError(f"metric must be one of {sorted(_METRIC_COLUMNS)}, got {metric!r}")
    variants = {CURVES_ADAPTED: rd_curves(summary, anchor_method=anchor_method)}
    if curves_include_anchor:
        variants[CURVES_WITH_ANCHOR] = rd_curves(summary, curves_include_anchor=True, anchor_method=anchor_method)
    present = list(variants[CURVES_ADAPTED])
    if pairs is None:
        pairs = [(m, a) for m, a in DEFAULT_BD_PAIRS if m in present and a in present]
    for test, ref in pairs:
        for m in (test, ref):
            if m not in present:
                raise KeyError(f"method {m!r} has no curve in the summary (have {present})")
    rows = [_bd_row(curves, test, ref, column, bd_method, label, min_overlap)
            for label, curves in variants.items()
            for bd_method in bd_methods
            for test, ref in pairs
            if label == CURVES_ADAPTED or {test, ref} & set(LEARNED_METHODS)]
    return pd.DataFrame(rows, columns=BD_COLUMNS)


def write_bd_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a :func:`bd_table` (or several concatenated) as CSV, atomically."""
    return atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.4f"))
