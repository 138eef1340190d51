"""The workbook end to end on the smoke profile: papermill driver, resume, failure, report files."""

from __future__ import annotations

import pandas as pd
import pytest

from alice_lib import pipeline as wb
from alice_lib.cli import main


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, kodak_dir):
    root = tmp_path_factory.mktemp("smoke")
    reports = wb.run_pipeline("smoke", run_dir=root / "run", reports_dir=root / "reports")
    return root / "run", reports


def test_driver_runs_every_notebook_and_writes_the_report(smoke_run):
    run_dir, reports = smoke_run
    spec = wb.load_profile("smoke")
    executed = sorted(p.name for p in (run_dir / "notebooks").glob("*.ipynb"))
    assert len(executed) == 4 + len(spec["targets"]) * len(spec["adapt"]["methods"])
    for name in ("bd_rate.csv", "results.csv", "rd_psnr.png", "rd_psnr.pdf", "rd_msssim.png", "parameters.png",
                 "complexity.png", "complexity.csv", "alice.json", "jpeg.json", "timings.csv"):
        assert (reports / name).stat().st_size > 0, name
    assert sorted(p.name for p in (reports / "notebooks").glob("*.ipynb")) == executed
    bd = pd.read_csv(reports / "bd_rate.csv")
    assert {"method", "anchor", "bd_rate_pct", "bd_psnr_db"} <= set(bd.columns)
    assert ("malice", "alice") in set(zip(bd["method"], bd["anchor"]))


def test_results_come_from_real_bitstreams(smoke_run):
    _, reports = smoke_run
    rows = pd.read_csv(reports / "results.csv")
    learned = rows[rows["method"].isin(["alice", "malice", "vanilla", "fixed-rate", "anchor"])]
    assert (learned["error"].fillna("") == "").all()
    expected = 8 * learned["bytes"] / (learned["height"] * learned["width"])
    assert ((learned["bpp"] - expected).abs() < 1e-12).all()
    alice = learned[learned["method"] == "alice"].set_index(["lmbda", "image"])
    malice = learned[learned["method"] == "malice"].set_index(["lmbda", "image"])
    # MALICE is the same model with the adapters folded in: same rate, same quality (float rounding aside).
    assert (alice["psnr"] - malice["psnr"]).abs().max() < 0.05


def test_second_run_resumes_without_training(smoke_run):
    run_dir, _ = smoke_run
    spec = wb.load_profile("smoke")
    artifact = wb.rate_artifact(run_dir, "alice", spec["targets"][0])
    stamp = artifact.stat().st_mtime_ns
    summary = wb.adapt(spec, run_dir, spec["targets"][0], "alice", progress=False)
    assert summary["status"] == "already trained"
    assert artifact.stat().st_mtime_ns == stamp


def test_failing_notebook_stops_with_its_path(tmp_path, capsys):
    code = main(["run", "--profile", "smoke", "--run-dir", str(tmp_path / "run"),
                 "--reports-dir", str(tmp_path / "reports"), "--kernel", "no-such-kernel"])
    assert code == 1
    assert "01_data.ipynb" in capsys.readouterr().err


def test_unknown_profile_and_method_are_clear_errors(tmp_path):
    with pytest.raises(wb.PipelineError, match="unknown profile"):
        wb.load_profile("nonexistent")
    with pytest.raises(wb.PipelineError, match="unknown method"):
        wb.adapt(wb.load_profile("smoke"), tmp_path, 0.0067, "qlora")


def test_paper_profile_carries_the_published_settings():
    paper = wb.load_profile("paper")
    assert wb.model_config(paper).to_dict() == wb.STFConfig().to_dict()
    assert paper["anchor"]["lmbda"] == 0.0483
    assert paper["targets"] == [0.0018, 0.0035, 0.0067, 0.013, 0.025]
    assert (paper["adapt"]["batch_size"], paper["adapt"]["crop"], paper["adapt"]["epochs"]) == (16, 256, 15)
    assert paper["adapt"]["alice"]["lr"] == 1e-4 and paper["adapt"]["schedule"] == "cosine"
    lora = wb.lora_config(paper)
    assert (lora.r, lora.alpha, lora.mlp_fc1, lora.mlp_fc2) == (8, 8, True, True)
    assert all(lora.encoder) and all(lora.decoder)
