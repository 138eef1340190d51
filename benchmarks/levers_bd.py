"""BD-rate over the rates ALICE rank 32 was trained at (docs/cpu-scale/README.md, the levers): rank 8, vanilla
and rank 32 against the references, from the main job's targets.csv and levers/kodak_r32.csv.

    python benchmarks/levers_bd.py
"""
import pandas as pd
from alice_lib.evaluation.bd import bd_rate
t = pd.read_csv("reports/cpu/targets.csv")
k = pd.read_csv("docs/cpu-scale/levers/kodak_r32.csv")
rows = []
lambdas = sorted(k.lmbda)
ref = t[(t.method == "alice") & t.lmbda.isin(lambdas)]
for name, curve in {"ALICE r 8 (shipped)": t[(t.method == "alice") & t.lmbda.isin(lambdas)][["lmbda", "bpp", "psnr"]],
                    "vanilla (shipped)": t[(t.method == "vanilla") & t.lmbda.isin(lambdas)][["lmbda", "bpp", "psnr"]],
                    "ALICE r 32 (probe)": k[["lmbda", "bpp", "psnr"]]}.items():
    curve = curve.sort_values("lmbda")
    row = {"curve": name, "lambdas": " ".join(map(str, curve.lmbda))}
    for method in ("akima", "cubic"):
        row[f"bd_rate_{method}"] = bd_rate(ref.ref_bpp, ref.ref_psnr, curve.bpp, curve.psnr, method=method)
    row["rate_ratios"] = " ".join(f"{b / r:.2f}" for b, r in zip(curve.bpp, ref.sort_values("lmbda").ref_bpp))
    rows.append(row)
out = pd.DataFrame(rows)
print(out.to_string(index=False, float_format=lambda v: f"{v:+.2f}"))
