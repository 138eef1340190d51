"""The workbook end to end on the smoke profile: papermill driver, resume, failure, report files.

The run goes to a fresh temporary folder (never ``runs/smoke``), so a test never passes
on an earlier run's artefacts.
"""

from __future__ import annotations

import base64
from dataclasses import replace
import contextlib
import hashlib
import os

import nbformat
import pandas as pd
from PIL import Image
import torch
import pytest

from alice_lib import pipeline as wb
from alice_lib.checkpoints import read_checkpoint
from alice_lib.cli import main
from alice_lib.driver import WIDGET_VIEW, report_files, run_pipeline, strip_notebook
from alice_lib.settings import PROFILE_DIR, SettingsError, load_settings, save_settings


@contextlib.contextmanager
def _captured_console(folder):
    """Everything the user would see: ``sys.stdout`` / ``sys.stderr`` and file descriptors 1 and 2 (where the
    notebook kernels write), as text in ``out["text"]``."""
    path = folder / "console.txt"
    out = {}
    with open(path, "a", buffering=1) as stream:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(stream.fileno(), 1)
            os.dup2(stream.fileno(), 2)
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                yield out
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
    out["text"] = path.read_text(errors="replace")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, kodak_dir):
    root = tmp_path_factory.mktemp("smoke")
    assert not (root / "run").exists()
    with _captured_console(root) as console:
        reports = run_pipeline("smoke", run_dir=root / "run", reports_dir=root / "reports",
                               parameters={"kodak_dir": str(kodak_dir)})
    return root / "run", reports, console["text"]


def test_driver_runs_every_notebook_and_writes_the_report(smoke_run):
    run_dir, reports, _ = smoke_run
    spec = wb.load_profile("smoke")
    executed = sorted(p.name for p in (run_dir / "notebooks").glob("*.ipynb"))
    assert len(executed) == 4 + len(spec.targets) * len(spec.adaptation.methods)
    for name in ("bd_rate.csv", "results.csv", "rd_psnr.png", "rd_psnr.pdf", "rd_msssim.png", "parameters.png",
                 "complexity.png", "complexity.csv", "alice.json", "jpeg.json", "timings.csv"):
        assert (reports / name).stat().st_size > 0, name
    assert sorted(p.name for p in (reports / "notebooks").glob("*.ipynb")) == executed
    bd = pd.read_csv(reports / "bd_rate.csv")
    assert {"method", "anchor", "bd_rate_pct", "bd_psnr_db"} <= set(bd.columns)
    assert ("malice", "alice") in set(zip(bd["method"], bd["anchor"]))


def test_every_notebook_builds_its_settings_from_the_runs_one_file(smoke_run):
    run_dir, _, _ = smoke_run
    settings_file = wb.RunLayout(run_dir).settings_file
    assert load_settings(settings_file) == wb.load_profile("smoke")
    for path in (run_dir / "notebooks").glob("*.ipynb"):
        given = nbformat.read(str(path), as_version=4).metadata.papermill.parameters
        assert (given["profile"], given["overrides"]) == (str(settings_file), {}), path.name


def test_report_notebooks_keep_text_but_not_the_reports_figures_or_widget_state(smoke_run):
    run_dir, reports, _ = smoke_run
    figures = report_files(reports)
    executed = nbformat.read(str(run_dir / "notebooks" / "05_figures.ipynb"), as_version=4)
    assert _figure_outputs(executed, figures), "the executed notebook shows the report's figures"
    widgets = 0
    for path in (reports / "notebooks").glob("*.ipynb"):
        widgets += _widget_views(nbformat.read(str(run_dir / "notebooks" / path.name), as_version=4))
        published = nbformat.read(str(path), as_version=4)
        assert path.stat().st_size < 200_000, (path.name, path.stat().st_size)
        assert "widgets" not in published.metadata and not _widget_views(published), path.name
        assert not _figure_outputs(published, figures), path.name
    assert widgets > 0, "the executed notebooks had widget views to drop"
    published = nbformat.read(str(reports / "notebooks" / "05_figures.ipynb"), as_version=4)
    text = "".join(str(out.get("data", {}).get("text/plain", "")) for cell in published.cells
                   for out in cell.get("outputs", []))
    assert "[figure: rd_psnr.png, a file of the report]" in text and "bd_rate_pct" in text


def _outputs(notebook):
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]


def _figure_outputs(notebook, figures) -> list[str]:
    """The report files whose bytes a notebook embeds as images."""
    return [figures[digest] for out in _outputs(notebook) for mime, value in out.get("data", {}).items()
            if mime.startswith("image/") and (digest := hashlib.sha256(base64.b64decode(value)).hexdigest()) in figures]


def _widget_views(notebook) -> int:
    return sum(WIDGET_VIEW in out.get("data", {}) for out in _outputs(notebook))


def test_strip_notebook_drops_duplicated_images_and_widgets_and_keeps_the_rest():
    figure, drawing = b"\x89PNG report figure", b"\x89PNG drawn in the notebook only"
    encoded = {name: base64.b64encode(blob).decode() for name, blob in (("figure", figure), ("drawing", drawing))}
    cell = nbformat.v4.new_code_cell("show()", outputs=[
        nbformat.v4.new_output("stream", text="printed\n"),
        nbformat.v4.new_output("display_data", data={"image/png": encoded["figure"], "text/plain": "<Image>"},
                               metadata={"image/png": {"width": 400}}),
        nbformat.v4.new_output("display_data", data={"image/png": encoded["drawing"], "text/plain": "<Figure>"}),
        nbformat.v4.new_output("display_data", data={WIDGET_VIEW: {"model_id": "1"}, "text/plain": "m: 0% 0/2"}),
        nbformat.v4.new_output("display_data", data={WIDGET_VIEW: {"model_id": "2"}}),
    ])
    notebook = nbformat.v4.new_notebook(cells=[cell], metadata={"widgets": {"state": {}},
                                                                "language_info": {"name": "python"}})
    stripped = strip_notebook(notebook, {hashlib.sha256(figure).hexdigest(): "rd_psnr.png"})
    outputs = stripped.cells[0].outputs
    assert "widgets" not in stripped.metadata and "language_info" in stripped.metadata
    assert [out.get("text") or dict(out.data) for out in outputs] == [
        "printed\n", {"text/plain": "[figure: rd_psnr.png, a file of the report]"},
        {"image/png": encoded["drawing"], "text/plain": "<Figure>"}]
    assert "image/png" not in outputs[1].metadata


def test_console_shows_work_units_and_no_kernel_transport_warning(smoke_run):
    _, _, console = smoke_run
    assert "steps" in console and "images" in console and "ETA" in console
    assert "without encryption" not in console and "TCP" not in console
    assert "unknown parameter" not in console  # each notebook gets only the parameters it declares


def test_relative_notebook_paths_are_resolved_from_where_alice_run_starts(tmp_path, monkeypatch):
    from alice_lib.driver import resolve_paths

    (tmp_path / "snapshots").mkdir()
    (tmp_path / "snapshots" / "anchor.safetensors").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    resolved = resolve_paths({"anchor_checkpoint": "snapshots/anchor.safetensors", "kodak_dir": "missing",
                              "reference_checkpoints": {0.0018: "snapshots/anchor.safetensors"},
                              "allow_download": False})
    assert resolved == {"anchor_checkpoint": str(tmp_path / "snapshots" / "anchor.safetensors"),
                        "kodak_dir": "missing", "allow_download": False,
                        "reference_checkpoints": {0.0018: str(tmp_path / "snapshots" / "anchor.safetensors")}}


def test_results_come_from_real_bitstreams(smoke_run):
    _, reports, _ = smoke_run
    rows = pd.read_csv(reports / "results.csv")
    learned = rows[rows["method"].isin(["alice", "malice", "vanilla", "fixed-rate", "anchor"])]
    assert (learned["error"].fillna("") == "").all()
    expected = 8 * learned["bytes"] / (learned["height"] * learned["width"])
    assert ((learned["bpp"] - expected).abs() < 1e-12).all()
    alice = learned[learned["method"] == "alice"].set_index(["lmbda", "image"])
    malice = learned[learned["method"] == "malice"].set_index(["lmbda", "image"])
    # MALICE is the same model with the adapters folded in: same rate, same quality (float rounding aside).
    assert (alice["psnr"] - malice["psnr"]).abs().max() < 0.05


def test_training_from_scratch_follows_the_profiles_hyperprior_recipe(tmp_path, monkeypatch):
    spec = wb.load_profile("smoke", {"anchor.train.hyper_init_gain": 300, "anchor.train.hyper_lr_scale": 0.125})
    seen = {}
    monkeypatch.setattr(wb, "training_sets", lambda *args: ([None] * 8, None))
    monkeypatch.setattr(wb, "train", lambda model, data, folder, config, **kw: seen.update(model=model, config=config))
    monkeypatch.setattr(wb, "export_trained", lambda folder, out: out)
    wb.train_from_scratch(spec, tmp_path, 0.0483, tmp_path / "anchor.safetensors", progress=False)
    torch.manual_seed(spec.anchor.train.seed)
    fresh = wb.SymmetricalTransFormer(spec.model.stf)
    assert torch.equal(seen["model"].h_a[-1].weight, 300 * fresh.h_a[-1].weight)
    assert seen["config"].hyper_lr_scale == 0.125


def test_a_mosaic_schedule_tiles_the_training_crops(tmp_path, monkeypatch):
    from alice_lib.settings import SettingsError, TrainingSettings

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (40, 40), (i * 30, 0, 0)).save(folder / f"{i}.png")
    monkeypatch.setattr(wb, "data_sources", lambda run_dir: {"train": {"path": str(folder)}})
    spec = wb.load_profile("smoke", {"data.val_images": 2, "data.val_crop": 16})
    plain = TrainingSettings(lr=1e-3, batch_size=1, crop=16, steps=2)
    train_set, val_set = wb.training_sets(spec, tmp_path, plain)
    assert train_set[0].shape == (3, 16, 16)
    train_set, val_set = wb.training_sets(spec, tmp_path, TrainingSettings(lr=1e-3, batch_size=1, crop=16, steps=2,
                                                                           mosaic=2))
    assert train_set[0].shape == (3, 32, 32) and val_set[0].shape == (3, 16, 16) and len(train_set) == 6
    assert TrainingSettings(lr=1e-3, batch_size=1, crop=16, steps=2, mosaic=2).input_size == 32
    with pytest.raises(SettingsError, match="mosaic"):
        TrainingSettings(lr=1e-3, batch_size=1, crop=16, steps=2, mosaic=0)


def test_references_are_trained_from_scratch_with_the_anchors_recipe(smoke_run):
    run_dir, reports, _ = smoke_run
    spec = wb.load_profile("smoke")
    assert spec.references.source == "scratch" and spec.result_label("full") == "full"
    for lmbda in spec.targets:
        folder = wb.RunLayout(run_dir).anchor_training(lmbda)
        ckpt = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)
        # from random weights, the anchor's budget and lambda of its own
        assert ckpt["step"] == spec.anchor.train.steps and ckpt["lmbda"] == lmbda and ckpt["mode"] == "full"
        assert wb.RunLayout(run_dir).fixed_rate(lmbda).exists()
    rows = pd.read_csv(reports / "summary.csv")
    fixed = rows[rows["method"] == "fixed-rate"].set_index("lmbda")["bpp"]
    finetuned = rows[rows["method"] == "full"].set_index("lmbda")["bpp"]
    assert sorted(fixed.index) == sorted(finetuned.index) == sorted(spec.targets)
    assert (fixed != finetuned).all()  # two different models per lambda, not one curve twice


def test_a_continued_run_ships_as_one_model_with_both_legs_of_its_log(smoke_run, tmp_path):
    run_dir, _, _ = smoke_run
    spec = wb.load_profile("smoke")
    folder = wb.RunLayout(run_dir).anchor_training(spec.targets[0])
    earlier = pd.DataFrame({"step": [10, 20], "val_loss": [9.0, 8.0]})
    earlier.to_csv(tmp_path / "earlier.csv", index=False)
    out = wb.export_trained(folder, tmp_path / "model.safetensors", tmp_path / "earlier.csv", earlier_steps=25)
    _, _, meta = read_checkpoint(out)
    best = torch.load(folder / "best.pt", map_location="cpu", weights_only=True)
    assert int(meta["trained_steps"]) == 25 + best["step"]
    log, own = pd.read_csv(out.with_suffix(".metrics.csv")), pd.read_csv(folder / "metrics.csv")
    assert log["leg"].tolist() == [1, 1] + [2] * len(own)
    assert log["step"].tolist() == [10, 20] + (own["step"] + 25).tolist()
    with pytest.raises(ValueError, match="past the 15 steps"):
        wb.export_trained(folder, tmp_path / "bad.safetensors", tmp_path / "earlier.csv", earlier_steps=15)
    assert not (tmp_path / "bad.safetensors").exists()


def test_second_run_resumes_without_training(smoke_run):
    run_dir, _, _ = smoke_run
    spec = wb.load_profile("smoke")
    artifact = wb.RunLayout(run_dir).rate_artifact("alice", spec.targets[0])
    stamp = artifact.stat().st_mtime_ns
    summary = wb.adapt(spec, run_dir, spec.targets[0], "alice", progress=False)
    assert summary["status"] == "already trained"
    assert artifact.stat().st_mtime_ns == stamp
    # the adaptation run's checkpoint holds the adapters only, and the frozen anchor's hash
    ckpt = torch.load(wb.RunLayout(run_dir).rate_training("alice", spec.targets[0]) / "last.pt",
                      map_location="cpu", weights_only=True)
    assert ckpt["model"] and all(".lora.W_" in key for key in ckpt["model"]) and ckpt["frozen_hash"]


def test_failing_notebook_stops_with_its_path(tmp_path, capsys):
    code = main(["run", "--profile", "smoke", "--run-dir", str(tmp_path / "run"), "--no-measure",
                 "--reports-dir", str(tmp_path / "reports"), "--kernel", "no-such-kernel"])
    assert code == 1
    assert "01_data.ipynb" in capsys.readouterr().err


def test_unknown_profile_and_method_are_clear_errors(tmp_path):
    with pytest.raises(wb.PipelineError, match="unknown profile"):
        wb.load_profile("nonexistent")
    with pytest.raises(wb.PipelineError, match="unknown method"):
        wb.adapt(wb.load_profile("smoke"), tmp_path, 0.0067, "qlora")


def test_saved_settings_load_back_equal_with_any_override(tmp_path):
    settings = wb.load_profile("paper", {"targets": (0.0067, 0.025), "data.val_source": "folder",
                                         "data.val_dir": tmp_path / "val", "adapt.epochs": 2})
    path = save_settings(settings, tmp_path / "settings.yaml")
    again = load_settings(path)
    assert again == settings and again.targets == (0.0067, 0.025) and again.data.val_dir == str(tmp_path / "val")
    assert "!!python" not in path.read_text()  # a plain profile, readable by yaml.safe_load
    assert save_settings(load_settings(path), path).read_text().splitlines()[1:] == \
        path.read_text().splitlines()[1:]


def test_one_adapter_setting_overrides_the_named_lora_file(tmp_path):
    """``-p lora.r=32`` changes the rank and keeps the rest of ``lora_8_8.yaml`` (a probe beyond the paper)."""
    published = load_settings("cpu").model.lora
    settings = load_settings("cpu", {"lora.r": 32, "lora.attn_qkv": True})
    assert settings.model.lora == replace(published, r=32, attn_qkv=True)
    assert load_settings(save_settings(settings, tmp_path / "settings.yaml")).model.lora == settings.model.lora
    with pytest.raises(SettingsError, match="ranks"):
        load_settings("cpu", {"lora.ranks": 32})


def test_paper_profile_carries_the_published_settings():
    paper = wb.load_profile("paper")
    assert paper.model.stf == wb.STFConfig()
    assert paper.anchor.lmbda == 0.0483
    assert list(paper.targets) == [0.0018, 0.0035, 0.0067, 0.013, 0.025]
    for method in ("alice", "vanilla"):
        s = paper.adaptation.training(method)
        assert (s.batch_size, s.crop, s.epochs, s.steps, s.lr, s.schedule) == (16, 256, 15, None, 1e-4, "cosine")
        assert s.steps_for(300_000) == 281_250
    lora = paper.model.lora
    assert (lora.r, lora.alpha, lora.mlp_fc1, lora.mlp_fc2) == (8, 8, True, True)
    assert all(lora.encoder) and all(lora.decoder)


def test_cpu_profile_keeps_its_schedule_and_states_its_choices():
    cpu = wb.load_profile("cpu")
    s = cpu.adaptation.training("alice")
    assert (s.steps, s.batch_size, s.crop, s.lr, s.schedule, s.schedule_unit, s.flip, s.seed) == (
        800, 4, 256, 5e-4, "hold-cosine", "step", True, 0)
    assert cpu.adaptation.training("vanilla") == s == cpu.adaptation.training("full")  # one budget for every method
    assert (cpu.data.val_source, cpu.data.val_images, cpu.data.val_crop) == ("held_out", 16, 256)
    assert cpu.anchor.weights == "cpu_anchor.safetensors" and cpu.anchor.train.steps == 26700
    # a hyperprior alive by construction (docs/studies/hyperprior.md)
    assert (cpu.anchor.train.hyper_init_gain, cpu.anchor.train.hyper_lr_scale) == (300, 0.125)
    assert (cpu.references.source, cpu.adaptation.weights) == ("full", "cpu_{method}_{lmbda}.safetensors")
    text = (PROFILE_DIR / "cpu.yaml").read_text()
    for key in ("flip: true", "steps: 800", "batch_size: 4 ", "val_source: held_out", "entropy_channels: 48"):
        line = next(line for line in text.splitlines() if key in line)
        assert "#" in line, f"cpu.yaml does not say why {key!r}"


def test_shipped_runs_are_installed_instead_of_trained_and_refused_on_another_anchor(smoke_run, tmp_path):
    from safetensors import safe_open

    from alice_lib.checkpoints import load_stf, round_weights_, save_stf
    from alice_lib.lora import lora_state_dict

    run_dir, _, _ = smoke_run
    spec = load_settings("smoke", {"adapt.weights": str(tmp_path / "weights" / "smoke_{method}_{lmbda}.safetensors")})
    lmbda, methods = spec.targets[0], ("alice", "vanilla", "full")
    shipped = {m: wb.ship_run(spec, run_dir, m, lmbda) for m in methods}
    assert all(p.with_suffix(".metrics.csv").exists() for p in shipped.values())
    with safe_open(str(shipped["vanilla"]), framework="pt") as f:  # vanilla ships the layers it changed, in fp16
        keys = list(f.keys())
        assert keys and all(".fc1." in k or ".fc2." in k for k in keys) and f.get_tensor(keys[0]).dtype == torch.float16
    assert shipped["vanilla"].stat().st_size < shipped["full"].stat().st_size / 2
    with safe_open(str(shipped["full"]), framework="pt") as f:  # the parameters it changed, none of the constants
        keys, parameters = set(f.keys()), {n for n, _ in wb.load_anchor(run_dir).named_parameters()}
        assert len(keys & parameters) > len(parameters) / 2
        assert not any("relative_position_index" in k or k.startswith("gaussian_conditional.") for k in keys)

    fresh = wb.RunLayout(tmp_path / "fresh")
    fresh.models_dir.mkdir(parents=True)
    fresh.anchor.write_bytes(wb.RunLayout(run_dir).anchor.read_bytes())
    for method in methods:
        summary = wb.adapt(spec, fresh.root, lmbda, method, progress=False)
        assert summary["status"] == "shipped" and summary["source"] == str(shipped[method])
        assert not (fresh.rate_training(method, lmbda) / "last.pt").exists()  # nothing trained
        log = shipped[method].with_suffix(".metrics.csv")
        assert fresh.rate_log(method, lmbda).read_bytes() == log.read_bytes()
        pd.testing.assert_frame_equal(pd.read_csv(log), pd.read_csv(wb.RunLayout(run_dir).rate_log(method, lmbda)),
                                      rtol=1e-6)  # every row and column, to 7 significant digits
        assert log.stat().st_size < wb.RunLayout(run_dir).rate_log(method, lmbda).stat().st_size
        assert wb.adapt(spec, fresh.root, lmbda, method, progress=False)["status"] == "shipped"
    for method in ("vanilla", "full"):  # the model trained here, rounded to float16 with its tables rebuilt
        trained = round_weights_(wb.load_rate_model(run_dir, method, lmbda), torch.float16)
        trained.update(force=True)
        installed = wb.load_rate_model(fresh.root, method, lmbda).state_dict()
        for name, value in trained.state_dict().items():
            assert torch.equal(installed[name], value), (method, name)
    trained, installed = (lora_state_dict(wb.load_rate_model(folder, "alice", lmbda)) for folder in (run_dir, fresh.root))
    assert all(torch.equal(installed[k], v.half().float()) for k, v in trained.items())  # float16 adapters

    assert load_settings("smoke", {**dict(spec.raw), "use_shipped": False}).adaptation.shipped_weights("alice", lmbda) \
        is None
    other = wb.RunLayout(tmp_path / "other")  # another anchor: adapters and weight deltas do not fit it
    anchor = load_stf(wb.RunLayout(run_dir).anchor)
    with torch.no_grad():
        anchor.layers[0].blocks[0].mlp.fc1.weight.add_(1e-3)
    save_stf(other.anchor, anchor)
    for method in methods:
        with pytest.raises(wb.PipelineError, match="does not fit this run's anchor"):
            wb.adapt(spec, other.root, lmbda, method, progress=False)
        assert not other.rate_artifact(method, lmbda).exists()


def test_neighbour_start_trains_outwards_and_starts_each_run_from_the_last_result(tmp_path):
    from alice_lib.adapter_files import save_adapters
    from alice_lib.checkpoints import save_stf
    from alice_lib.driver import notebook_order
    from alice_lib.lora import base_state_dict, lora_state_dict
    from alice_lib.planning import training_runs
    from alice_lib.models.stf import SymmetricalTransFormer
    from alice_lib.train import prepare_method

    cpu = load_settings("cpu", {"adapt.start": "neighbour"})
    assert cpu.adaptation_order() == (0.025, 0.013, 0.0067, 0.0035, 0.0018)
    assert [cpu.start_of(t) for t in cpu.adaptation_order()] == [None, 0.025, 0.013, 0.0067, 0.0035]
    adapted = [run.parameters["lmbda"] for run in notebook_order(cpu) if run.notebook == "03_adapt"]
    assert adapted == [t for t in cpu.adaptation_order() for _ in cpu.adaptation.methods]
    paper = load_settings("cpu")  # the paper's default: every run from the anchor
    assert paper.adaptation.start == "anchor" and {paper.start_of(t) for t in paper.targets} == {None}
    with pytest.raises(wb.SettingsError, match="adapt.start"):
        load_settings("cpu", {"adapt.start": "previous"})

    spec = load_settings("smoke", {"adapt.start": "neighbour"})
    near, far = spec.adaptation_order()  # 0.025 starts from the anchor, 0.0067 from 0.025's result
    assert (spec.start_of(near), spec.start_of(far)) == (None, near)
    assert [(r.lmbda, r.start) for r in training_runs(spec, 10)] == [(near, "anchor")] * 3 + [(far, f"{near:g}")] * 3
    layout = wb.RunLayout(tmp_path / "run")
    torch.manual_seed(0)
    save_stf(layout.anchor, SymmetricalTransFormer(spec.model.stf))
    anchor = base_state_dict(wb.load_anchor(layout.root))
    for method in ("alice", "vanilla", "full"):
        with pytest.raises(wb.PipelineError, match="train that first"):
            wb.start_adaptation(spec, layout.root, far, method)
        neighbour = wb.start_adaptation(spec, layout.root, near, method)  # a stand-in for its trained result
        with torch.no_grad():
            for p in neighbour.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        out = layout.rate_artifact(method, near)
        out.parent.mkdir(parents=True, exist_ok=True)
        if method == "alice":
            save_adapters(out, neighbour, lmbda=near, config=spec.model.lora)
        else:
            save_stf(out, neighbour)
        start = wb.start_adaptation(spec, layout.root, far, method)
        expected = lora_state_dict(neighbour) if method == "alice" else neighbour.state_dict()
        started = lora_state_dict(start) if method == "alice" else start.state_dict()
        assert expected and all(torch.equal(started[k], v) for k, v in expected.items()), method
        assert all(torch.equal(base_state_dict(start)[k], v) for k, v in anchor.items()) == (method == "alice")
        reference = wb.load_anchor(layout.root)  # what the method trains is unchanged by where it starts
        prepare_method(reference, method, spec.model.lora, spec.adaptation.training(method))
        trains = {n for n, p in start.named_parameters() if p.requires_grad}
        assert trains == {n for n, p in reference.named_parameters() if p.requires_grad}, method
        default = wb.start_adaptation(load_settings("smoke"), layout.root, far, method)  # the paper: the anchor
        assert all(torch.equal(base_state_dict(default)[k], v) for k, v in anchor.items())
        assert all(not v.any() for k, v in lora_state_dict(default).items() if k.endswith("W_b")), method


def test_use_shipped_switches_off_every_weight_file_and_bad_values_are_refused():
    shipped = load_settings("cpu", {"adapt.weights": "cpu_{method}_{lmbda}.safetensors"})
    assert shipped.use_shipped and shipped.anchor.weights and shipped.adaptation.weights
    assert shipped.references.source == "full"  # the references are the shipped full fine-tunes
    retrain = load_settings("cpu", {"adapt.weights": "cpu_{method}_{lmbda}.safetensors", "use_shipped": False})
    assert (retrain.anchor.weights, retrain.references.weights, retrain.adaptation.weights) == (None, None, None)
    assert retrain.anchor.train == shipped.anchor.train  # the same recipes, trained here
    with pytest.raises(wb.SettingsError, match="use_shipped must be true or false"):
        load_settings("cpu", {"use_shipped": "no"})
    with pytest.raises(wb.SettingsError, match=r"\{method\}"):
        load_settings("cpu", {"adapt.weights": "cpu_{lmbda}.safetensors"})
