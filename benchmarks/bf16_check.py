"""Is bfloat16 training honest? Validation of bf16 autocast against the spread of two fp32 seeds.

Three short runs of the chosen CPU size with the anchor's recipe (``cpu_scale_pilot.py``),
from random weights: fp32 with seed 0, fp32 with seed 1, and bf16 autocast with seed 0
(the same first weights, crops and noise as fp32 seed 0). At every validation the table
puts ``|bf16 - fp32|`` (seed 0) beside ``|fp32 seed 1 - fp32 seed 0|``: bf16 passes where
its difference stays within the seeds' spread. The numerics do not depend on whether the
CPU has bf16 units (without AMX autocast is only slower), so the check runs anywhere.

    python benchmarks/bf16_check.py train --root runs/bf16-check --steps 300 --every 100
    python benchmarks/bf16_check.py report --root runs/bf16-check --out docs/cpu-scale/bf16
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_scale_pilot import DEFAULT_DATA, ROOT, train_command  # noqa: E402

SIZE = "e32-d1111-w8"
RUNS = {"fp32-seed0": ("fp32", 0), "fp32-seed1": ("fp32", 1), "bf16-seed0": ("bf16", 0)}
KEYS = ("val_loss", "val_psnr", "val_bpp")


def train(args: argparse.Namespace) -> None:
    for name, (precision, seed) in RUNS.items():
        folder = args.root / name
        folder.mkdir(parents=True, exist_ok=True)
        command = train_command(SIZE, folder, args.data, args.threads)
        command += ["-p", f"anchor.train.precision={precision}", "-p", f"anchor.train.seed={seed}",
                    "-p", f"anchor.train.steps={args.steps}", "-p", f"anchor.train.validate_every={args.every}"]
        print(f"{name}: training, log in {folder / 'train.log'}", flush=True)
        with open(folder / "train.log", "a") as log:
            if subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT):
                raise SystemExit(f"{name} failed: see {folder / 'train.log'}")


def report(args: argparse.Namespace) -> pd.DataFrame:
    logs = {name: pd.read_csv(args.root / name / "metrics.csv").set_index("step") for name in RUNS}
    steps = sorted(set.intersection(*(set(log.index) for log in logs.values())))
    rows = []
    for step in steps:
        row = {"step": step}
        for key in KEYS:
            a, b, h = (logs[n].loc[step, key] for n in ("fp32-seed0", "fp32-seed1", "bf16-seed0"))
            row.update({f"{key}_fp32_s0": a, f"{key}_fp32_s1": b, f"{key}_bf16_s0": h,
                        f"{key}_seed_spread": abs(b - a), f"{key}_bf16_diff": abs(h - a),
                        f"{key}_within": abs(h - a) <= abs(b - a)})
        row["bf16_within_spread"] = all(row[f"{k}_bf16_diff"] <= row[f"{k}_seed_spread"] for k in KEYS)
        row["step_seconds_fp32"] = logs["fp32-seed0"].loc[step, "seconds"] / args.every
        row["step_seconds_bf16"] = logs["bf16-seed0"].loc[step, "seconds"] / args.every
        rows.append(row)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "bf16_check.csv", index=False)
    shown = ["step", *[f"{k}_{s}" for k in KEYS for s in ("seed_spread", "bf16_diff", "within")],
             "bf16_within_spread"]
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"written: {args.out / 'bf16_check.csv'}")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("train", "report"))
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "bf16-check")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "cpu-scale" / "bf16")
    args = parser.parse_args(argv)
    train(args) if args.command == "train" else report(args)


if __name__ == "__main__":
    main()
