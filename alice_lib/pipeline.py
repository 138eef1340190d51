"""The workbook's steps as functions; :mod:`alice_lib.driver` runs the notebooks that call them.

Each notebook is a thin section of the paper: it builds the experiment's typed settings
once (:func:`load_profile`, a :class:`~alice_lib.settings.Settings`) and passes them to
the step functions below; the run folder (``runs/<profile>/``, laid out by
:class:`~alice_lib.run_folder.RunLayout`) is the only state they share.

Methods trained per target lambda (:data:`~alice_lib.settings.TRAINING_MODES`):
``alice`` (LoRA adapters, everything else frozen), ``vanilla`` (the same fc1/fc2
layers fine-tuned) and ``full`` (every weight fine-tuned from the anchor: the
CPU-scale fixed-rate reference, called ``fixed-rate`` in the results).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from . import data as data_lib
from . import data_sources as sources_lib
from .checkpoints import load_stf, load_weight_delta, save_stf, save_weight_delta, ship_stf, stored_as
from . import evaluation
from .adapter_files import load_adapters, save_adapters
from .lora import count_parameters, merge_lora
from .models.stf import STFConfig, SymmetricalTransFormer
from .run_folder import TRAINING_LOG, RunLayout, lmbda_tag
from .settings import RESULT_LABEL, TRAINING_MODES, Settings, SettingsError, TrainingSettings, load_settings
from .train import (TrainConfig, load_checkpoint, load_weights, prepare_method, start_model, train,
                    training_data)
from .utils import atomic_copy, atomic_write_bytes, sha256_file


class PipelineError(RuntimeError):
    """A step of the workbook failed; the message names the notebook or file to look at."""


# ----------------------------------------------------------------------------- profiles
def load_profile(profile: str | Path | Mapping | Settings, overrides: Mapping | None = None) -> Settings:
    """The typed settings of a profile (name, YAML path, dict or :class:`Settings`), with dotted overrides.

    A run loads them once (the driver, or a notebook run alone) and every step takes them.
    """
    if isinstance(profile, Settings) and not overrides:
        return profile
    try:
        return load_settings(profile, overrides)
    except SettingsError as error:
        raise PipelineError(str(error)) from error


# ----------------------------------------------------------------------------- data
def prepare_data(settings: Settings, run_dir: str | Path, kodak: str | None = None, train_folder: str | None = None,
                 allow_download: bool = True, val_folder: str | None = None) -> dict:
    """Resolve the Kodak, training and validation folders (01_data) and record them in ``data.json``.

    Each entry keeps the number of images found, so the plan and the step count of an
    epoch-based schedule are computed from the data actually there.
    """
    spec = settings.data
    sources = {
        "kodak": sources_lib.resolve_kodak(kodak or spec.kodak_dir, allow_download=allow_download),
        "train": sources_lib.resolve_training(train_folder or spec.train_dir, source=spec.train_source,
                                              n_images=spec.train_images or sources_lib.OPENIMAGES_TRAIN_IMAGES,
                                              allow_download=allow_download),
    }
    val = sources_lib.resolve_validation(spec.val_source, val_folder or spec.val_dir, spec.val_images,
                                         allow_download=allow_download)
    if val is not None:
        sources["val"] = val
    return record_sources(run_dir, sources)


def record_sources(run_dir: str | Path, sources: Mapping[str, sources_lib.DataSource]) -> dict:
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


def training_sets(settings: Settings, run_dir: str | Path,
                  schedule: TrainingSettings) -> tuple[Dataset, Dataset | None]:
    """Random-crop training set and the validation set (centre crops) the data settings name.

    ``held_out``: the last ``val_images`` of the training folder (at most a quarter of
    it); otherwise the recorded validation folder, e.g. the OpenImages test split.
    """
    spec, sources = settings.data, data_sources(run_dir)
    if spec.val_source != "held_out" and "val" not in sources:
        raise PipelineError(f"{RunLayout(run_dir).data_json} has no validation folder for val_source "
                            f"{spec.val_source!r}: run notebooks/01_data.ipynb again")
    return training_data(sources["train"]["path"], spec, schedule, sources.get("val", {}).get("path"))


# ----------------------------------------------------------------------------- fixed-rate models
def train_from_scratch(settings: Settings, run_dir: str | Path, lmbda: float, out_path: Path,
                       progress: bool = True) -> Path:
    """Train a fixed-rate STF of the profile's size at ``lmbda`` from random weights."""
    schedule = settings.anchor.train
    model = start_model(settings.model.stf, schedule)
    train_set, val_set = training_sets(settings, run_dir, schedule)
    folder = RunLayout(run_dir).anchor_training(lmbda)
    config = TrainConfig.from_schedule(schedule, lmbda, settings.model.metric, len(train_set))
    train(model, train_set, folder, config,
          val_data=val_set, progress=progress,
          extra_state={"model_config": settings.model.stf.to_dict(), "mode": "full", "lmbda": lmbda})
    return export_trained(folder, out_path)


def export_trained(folder: str | Path, out_path: str | Path, earlier_log: str | Path | None = None,
                   earlier_steps: int = 0) -> Path:
    """The best checkpoint of a fixed-rate training folder as a float16 model file, as models ship.

    The weights (the moving average where the run kept one) are rounded to float16 and the
    coder tables built from the stored values (:func:`~alice_lib.checkpoints.ship_stf`), so
    that a model trained here is the same kind of file as the one a profile ships, and
    adapters trained on it fit the shipped form. Its ``metrics.csv`` is copied beside it
    (``<name>.metrics.csv``), so that a shipped model keeps its training log.

    A run that continued another run's weights (``alice train --init``, its optimiser afresh)
    ships as one model: ``earlier_steps`` (the earlier run's steps at those weights) are added
    to its own, and ``earlier_log`` comes first in the shipped log, the two told apart by a
    ``leg`` column (1, 2) and the continuation's steps counted from ``earlier_steps``.
    """
    folder, out_path = Path(folder), Path(out_path)
    best = load_checkpoint(folder / "best.pt")
    model = SymmetricalTransFormer(STFConfig(**best["model_config"]))
    load_weights(model, best, folder / "best.pt", averaged=True)
    log = pd.read_csv(folder / TRAINING_LOG)
    meta = {"lmbda": best["lmbda"], "trained_steps": earlier_steps + best["step"], "best_val_loss": best["best_loss"]}
    if earlier_log is not None:
        log = joined_log(pd.read_csv(earlier_log), log, earlier_steps)
        meta["legs"] = f"{earlier_steps} steps, then {best['step']} continued from their weights"
    path = ship_stf(out_path, model, meta)
    ship_log(log, out_path.with_suffix(".metrics.csv"))
    return path


def joined_log(earlier: pd.DataFrame, continued: pd.DataFrame, earlier_steps: int) -> pd.DataFrame:
    """Two legs of one model's training as one log: the continuation's steps counted from ``earlier_steps``."""
    if earlier_steps <= 0 or earlier["step"].max() > earlier_steps:
        raise ValueError(f"the earlier log reaches step {earlier['step'].max()}, past the {earlier_steps} steps "
                         "it is said to have trained")
    continued = continued.assign(step=continued["step"] + earlier_steps)
    return pd.concat([earlier.assign(leg=1), continued.assign(leg=2)], ignore_index=True)


def ship_log(log: Path | pd.DataFrame, out: Path) -> Path:
    """A training log as it ships beside its weights: every row and column, floats to 7 significant
    digits (about half the bytes of the full-precision log, in a package with a size budget)."""
    table = log if isinstance(log, pd.DataFrame) else pd.read_csv(log)
    return atomic_write_bytes(out, table.to_csv(index=False, float_format="%.7g").encode())


def _install_model(source: Path, out: Path, lmbda: float, config: STFConfig | None = None) -> Path:
    """Copy a model file (published checkpoint or shipped weights) into the run folder, coder tables updated."""
    model = load_stf(source, config=config)
    model.update(force=True)
    return save_stf(out, model, {"lmbda": float(lmbda), "source": str(source)})


def prepare_anchor(settings: Settings, run_dir: str | Path, checkpoint: str | None = None,
                   progress: bool = True) -> Path:
    """The frozen base model at the anchor lambda (02_fixed_rate), in ``models/anchor.safetensors``.

    Order: an explicit checkpoint (a published STF file or one of ours); the weights
    the profile ships; else it is trained here with the profile's anchor budget.
    Already present in the run folder: nothing is done.
    """
    out = RunLayout(run_dir).anchor
    lmbda = settings.anchor.lmbda
    if out.exists() and checkpoint is None:
        return out
    source = Path(checkpoint) if checkpoint else settings.anchor.shipped_weights
    if source is not None and source.exists():
        return _install_model(source, out, lmbda, config=None if checkpoint else settings.model.stf)
    if source is not None and checkpoint:
        raise PipelineError(f"anchor checkpoint {source} does not exist")
    return train_from_scratch(settings, run_dir, lmbda, out, progress=progress)


def published_references(run_dir: str | Path, checkpoints: dict | None) -> dict[float, Path]:
    """Load published fixed-rate STF checkpoints ``{lambda: path}`` into the run folder."""
    done = {}
    layout = RunLayout(run_dir)
    for lmbda, path in (checkpoints or {}).items():
        done[float(lmbda)] = _install_model(Path(path), layout.fixed_rate(float(lmbda)), float(lmbda))
    return done


def prepare_references(settings: Settings, run_dir: str | Path, checkpoints: dict | None = None,
                       progress: bool = True) -> dict[float, Path]:
    """The fixed-rate reference at each target lambda, in ``models/fixed-rate-<l>.safetensors`` (02_fixed_rate).

    By ``references.source``: ``published``, the checkpoints given; ``scratch``, the weights the
    profile ships, else a model trained here from random weights with the anchor's recipe (the
    same budget, so the comparison is fair whether or not it converges); ``full``, nothing
    here (03_adapt's ``full`` method stands in). Checkpoints given explicitly always win.
    """
    if checkpoints or settings.references.source == "published":
        return published_references(run_dir, checkpoints)
    if settings.references.source == "full":
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
    path = RunLayout(run_dir).anchor
    if not path.exists():
        raise PipelineError(f"{path} not found: run notebooks/02_fixed_rate.ipynb for this run folder first")
    return load_stf(path)


# ----------------------------------------------------------------------------- adaptation
def adapt(settings: Settings, run_dir: str | Path, lmbda: float, method: str, progress: bool = True,
          device: str | torch.device | None = None) -> dict:
    """Train one method at one target lambda from the anchor (03_adapt); resumes, never trains twice.

    Returns a summary with the artefact path, the parameter counts, the schedule
    actually run (steps, epochs, training images) and the last metrics. ``device``:
    where to train (default the CPU); the artefact is written from the CPU either way.
    """
    if method not in TRAINING_MODES:
        raise PipelineError(f"unknown method {method!r}; choose one of {tuple(TRAINING_MODES)}")
    layout = RunLayout(run_dir)
    out = layout.rate_artifact(method, lmbda)
    schedule = settings.adaptation.training(method)
    lora, shipped = settings.model.lora, settings.adaptation.shipped_weights(method, lmbda)
    summary = {"method": method, "lmbda": lmbda, "artifact": str(out)}
    if out.exists() or (shipped is not None and shipped.exists()):
        if out.exists():
            status = "shipped" if layout.rate_source(method, lmbda).exists() else "already trained"
        else:
            install_shipped_run(settings, run_dir, method, lmbda)
            status, summary["source"] = "shipped", str(shipped)
        model = load_anchor(run_dir)
        prepare_method(model, method, lora, schedule)
        return {**summary, **count_parameters(model, TRAINING_MODES[method], lora), "status": status}
    model = start_adaptation(settings, run_dir, lmbda, method)
    summary.update(count_parameters(model, TRAINING_MODES[method], lora))
    train_set, val_set = training_sets(settings, run_dir, schedule)
    model.to(device or "cpu")
    # Only what trains goes into the run's checkpoints (a few hundred kB for ALICE): unfinished runs can be kept.
    config = TrainConfig.from_schedule(schedule, lmbda, settings.model.metric, len(train_set),
                                       checkpoint_frozen=False)
    hook = epoch_check(settings, run_dir, model, method, lmbda) if settings.adaptation.epoch_check.enabled else None
    folder = layout.rate_training(method, lmbda)
    started = time.time()
    row = train(model, train_set, folder, config, val_data=val_set, progress=progress, on_epoch_end=hook,
                extra_state={"model_config": model.config.to_dict(), "mode": method, "lmbda": lmbda})
    best_path = folder / ("best.pt" if val_set is not None else "last.pt")
    best = load_checkpoint(best_path)
    load_weights(model.cpu(), best, best_path, averaged=True)
    meta = {"lmbda": lmbda, "method": method, "anchor_lmbda": settings.anchor.lmbda, "steps": best["step"],
            "started_from": settings.start_of(lmbda) or "anchor"}
    if method == "alice":
        save_adapters(out, model, lmbda=lmbda, config=lora, extra_metadata=meta)
    else:
        model.update(force=True)
        save_stf(out, model, meta)
    return {**summary, "status": "trained", "seconds": round(time.time() - started, 1), "train_images": len(train_set),
            "planned_steps": config.steps, **row}


def start_adaptation(settings: Settings, run_dir: str | Path, lmbda: float,
                     method: str) -> SymmetricalTransFormer:
    """The model an adaptation at ``lmbda`` trains, prepared for ``method``, before its first step.

    From the run's anchor, with new adapters for ``alice`` (the paper), or, with
    ``adapt.start: neighbour``, from the result of the same method at the neighbouring
    target (:meth:`~alice_lib.settings.Settings.start_of`): its adapters on the frozen
    anchor, or its fine-tuned weights. That run must have been trained (or installed) first.
    """
    neighbour = settings.start_of(lmbda)
    start = None if neighbour is None else RunLayout(run_dir).rate_artifact(method, neighbour)
    if start is not None and not start.exists():
        raise PipelineError(f"adapt.start is 'neighbour': the {method} run at lambda {lmbda} starts from the one at "
                            f"{neighbour}, which is not in {run_dir} yet; train that first "
                            f"(alice run goes in this order: {list(settings.adaptation_order())})")
    model = load_stf(start) if start is not None and method != "alice" else load_anchor(run_dir)
    prepare_method(model, method, settings.model.lora, settings.adaptation.training(method))
    if start is not None and method == "alice":
        load_adapters(start, model)  # same anchor, so the same base weights: the file's check holds
    return model


def install_shipped_run(settings: Settings, run_dir: str | Path, method: str, lmbda: float) -> Path:
    """Put the run the profile ships for (``method``, ``lmbda``) into the run folder, as if trained here.

    The artefact goes where :func:`adapt` would write it (adapters, or a whole model
    rebuilt on the run's anchor from the float16 weight delta ``vanilla`` and ``full`` ship as),
    the training log into the run's ``train/`` folder, and ``shipped.json`` says where
    they came from. Adapters and weight deltas are refused unless the run's anchor is
    the one they were trained on.
    """
    shipped = settings.adaptation.shipped_weights(method, lmbda)
    if shipped is None or not shipped.exists():
        raise PipelineError(f"the profile ships no {method} run at lambda {lmbda} ({shipped})")
    layout, anchor = RunLayout(run_dir), load_anchor(run_dir)
    out = layout.rate_artifact(method, lmbda)
    try:
        if method == "alice":
            load_adapters(shipped, anchor)  # checks the base weights before anything is copied
            atomic_copy(shipped, out)
        else:
            save_stf(out, load_weight_delta(shipped, anchor), {"lmbda": lmbda, "method": method,
                                                               "source": str(shipped)})
    except ValueError as error:
        raise PipelineError(f"the shipped {method} run at lambda {lmbda} does not fit this run's anchor "
                            f"({error}); run with -p use_shipped=false to train it here") from error
    log = shipped.with_suffix(".metrics.csv")
    if log.exists():
        atomic_copy(log, layout.rate_log(method, lmbda))
    record = {"source": str(shipped), "sha256": sha256_file(shipped), "training_log": str(log) if log.exists() else None}
    atomic_write_bytes(layout.rate_source(method, lmbda), json.dumps(record, indent=1).encode())
    return out


def ship_run(settings: Settings, run_dir: str | Path, method: str, lmbda: float,
             weights_dir: str | Path | None = None) -> Path:
    """The shipped form of one adaptation run of ``run_dir`` (the inverse of :func:`install_shipped_run`).

    Into ``weights_dir`` (default ``alice_lib/weights``) under the profile's
    ``adapt.weights`` name: ALICE's adapters in float16; ``vanilla`` and ``full`` rounded
    to float16, their coder tables rebuilt from the stored values, as what differs from the
    run's anchor (:func:`~alice_lib.checkpoints.save_weight_delta`: ``vanilla``'s
    ``fc1``/``fc2``, ``full``'s parameters without the constants); the training log beside it
    (:func:`ship_log`).
    """
    layout = RunLayout(run_dir)
    pattern = settings.adaptation.shipped_weights(method, lmbda)
    if pattern is None:
        raise PipelineError("the profile names no adapt.weights to ship under")
    out = Path(weights_dir or pattern.parent) / pattern.name
    artifact = layout.rate_artifact(method, lmbda)
    if not artifact.exists():
        raise PipelineError(f"{artifact} not found: run notebooks/03_adapt.ipynb with method={method}, lmbda={lmbda}")
    if method == "alice":  # the adapters in float16
        model = load_anchor(run_dir)
        adapters = load_adapters(artifact, model)
        save_adapters(out, model, lmbda=lmbda, config=adapters["config"], extra_metadata=adapters["extra"],
                      dtype=torch.float16)
    else:
        save_weight_delta(out, stored_as(load_stf(artifact), torch.float16), load_anchor(run_dir),
                          {"lmbda": lmbda, "method": method, "anchor_lmbda": settings.anchor.lmbda})
    if layout.rate_log(method, lmbda).exists():
        ship_log(layout.rate_log(method, lmbda), out.with_suffix(".metrics.csv"))
    return out


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


def load_rate_model(run_dir: str | Path, method: str, lmbda: float,
                    settings: Settings | None = None) -> SymmetricalTransFormer:
    """A model for one (method, lambda): ``alice`` unmerged, ``malice`` merged, others plain.

    ``fixed-rate`` is the reference 02_fixed_rate put in the run folder; without one it is the
    ``full`` fine-tune only when the references are its models (``references.source: full``, or no
    settings are given).
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
        if settings is not None and settings.references.source != "full":
            raise PipelineError(f"{layout.fixed_rate(lmbda)} not found: run notebooks/02_fixed_rate.ipynb first")
        method = "full"
    path = layout.rate_artifact(method, lmbda)
    if not path.exists():
        raise PipelineError(f"{path} not found: run notebooks/03_adapt.ipynb with method={method}, lmbda={lmbda}")
    return load_stf(path)


# ----------------------------------------------------------------------------- evaluation
def evaluate_run(settings: Settings, run_dir: str | Path, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Every model of the run and the classical codecs on the Kodak folder (04_evaluate).

    This step only lists the models (:func:`eval_models`); :func:`alice_lib.evaluation.evaluate`
    codes them and writes every table once into ``eval/``. The anchor is evaluated once
    as its own point (method ``anchor``); rows already in ``eval/results.csv`` are kept.
    """
    spec = settings.evaluation
    return evaluation.evaluate(
        eval_models(settings, run_dir), _eval_images(settings, run_dir), RunLayout(run_dir).eval_dir,
        classical=spec.classical, qualities=spec.qualities, padding=spec.padding, bd_methods=spec.bd_methods,
        curves_include_anchor=spec.curves_include_anchor,
        description=f"ALICE workbook, profile {settings.name}, real rANS bitstreams", progress=progress)


def eval_models(settings: Settings, run_dir: str | Path) -> list[evaluation.ModelEntry]:
    """The learned models 04_evaluate codes: the anchor once, then each method at each target lambda."""
    entries = [evaluation.ModelEntry("anchor", evaluation.ANCHOR_METHOD, settings.anchor.lmbda,
                                     lambda: load_anchor(run_dir))]
    for lmbda in settings.targets:
        for method in settings.evaluation.methods:
            entries.append(evaluation.ModelEntry(f"{method}-{lmbda_tag(lmbda)}", method, lmbda,
                                                 lambda m=method, lm=lmbda: load_rate_model(run_dir, m, lm, settings)))
    return entries


def _eval_images(settings: Settings, run_dir: str | Path) -> Path:
    """The Kodak folder, or the first ``max_images`` of it linked into the run folder."""
    folder = Path(data_sources(run_dir)["kodak"]["path"])
    limit = settings.evaluation.max_images
    if not limit:
        return folder
    subset = RunLayout(run_dir).eval_images
    subset.mkdir(parents=True, exist_ok=True)
    for path in data_lib.list_images(folder)[:limit]:
        link = subset / path.name
        if not link.exists():
            link.symlink_to(path.resolve())
    return subset


def parameter_rows(settings: Settings, full_size: bool = False) -> list[dict]:
    """Trainable, stored-per-rate and stored-for-all-rates counts for each method.

    ``full_size=True`` counts for the published STF (the paper's 0.35% claim) rather
    than the profile's model; the number of rates is the profile's (anchor + targets).
    """
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


# ----------------------------------------------------------------------------- report
def anchor_training_log(settings: Settings, run_dir: str | Path) -> Path | None:
    """The anchor's metrics.csv: trained in this run folder, or shipped beside its weights."""
    trained = RunLayout(run_dir).anchor_log(settings.anchor.lmbda)
    if trained.exists():
        return trained
    weights = settings.anchor.shipped_weights
    shipped = weights.with_suffix(".metrics.csv") if weights else None
    return shipped if shipped and shipped.exists() else None


def curve_labels(settings: Settings) -> dict[str, str]:
    """Legend entries of a run's figures that name what its curves are (the references' source)."""
    from .figures import REFERENCE_LABELS

    label = REFERENCE_LABELS.get(settings.references.source)
    return {"fixed-rate": label} if label else {}


def write_report(settings: Settings, run_dir: str | Path, reports_dir: str | Path) -> dict:
    """Tables and figures of a finished run into ``reports_dir`` (05_figures).

    The evaluation's tables are copied as 04_evaluate wrote them and the RD figures are
    drawn from them (nothing is recomputed); parameters and complexity are measured here.
    """
    from .figures import plot_complexity_table, plot_parameter_bars, plot_rd_curves

    reports_dir = Path(reports_dir)
    try:
        tables = evaluation.publish_tables(RunLayout(run_dir).eval_dir, reports_dir)
    except FileNotFoundError as error:
        raise PipelineError(str(error)) from error
    spec = settings.evaluation
    plot_rd_curves(tables.summary, reports_dir, published=spec.published_points,
                   curves_include_anchor=spec.curves_include_anchor, labels=curve_labels(settings))

    published_rows, profile_rows = parameter_rows(settings, full_size=True), parameter_rows(settings)
    parameters = published_rows + profile_rows
    pd.DataFrame(parameters).to_csv(reports_dir / "parameters.csv", index=False)
    plot_parameter_bars(published_rows, reports_dir, stem="parameters")
    plot_parameter_bars(profile_rows, reports_dir, stem=f"parameters_{settings.name}")

    cx = settings.complexity
    image_path = Path(data_sources(run_dir)["kodak"]["path"]) / cx.image
    if not image_path.exists():
        image_path = data_lib.list_images(image_path.parent)[0]
    complexity = evaluation.measure_complexity(evaluation.complexity_models(settings),
                                               data_lib.read_image(image_path),
                                               repeats=cx.repeats, out_path=reports_dir / "complexity.csv")
    plot_complexity_table(complexity, reports_dir)
    files = sorted(p for p in reports_dir.iterdir() if p.is_file())
    return {"files": files, "bd": tables.bd, "parameters": parameters, "complexity": complexity,
            "summary": tables.summary}


__all__ = [
    "PipelineError", "load_profile", "prepare_data", "record_sources", "data_sources", "training_sets",
    "train_from_scratch", "export_trained", "prepare_anchor", "published_references", "prepare_references",
    "load_anchor", "adapt", "epoch_check", "load_rate_model", "evaluate_run", "eval_models", "parameter_rows",
    "anchor_training_log", "write_report", "RESULT_LABEL", "TRAINING_MODES", "RunLayout",
    "Settings", "lmbda_tag",
]
