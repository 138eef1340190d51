"""Continuous rate on Kodak for a trained run folder (a script, not a test).

Beyond ALICE (VCIP 2024): between trained adapter rates, (a) interpolation of the
merged low-rank updates and (b) CALICE-style alpha scaling of one adapter set
(:mod:`alice_lib.codec`). Prints, with real rANS bitstreams:

* the BD-rate (%, PSNR) of ``--per-interval`` intermediate points per interval
  against the curve through the trained points (anchor included), for both modes;
* the hit rate of target-bpp coding within +-``--tol`` for ``--targets`` bpp values
  (default: 4 values spread log-uniformly inside the mean covered range), counted
  over the (image, target) pairs inside that image's covered range, with the
  clamped pairs reported apart.

    python benchmarks/rate_control.py [--run-dir runs/cpu] [--kodak ../shared/data/kodak]
                                      [--max-images N] [--per-interval 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alice_lib.checkpoints import load_stf  # noqa: E402
from alice_lib.codec import ANCHOR_LMBDA, RateControl  # noqa: E402
from alice_lib.evaluation.rate_control import (interpolation_bd_rates, measure_intermediate,  # noqa: E402
                                               target_hit_rate)
from alice_lib.adapter_files import read_adapter_metadata  # noqa: E402
from alice_lib.run_folder import RunLayout, default_run_dir  # noqa: E402


def rate_control(run_dir: Path, mode: str = "interpolate") -> RateControl:
    """The run's anchor and every ALICE adapter file it trained, found through the run-folder layout."""
    layout = RunLayout(run_dir)
    if not layout.anchor.exists():
        raise SystemExit(f"{layout.anchor} not found: train the run first (alice run --profile cpu)")
    adapters = {read_adapter_metadata(path)["lambda"]: path for path in layout.trained_artifacts("alice")}
    if not adapters:
        raise SystemExit(f"no ALICE adapters in {layout.root / 'rates'}")
    from alice_lib.checkpoints import read_checkpoint

    meta = read_checkpoint(layout.anchor)[2]
    anchor_lmbda = float(meta.get("lmbda", ANCHOR_LMBDA))
    return RateControl(load_stf(layout.anchor), adapters, mode=mode, anchor_lmbda=anchor_lmbda, copy=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=default_run_dir("cpu"))
    parser.add_argument("--kodak", type=Path, default=REPO.parent / "shared" / "data" / "kodak")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--per-interval", type=int, default=3)
    parser.add_argument("--targets", type=float, nargs="*", default=None)
    parser.add_argument("--tol", type=float, default=0.03)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="folder for the CSV files (default: <run>/eval)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or RunLayout(args.run_dir).eval_dir
    out.mkdir(parents=True, exist_ok=True)

    rc = rate_control(args.run_dir)
    print(f"{rc}\ncovered lambdas {rc.lmbdas[0]:g} .. {rc.lmbdas[-1]:g}; Kodak: {args.kodak}")
    started = time.time()
    points = measure_intermediate(rc, args.kodak, per_interval=args.per_interval, max_images=args.max_images,
                                  progress=True)
    points.to_csv(out / "rate_control_points.csv", index=False)
    bd = interpolation_bd_rates(points)
    bd.to_csv(out / "rate_control_bd.csv", index=False)
    print(f"\nintermediate points vs the trained curve ({time.time() - started:.0f} s):")
    for row in bd.itertuples():
        note = "" if math.isfinite(row.bd_rate_pct) else "  (no PSNR overlap with the trained curve)"
        print(f"  {row.mode:12s} BD-rate {row.bd_rate_pct:+.2f} %  ({row.n_points} points, {row.n_trained} "
              f"trained){note}")
    best = bd.loc[bd["bd_rate_pct"].idxmin(), "mode"] if bd["bd_rate_pct"].notna().any() else "interpolate"
    print(f"  better mode: {best}")

    if args.targets:
        targets = args.targets
    else:
        trained = points[points["mode"] == "trained"].groupby("control")["bpp"].mean()
        lo, hi = float(trained.min()), float(trained.max())
        targets = [float(f"{lo * (hi / lo) ** q:.3g}") for q in (0.15, 0.4, 0.65, 0.9)]
    started = time.time()
    hits = target_hit_rate(rc.with_mode(best), args.kodak, targets, tol=args.tol, max_images=args.max_images,
                           progress=True)
    hits.to_csv(out / "rate_control_targets.csv", index=False)
    print(f"\ntarget bpp within +-{100 * args.tol:g} % ({best}, {time.time() - started:.0f} s):")
    for t, group in hits.groupby("target_bpp"):
        inside = group[~group["clamped"]]
        rate = inside["hit"].mean() if len(inside) else math.nan
        print(f"  {t:7.3f} bpp: hit {100 * rate:5.1f} % of {len(inside)} in range, {len(group) - len(inside)} "
              f"clamped, median |err| {100 * np.median(np.abs(inside['rel_error'])) if len(inside) else math.nan:.2f} %")
    print(f"  overall: {100 * hits.attrs['hit_rate']:.1f} % of {hits.attrs['inside']} (image, target) pairs in "
          f"range; {hits.attrs['clamped']} clamped; mean coder calls {hits['coder_calls'].mean():.2f}, "
          f"estimate calls {hits['estimate_calls'].mean():.1f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
