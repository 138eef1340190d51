"""The CPU-scale pilot: candidate STF sizes trained side by side for the same wall time.

Each candidate is the same STF class with another :class:`~alice_lib.models.stf.STFConfig`
(the capacity moved from the entropy model into the transforms, ``entropy_channels``),
trained from random weights with one recipe at the anchor's lambda, one process and
one thread each, all at once, so that they share the machine alike. Every run is
``alice train`` (the cpu profile's fixed-rate recipe with the overrides below) in
its own folder under ``--root`` and resumes where it stopped: calling this again
continues each run until its training time (the ``seconds`` column of its
``metrics.csv``) reaches ``--hours``.

    python benchmarks/cpu_scale_pilot.py train --hours 3          # resumable; Ctrl-C stops every run
    python benchmarks/cpu_scale_pilot.py report --out docs/cpu-scale/pilot
    python benchmarks/cpu_scale_pilot.py report-anchor --run alice_lib/weights/cpu_anchor.metrics.csv --out docs/cpu-scale/anchor
    python benchmarks/checkpoint_kodak.py runs/cpu-scale-pilot/*/best.pt   # Kodak, real bitstreams, vs JPEG

``report`` writes ``pilot.csv`` (the last validation of each run, its steps and
hours, and the slope of its validation loss over the last hour) and ``pilot.png``
(validation loss and PSNR against hours).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "bsds432"

#: Candidate sizes (overrides of the cpu profile's model), each about 3.6M parameters.
CANDIDATES: dict[str, dict[str, str]] = {
    # wide and shallow: one block per stage, no shifted window anywhere
    "e32-d1111-w8": {"embed_dim": "32", "depths": "[1,1,1,1]", "num_heads": "[2,4,8,16]", "window_size": "8",
                     "entropy_channels": "48"},
    # narrow and deep: a shifted-window block in every stage, as in Swin
    "e24-d2222-w8": {"embed_dim": "24", "depths": "[2,2,2,2]", "num_heads": "[2,4,6,12]", "window_size": "8",
                     "entropy_channels": "48"},
}

#: One recipe for every candidate (overrides of the cpu profile's fixed-rate schedule, ``anchor.train``):
#: the anchor's lambda, 4 crops of 256 px, a constant learning rate (the pilot is the first part of a
#: longer run; the decay comes at the end), a live hyperprior (recipe v2's start and its slower learning
#: rate) and a moving average of the weights, which is what validation judges (every 200 steps, on the
#: last 16 images of the folder).
RECIPE: dict[str, str] = {
    "anchor.lmbda": "0.0483", "anchor.train.batch_size": "4", "anchor.train.crop": "256",
    "data.val_images": "16", "data.val_crop": "256", "anchor.train.lr": "5e-4",
    "anchor.train.schedule": "constant", "anchor.train.steps": "1000000", "anchor.train.validate_every": "200",
    "anchor.train.checkpoint_every": "50", "anchor.train.average_decay": "0.999",
    "anchor.train.hyper_init_gain": "300", "anchor.train.hyper_lr_scale": "0.125",
    "anchor.train.precision": "fp32", "anchor.train.seed": "0",
    "anchor.train.decay_fraction": "0.2"}  # unused by a constant rate, but the runs' recorded configuration


def alice_train(run_dir: Path, threads: int, overrides: dict, *options: str) -> list[str]:
    """``alice train --profile cpu`` into ``run_dir`` with ``-p`` overrides (``python -m alice_lib.cli``:
    this interpreter's package); ``options`` go before them (``--method``, ``--init`` ...)."""
    return [sys.executable, "-m", "alice_lib.cli", "train", "--profile", "cpu", *options, "--train-dir", str(run_dir),
            "--threads", str(threads), "--no-progress",
            *[arg for key, value in overrides.items() for arg in ("-p", f"{key}={value}")]]


def train_command(name: str, run_dir: Path, data: Path, threads: int) -> list[str]:
    """``alice train`` for one candidate."""
    return alice_train(run_dir, threads, {"data.train_dir": str(data), **RECIPE,
                                          **{f"model.{key}": value for key, value in CANDIDATES[name].items()}})


def trained_hours(run_dir: Path) -> float:
    """Training time so far, from ``metrics.csv`` (finished epochs only)."""
    path = run_dir / "metrics.csv"
    return float(pd.read_csv(path)["seconds"].sum()) / 3600 if path.exists() else 0.0


def train(args: argparse.Namespace) -> None:
    # A plain kill of the driver must stop its runs too (they resume from their last.pt).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    processes: dict[str, subprocess.Popen] = {}
    for name in args.candidates:
        run_dir = args.root / name
        if trained_hours(run_dir) >= args.hours:
            print(f"{name}: {trained_hours(run_dir):.2f} h trained, done")
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        log = open(run_dir / "train.log", "a")
        processes[name] = subprocess.Popen(train_command(name, run_dir, args.data, args.threads), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        print(f"{name}: started (pid {processes[name].pid}), log in {run_dir / 'train.log'}", flush=True)
    try:
        while processes:
            time.sleep(30)
            for name, process in list(processes.items()):
                hours = trained_hours(args.root / name)
                if process.poll() is not None:
                    print(f"{name}: exited with {process.returncode} after {hours:.2f} h", flush=True)
                    del processes[name]
                elif hours >= args.hours:
                    process.terminate()
                    process.wait()
                    print(f"{name}: {hours:.2f} h trained, stopped", flush=True)
                    del processes[name]
    finally:
        for process in processes.values():
            process.terminate()


def report(args: argparse.Namespace) -> pd.DataFrame:
    import matplotlib.pyplot as plt

    rows, curves = [], {}
    for name in args.candidates:
        path = args.root / name / "metrics.csv"
        if not path.exists():
            continue
        log = pd.read_csv(path)
        log["hours"] = log["seconds"].cumsum() / 3600
        curves[name] = log
        last = log.iloc[-1]
        recent = log[log["hours"] >= last["hours"] - 1.0]
        slope = (recent["val_loss"].iloc[-1] - recent["val_loss"].iloc[0]) / max(
            recent["hours"].iloc[-1] - recent["hours"].iloc[0], 1e-9)
        rows.append({"candidate": name, "steps": int(last["step"]), "hours": last["hours"],
                     "val_loss": last["val_loss"], "val_bpp": last["val_bpp"], "val_psnr": last["val_psnr"],
                     "val_z_bits": last.get("val_z_bits"), "val_loss_per_hour_last_hour": slope})
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "pilot.csv", index=False)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, log in curves.items():
        axes[0].plot(log["hours"], log["val_loss"], label=name)
        axes[1].plot(log["hours"], log["val_psnr"], label=name)
    axes[0].set(xlabel="hours of training (one thread)", ylabel="validation loss (λ·255²·MSE + bpp)")
    axes[1].set(xlabel="hours of training (one thread)", ylabel="validation PSNR (dB)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.out / "pilot.png", dpi=120)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"written: {args.out / 'pilot.csv'}, {args.out / 'pilot.png'}")
    return table


def report_anchor(args: argparse.Namespace) -> pd.DataFrame:
    """The anchor's run (the chosen candidate, continued): its log, its curve and power-law fits of its loss.

    ``--run`` is the run folder (its ``metrics.csv``) or a log file; a shipped anchor's log
    (``alice_lib/weights/*.metrics.csv``) may hold two legs, a run and its continuation from
    the first's weights, told apart by its ``leg`` column. Writes ``metrics.csv`` (the log as
    read), ``anchor.png`` (validation loss against steps on log axes with the fits, and PSNR)
    and ``fits.csv``: for each first step, the exponent of ``loss ~ steps^k`` fitted from there
    on over the first leg (the held learning rate) and the steps at which the fit reaches
    ``--target``.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    source = args.run if args.run.suffix == ".csv" else args.run / "metrics.csv"
    log = pd.read_csv(source)
    legs = [part for _, part in log.groupby("leg")] if "leg" in log else [log]
    first_leg = legs[0]
    rows = []
    for first in args.fit_from:
        part = first_leg[first_leg["step"] >= first]
        k, c = np.polyfit(np.log(part["step"]), np.log(part["val_loss"]), 1)
        rows.append({"fit_from_step": first, "last_step": int(first_leg["step"].iloc[-1]), "exponent": k,
                     "log_scale": c, "steps_to_target": float(np.exp((np.log(args.target) - c) / k)),
                     "target": args.target})
    fits = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    if source.resolve() != (args.out / "metrics.csv").resolve():
        shutil.copyfile(source, args.out / "metrics.csv")  # the log as written, byte for byte
    fits.to_csv(args.out / "fits.csv", index=False)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = ["lr held", "continued: a cosine to zero"] if len(legs) > 1 else ["validation"]
    for part, name in zip(legs, names):
        axes[0].loglog(part["step"], part["val_loss"], marker=".", label=f"validation loss ({name})")
        axes[1].plot(part["step"], part["val_psnr"], marker=".", label=name)
    for row in rows:
        steps = np.geomspace(row["fit_from_step"], row["steps_to_target"], 50)
        fitted = np.exp(row["log_scale"]) * steps ** row["exponent"]  # the fit itself, loss = e^c * steps^k
        axes[0].loglog(steps, fitted, linestyle=":", label=f"fit from step {row['fit_from_step']}: k = {row['exponent']:.2f}")
    axes[0].axhline(args.target, color="gray", linestyle="--", label=f"JPEG-level objective ~{args.target:g}")
    axes[0].set(xlabel="steps (batch 4 of 256 px)", ylabel="validation loss (λ·255²·MSE + bpp)")
    axes[0].legend(fontsize=7)
    axes[1].set(xlabel="steps", ylabel="validation PSNR (dB)")
    if len(legs) > 1:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "anchor.png", dpi=120)
    print(fits.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"written: {args.out / 'metrics.csv'}, {args.out / 'fits.csv'}, {args.out / 'anchor.png'}")
    return fits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("train", "report", "report-anchor"))
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "cpu-scale-pilot")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--hours", type=float, default=3.0, help="training time per candidate")
    parser.add_argument("--threads", type=int, default=1, help="threads per candidate")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "cpu-scale" / "pilot")
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "cpu-anchor",
                        help="report-anchor: the run folder or its log (a shipped anchor's .metrics.csv)")
    parser.add_argument("--fit-from", type=int, nargs="+", default=[1000, 2600], help="report-anchor: fit starts")
    parser.add_argument("--target", type=float, default=3.9, help="report-anchor: the objective to project to")
    args = parser.parse_args(argv)
    {"train": train, "report": report, "report-anchor": report_anchor}[args.command](args)


if __name__ == "__main__":
    main()
