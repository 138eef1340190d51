"""How ALICE's Kodak results move with the adaptation budget: one row per run, one curve per lambda.

Each argument is ``STEPS=FOLDER``, a report folder of a main-job run (``reports/cpu`` or one of
``runs/cpu-adapt<N>/reports``) whose adapters trained for STEPS steps. From its
``bd_rate.csv`` (Akima, five adapted points, alice vs fixed-rate) and ``targets.csv`` (each
ALICE point against the reference at its lambda) this prints one table and draws
``budget.png``: BD-rate, rate ratio and objective ratio against the steps (log scale).

    python benchmarks/adaptation_budget.py 300=reports/cpu 1200=runs/cpu-adapt1200/reports \\
        2000=runs/cpu-adapt2000/reports 5500=runs/cpu-adapt5500/reports --out docs/studies/adaptation-budget
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def budget_rows(runs: dict[int, Path]) -> pd.DataFrame:
    """One row per (steps, lambda): rate ratio, PSNR delta, objective ratio, and the run's BD figures."""
    rows = []
    for steps, folder in sorted(runs.items()):
        bd = pd.read_csv(folder / "bd_rate.csv")
        pick = bd[(bd.method == "alice") & (bd.anchor == "fixed-rate") & (bd.bd_method == "akima")
                  & (bd.curves == "adapted") & (bd.metric == "psnr")]
        if len(pick) != 1:
            raise SystemExit(f"{folder}/bd_rate.csv has no single alice-vs-fixed-rate Akima row")
        targets = pd.read_csv(folder / "targets.csv")
        targets = targets[(targets.method == "alice") & (targets.reference == "fixed-rate")]
        for row in targets.itertuples():
            rows.append({"steps": steps, "lmbda": row.lmbda, "rate_ratio": row.rate_ratio,
                         "psnr_delta_db": row.psnr_delta_db, "rd_loss_ratio": row.rd_loss_ratio,
                         "bd_rate_pct": float(pick.bd_rate_pct.iloc[0]), "bd_psnr_db": float(pick.bd_psnr_db.iloc[0])})
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), layout="constrained")
    bd = table.drop_duplicates("steps")
    axes[0].plot(bd.steps, bd.bd_rate_pct, "o-", color="black")
    axes[0].axhline(5, ls="--", color="grey", label="aim: +5 %")
    axes[0].set(ylabel="BD-rate, alice vs fixed-rate (%)")
    for lmbda, group in table.groupby("lmbda"):
        axes[1].plot(group.steps, group.rate_ratio, "o-", label=f"{lmbda:g}")
        axes[2].plot(group.steps, group.rd_loss_ratio, "o-", label=f"{lmbda:g}")
    axes[1].axhline(1.25, ls="--", color="grey")
    axes[1].set(ylabel="ALICE rate / reference rate")
    axes[2].axhline(1.0, ls="--", color="grey")
    axes[2].set(ylabel="ALICE objective / reference objective")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(sorted(table.steps.unique()), [f"{s:,}" for s in sorted(table.steps.unique())])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("adaptation steps (batch 4 of 256 px)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.legend(*axes[2].get_legend_handles_labels(), title="lambda", loc="outside right center")
    fig.suptitle("ALICE against the CPU references on Kodak, by adaptation budget (shipped anchor)")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "budget.png"
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="STEPS=FOLDER")
    parser.add_argument("--out", type=Path, help="write budget.csv and budget.png here")
    args = parser.parse_args()
    runs = {}
    for item in args.runs:
        steps, sep, folder = item.partition("=")
        if not sep or not steps.isdigit():
            parser.error(f"expected STEPS=FOLDER, got {item!r}")
        runs[int(steps)] = Path(folder)
    table = budget_rows(runs)
    wide = table.assign(lmbda=table.lmbda.map("{:g}".format)).pivot(
        index="lmbda", columns="steps", values=["rate_ratio", "psnr_delta_db", "rd_loss_ratio"])
    with pd.option_context("display.width", 200, "display.precision", 3):
        print(table.drop_duplicates("steps")[["steps", "bd_rate_pct", "bd_psnr_db"]].to_string(index=False))
        print(wide.to_string())
    if args.out:
        table.to_csv(args.out / "budget.csv", index=False, float_format="%.4f")
        print(f"wrote {args.out / 'budget.csv'} and {plot(table, args.out)}")


if __name__ == "__main__":
    main()
