"""The workbook's steps as functions, and the papermill driver.

Each notebook is a thin section of the paper that calls one of the step functions
below with the experiment's typed settings (:func:`load_profile`, a
:class:`~alice_lib.settings.Settings`); the run folder (``runs/<profile>/``, laid out
by :class:`~alice_lib.settings.RunLayout`) is the only state they share.

Methods trained per target lambda (:data:`~alice_lib.settings.TRAINING_MODES`):
``alice`` (LoRA adapters, everything else frozen), ``vanilla`` (the same fc1/fc2
layers fine-tuned) and ``full`` (every weight fine-tuned from the anchor: the
CPU-scale fixed-rate reference, called ``fixed-rate`` in the results).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from jupyter_client.manager import AsyncKernelManager
from torch import nn
from torch.utils.data import Dataset, Subset

from . import data as data_lib
from .checkpoints import load_stf, save_stf
from . import evaluation
from .adapter_files import load_adapters, save_adapters
from .lora import count_parameters, inject_lora, mark_trainable, merge_lora
from .models.stf import STFConfig, SymmetricalTransFormer
from . import settings as settings_lib
from .planning import ExperimentPlan, Progress, make_plan
from .settings import (RESULT_LABEL, TRAINING_MODES, RunLayout, Settings, SettingsError,
                       TrainingSettings, lmbda_tag, load_settings, split_parameters)
from .train import TrainConfig, amplify_hyper_latent, load_checkpoint, load_weights, train
from .utils import atomic_copy, atomic_write_bytes

PACKAGE_DIR = settings_lib.PACKAGE_DIR
PROFILE_DIR = settings_lib.PROFILE_DIR
REPO_ROOT = settings_lib.REPO_ROOT
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = ("01_data", "02_fixed_rate", "03_adapt", "04_evaluate", "05_figures")
TRAINING_METHODS = tuple(TRAINING_MODES)  # kept for older notebooks; the definition is TRAINING_MODES


class PipelineError(RuntimeError):
    """A step of the workbook failed; the message names the notebook or file to look at."""


# ----------------------------------------------------------------------------- profiles
def load_profile(profile: str | Path | Mapping | Settings, overrides: Mapping | None = None) -> Settings:
    """The typed settings of a profile (name, YAML path, dict or :class:`Settings`), with dotted overrides.

    Every step takes what this returns; ``settings["adapt"]``-style access still
    reads the profile's sections for code written against the dicts.
    """
    if isinstance(profile, Settings) and not overrides:
        return profile
    try:
        return load_settings(profile, overrides)
    except SettingsError as error:
        raise PipelineError(str(error)) from error


def model_config(profile) -> STFConfig:
    return load_profile(profile).model.stf


def lora_config(profile) -> LoRAConfig:
    return load_profile(profile).model.lora


def default_run_dir(profile) -> Path:
    return settings_lib.default_run_dir(load_profile(profile).name)


def default_reports_dir(profile) -> Path:
    return settings_lib.default_reports_dir(load_profile(profile).name)


# ----------------------------------------------------------------------------- data
def prepare_data(profile, run_dir: str | Path, kodak: str | None = None, train_folder: str | None = None,
                 allow_download: bool = True, val_folder: str | None = None) -> dict:
    """Resolve the Kodak, training and validation folders (01_data) and record them in ``data.json``.

    Each entry keeps the number of images found, so the plan and the step count of an
    epoch-based schedule are computed from the data actually there.
    """
    settings = load_profile(profile)
    spec = settings.data
    sources = {
        "kodak": data_lib.resolve_kodak(kodak or spec.kodak_dir, allow_download=allow_download),
        "train": data_lib.resolve_training(train_folder or spec.train_dir, source=spec.train_source,
                                           n_images=spec.train_images or data_lib.OPENIMAGES_TRAIN_IMAGES,
                                           allow_download=allow_download),
    }
    val = data_lib.resolve_validation(spec.val_source, val_folder or spec.val_dir, spec.val_images,
                                      allow_download=allow_download)
    if val is not None:
        sources["val"] = val
    return record_sources(run_dir, sources)


def record_sources(run_dir: str | Path, sources: Mapping[str, data_lib.DataSource]) -> dict:
    """Write resolved data folders (``kodak``, ``train``, ``val``) into the run's ``data.json``."""
    record = {name: {"path": str(src.path), "kind": src.kind, "is_kodak": src.is_kodak, "note": src.note,
                     "images": data_lib.count_images(src.path)} for name, src in sources.items()}
    path = RunLayout(run_dir).data_json
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(record, indent=2).encode())
    return record


def data_sources(run_dir: str | Path) -> dict:
    path = RunLayout(run_dir).data_json
    if not path.exists():
        raise PipelineError(f"{path} not found: run notebooks/01_data.ipynb for this run folder first")
    return json.loads(path.read_text())


def training_sets(profile, run_dir: str | Path, schedule: TrainingSettings) -> tuple[Dataset, Dataset | None]:
    """Random-crop training set and the validation set (centre crops) the data settings name.

    ``held_out``: the last ``val_images`` of the training folder (at most a quarter of
    it); otherwise the recorded validation folder, e.g. the OpenImages test split.
    """
    settings = load_profile(profile)
    spec, sources = settings.data, data_sources(run_dir)
    folder = sources["train"]["path"]
    train_set = data_lib.ImageFolder(folder, schedule.crop, train=True, max_images=spec.train_images,
                                     cache=spec.cache, flip=schedule.flip)
    if spec.val_source != "held_out":
        if "val" not in sources:
            raise PipelineError(f"{RunLayout(run_dir).data_json} has no validation folder for val_source "
                                f"{spec.val_source!r}: run notebooks/01_data.ipynb again")
        val_set = data_lib.ImageFolder(sources["val"]["path"], spec.val_crop, train=False,
                                       max_images=spec.val_images or None, cache=spec.cache)
        return _mosaics(train_set, schedule), val_set
    n_val = min(spec.val_images, len(train_set) // 4)
    if n_val == 0:
        return _mosaics(train_set, schedule), None
    val_set = data_lib.ImageFolder(folder, spec.val_crop, train=False, max_images=spec.train_images, cache=spec.cache)
    if len(val_set) != len(train_set):  # a different crop skipped other files: validate on the train crops
        val_set = data_lib.ImageFolder(folder, schedule.crop, train=False, max_images=spec.train_images,
                                       cache=spec.cache)
    split = len(train_set) - n_val
    return _mosaics(Subset(train_set, range(split)), schedule), Subset(val_set, range(split, len(val_set)))


def _mosaics(train_set: Dataset, schedule: TrainingSettings) -> Dataset:
    """The training crops, tiled into mosaics where the schedule asks (validation stays plain crops)."""
    return data_lib.Mosaics(train_set, schedule.mosaic) if schedule.mosaic > 1 else train_set


# ----------------------------------------------------------------------------- fixed-rate models
def anchor_path(run_dir: str | Path) -> Path:
    return RunLayout(run_dir).anchor


def train_from_scratch(profile, run_dir: str | Path, lmbda: float, out_path: Path, progress: bool = True) -> Path:
    """Train a fixed-rate STF of the profile's size at ``lmbda`` from random weights."""
    settings = load_profile(profile)
    schedule = settings.anchor.train
    torch.manual_seed(schedule.seed)
    model = SymmetricalTransFormer(settings.model.stf)
    amplify_hyper_latent(model, schedule.hyper_init_gain)
    train_set, val_set = training_sets(settings, run_dir, schedule)
    folder = RunLayout(run_dir).anchor_training(lmbda)
    config = TrainConfig.from_schedule(schedule, lmbda, settings.model.metric, len(train_set))
    train(model, train_set, folder, config,
          val_data=val_set, progress=progress,
          extra_state={"model_config": settings.model.stf.to_dict(), "mode": "full", "lmbda": lmbda})
    return export_trained(folder, out_path)


def export_trained(folder: str | Path, out_path: str | Path) -> Path:
    """The best checkpoint of a fixed-rate training folder as a safetensors model file.

    Its ``metrics.csv`` is copied beside it (``<name>.metrics.csv``), so that a shipped
    model keeps its training log.
    """
    folder, out_path = Path(folder), Path(out_path)
    best = load_checkpoint(folder / "best.pt")
    model = SymmetricalTransFormer(STFConfig(**best["model_config"]))
    load_weights(model, best, folder / "best.pt", averaged=True)
    model.update(force=True)
    path = save_stf(out_path, model, {"lmbda": best["lmbda"], "trained_steps": best["step"],
                                      "best_val_loss": best["best_loss"]})
    atomic_copy(folder / "metrics.csv", out_path.with_suffix(".metrics.csv"))
    return path


def _install_model(source: Path, out: Path, lmbda: float, config: STFConfig | None = None) -> Path:
    """Copy a model file (published checkpoint or shipped weights) into the run folder, coder tables updated."""
    model = load_stf(source, config=config)
    model.update(force=True)
    return save_stf(out, model, {"lmbda": float(lmbda), "source": str(source)})


def prepare_anchor(profile, run_dir: str | Path, checkpoint: str | None = None, progress: bool = True) -> Path:
    """The frozen base model at the anchor lambda (02_fixed_rate), in ``models/anchor.safetensors``.

    Order: an explicit checkpoint (a published STF file or one of ours); the weights
    the profile ships; else it is trained here with the profile's anchor budget.
    Already present in the run folder: nothing is done.
    """
    settings = load_profile(profile)
    out = anchor_path(run_dir)
    lmbda = settings.anchor.lmbda
    if out.exists() and checkpoint is None:
        return out
    source = Path(checkpoint) if checkpoint else settings.anchor.shipped_weights
    if source is not None and source.exists():
        return _install_model(source, out, lmbda, config=None if checkpoint else settings.model.stf)
    if source is not None and checkpoint:
        raise PipelineError(f"anchor checkpoint {source} does not exist")
    return train_from_scratch(settings, run_dir, lmbda, out, progress=progress)


def published_references(profile, run_dir: str | Path, checkpoints: dict | None) -> dict[float, Path]:
    """Load published fixed-rate STF checkpoints ``{lambda: path}`` into the run folder."""
    done = {}
    layout = RunLayout(run_dir)
    for lmbda, path in (checkpoints or {}).items():
        done[float(lmbda)] = _install_model(Path(path), layout.fixed_rate(float(lmbda)), float(lmbda))
    return done


def prepare_references(profile, run_dir: str | Path, checkpoints: dict | None = None,
                       progress: bool = True) -> dict[float, Path]:
    """The fixed-rate reference at each target lambda, in ``models/fixed-rate-<l>.safetensors`` (02_fixed_rate).

    By ``references.source``: ``published``, the checkpoints given; ``scratch``, the weights the
    profile ships, else a model trained here from random weights with the anchor's recipe (the
    same budget, so the comparison is fair whether or not it converges); ``finetune``, nothing
    here (03_adapt's ``full`` method stands in). Checkpoints given explicitly always win.
    """
    settings = load_profile(profile)
    if checkpoints or settings.references.source == "published":
        return published_references(settings, run_dir, checkpoints)
    if settings.references.source == "finetune":
        return {}
    layout, done = RunLayout(run_dir), {}
    for lmbda in settings.targets:
        out = layout.fixed_rate(lmbda)
        shipped = settings.references.shipped_weights(lmbda)
        if not out.exists() and shipped is not None and shipped.exists():
            _install_model(shipped, out, lmbda, config=settings.model.stf)
        elif not out.exists():
            train_from_scratch(settings, run_dir, lmbda, out, progress=progress)
        done[lmbda] = out
    return done


def load_anchor(run_dir: str | Path) -> SymmetricalTransFormer:
    path = anchor_path(run_dir)
    if not path.exists():
        raise PipelineError(f"{path} not found: run notebooks/02_fixed_rate.ipynb for this run folder first")
    return load_stf(path)


# ----------------------------------------------------------------------------- adaptation
def rate_dir(run_dir: str | Path, method: str, lmbda: float) -> Path:
    return RunLayout(run_dir).rate_dir(method, lmbda)


def rate_artifact(run_dir: str | Path, method: str, lmbda: float) -> Path:
    return RunLayout(run_dir).rate_artifact(method, lmbda)


def adapt(profile, run_dir: str | Path, lmbda: float, method: str, progress: bool = True,
          device: str | torch.device | None = None) -> dict:
    """Train one method at one target lambda from the anchor (03_adapt); resumes, never trains twice.

    Returns a summary with the artefact path, the parameter counts, the schedule
    actually run (steps, epochs, training images) and the last metrics. ``device``:
    where to train (default the CPU); the artefact is written from the CPU either way.
    """
    if method not in TRAINING_MODES:
        raise PipelineError(f"unknown method {method!r}; choose one of {tuple(TRAINING_MODES)}")
    settings = load_profile(profile)
    layout = RunLayout(run_dir)
    out = layout.rate_artifact(method, lmbda)
    schedule = settings.adaptation.training(method)
    mode, lora = TRAINING_MODES[method], settings.model.lora
    model = load_anchor(run_dir)
    if method == "alice":
        inject_lora(model, lora, generator=torch.Generator().manual_seed(schedule.seed))
    mark_trainable(model, mode, lora)
    summary = {"method": method, "lmbda": lmbda, "artifact": str(out), **count_parameters(model, mode, lora)}
    if out.exists():
        return {**summary, "status": "already trained"}
    train_set, val_set = training_sets(settings, run_dir, schedule)
    model.to(device or "cpu")
    # Only what trains goes into the run's checkpoints (a few hundred kB for ALICE): unfinished runs can be kept.
    config = replace(TrainConfig.from_schedule(schedule, lmbda, settings.model.metric, len(train_set)),
                     checkpoint_frozen=False)
    hook = epoch_check(settings, run_dir, model, method, lmbda) if settings.adaptation.epoch_check.enabled else None
    folder = layout.rate_training(method, lmbda)
    started = time.time()
    row = train(model, train_set, folder, config, val_data=val_set, progress=progress, on_epoch_end=hook,
                extra_state={"model_config": model.config.to_dict(), "mode": method, "lmbda": lmbda})
    best_path = folder / ("best.pt" if val_set is not None else "last.pt")
    best = load_checkpoint(best_path)
    load_weights(model.cpu(), best, best_path, averaged=True)
    meta = {"lmbda": lmbda, "method": method, "anchor_lmbda": settings.anchor.lmbda, "steps": best["step"]}
    if method == "alice":
        save_adapters(out, model, lmbda=lmbda, config=lora, extra_metadata=meta)
    else:
        model.update(force=True)
        save_stf(out, model, meta)
    return {**summary, "status": "trained", "seconds": round(time.time() - started, 1), "train_images": len(train_set),
            "planned_steps": config.steps, **row}


def epoch_check(settings: Settings, run_dir: str | Path, model: nn.Module, method: str,
                lmbda: float) -> Callable[[dict], None]:
    """``train``'s ``on_epoch_end``: code Kodak with real bitstreams after each epoch (the reference's check).

    One row per epoch (mean bpp from the bitstreams' bytes, mean PSNR) in
    ``rates/<method>-<lambda>/epoch_check.csv``; a resumed run replaces the rows of the
    epochs it trains again. Only rank 0 codes (the weights agree on every rank).
    """
    from .evaluation.coding import code_image

    images = data_lib.list_images(data_sources(run_dir)["kodak"]["path"])[:settings.adaptation.epoch_check.images]
    path = RunLayout(run_dir).epoch_check(method, lmbda)

    def check(row: dict) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model.update(force=True)
            coded = [code_image(model, data_lib.read_image(p), padding=settings.evaluation.padding,
                                estimate_bpp=False) for p in images]
        model.train(was_training)
        frame = pd.read_csv(path) if path.exists() else pd.DataFrame()
        if len(frame):
            frame = frame[frame["epoch"] < row["epoch"]]
        mean = pd.DataFrame(coded)[["bpp", "psnr"]].mean()
        entry = {"epoch": row["epoch"], "step": row["step"], "images": len(coded), "bpp": mean["bpp"],
                 "psnr": mean["psnr"], "val_loss": row.get("val_loss", math.nan)}
        table = pd.concat([frame, pd.DataFrame([entry])], ignore_index=True)
        atomic_write_bytes(path, table.to_csv(index=False).encode())

    return check


def load_rate_model(run_dir: str | Path, method: str, lmbda: float, profile=None) -> SymmetricalTransFormer:
    """A model for one (method, lambda): ``alice`` unmerged, ``malice`` merged, others plain.

    ``fixed-rate`` is the reference 02_fixed_rate put in the run folder; without one it is the
    ``full`` fine-tune only when the profile's references are fine-tunes (or no profile is given).
    """
    layout = RunLayout(run_dir)
    if method in ("alice", "malice"):
        model = load_anchor(run_dir)
        load_adapters(layout.rate_artifact("alice", lmbda), model)
        if method == "malice":
            merge_lora(model, strip=True)
        return model.eval()
    if method == "fixed-rate":
        if layout.fixed_rate(lmbda).exists():
            return load_stf(layout.fixed_rate(lmbda))
        if profile is not None and load_profile(profile).references.source != "finetune":
            raise PipelineError(f"{layout.fixed_rate(lmbda)} not found: run notebooks/02_fixed_rate.ipynb first")
        method = "full"
    if method == "full-finetune":
        method = "full"
    path = layout.rate_artifact(method, lmbda)
    if not path.exists():
        raise PipelineError(f"{path} not found: run notebooks/03_adapt.ipynb with method={method}, lmbda={lmbda}")
    return load_stf(path)


# ----------------------------------------------------------------------------- evaluation
def evaluate_run(profile, run_dir: str | Path, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Every model of the run and the classical codecs on the Kodak folder (04_evaluate).

    This step only lists the models (:func:`eval_models`); :func:`alice_lib.evaluation.evaluate`
    codes them and writes every table once into ``eval/``. The anchor is evaluated once
    as its own point (method ``anchor``); rows already in ``eval/results.csv`` are kept.
    """
    run_dir, settings = Path(run_dir), load_profile(profile)
    spec = settings.evaluation
    return evaluation.evaluate(
        eval_models(settings, run_dir), _eval_images(settings, run_dir), run_dir / "eval",
        classical=spec.classical, qualities=spec.qualities, padding=spec.padding, bd_methods=spec.bd_methods,
        curves_include_anchor=spec.curves_include_anchor,
        description=f"ALICE workbook, profile {settings.name}, real rANS bitstreams", progress=progress)


def eval_models(profile, run_dir: Path) -> list[evaluation.ModelEntry]:
    """The learned models 04_evaluate codes: the anchor once, then each method at each target lambda."""
    settings = load_profile(profile)
    entries = [evaluation.ModelEntry("anchor", evaluation.ANCHOR_METHOD, settings.anchor.lmbda,
                                     lambda: load_anchor(run_dir))]
    for lmbda in settings.targets:
        for method in settings.evaluation.methods:
            entries.append(evaluation.ModelEntry(f"{method}-{lmbda_tag(lmbda)}", method, lmbda,
                                                 lambda m=method, lm=lmbda: load_rate_model(run_dir, m, lm, settings)))
    return entries


def _eval_images(profile, run_dir: Path) -> Path:
    """The Kodak folder, or the first ``max_images`` of it linked into the run folder."""
    folder = Path(data_sources(run_dir)["kodak"]["path"])
    limit = load_profile(profile).evaluation.max_images
    if not limit:
        return folder
    subset = run_dir / "eval" / "images"
    subset.mkdir(parents=True, exist_ok=True)
    for path in data_lib.list_images(folder)[:limit]:
        link = subset / path.name
        if not link.exists():
            link.symlink_to(path.resolve())
    return subset


def parameter_rows(profile, full_size: bool = False) -> list[dict]:
    """Trainable, stored-per-rate and stored-for-all-rates counts for each method.

    ``full_size=True`` counts for the published STF (the paper's 0.35% claim) rather
    than the profile's model; the number of rates is the profile's (anchor + targets).
    """
    settings = load_profile(profile)
    model = SymmetricalTransFormer(STFConfig() if full_size else settings.model.stf)
    lora = settings.model.lora
    n_rates = len(settings.targets) + 1
    rows = []
    for method, mode in TRAINING_MODES.items():
        counts = count_parameters(model, mode, lora)
        per_rate = counts["stored_per_rate"]
        all_rates = counts["total"] * n_rates if mode == "full" else counts["total"] + per_rate * (n_rates - 1)
        rows.append({"model": "published STF" if full_size else f"{settings.name} STF", "method": RESULT_LABEL[method],
                     "total": counts["total"], "trainable": counts["trainable"], "stored_per_rate": per_rate,
                     "stored_all_rates": all_rates, "stored_per_rate_pct": 100 * per_rate / counts["total"]})
    return rows


# ----------------------------------------------------------------------------- driver
@dataclass
class NotebookRun:
    notebook: str
    parameters: dict
    output: Path


def notebook_runs(plan: ExperimentPlan, profile: str, run_dir: Path, reports_dir: Path,
                  overrides: Mapping | None = None) -> list[NotebookRun]:
    """The plan's work items as papermill runs: parameters (settings overrides included) and output paths."""
    common = {"profile": profile, "run_dir": str(run_dir), "reports_dir": str(reports_dir),
              "overrides": dict(overrides or {})}
    runs = []
    for item in plan.work:
        params = {**common, **item.parameters}
        name = item.notebook
        if "method" in item.parameters:
            name = f"{item.notebook}_{item.parameters['method']}_{lmbda_tag(item.parameters['lmbda'])}"
        runs.append(NotebookRun(item.notebook, params, RunLayout(run_dir).notebooks_dir / f"{name}.ipynb"))
    return runs


class _LocalKernelManager(AsyncKernelManager):
    """A kernel on this machine over IPC sockets rather than TCP.

    ipykernel warns, in every notebook, that a TCP kernel without CurveZMQ keys sends
    code in plain text; a local kernel needs no network port at all, so IPC is the
    right transport (and the warning's condition no longer holds).
    """

    def __init__(self, **kwargs):
        super().__init__(transport="ipc", **kwargs)


def run_pipeline(profile_name: str | Path, run_dir: str | Path | None = None, reports_dir: str | Path | None = None,
                 parameters: dict | None = None, kernel_name: str | None = None, progress: bool = True,
                 measure: bool = True) -> Path:
    """Execute the notebooks in order with papermill; a second call resumes.

    ``parameters``: ``-p`` pairs: dotted settings overrides (``adapt.epochs=2``) and
    notebook parameters (``kodak_dir``, ``anchor_checkpoint``). Progress is shown in
    units of work (training steps, images coded) with an ETA from the same estimate
    as ``alice plan`` (:class:`~alice_lib.planning.Progress`). Executed notebooks go
    to ``<run_dir>/notebooks``; the figures and tables of 05_figures go to
    ``reports_dir`` (default ``reports/<profile>``), with copies of the executed
    notebooks. A failing notebook stops the run with :class:`PipelineError` naming
    the executed notebook to open.
    """
    import papermill as pm

    try:
        overrides, _ = split_parameters(parameters)
    except SettingsError as error:
        raise PipelineError(str(error)) from error
    settings = load_profile(profile_name, overrides)
    run_dir = Path(run_dir or settings_lib.default_run_dir(settings.name)).resolve()
    reports_dir = Path(reports_dir or settings_lib.default_reports_dir(settings.name)).resolve()
    RunLayout(run_dir).notebooks_dir.mkdir(parents=True, exist_ok=True)
    if progress and measure:
        print(f"alice run: timing a few training steps of the {settings.name} model for the estimate", flush=True)
    plan = make_plan(settings, {**overrides, **(parameters or {})}, run_dir=run_dir, measure=measure)
    steps = notebook_runs(plan, str(profile_name), run_dir, reports_dir, overrides)
    bar = Progress(plan, run_dir, stream=sys.stdout, enabled=progress)
    started, timings = time.time(), []
    try:
        for index, step in enumerate(steps):
            bar.start(index)
            seconds = _execute(pm, step, kernel_name, bar)
            bar.finish(index, seconds)
            timings.append({"notebook": step.output.name, "seconds": round(seconds, 1)})
    finally:
        bar.close()
    timings.append({"notebook": "total", "seconds": round(time.time() - started, 1)})
    reports_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(reports_dir / "timings.csv", pd.DataFrame(timings).to_csv(index=False).encode())
    copy_dir = reports_dir / "notebooks"
    for step in steps:
        atomic_copy(step.output, copy_dir / step.output.name)
    return reports_dir


def _execute(pm, step: NotebookRun, kernel_name: str | None, bar: Progress) -> float:
    """Run one notebook in a worker thread while the progress line refreshes; its wall time in seconds."""
    import threading

    outcome: dict = {}

    def work() -> None:
        try:
            pm.execute_notebook(str(NOTEBOOK_DIR / f"{step.notebook}.ipynb"), str(step.output),
                                parameters=step.parameters, cwd=str(NOTEBOOK_DIR), progress_bar=False,
                                kernel_name=kernel_name, kernel_manager_class=_LocalKernelManager)
        except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread
            outcome["error"] = error

    t0 = time.time()
    worker = threading.Thread(target=work, name=f"papermill {step.output.name}", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(timeout=2.0)
        bar.refresh()
    error = outcome.get("error")
    if error is not None:  # papermill's own error carries the cell's traceback
        last = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise PipelineError(f"{step.output} failed ({type(error).__name__}): open it to see the cell. {last}") \
            from error
    return time.time() - t0


__all__ = [
    "PipelineError", "load_profile", "model_config", "lora_config", "prepare_data", "data_sources",
    "record_sources", "prepare_anchor", "published_references", "prepare_references", "load_anchor", "adapt", "load_rate_model", "evaluate_run",
    "parameter_rows", "notebook_runs", "run_pipeline", "published_points",
    "RESULT_LABEL", "TRAINING_MODES", "lmbda_tag", "epoch_check", "training_sets", "RunLayout", "Settings",
]


# ----------------------------------------------------------------------------- report
def anchor_training_log(profile, run_dir: str | Path) -> Path | None:
    """The anchor's metrics.csv: trained in this run folder, or shipped beside its weights."""
    settings = load_profile(profile)
    trained = RunLayout(run_dir).anchor_training(settings.anchor.lmbda) / "metrics.csv"
    if trained.exists():
        return trained
    weights = settings.anchor.shipped_weights
    shipped = weights.with_suffix(".metrics.csv") if weights else None
    return shipped if shipped and shipped.exists() else None


def write_report(profile, run_dir: str | Path, reports_dir: str | Path) -> dict:
    """Tables and figures of a finished run into ``reports_dir`` (05_figures).

    The evaluation's tables are copied as 04_evaluate wrote them and the RD figures are
    drawn from them (nothing is recomputed); parameters and complexity are measured here.
    """
    from .figures import plot_complexity_table, plot_parameter_bars, plot_rd_curves

    run_dir, reports_dir = Path(run_dir), Path(reports_dir)
    try:
        tables = evaluation.publish_tables(run_dir / "eval", reports_dir)
    except FileNotFoundError as error:
        raise PipelineError(str(error)) from error
    settings = load_profile(profile)
    spec = settings.evaluation
    plot_rd_curves(tables.summary, reports_dir, published=spec.published_points,
                   curves_include_anchor=spec.curves_include_anchor)

    published_rows, profile_rows = parameter_rows(settings, full_size=True), parameter_rows(settings)
    parameters = published_rows + profile_rows
    pd.DataFrame(parameters).to_csv(reports_dir / "parameters.csv", index=False)
    plot_parameter_bars(published_rows, reports_dir, stem="parameters")
    plot_parameter_bars(profile_rows, reports_dir, stem=f"parameters_{settings.name}")

    cx = settings.complexity
    image_path = Path(data_sources(run_dir)["kodak"]["path"]) / cx.image
    if not image_path.exists():
        image_path = data_lib.list_images(image_path.parent)[0]
    complexity = evaluation.measure_complexity(evaluation.complexity_models(settings), data_lib.read_image(image_path),
                                               repeats=cx.repeats, out_path=reports_dir / "complexity.csv")
    plot_complexity_table(complexity, reports_dir)
    files = sorted(p for p in reports_dir.iterdir() if p.is_file())
    return {"files": files, "bd": tables.bd, "parameters": parameters, "complexity": complexity,
            "summary": tables.summary}
