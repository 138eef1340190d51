"""``alice plan``'s work list and ``alice run``'s progress: units of work, and an ETA that learns."""

from __future__ import annotations

import io

import pytest

from alice_lib.driver import NotebookRun, Progress, notebook_order
from alice_lib.planning import Costs, format_seconds, make_plan
from alice_lib.settings import load_settings


def _plan(overrides=None, **kwargs):
    """``alice plan`` of the smoke profile: the driver's notebooks, estimated."""
    settings = load_settings("smoke", overrides)
    return make_plan(settings, notebook_order(settings), {}, requested_only=True, **kwargs)


@pytest.fixture
def smoke_plan(tmp_path):
    costs = Costs("test", {"alice": 1.0, "vanilla": 1.0, "full": 2.0}, image_seconds=3.0, classical_image_seconds=0.1,
                  complexity_seconds=10.0, measured=True)
    return _plan(run_dir=tmp_path / "run", costs=costs)


def test_plan_lists_every_notebook_with_its_work(smoke_plan):
    work = smoke_plan.work
    assert [w.notebook for w in work][:2] == ["01_data", "02_fixed_rate"] and work[-1].notebook == "05_figures"
    adapt = [w for w in work if w.notebook == "03_adapt"]
    assert len(adapt) == 2 * 3 and all((w.unit, w.units) == ("step", 3) for w in adapt)
    # 02_fixed_rate trains the anchor and, from scratch with its recipe, a reference per target (full steps)
    assert work[1].units == 3 * 6 and work[1].work_seconds == pytest.approx(3 * 6 * 2.0)
    assert len(work[1].watch) == 3 and smoke_plan.references == {"source": "scratch", "trained_here": [0.0067, 0.025],
                                                                  "steps": 12}
    evaluate = next(w for w in work if w.notebook == "04_evaluate")
    assert evaluate.unit == "image" and evaluate.units == (1 + 2 * 5) * smoke_plan.data.kodak_images
    assert smoke_plan.training_steps == 6 * 3 + 6 + 2 * 6


def test_plan_skips_references_the_run_folder_has(tmp_path):
    from alice_lib.run_folder import RunLayout

    run = tmp_path / "run"
    RunLayout(run).fixed_rate(0.0067).parent.mkdir(parents=True)
    RunLayout(run).fixed_rate(0.0067).write_bytes(b"")
    plan = _plan(run_dir=run, measure=False)
    assert plan.references["trained_here"] == [0.025]
    finetune = _plan({"references.source": "full"}, run_dir=run, measure=False)
    assert finetune.references == {"source": "full", "trained_here": [], "steps": 0}
    assert finetune.work[1].units == 6


def test_the_plan_estimates_the_drivers_notebooks_in_the_drivers_order():
    settings = load_settings("smoke")
    order = notebook_order(settings)
    assert [run.output_name for run in order] == [
        "01_data.ipynb", "02_fixed_rate.ipynb", *(f"03_adapt_{m}_{lmbda:g}.ipynb" for lmbda in settings.targets
                                                for m in settings.adaptation.methods),
        "04_evaluate.ipynb", "05_figures.ipynb"]
    chosen = [order[0], NotebookRun("06_extra"), order[3]]  # whatever the driver runs, the plan follows
    plan = make_plan(settings, chosen, {}, measure=False, requested_only=True)
    assert [(w.notebook, w.unit) for w in plan.work] == [("01_data", "task"), ("06_extra", "task"),
                                                         ("03_adapt", "step")]
    assert plan.work[2].label == f"vanilla lambda {settings.targets[0]:g}" and plan.work[2].watch == ()


def test_progress_rescales_the_estimate_by_the_observed_speed(smoke_plan):
    stream = io.StringIO()
    progress = Progress(smoke_plan, stream=stream)
    first, second = smoke_plan.work[0], smoke_plan.work[1]
    progress.start(0)
    progress.finish(0, first.work_seconds + 7.0)  # 7 s to start a notebook on this machine
    assert progress.overhead == pytest.approx(7.0)
    progress.start(1)
    progress.finish(1, 7.0 + 3 * second.work_seconds)  # the work ran 3x slower than planned
    planned = first.work_seconds + second.work_seconds
    assert progress._ratio() == pytest.approx((first.work_seconds + 3 * second.work_seconds) / planned)
    progress.start(2)
    progress.close()
    text = stream.getvalue()
    assert "03_adapt" in text and "steps" in text and "ETA" in text


def test_progress_judges_a_resumed_training_by_the_steps_it_ran(smoke_plan):
    """A training that resumes at step 2 of 3 ran a third of its plan: finishing it in a third
    of the planned time is the planned speed, not three times it."""
    progress = Progress(smoke_plan, stream=io.StringIO())
    index = next(i for i, w in enumerate(smoke_plan.work) if w.notebook == "03_adapt")
    item = smoke_plan.work[index]
    log = item.watch[0]
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("epoch,step,train_loss\n1,2,0.5\n")  # resumed: steps 1-2 were trained before
    progress.start(index)
    log.write_text("epoch,step,train_loss\n1,2,0.5\n2,3,0.4\n")
    progress.finish(index, progress.overhead + item.work_seconds / 3)
    assert progress.finished[-1][0] == pytest.approx(item.work_seconds / 3)
    assert progress._ratio() == pytest.approx(1.0)
    log.unlink()
    progress.start(index)  # from step 0: judged against the whole plan
    progress.finish(index, progress.overhead + item.work_seconds)
    assert progress.finished[-1][0] == pytest.approx(item.work_seconds)
    progress.close()


def test_progress_counts_coded_images_and_takes_the_evaluation_s_pace_from_them(smoke_plan, monkeypatch):
    """An evaluation slower than planned shows the images coded, not a time-based guess that
    runs ahead of them, and its remaining time follows the pace of the rows so far."""
    stream = io.StringIO()
    progress = Progress(smoke_plan, stream=stream)
    index = next(i for i, w in enumerate(smoke_plan.work) if w.unit == "image")
    item = smoke_plan.work[index]
    results = item.watch[0]
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("method,image\n")
    clock = [1000.0]
    monkeypatch.setattr("alice_lib.driver.time.time", lambda: clock[0])
    progress.start(index)
    half = item.units // 2
    results.write_text("method,image\n" + "m,x\n" * half)
    clock[0] += 100 * progress._expected(item, 1.0)  # a hundred times slower than planned
    progress.refresh()
    line = stream.getvalue().rsplit("\r", 1)[-1]
    assert f" {half:,}/{item.units:,} images" in line
    later = sum(progress._expected(w, 1.0) for w in smoke_plan.work[index + 1:])
    left = (clock[0] - 1000.0) * (item.units - half) / half
    assert f"ETA {format_seconds(later + left)}" in line
    results.unlink()
    progress.close()


def test_format_seconds_reads_at_a_glance():
    assert (format_seconds(40), format_seconds(725), format_seconds(3 * 3600 + 720)) == ("40 s", "12 min 5 s",
                                                                                          "3 h 12 min")
