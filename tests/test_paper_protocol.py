"""The paper profile's code path without a GPU: the reference protocol on the full-size STF.

A few steps on tiny image folders (overridden counts and epochs), but everything the
paper run does differently from the CPU profile goes through the same functions:
epochs converted to steps from the images found, cosine stepped per epoch with
T_max = epochs, validation once per epoch on a separate split, random crops without
flips, seed 42, the per-epoch Kodak check with real bitstreams, curves without the
anchor and BD from adapted points in the cubic and Akima forms.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from alice_lib import evaluation
from alice_lib import pipeline as wb
from alice_lib.checkpoints import save_stf
from alice_lib.cli import main
from alice_lib.models.stf import STFConfig, SymmetricalTransFormer
from alice_lib.run_folder import RunLayout
from alice_lib.settings import PROFILE_DIR, load_settings
from alice_lib.train import load_checkpoint

REFERENCE_TARGETS = [0.0018, 0.0035, 0.0067, 0.013, 0.025]


def _photos(folder, n: int, size: tuple[int, int], seed: int):
    """Smooth random PNGs (photograph-like enough to code; white noise would not)."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        low = torch.rand(1, 3, 4, 4, generator=g)
        image = torch.nn.functional.interpolate(low, size=size, mode="bicubic", align_corners=False)[0]
        array = image.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"img{i:02d}.png")
    return folder


@pytest.mark.filterwarnings("ignore:MS-SSIM needs both sides")  # the tiny test image: PSNR is what is checked
def test_paper_protocol_runs_end_to_end_on_the_full_size_stf(tmp_path):
    overrides = {"data.train_images": 4, "data.val_source": "folder", "data.val_dir": str(tmp_path / "val"),
                 "data.val_images": 2, "data.val_crop": 64, "data.cache": True, "adapt.epochs": 2,
                 "adapt.crop": 64, "adapt.batch_size": 2, "adapt.num_workers": 0, "adapt.methods": ["alice"],
                 "adapt.epoch_check.images": 1, "targets": [0.0067]}
    settings = wb.load_profile("paper", overrides)
    # What stays the reference's: per-epoch cosine, crop only, seed 42, check on, curves without anchor.
    schedule = settings.adaptation.training("alice")
    assert (schedule.schedule, schedule.schedule_unit, schedule.flip, schedule.seed) == ("cosine", "epoch", False, 42)
    assert settings.adaptation.epoch_check.enabled and settings.model.stf == STFConfig()
    assert settings.evaluation.curves_include_anchor is False

    run_dir = tmp_path / "run"
    _photos(tmp_path / "val", 2, (72, 72), seed=1)
    sources = wb.prepare_data(settings, run_dir, kodak=str(_photos(tmp_path / "kodak", 1, (96, 128), seed=2)),
                              train_folder=str(_photos(tmp_path / "train", 6, (80, 80), seed=3)),
                              allow_download=False)
    assert (sources["train"]["images"], sources["val"]["images"]) == (6, 2)

    torch.manual_seed(0)
    anchor = SymmetricalTransFormer(STFConfig())  # the published size; weights need not be trained here
    anchor.update(force=True)
    save_stf(RunLayout(run_dir).anchor, anchor, {"lmbda": settings.anchor.lmbda})
    del anchor

    train_set, val_set = wb.training_sets(settings, run_dir, schedule)
    assert (len(train_set), len(val_set), train_set.flip) == (4, 2, False)
    summary = wb.adapt(settings, run_dir, 0.0067, "alice", progress=False)
    # Steps from the images found: 2 epochs * (4 // 2) = 4.
    assert summary["status"] == "trained" and summary["planned_steps"] == summary["step"] == 4

    folder = RunLayout(run_dir).rate_training("alice", 0.0067)
    last = load_checkpoint(folder / "last.pt")
    assert last["train_config"]["schedule_unit"] == "epoch" and last["train_config"]["batch_size"] == 2
    assert last["train_config"]["seed"] == 42 and last["train_config"]["steps_per_epoch"] == 2
    assert last["scheduler"]["T_max"] == 2 and last["scheduler"]["last_epoch"] == 2  # once per epoch
    metrics = pd.read_csv(folder / "metrics.csv")
    assert list(metrics["step"]) == [2, 4] and metrics["val_loss"].notna().all()  # validation once per epoch
    # The learning rate of each epoch: cosine over T_max = 2 epochs, 1e-4 then 1e-4 * (1 + cos(pi / 2)) / 2.
    assert metrics["lr"].tolist() == pytest.approx([1e-4, 1e-4 * (1 + math.cos(math.pi / 2)) / 2])
    check = pd.read_csv(RunLayout(run_dir).epoch_check("alice", 0.0067))
    assert list(check["epoch"]) == [1, 2] and np.isfinite(check[["bpp", "psnr"]].to_numpy()).all()
    assert RunLayout(run_dir).rate_artifact("alice", 0.0067).exists()


def test_paper_curves_exclude_the_anchor_and_bd_comes_from_adapted_points():
    """The settings the pipeline passes to the evaluation: BD (cubic and Akima) on adapted points only."""
    spec = load_settings("paper").evaluation
    bpp = np.array([0.12, 0.2, 0.35, 0.55, 0.8])
    psnr = 10 * np.log10(bpp) + 36
    rows = [{"method": m, "lmbda": lm, "bpp": b * scale, "psnr": p, "ms_ssim_db": p / 2}
            for m, scale in (("alice", 1.05), ("fixed-rate", 1.0)) for lm, b, p in zip(REFERENCE_TARGETS, bpp, psnr)]
    rows.append({"method": "anchor", "lmbda": 0.0483, "bpp": 3.0, "psnr": 20.0, "ms_ssim_db": 10.0})  # far off
    table = evaluation.bd_table(pd.DataFrame(rows), [("alice", "fixed-rate")], bd_methods=spec.bd_methods,
                                curves_include_anchor=spec.curves_include_anchor)
    assert set(table["bd_method"]) == {"cubic", "akima"} and set(table["curves"]) == {"adapted"}
    # 5 % more bits at equal quality everywhere: the anchor's outlier would pull this far away.
    assert np.allclose(table["bd_rate_pct"], 5.0, atol=0.3)


def test_plan_json_carries_the_reference_protocol(capsys):
    assert main(["plan", "--profile", "paper", "--json", "--no-measure", "--requested-counts"]) == 0
    plan = json.loads(capsys.readouterr().out)
    runs = plan["runs"]
    assert sorted({r["lmbda"] for r in runs}) == REFERENCE_TARGETS
    assert {r["method"] for r in runs} == {"alice", "vanilla"} and len(runs) == 10
    for run in runs:
        assert (run["epochs"], run["steps"], run["global_batch_size"], run["lr"]) == (15, 281_250, 16, 1e-4)
        assert (run["schedule"], run["schedule_unit"], run["crop"], run["flip"], run["seed"]) == \
            ("cosine", "epoch", 256, False, 42)
    assert (plan["data"]["train_images"], plan["data"]["val_images"], plan["data"]["val_source"]) == \
        (300_000, 10_000, "openimages-test")
    assert plan["data"]["counts_from"] == "requested"
    ev = plan["evaluation"]
    assert (ev["bd_methods"], ev["curves_include_anchor"], ev["padding"]) == (["cubic", "akima"], False, "reference")
    assert plan["estimate"]["training_steps"] >= 10 * 281_250 and plan["estimate"]["total_seconds"] > 0


def test_plan_without_the_data_uses_the_requested_counts_and_says_so(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ALICE_OFFLINE", "1")
    monkeypatch.setattr("alice_lib.data_sources.DATA_ROOT", tmp_path)  # no OpenImages there
    assert main(["plan", "--profile", "paper", "--no-measure", "--run-dir", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert "MISSING" in text and "requested count" in text and "281,250" in text


def test_settings_reject_what_cannot_describe_an_experiment():
    with pytest.raises(ValueError, match="exactly one of epochs and steps"):
        load_settings("paper", {"adapt.steps": 100})
    with pytest.raises(ValueError, match="unknown keys"):
        load_settings("cpu", {"adapt.epoch": 3})
    with pytest.raises(ValueError, match="bd_methods"):
        load_settings("paper", {"eval.bd_methods": ["quadratic"]})
    with pytest.raises(ValueError, match="references.source"):
        load_settings("cpu", {"references.source": "borrowed"})
    with pytest.raises(ValueError, match="lmbda"):
        load_settings("cpu", {"references.weights": "cpu_fixed.safetensors"})


def test_reference_sources_and_labels():
    paper, cpu = load_settings("paper"), load_settings("cpu")
    assert paper.references.source == "published" and paper.result_label("full") == "full"
    assert cpu.references.source == "full" and cpu.result_label("full") == "fixed-rate"
    assert cpu.references_to_train() == ()  # fine-tunes: nothing trained from scratch
    scratch = load_settings("cpu", {"references.source": "scratch", "references.weights": "x_{lmbda}.safetensors"})
    assert scratch.result_label("full") == "full"  # then a curve of its own
    assert scratch.references.shipped_weights(0.0067).name == "x_0.0067.safetensors"
    assert scratch.references_to_train() == scratch.targets  # nothing of that name is shipped
    named = load_settings("cpu", {"references.source": "scratch", "references.weights": "cpu_full_{lmbda}.safetensors"})
    assert named.references_to_train() == ()  # a shipped file of that name at every target: none trained


def test_the_full_fine_tune_has_one_name_and_the_old_names_are_refused(tmp_path):
    """``full`` is the method, its label as a curve of its own and the reference source that uses its models;
    the older names (``finetune``, ``full-finetune``) are refused with the valid choices, not guessed."""
    from alice_lib.settings import EVALUATED_METHODS, REFERENCE_SOURCES, TRAINING_MODES

    assert "full" in TRAINING_MODES and "full" in REFERENCE_SOURCES and "full" in EVALUATED_METHODS
    assert not {"finetune", "full-finetune"} & {*REFERENCE_SOURCES, *EVALUATED_METHODS}
    raw = yaml.safe_load((PROFILE_DIR / "smoke.yaml").read_text())
    raw["references"] = {"source": "full"}
    raw["eval"]["methods"] = ["fixed-rate", "alice", "full"]
    settings = load_settings(raw)
    assert settings.references.source == "full" and settings.evaluation.methods == ("fixed-rate", "alice", "full")
    assert settings.result_label("full") == "fixed-rate" and settings.result_label("alice") == "alice"
    with pytest.raises(ValueError, match="references.source: 'finetune' is not one of full, scratch, published"):
        load_settings("smoke", {"references.source": "finetune"})
    raw["eval"]["methods"] = ["fixed-rate", "full-finetune"]
    with pytest.raises(ValueError, match="full-finetune"):
        load_settings(raw)
