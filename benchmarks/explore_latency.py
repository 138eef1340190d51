"""Latency per slider move of the rate explorer (``notebooks/06_explore.ipynb``), a script, not a test.

A move is what :class:`alice_lib.explore.ExplorerPanel` does when the slider moves to a
rate not seen before: code the image into an ``.alice`` file and decode it, pick and code
the JPEG at the same bytes, measure PSNR and MS-SSIM, and draw the pictures and the RD
point for the widgets (``show``). Timed for the downscaled preview (while the slider
moves) and for the full image (once it rests), on the CPU profile's shipped weights::

    python benchmarks/explore_latency.py [--image kodim23.png] [--moves 12] [--threads 1]

Prints the median and the slowest of each, the parts of the median move, and the
one-off costs (loading, the JPEG size ladder of each scale). The machine's load average
is printed too: on a shared machine the numbers include whatever else ran.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _moves(ex, panel, controls: list[float], mode: str, scale: float) -> list[dict]:
    """Time each move: the view (coding, JPEG, metrics) and the panel's drawing of it."""
    rows = []
    for control in controls:
        start = time.perf_counter()
        view = ex.view(control, mode, scale)
        coded = time.perf_counter()
        panel.show(view)
        done = time.perf_counter()
        rows.append({**view.seconds, "display": done - coded, "total": done - start})
    return rows


def _report(name: str, rows: list[dict]) -> None:
    totals = sorted(r["total"] for r in rows)
    parts = {k: statistics.median(r[k] for r in rows) for k in ("code", "jpeg", "metrics", "display")}
    print(f"{name:8s} median {statistics.median(totals):.3f} s, slowest {totals[-1]:.3f} s over {len(rows)} moves; "
          "median parts: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="kodim23.png", help="a Kodak file name or a path")
    parser.add_argument("--moves", type=int, default=12, help="moves timed per kind (each to a new rate)")
    parser.add_argument("--mode", default="interpolate", choices=("interpolate", "alpha"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from alice_lib import explore

    start = time.perf_counter()
    ex = explore.load_explorer(args.image, threads=args.threads)
    loaded = time.perf_counter() - start
    lo, hi = ex.rc.range
    first = ex.view(lo + 0.37 * (hi - lo), args.mode)  # also measures the full-size JPEG ladder once
    ladder_full = first.seconds["jpeg"]
    ladder_preview = ex.view(lo + 0.37 * (hi - lo), args.mode, ex.preview_scale).seconds["jpeg"]
    with tempfile.TemporaryDirectory() as out:
        panel = explore.ExplorerPanel(ex, first, out)
        # Distinct rates never coded before, spread over the whole range.
        controls = [lo + (hi - lo) * (k + 0.5) / (2 * args.moves) for k in range(2 * args.moves)]
        preview = _moves(ex, panel, controls[0::2], args.mode, ex.preview_scale)
        full = _moves(ex, panel, controls[1::2], args.mode, 1.0)
    switch = []
    for control in controls:
        t = time.perf_counter()
        ex.rc.model_at(control + 1e-6)
        switch.append(time.perf_counter() - t)

    h, w = ex.picture.pixels.shape[-2:]
    ph, pw = ex.image(ex.preview_scale).shape[-2:]
    print(f"{ex.picture.name} {w}x{h} ({ex.picture.source}); preview {pw}x{ph}; mode {args.mode}; "
          f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs "
          f"({platform.processor() or '?'}); "
          f"load average {os.getloadavg()[0]:.2f}")
    _report("preview", preview)
    _report("full", full)
    print(f"one-off: load {loaded:.2f} s; first JPEG match, every quality's size included, {ladder_full:.2f} s "
          f"(full) / {ladder_preview:.2f} s (preview); model switch between rates "
          f"{statistics.median(switch) * 1e3:.1f} ms median")


if __name__ == "__main__":
    main()
