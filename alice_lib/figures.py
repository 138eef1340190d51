"""Paper figures: RD curves, parameter bars, complexity table (matplotlib, PNG + PDF).

Every function draws on its own :class:`matplotlib.figure.Figure` (no pyplot state, no
backend change, so it is safe in notebooks and headless runs), saves ``<stem>.png``
(300 dpi) and ``<stem>.pdf`` into ``out_dir`` and returns ``(figure, [paths])``. Sizes
are for a single column of a two-column paper (3.5 in wide, 8 pt text).

Inputs:

* RD curves: a summary table as ``04_evaluate`` wrote it (``summary.csv``, read with
  :func:`alice_lib.evaluation.read_tables`; one row per rate point with ``method``, ``bpp``,
  ``psnr``, ``ms_ssim_db``). The curves are :func:`alice_lib.evaluation.rd_curves`, the same
  the BD table is computed from: each method's own models, the anchor drawn as its own
  marker (and joined to the learned curves only with ``curves_include_anchor``).
* Parameter bars: a list of dicts ``{"method", "trainable", "stored_per_rate",
  "stored_all_rates"}`` (or a mapping method -> the three numbers).
* Complexity table: the DataFrame of :func:`alice_lib.evaluation.measure_complexity`.

This module depends on :mod:`alice_lib.evaluation` and never the reverse: it draws what
evaluation measured and computes no metric of its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .evaluation import ANCHOR_METHOD, anchor_points, published_points, rd_curves

__all__ = ["METHOD_STYLES", "REFERENCE_LABELS", "ANCHOR_STYLE", "PAPER_RC", "draw_rd", "plot_rd", "plot_rd_curves",
           "plot_parameter_bars", "plot_training_curve", "plot_complexity_table", "save_figure"]

#: label, colour, marker, line style per method (Okabe-Ito colours, colour-blind safe).
METHOD_STYLES: dict[str, dict] = {
    "fixed-rate": {"label": "STF, fixed-rate models", "color": "#000000", "marker": "o", "linestyle": "-"},
    "alice": {"label": "ALICE", "color": "#D55E00", "marker": "s", "linestyle": "-"},
    "malice": {"label": "MALICE", "color": "#0072B2", "marker": "D", "linestyle": "-"},
    "vanilla": {"label": "Vanilla fine-tuning", "color": "#009E73", "marker": "^", "linestyle": "-"},
    "full": {"label": "Every weight fine-tuned from the anchor", "color": "#555555", "marker": "o",
             "linestyle": "-."},
    "stf-published": {"label": "STF (published)", "color": "#7F7F7F", "marker": "x", "linestyle": ":"},
    "avif": {"label": "AVIF 4:4:4", "color": "#CC79A7", "marker": "v", "linestyle": "--"},
    "webp": {"label": "WebP (4:2:0)", "color": "#E69F00", "marker": "<", "linestyle": "--"},
    "jpeg": {"label": "JPEG 4:4:4", "color": "#56B4E9", "marker": ">", "linestyle": "--"},
}
#: The fixed-rate curve's legend entry per ``references.source``, where "fixed-rate" alone would not say what it is.
REFERENCE_LABELS = {"full": "STF, fixed-rate: every weight fine-tuned from the anchor"}
#: The anchor (the frozen base, lambda 0.0483): one point, drawn as its own marker.
ANCHOR_STYLE = {"label": "Anchor (frozen base)", "color": "#000000", "marker": "*", "markersize": 8,
                "linestyle": "none", "zorder": 5}
_CLASSICAL = {"jpeg", "webp", "avif"}
_FALLBACK_COLORS = ["#F0E442", "#8C564B", "#17BECF", "#BCBD22", "#9467BD"]

#: rc settings for paper-size figures.
PAPER_RC = {
    "font.size": 8, "axes.labelsize": 8, "axes.titlesize": 8, "legend.fontsize": 7,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "lines.linewidth": 1.2, "lines.markersize": 3.5,
    "axes.linewidth": 0.6, "grid.linewidth": 0.4, "pdf.fonttype": 42, "ps.fonttype": 42,
}

_METRIC_LABELS = {"psnr": "PSNR (dB)", "ms_ssim_db": "MS-SSIM (dB)"}


def save_figure(fig: Figure, out_dir: str | Path, stem: str, *, dpi: int = 300,
                formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Save ``fig`` as ``<stem>.png`` (300 dpi) and ``<stem>.pdf``; returns the paths.

    ``dpi`` and ``formats`` for figures that are not for print (the explorer's view, a
    photograph-sized PNG only).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in formats:
        path = out_dir / f"{stem}.{ext}"
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        paths.append(path)
    return paths


def _style(method: str, index: int) -> dict:
    if method in METHOD_STYLES:
        return METHOD_STYLES[method]
    return {"label": method, "color": _FALLBACK_COLORS[index % len(_FALLBACK_COLORS)],
            "marker": "*", "linestyle": "-."}


def _method_order(methods: Sequence[str]) -> list[str]:
    known = [m for m in METHOD_STYLES if m in methods]
    return known + [m for m in methods if m not in METHOD_STYLES]


def _rd_points(summary: pd.DataFrame, metric: str, published: bool) -> pd.DataFrame:
    """The drawable rate points: finite metric, positive rate, published STF points added or removed."""
    df = summary.copy()
    if published and metric == "psnr" and "stf-published" not in set(df["method"]):
        df = pd.concat([df, published_points("mse")], ignore_index=True)
    if not published:
        df = df[~df["method"].astype(str).str.startswith("stf-published")]
    return df[np.isfinite(pd.to_numeric(df[metric], errors="coerce")) & (pd.to_numeric(df["bpp"]) > 0)]


def _rd_limits(df: pd.DataFrame, metric: str) -> tuple[tuple[float, float], tuple[float, float] | None]:
    """x from 0 to 1.1 x the learned methods' top rate (classical sweeps run further); y over the points inside."""
    learned = df[~df["method"].isin(_CLASSICAL)]
    xlim = (0.0, float((learned if len(learned) else df)["bpp"].max()) * 1.1)
    inside = df[(df["bpp"] >= xlim[0]) & (df["bpp"] <= xlim[1])][metric]
    if not len(inside):
        return xlim, None
    lo, hi = float(inside.min()), float(inside.max())
    pad = max(0.5, 0.05 * (hi - lo))
    return xlim, (lo - pad, hi + pad)


def _anchor_label(anchor: pd.DataFrame) -> str:
    """The anchor's legend entry, with its lambda when the summary has it."""
    lmbda = pd.to_numeric(anchor.get("lmbda", pd.Series(dtype=float)), errors="coerce").dropna()
    return ANCHOR_STYLE["label"] + (f", \u03bb = {lmbda.iloc[0]:g}" if len(lmbda) else "")


def draw_rd(
    ax,
    summary: pd.DataFrame,
    metric: str = "psnr",
    *,
    methods: Sequence[str] | None = None,
    published: bool = True,
    curves_include_anchor: bool = False,
    xlim: tuple[float, float] | None = None,
    legend: str | None = "outside",
    labels: Mapping[str, str] | None = None,
) -> None:
    """Draw the RD curves of ``metric`` against bpp on ``ax``: the one drawing of :func:`plot_rd`.

    Separate from the saving so that a figure made elsewhere (``alice_lib.explore``'s view)
    draws exactly the report's curves, styles and limits. ``legend``: ``"outside"`` (beside
    the axes, never over the curves), ``"inside"`` (the best corner) or None. ``labels``:
    legend entries that replace a method's default (what a run's curve is, e.g. its references).
    """
    if metric not in _METRIC_LABELS:
        raise ValueError(f"metric must be one of {sorted(_METRIC_LABELS)}")
    df = _rd_points(summary, metric, published)
    curves = rd_curves(df, curves_include_anchor=curves_include_anchor)
    order = _method_order([m for m in curves if methods is None or m in methods])
    anchor = anchor_points(df)
    auto_xlim, ylim = _rd_limits(df, metric) if len(df) else (None, None)
    xlim = xlim or auto_xlim
    for i, method in enumerate(order):
        st = _style(method, i)
        label = (labels or {}).get(method, st["label"])
        ax.plot(curves[method]["bpp"], curves[method][metric], label=label, color=st["color"],
                marker=st["marker"], linestyle=st["linestyle"])
    if len(anchor):
        ax.plot(anchor["bpp"], anchor[metric], **{**ANCHOR_STYLE, "label": _anchor_label(anchor)})
    ax.set_xlabel("Rate (bpp)")
    ax.set_ylabel(_METRIC_LABELS[metric])
    if xlim is not None:
        ax.set_xlim(*xlim)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(True, alpha=0.4)
    if legend == "outside" and (order or len(anchor)):
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, borderaxespad=0.0)
    elif legend == "inside" and (order or len(anchor)):
        ax.legend(loc="best", frameon=False)


def plot_rd(
    summary: pd.DataFrame,
    out_dir: str | Path,
    metric: str = "psnr",
    *,
    methods: Sequence[str] | None = None,
    published: bool = True,
    curves_include_anchor: bool = False,
    stem: str | None = None,
    title: str | None = None,
    xlim: tuple[float, float] | None = None,
    size: tuple[float, float] = (5.0, 2.7),
    labels: Mapping[str, str] | None = None,
) -> tuple[Figure, list[Path]]:
    """RD curve of ``metric`` (``psnr`` or ``ms_ssim_db``) against bpp for each method, the anchor as a star.

    Curves come from :func:`alice_lib.evaluation.rd_curves` (the BD table's curves). With
    ``published`` (PSNR only) the STF paper's Kodak points are added.
    """
    if metric not in _METRIC_LABELS:
        raise ValueError(f"metric must be one of {sorted(_METRIC_LABELS)}")
    with matplotlib.rc_context(PAPER_RC):
        fig = Figure(figsize=size)
        ax = fig.add_subplot()
        draw_rd(ax, summary, metric, methods=methods, published=published,
                curves_include_anchor=curves_include_anchor, xlim=xlim, labels=labels)
        if title:
            ax.set_title(title)
        fig.tight_layout()
        paths = save_figure(fig, out_dir, stem or ("rd_psnr" if metric == "psnr" else "rd_msssim"))
    return fig, paths


def plot_rd_curves(summary: pd.DataFrame, out_dir: str | Path, **kwargs) -> dict[str, tuple[Figure, list[Path]]]:
    """Both RD figures: ``rd_psnr`` (PSNR-bpp) and ``rd_msssim`` (MS-SSIM dB-bpp)."""
    return {metric: plot_rd(summary, out_dir, metric, **kwargs) for metric in ("psnr", "ms_ssim_db")}


_SHORT_LABELS = {ANCHOR_METHOD: "Anchor", "fixed-rate": "Fixed-rate STF", "alice": "ALICE", "malice": "MALICE",
                 "vanilla": "Vanilla FT", "stf-published": "STF (published)", "jpeg": "JPEG", "webp": "WebP", "avif": "AVIF"}

_PARAM_KEYS = (("trainable", "Trainable"), ("stored_per_rate", "Stored per rate"),
               ("stored_all_rates", "Stored for all rates"))


def _human(n: float) -> str:
    if not math.isfinite(n):
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.0f}"


def _param_entries(entries) -> list[dict]:
    if isinstance(entries, Mapping):
        return [{"method": m, **v} for m, v in entries.items()]
    if isinstance(entries, pd.DataFrame):
        return entries.to_dict("records")
    return [dict(e) for e in entries]


def plot_parameter_bars(
    entries,
    out_dir: str | Path,
    *,
    stem: str = "parameters",
    size: tuple[float, float] = (3.5, 2.4),
) -> tuple[Figure, list[Path]]:
    """Grouped bars on a log scale: trainable / stored per rate / stored for all rates, per method.

    ``entries``: list of ``{"method", "trainable", "stored_per_rate", "stored_all_rates"}``
    (missing keys are left out; zeros cannot be drawn on a log axis and are labelled "0").
    """
    rows = _param_entries(entries)
    if not rows:
        raise ValueError("no parameter entries to plot")
    n_groups, width = len(rows), 0.26
    x = np.arange(n_groups)
    with matplotlib.rc_context(PAPER_RC):
        fig = Figure(figsize=size)
        ax = fig.add_subplot()
        colors = ("#D55E00", "#0072B2", "#7F7F7F")
        for k, ((key, label), color) in enumerate(zip(_PARAM_KEYS, colors)):
            values = np.array([float(r.get(key, math.nan) or 0) if r.get(key) is not None else math.nan
                               for r in rows])
            pos = x + (k - 1) * width
            drawable = np.where(values > 0, values, np.nan)
            bars = ax.bar(pos, drawable, width, label=label, color=color)
            for bar, v, p in zip(bars, values, pos):
                if not math.isfinite(v):
                    continue
                if v > 0:
                    ax.annotate(_human(v), (p, v), xytext=(0, 1.5), textcoords="offset points",
                                ha="center", va="bottom", fontsize=5.5, rotation=90)
                else:
                    ax.annotate("0", (p, 1), xytext=(0, 1.5), textcoords="offset points",
                                ha="center", va="bottom", fontsize=5.5)
        ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([_SHORT_LABELS.get(str(r["method"]), str(r["method"])) for r in rows])
        ax.set_ylabel("Parameters")
        ymax = max((float(r.get(k) or 0) for r in rows for k, _ in _PARAM_KEYS), default=1.0)
        ymin = min((float(r.get(k)) for r in rows for k, _ in _PARAM_KEYS if r.get(k)), default=1.0)
        ax.set_ylim(max(ymin / 5, 0.5), ymax * 20)
        ax.grid(True, axis="y", alpha=0.4)
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False, fontsize=6)
        fig.tight_layout()
        paths = save_figure(fig, out_dir, stem)
    return fig, paths


def plot_complexity_table(
    complexity: pd.DataFrame,
    out_dir: str | Path,
    *,
    stem: str = "complexity",
    size: tuple[float, float] | None = None,
) -> tuple[Figure, list[Path]]:
    """The complexity table (model, part, parameters, GMACs, median time, peak memory) as a figure.

    GMACs = FlopCounterMode FLOPs / 2; "Mem." is ``peak_mem_mib`` (see
    :mod:`alice_lib.evaluation.complexity` for what it measures on CPU and GPU).
    """
    df = complexity.copy()
    device = ", ".join(sorted(set(df["device"].astype(str)))) if "device" in df else ""
    cells = [[str(r["model"]), str(r["part"]), f"{r['params'] / 1e6:.2f}",
              "-" if not (r.get("flops", -1) >= 0) else f"{r['flops'] / 2e9:.1f}",
              f"{r['time_ms']:.0f}", "-" if not math.isfinite(r.get("peak_mem_mib", math.nan))
              else f"{r['peak_mem_mib']:.0f}"] for _, r in df.iterrows()]
    header = ["Model", "Part", "Params (M)", "GMACs", "Time (ms)", "Mem. (MiB)"]
    if size is None:
        size = (4.6, 0.2 * (len(cells) + 1))
    with matplotlib.rc_context(PAPER_RC):
        fig = Figure(figsize=size)
        ax = fig.add_subplot()
        ax.axis("off")
        table = ax.table(cellText=cells, colLabels=header, cellLoc="center", bbox=[0, 0, 1, 1],
                         colWidths=[0.22, 0.14, 0.16, 0.12, 0.15, 0.21])
        table.auto_set_font_size(False)
        table.set_fontsize(6.5)
        for (row, _col), cell in table.get_celld().items():
            cell.set_linewidth(0.4)
            if row == 0:
                cell.set_text_props(weight="bold")
        if device:
            hw = f"{int(df['height'].iloc[0])}x{int(df['width'].iloc[0])}" if "height" in df else ""
            ax.set_title(f"{hw} image, {device}; median of {int(df['repeats'].iloc[0])} runs"
                         if "repeats" in df else device, fontsize=6.5)
        paths = save_figure(fig, out_dir, stem)
    return fig, paths


def plot_training_curve(metrics: pd.DataFrame, *, title: str = "", out_dir: str | Path | None = None,
                        stem: str = "training", size: tuple[float, float] = (7.0, 2.4)) -> Figure:
    """Loss, bpp and PSNR per epoch from a training run's ``metrics.csv`` (train and validation)."""
    fig = Figure(figsize=size, layout="constrained")
    with matplotlib.rc_context(PAPER_RC):
        axes = fig.subplots(1, 3)
        x = metrics["step"]
        for ax, key, label in zip(axes, ("loss", "bpp", "psnr"), ("RD loss", "bpp", "PSNR (dB)")):
            for split, style in (("train", "-"), ("val", "--")):
                column = f"{split}_{key}"
                if column in metrics:
                    ax.plot(x, metrics[column], style, label=split)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        axes[0].legend()
        if title:
            fig.suptitle(title)
    if out_dir is not None:
        save_figure(fig, out_dir, stem)
    return fig
