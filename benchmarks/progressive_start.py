"""Independent adapters (the paper) against progressive ones (each from its neighbour's), measured.

Xu, Huang and Wu (2026, "Variable-Rate Deep Image Compression based on Low-Rank
Adaptation by Progressive Learning") start each rate's adapters from the neighbouring
rate's, going down from the anchor, and report 97 % fewer training steps. Here both
schemes train ALICE with one schedule (the profile's ``adapt``) on one anchor; the
report compares, per target lambda, the validation objective both reach and the step at
which the progressive run first reaches the independent run's final objective.

``train`` runs the adaptations of one scheme into a run folder of their own (data,
anchor, then ``pipeline.adapt`` outwards from the anchor), resumable; the independent
runs may equally come from ``alice run -p use_shipped=false`` (its run folder). The first
rate of the progressive order starts from the anchor exactly as its independent run does:
``--first-shipped`` installs the profile's shipped run there instead of training it again,
and ``-p adapt.steps=N`` gives the later rates a budget of their own (the question being
how few steps a neighbour's start needs).

    python benchmarks/progressive_start.py train --anchor ANCHOR.safetensors --start anchor --run-dir runs/independent
    python benchmarks/progressive_start.py train --anchor ANCHOR.safetensors --start neighbour --run-dir runs/progressive
    python benchmarks/progressive_start.py report --independent runs/independent --progressive runs/progressive
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from alice_lib import pipeline as wb  # noqa: E402
from alice_lib.cli import _parameters  # noqa: E402  (-p KEY=VALUE, as alice run reads them)
from alice_lib.run_folder import RunLayout  # noqa: E402
from alice_lib.settings import load_settings, split_parameters  # noqa: E402

DEFAULT_PROFILE = ROOT / "alice_lib" / "profiles" / "cpu.yaml"
METHOD = "alice"


def train(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    overrides, _ = split_parameters(_parameters(args.p, "progressive_start"))
    settings = load_settings(args.profile, {**overrides, "use_shipped": False, "adapt.start": args.start})
    wb.prepare_data(settings, args.run_dir, train_folder=args.data, allow_download=False)
    wb.prepare_anchor(settings, args.run_dir, checkpoint=str(args.anchor))
    for lmbda in settings.adaptation_order():
        if args.first_shipped and settings.start_of(lmbda) is None:  # from the anchor: the independent run itself
            shipped = wb.install_shipped_run(load_settings(args.profile, overrides), args.run_dir, METHOD, lmbda)
            print(f"lambda {lmbda}: shipped, {shipped}", flush=True)
            continue
        row = wb.adapt(settings, args.run_dir, lmbda, METHOD, progress=not args.no_progress)
        print(f"lambda {lmbda}: {row['status']}, {row['artifact']}", flush=True)


def read_logs(independent: Path, progressive: Path, lmbdas: list[float]) -> dict[float, tuple[pd.DataFrame, ...]]:
    """Per lambda, the training logs (``metrics.csv``) of the independent and the progressive run."""
    return {lmbda: tuple(pd.read_csv(RunLayout(folder).rate_log(METHOD, lmbda)) for folder in (independent, progressive))
            for lmbda in lmbdas}


def compare(logs: dict[float, tuple[pd.DataFrame, ...]]) -> pd.DataFrame:
    """Per lambda: each scheme's budget and final validation objective, the independent run's
    objective at the progressive run's last step (where it validated there), and the first
    validated step at which the progressive run is at or below the independent run's final."""
    rows = []
    for lmbda, (ind, pro) in logs.items():
        final, steps = float(ind["val_loss"].iloc[-1]), int(pro["step"].iloc[-1])
        reached = pro.loc[pro["val_loss"] <= final, "step"]
        same_step = ind.loc[ind["step"] == steps, "val_loss"]
        rows.append({"lmbda": lmbda, "independent_steps": int(ind["step"].iloc[-1]), "independent_final": final,
                     "progressive_steps": steps, "progressive_first": float(pro["val_loss"].iloc[0]),
                     "progressive_final": float(pro["val_loss"].iloc[-1]),
                     "independent_at_progressive_steps": float(same_step.iloc[0]) if len(same_step) else None,
                     "progressive_steps_to_independent_final": int(reached.iloc[0]) if len(reached) else None})
    return pd.DataFrame(rows)


def report(args: argparse.Namespace) -> pd.DataFrame:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = load_settings(args.profile)
    logs = read_logs(args.independent, args.progressive, sorted(settings.targets))
    table = compare(logs)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "progressive.csv", index=False)
    fig, axes = plt.subplots(1, len(table), figsize=(3 * len(table), 3), sharex=True)
    for ax, (lmbda, runs) in zip(axes, logs.items()):
        for log, label in zip(runs, ("independent", "progressive")):
            ax.plot(log["step"], log["val_loss"], marker=".", label=label)
        ax.set(title=f"λ = {lmbda}", xlabel="steps")
    axes[0].set_ylabel("validation objective")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.out / "progressive.png", dpi=120)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"written: {args.out / 'progressive.csv'}, {args.out / 'progressive.png'}")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("train", "report"))
    parser.add_argument("--profile", type=Path, default=DEFAULT_PROFILE)
    parser.add_argument("--anchor", type=Path, help="train: the anchor's weights (a model file)")
    parser.add_argument("--start", choices=("anchor", "neighbour"), default="neighbour")
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "bsds432"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--first-shipped", action="store_true",
                        help="train: install the profile's shipped run at the first rate (it starts from the anchor)")
    parser.add_argument("-p", action="append", default=[], metavar="KEY=VALUE", help="a settings override")
    parser.add_argument("--independent", type=Path)
    parser.add_argument("--progressive", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "cpu-scale" / "progressive")
    args = parser.parse_args(argv)
    if args.command == "train":
        if args.anchor is None or args.run_dir is None:
            parser.error("train needs --anchor and --run-dir")
        train(args)
    else:
        if args.independent is None or args.progressive is None:
            parser.error("report needs --independent and --progressive (run folders)")
        report(args)


if __name__ == "__main__":
    main()
