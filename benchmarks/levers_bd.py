"""BD-rate over the rates ALICE rank 32 was trained at (docs/cpu-scale/README.md, the levers): rank 8, vanilla
and rank 32 against the references, from the main job's targets.csv and levers/kodak_r32.csv (Kodak means).

    python benchmarks/levers_bd.py
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from alice_lib.evaluation.bd import bd_rate

ROOT = Path(__file__).resolve().parents[1]


def main() -> pd.DataFrame:
    targets = pd.read_csv(ROOT / "reports" / "cpu" / "targets.csv")
    rank32 = pd.read_csv(ROOT / "docs" / "cpu-scale" / "levers" / "kodak_r32.csv").sort_values("lmbda")
    measured = targets[targets.lmbda.isin(rank32.lmbda)].sort_values("lmbda")
    reference = measured[measured.method == "alice"]  # every row carries its reference's point
    curves = {"ALICE r 8 (shipped)": reference, "vanilla (shipped)": measured[measured.method == "vanilla"],
              "ALICE r 32 (probe)": rank32}
    rows = []
    for name, curve in curves.items():
        row = {"curve": name, "lambdas": " ".join(map(str, curve.lmbda))}
        for method in ("akima", "cubic"):
            row[f"bd_rate_{method}"] = bd_rate(reference.ref_bpp, reference.ref_psnr, curve.bpp, curve.psnr,
                                               method=method)
        row["rate_ratios"] = " ".join(f"{b / r:.2f}" for b, r in zip(curve.bpp, reference.ref_bpp))
        rows.append(row)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:+.2f}"))
    return table


if __name__ == "__main__":
    main()
