"""The adaptation budget of the CPU scale, measured: the full fine-tune from the anchor at lambda 0.0018.

Issue 25's rule: on the validation objective (``lambda * 255^2 * MSE + bpp`` on the
held-out crops) of every weight fine-tuned from the anchor at the lowest target lambda,
the budget is the first N with ``obj(2N) > 0.99 * obj(N)``: doubling the steps would
gain less than one per cent. ALICE, vanilla and the references then all train N steps
with one schedule.

The run is ``alice train --method full`` on the chosen CPU size (``cpu_scale_pilot.py``)
at a constant learning rate (a schedule of a given length would decide the curve's
shape in advance), validating every ``--every`` steps; it resumes where it stopped. It
trains in doublings (2, 4, 8 ... validations) and stops at the first doubling after which
the rule names an N: longer training cannot change the first N that qualifies, and a
constant rate makes the stages one run.

    python benchmarks/fine_tune_budget.py train --init ANCHOR.safetensors --root runs/budget --steps 4000
    python benchmarks/fine_tune_budget.py report --root runs/budget --out docs/cpu-scale/budget

``--method alice`` (or ``vanilla``) trains that method with the same schedule instead, and
``gap`` compares its curve with the full fine-tune's, step by step: how ALICE's distance to
its reference moves with the budget (``--tolerance -1`` keeps it training to ``--steps``)::

    python benchmarks/fine_tune_budget.py train --method alice --tolerance -1 --steps 1600 --init ANCHOR --root runs/budget-alice
    python benchmarks/fine_tune_budget.py gap --root runs/budget-alice --reference docs/cpu-scale/budget/metrics.csv --out docs/cpu-scale/budget

``-p KEY=VALUE`` trains a probe of one lever on the same schedule (``-p lora.r=32``,
``-p "adapt.alice.also_train=[entropy]"``), and ``gap --name`` files its table apart::

    python benchmarks/fine_tune_budget.py train --method alice --tolerance -1 --steps 200 --init ANCHOR --root runs/probe-r32 -p lora.r=32
    python benchmarks/fine_tune_budget.py gap --method alice --name r32 --root runs/probe-r32
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_scale_pilot import CANDIDATES, DEFAULT_DATA, ROOT, alice_train  # noqa: E402  (the chosen size)

LMBDA = 0.0018
SIZE = "e32-d1111-w8"


def budget(steps: list[int], objective: list[float], tolerance: float = 0.01) -> int | None:
    """The first N (a validated step whose double was validated too) with obj(2N) > (1 - tolerance) * obj(N)."""
    at = dict(zip(steps, objective))
    for n in sorted(at):
        if 2 * n in at and at[2 * n] > (1 - tolerance) * at[n]:
            return n
    return None


def logged_budget(root: Path, tolerance: float) -> tuple[pd.DataFrame, int | None]:
    """The run's log (``metrics.csv``) and the N its validations name so far (None: train longer)."""
    log = pd.read_csv(root / "metrics.csv")
    return log, budget(log["step"].tolist(), log["val_loss"].tolist(), tolerance)


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def train_command(args: argparse.Namespace, steps: int) -> list[str]:
    schedule = {"batch_size": 4, "crop": 256, "lr": args.lr, "schedule": "constant", "steps": steps,
                "validate_every": args.every, "checkpoint_every": 50, "average_decay": args.average_decay,
                "precision": "fp32", "seed": 0}
    overrides = {"data.train_dir": str(args.data), "data.val_images": 16, "data.val_crop": 256,
                 **{f"adapt.{args.method}.{k}": v for k, v in schedule.items()},
                 **{f"model.{k}": v for k, v in CANDIDATES[SIZE].items()}}
    overrides.update(args.set)  # a probe's own settings (adapters, extra modules), beside the schedule
    return alice_train(args.root, args.threads, overrides, "--method", args.method, "--lmbda", str(LMBDA),
                       "--init", str(args.init))


def stages(every: int, cap: int) -> list[int]:
    """The step counts the run stops at to test the rule: ``every`` doubled from 2 ``every`` up to ``cap``."""
    targets, steps = [], 2 * every
    while steps < cap:
        targets.append(steps)
        steps *= 2
    return targets + [cap]


def train(args: argparse.Namespace) -> int:
    """Train in doublings until the rule names N (or ``--steps``); the exit status of the last stage."""
    args.root.mkdir(parents=True, exist_ok=True)
    status = 0
    for steps in stages(args.every, args.steps):
        with open(args.root / "train.log", "a") as log:
            status = subprocess.call(train_command(args, steps), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if status:
            break
        _, n = logged_budget(args.root, args.tolerance)
        print(f"trained {steps} steps: " + (f"budget N = {n}" if n is not None else "no N yet"), flush=True)
        if n is not None:
            break
    return status


def report(args: argparse.Namespace) -> int | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log, n = logged_budget(args.root, args.tolerance)
    at = dict(zip(log["step"], log["val_loss"]))
    table = pd.DataFrame([{"N": s, "obj_N": at[s], "obj_2N": at[2 * s], "ratio": at[2 * s] / at[s]}
                          for s in sorted(at) if 2 * s in at])
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "budget.csv", index=False)
    log.to_csv(args.out / "metrics.csv", index=False)  # the whole curve, beside the pairs the rule reads
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(log["step"], log["val_loss"], marker=".")
    if n is not None:
        ax.axvline(n, color="gray", linestyle="--", label=f"N = {n}: obj(2N) > 0.99 obj(N)")
        ax.legend()
    ax.set(xscale="log", xlabel="fine-tuning steps (full model, lambda 0.0018)",
           ylabel="validation objective (λ·255²·MSE + bpp)")
    fig.tight_layout()
    fig.savefig(args.out / "budget.png", dpi=120)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"budget N = {n}" if n is not None else "no N yet: train longer")
    print(f"written: {args.out / 'budget.csv'}, {args.out / 'metrics.csv'}, {args.out / 'budget.png'}")
    return n


def gap_table(method_log: pd.DataFrame, reference_log: pd.DataFrame) -> pd.DataFrame:
    """Per step validated in both logs: each objective and the method's distance above the reference's, in %."""
    both = method_log[["step", "val_loss"]].merge(reference_log[["step", "val_loss"]], on="step",
                                                  suffixes=("_method", "_reference"))
    both["gap_pct"] = 100 * (both["val_loss_method"] / both["val_loss_reference"] - 1)
    return both


def gap(args: argparse.Namespace) -> pd.DataFrame:
    table = gap_table(pd.read_csv(args.root / "metrics.csv"), pd.read_csv(args.reference))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gap_{args.name or args.method}.csv"
    table.to_csv(path, index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"written: {path}")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("train", "report", "gap"))
    parser.add_argument("--method", choices=("full", "alice", "vanilla"), default="full",
                        help="train / gap: the method fine-tuned (the rule reads full)")
    parser.add_argument("--reference", type=Path, default=ROOT / "docs" / "cpu-scale" / "budget" / "metrics.csv",
                        help="gap: the full fine-tune's log")
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "fine-tune-budget")
    parser.add_argument("--init", type=Path, help="train: the anchor's weights (a model file)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=6400, help="train: at most this many steps")
    parser.add_argument("--every", type=int, default=100, help="validate every N steps")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--average-decay", type=float, default=0.99)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "cpu-scale" / "budget")
    parser.add_argument("-p", "--set", action="append", default=[], type=_setting, metavar="KEY=VALUE",
                        help="train: a further setting, as alice train -p takes it (e.g. lora.r=32)")
    parser.add_argument("--name", help="gap: the probe's name in the table's file (gap_NAME.csv; default the method)")
    args = parser.parse_args(argv)
    args.set = dict(args.set)
    if args.command == "train":
        if args.init is None:
            parser.error("train needs --init (the anchor's weights)")
        sys.exit(train(args))
    gap(args) if args.command == "gap" else report(args)


if __name__ == "__main__":
    main()
