"""What an experiment will do and how long it takes: ``alice plan``, and the estimate ``alice run`` shows.

:func:`make_plan` resolves a profile into every training run (method, lambda,
epochs, steps, batch, schedule, augmentation, seed), the data (requested and found
counts), the evaluation, and an estimated wall time from a few steps measured on
this device (:func:`measure_costs`). The driver (:mod:`alice_lib.driver`) decides which
notebooks run, in which order; the plan only estimates each of them in units of work
(training steps, images coded), and the same estimate drives ``alice run``'s progress
(:class:`alice_lib.driver.Progress`), so the plan and the ETA cannot disagree.

Step counts of an epoch-based schedule come from the training images found; when
the data is not there yet (OpenImages before its download) they come from the
requested counts, and the plan says so.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from . import data as data_lib
from . import data_sources as sources_lib
from .evaluation.tables import RESULTS_CSV
from .run_folder import RunLayout
from .settings import TRAINING_MODES, Settings, TrainingSettings

KODAK_PIXELS = 768 * 512
KODAK_IMAGES = 24
# Prior per-image cost of coding with the published STF, for the complexity table when the
# profile's model is another size (measured on this repository's 2-core CPU: ~6.5 s enc+dec).
PUBLISHED_IMAGE_SECONDS = {"cpu": 7.0, "cuda": 0.5}
# Starting a notebook's kernel and importing torch and the package (a prior: alice run replaces it by the
# time 01_data actually took), and the work of the two notebooks that mostly read files.
NOTEBOOK_OVERHEAD = 10.0
FIXED_SECONDS = {"01_data": 2.0, "02_fixed_rate": 3.0}
TASK_LABELS = {"01_data": "data", "02_fixed_rate": "anchor", "04_evaluate": "evaluation",
               "05_figures": "figures and complexity"}


class NotebookCall(Protocol):
    """A notebook the driver runs (:class:`alice_lib.driver.NotebookRun`): its name and its own parameters."""

    @property
    def notebook(self) -> str: ...

    @property
    def parameters(self) -> Mapping: ...


@dataclass(frozen=True)
class RunEntry:
    """One training run as it will happen."""

    method: str
    lmbda: float
    epochs: float
    steps: int
    global_batch_size: int
    lr: float
    schedule: str
    schedule_unit: str
    crop: int
    flip: bool
    seed: int
    train_images: int
    done: bool = False
    start: str = "anchor"  # what it starts from: the anchor, or the lambda of its neighbour's result (adapt.start)


@dataclass(frozen=True)
class DataPlan:
    """Requested and found image counts; ``counts_from`` says which the step counts use."""

    train_requested: int | None
    train_found: int | None
    train_from: str
    train_images: int
    val_source: str
    val_requested: int
    val_found: int | None
    val_from: str
    val_images: int
    kodak_from: str
    kodak_images: int
    counts_from: str


@dataclass(frozen=True)
class Costs:
    """Seconds per unit of work on this device: a training step per method, coding one test image."""

    device: str
    step_seconds: Mapping[str, float]
    image_seconds: float
    classical_image_seconds: float
    complexity_seconds: float
    measured: bool


@dataclass(frozen=True)
class WorkItem:
    """The estimate of one notebook of ``alice run``: its work in units, its estimated seconds."""

    notebook: str
    label: str
    units: int
    unit: str
    work_seconds: float  # the work itself: steps, images coded
    watch: tuple[Path, ...] = ()  # files whose growth measures the item's progress (units summed)
    overhead: float = NOTEBOOK_OVERHEAD  # starting a kernel and importing: the same for every notebook

    @property
    def seconds(self) -> float:
        return self.overhead + self.work_seconds


@dataclass
class ExperimentPlan:
    profile: str
    anchor: dict
    runs: list[RunEntry]
    data: DataPlan
    evaluation: dict
    costs: Costs
    work: list[WorkItem]
    notes: list[str] = field(default_factory=list)
    references: dict = field(default_factory=dict)  # source, lambdas trained here from scratch, their steps

    @property
    def total_seconds(self) -> float:
        return sum(item.seconds for item in self.work)

    @property
    def training_steps(self) -> int:
        """Steps still to train: the adaptation runs not done, the anchor and references trained here."""
        return sum(r.steps for r in self.runs if not r.done) + self.anchor["steps"] + \
            self.references.get("steps", 0)

    def to_dict(self) -> dict:
        """The plan as one JSON-able object (``alice plan --json``)."""
        return {"profile": self.profile, "anchor": self.anchor, "references": self.references,
                "runs": [asdict(r) for r in self.runs],
                "data": {**asdict(self.data), "train_images": self.data.train_images,
                         "val_images": self.data.val_images},
                "evaluation": self.evaluation,
                "estimate": {"device": self.costs.device, "measured": self.costs.measured,
                             "step_seconds": dict(self.costs.step_seconds),
                             "image_seconds": self.costs.image_seconds,
                             "total_seconds": round(self.total_seconds, 1),
                             "training_steps": self.training_steps,
                             "images_coded": sum(i.units for i in self.work if i.unit == "image")},
                "notes": list(self.notes)}

    def _references_text(self) -> str:
        r = self.references or {}
        trained = r.get("trained_here") or []
        text = {"full": "the full fine-tunes from the anchor (method full)",
                "scratch": "trained from random weights with the anchor's recipe",
                "published": "published checkpoints (reference_checkpoints)"}.get(r.get("source"), "none")
        if trained:
            text += f"; trained here for lambda {', '.join(f'{t:g}' for t in trained)} ({r['steps']:,} steps)"
        elif r.get("source") == "scratch":
            text += "; shipped or already trained"
        return text

    def describe(self) -> str:
        """The plan as text for a person: runs, data, evaluation, time."""
        d = self.data
        lines = [f"profile {self.profile}", "",
                 f"data: train {d.train_images:,} images ({d.counts_from} count; requested "
                 f"{_count(d.train_requested)}, found {_count(d.train_found)}: {d.train_from})",
                 f"      validation {d.val_images:,} images, {d.val_source} (requested {_count(d.val_requested)}, "
                 f"found {_count(d.val_found)}: {d.val_from})",
                 f"      test: {d.kodak_images} images ({d.kodak_from})", "",
                 f"anchor: lambda {self.anchor['lmbda']:g}, {self.anchor['source']}",
                 f"fixed-rate references: {self._references_text()}", "",
                 "training runs:",
                 f"  {'method':8s} {'lambda':>7s} {'epochs':>6s} {'steps':>9s} {'batch':>5s} {'lr':>8s} "
                 f"{'schedule':>15s} {'crop':>4s} {'flip':>5s} {'seed':>4s} {'from':>7s}"]
        for r in self.runs:
            lines.append(f"  {r.method:8s} {r.lmbda:7g} {r.epochs:6.3g} {r.steps:9,d} {r.global_batch_size:5d} "
                         f"{r.lr:8.1e} {r.schedule + '/' + r.schedule_unit:>15s} {r.crop:4d} {str(r.flip):>5s} "
                         f"{r.seed:4d} {r.start:>7s}{'  (done)' if r.done else ''}")
        e = self.evaluation
        lines += ["", f"evaluation: {', '.join(e['datasets'])}, methods {', '.join(e['methods'])}, classical "
                      f"{', '.join(e['classical'])}; padding {e['padding']}; BD {', '.join(e['bd_methods'])}; "
                      f"curves {'include' if e['curves_include_anchor'] else 'exclude'} the anchor", ""]
        c = self.costs
        steps = ", ".join(f"{m} {s:.3g} s" for m, s in c.step_seconds.items())
        lines.append(f"estimate on {c.device} ({'measured' if c.measured else 'not measured: priors'}): "
                     f"a step {steps}; coding a test image {c.image_seconds:.3g} s")
        lines.append(f"  {self.training_steps:,} training steps (anchor and references included when trained here), "
                     f"{sum(i.units for i in self.work if i.unit == 'image'):,} images coded: about "
                     f"{format_seconds(self.total_seconds)}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def format_seconds(seconds: float) -> str:
    """``3 h 12 min`` / ``12 min 5 s`` / ``40 s``: durations a person reads at a glance."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


# ----------------------------------------------------------------------------- data
def _quiet(fn, *args, **kwargs):
    """Call a resolver without its fallback warnings (the plan reports where the data came from instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def plan_data(settings: Settings, run_dir: Path | None, parameters: Mapping | None = None,
              requested_only: bool = False) -> DataPlan:
    """Requested and found counts, without downloading anything.

    ``data.json`` of the run folder wins when 01_data has run; else the folders are
    resolved with downloads disabled. Missing data (or ``requested_only``): the
    requested counts, said so.
    """
    parameters = dict(parameters or {})
    spec = settings.data
    recorded = {}
    if run_dir is not None and RunLayout(run_dir).data_json.exists():
        recorded = json.loads(RunLayout(run_dir).data_json.read_text())
    train_found, train_from = _found(recorded.get("train"), requested_only, lambda: _quiet(
        sources_lib.resolve_training, parameters.get("train_dir") or spec.train_dir, source=spec.train_source,
        n_images=spec.train_images or sources_lib.OPENIMAGES_TRAIN_IMAGES, allow_download=False))
    val_found, val_from = None, "held out of the training images"
    if spec.val_source != "held_out":
        val_found, val_from = _found(recorded.get("val"), requested_only, lambda: _quiet(
            sources_lib.resolve_validation, spec.val_source, parameters.get("val_dir") or spec.val_dir,
            spec.val_images, allow_download=False))
    kodak_found, kodak_from = _found(recorded.get("kodak"), False, lambda: _quiet(
        sources_lib.resolve_kodak, parameters.get("kodak_dir") or spec.kodak_dir, allow_download=False))
    present = train_found is not None
    train = min(train_found, spec.train_images or train_found) if present else (spec.train_images or 0)
    held_out = min(spec.val_images, train // 4) if spec.val_source == "held_out" else 0
    if spec.val_source == "held_out":
        val = held_out
    elif val_found is not None:
        val = min(val_found, spec.val_images or val_found)
    else:
        val = spec.val_images
    n_test = min(kodak_found or KODAK_IMAGES, settings.evaluation.max_images or KODAK_IMAGES)
    return DataPlan(train_requested=spec.train_images, train_found=train_found, train_from=train_from,
                    train_images=train - held_out, val_source=spec.val_source, val_requested=spec.val_images,
                    val_found=val_found, val_from=val_from, val_images=val, kodak_from=kodak_from,
                    kodak_images=n_test, counts_from="found" if present else "requested")


def _found(recorded: Mapping | None, requested_only: bool, resolve) -> tuple[int | None, str]:
    """``(count, where)`` of one data source: recorded in data.json, resolved now, or missing."""
    if requested_only:
        return None, "not looked for (requested counts)"
    if recorded:
        return int(recorded.get("images") or data_lib.count_images(recorded["path"])), recorded["path"]
    try:
        source = resolve()
    except (FileNotFoundError, ValueError, ImportError) as error:
        reason = str(error).split(";")[0].split(". ")[0]
        return None, f"MISSING ({reason}); steps use the requested counts"
    if source is None:
        return None, "none"
    return data_lib.count_images(source.path), f"{source.path} ({source.kind})"


# ----------------------------------------------------------------------------- costs
def _smooth_images(n: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Photograph-like test input (a smooth random field, not white noise, which codes unlike photos)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(2, size[0] // 32), max(2, size[1] // 32), generator=g)
    return torch.nn.functional.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def measure_costs(settings: Settings, device: str | torch.device | None = None, steps: int = 2,
                  max_batch: int | None = None) -> Costs:
    """A couple of training steps per method and one image coded, on this device, with the profile's model.

    Cheap on purpose: on a CPU the batch is cut to ``max_batch`` (default 2) and the
    step time scaled back up linearly; coding is timed on a 256x256 image and scaled
    to Kodak's pixel count.
    """
    from .lora import inject_lora, mark_trainable
    from .models.stf import SymmetricalTransFormer
    from .train import RateDistortionLoss

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    max_batch = max_batch or (2 if device.type == "cpu" else 10**9)
    model = SymmetricalTransFormer(settings.model.stf).to(device)
    criterion = RateDistortionLoss(0.01, settings.model.metric)
    methods = list(dict.fromkeys([*settings.adaptation.methods, *(["full"] if _anchor_trains(settings) else [])]))
    step_seconds = {}
    # Whole-weight modes first on the plain model, then the adapters injected for ALICE.
    for method in sorted(methods, key=lambda m: m == "alice"):
        if method == "alice":
            inject_lora(model, settings.model.lora)
        schedule = settings.adaptation.training(method)
        batch = min(schedule.batch_size, max_batch)
        mark_trainable(model, TRAINING_MODES[method], settings.model.lora)
        step_seconds[method] = _step_seconds(model, criterion, batch, schedule.input_size, steps, device) \
            * schedule.batch_size / batch
    model.eval().update(force=True)
    x = _smooth_images(1, (256, 256)).to(device)
    times = []
    with torch.no_grad():
        for _ in range(2):  # the first call builds the coder's tables
            started = time.perf_counter()
            coded = model.compress(x)
            model.decompress(coded["strings"], coded["shape"])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    image_seconds = times[-1] * KODAK_PIXELS / (256 * 256)
    del model, coded
    if device.type == "cuda":  # the notebooks' kernels need this GPU memory, not the driver's cache
        torch.cuda.empty_cache()
    return Costs(device=_device_name(device), step_seconds=step_seconds, image_seconds=image_seconds,
                 classical_image_seconds=0.15, complexity_seconds=_complexity_seconds(settings, image_seconds,
                                                                                    device.type),
                 measured=True)


def _step_seconds(model, criterion, batch: int, crop: int, steps: int, device: torch.device) -> float:
    """Fastest of ``steps`` timed optimiser steps after one warm-up (forward, backward, Adam)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-6)
    x = _smooth_images(batch, (crop, crop)).to(device)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        loss = criterion(model(x), x)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times[1:])


# A published-size STF training step at batch 16 of 256 px crops, fp32, measured on one
# NVIDIA H200 (median of 30 steps, benchmarks/gpu/paper_scale.py; docs/gpu.md).
GPU_STEP_SECONDS = {"alice": 0.134, "vanilla": 0.109, "full": 0.151}


def prior_costs(settings: Settings) -> Costs:
    """Costs without measuring (``--no-measure``): rough priors for this device kind, labelled as such."""
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    scale = settings.model.stf.embed_dim ** 2 * sum(settings.model.stf.depths) / (48 ** 2 * 12)
    steps = {}
    for m in settings.adaptation.methods:
        s = settings.adaptation.training(m)
        base = GPU_STEP_SECONDS.get(m, GPU_STEP_SECONDS["full"]) if kind == "cuda" else 30.0
        steps[m] = base * scale * s.batch_size / 16 * (s.input_size / 256) ** 2
    image = PUBLISHED_IMAGE_SECONDS[kind] * scale
    return Costs(device=_device_name(torch.device(kind)), step_seconds=steps,
                 image_seconds=image, classical_image_seconds=0.15,
                 complexity_seconds=_complexity_seconds(settings, image, kind), measured=False)


def _complexity_seconds(settings: Settings, image_seconds: float, kind: str) -> float:
    """The complexity table: 3 models, encoder and decoder, timed ``repeats`` times plus a FLOP count and warm-up."""
    per_image = PUBLISHED_IMAGE_SECONDS[kind] if settings.complexity.model == "published" else image_seconds
    return 3 * per_image * (settings.complexity.repeats + 3)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} thread(s)"


# ----------------------------------------------------------------------------- the plan
def _anchor_trains(settings: Settings, checkpoint: str | None = None, run_dir: Path | None = None) -> bool:
    """Whether 02_fixed_rate will train the anchor (no checkpoint, no shipped weights, none in the run folder)."""
    if checkpoint or (run_dir is not None and RunLayout(run_dir).anchor.exists()):
        return False
    shipped = settings.anchor.shipped_weights
    return not (shipped is not None and shipped.exists())


def _reference_runs(settings: Settings, n_train: int, run_dir: Path | None, notebook: Mapping) -> list[RunEntry]:
    """The fixed-rate references 02_fixed_rate trains from scratch, each with the anchor's recipe
    (none when reference checkpoints are given)."""
    if notebook.get("reference_checkpoints"):
        return []
    return [_entry("fixed-rate", lmbda, settings.anchor.train, n_train)
            for lmbda in settings.references_to_train(run_dir)]


def training_runs(settings: Settings, n_train: int, run_dir: Path | None = None) -> list[RunEntry]:
    """Every adaptation run of the profile, with its steps computed for ``n_train`` images; ``done``
    when the run folder has it or the profile ships it (03_adapt then trains nothing)."""
    runs = []
    for lmbda in settings.adaptation_order():
        start = settings.start_of(lmbda)
        for method in settings.adaptation.methods:
            shipped = settings.adaptation.shipped_weights(method, lmbda)
            done = ((run_dir is not None and RunLayout(run_dir).rate_artifact(method, lmbda).exists())
                    or (shipped is not None and shipped.exists()))
            runs.append(_entry(method, lmbda, settings.adaptation.training(method), n_train, done=done,
                               start="anchor" if start is None else f"{start:g}"))
    return runs


def _entry(method: str, lmbda: float, schedule: TrainingSettings, n_train: int, done: bool = False,
           start: str = "anchor") -> RunEntry:
    n = max(n_train, schedule.batch_size) if schedule.steps is not None else n_train
    return RunEntry(method=method, lmbda=lmbda, epochs=schedule.epochs_for(n), steps=schedule.steps_for(n),
                    global_batch_size=schedule.batch_size, lr=float(schedule.lr), schedule=schedule.schedule,
                    schedule_unit=schedule.schedule_unit, crop=schedule.crop, flip=schedule.flip, seed=schedule.seed,
                    train_images=n_train, done=done, start=start)


def make_plan(settings: Settings, notebooks: Sequence[NotebookCall], parameters: Mapping | None = None,
              run_dir: str | Path | None = None, measure: bool = True, requested_only: bool = False,
              costs: Costs | None = None) -> ExperimentPlan:
    """The resolved experiment of ``settings`` and the estimate of each notebook the driver runs.

    ``notebooks``: the driver's list, in its order (:func:`alice_lib.driver.notebook_order`);
    ``parameters``: the notebook parameters (``kodak_dir``, ``anchor_checkpoint``, ...).
    """
    notebook = dict(parameters or {})
    run_dir = Path(run_dir) if run_dir else None
    data = plan_data(settings, run_dir, notebook, requested_only)
    runs = training_runs(settings, data.train_images, run_dir)
    checkpoint = notebook.get("anchor_checkpoint")
    trains_anchor = _anchor_trains(settings, checkpoint, run_dir)
    anchor_run = _entry("full", settings.anchor.lmbda, settings.anchor.train, data.train_images) if trains_anchor \
        else None
    costs = costs or (measure_costs(settings) if measure else prior_costs(settings))
    source = (f"checkpoint {checkpoint}" if checkpoint else "already in the run folder"
              if run_dir is not None and RunLayout(run_dir).anchor.exists() else
              f"shipped weights {settings.anchor.weights}" if not trains_anchor else
              f"trained here: {anchor_run.steps:,} steps at batch {anchor_run.global_batch_size}")
    anchor = {"lmbda": settings.anchor.lmbda, "source": source, "trains": trains_anchor,
              "steps": anchor_run.steps if anchor_run else 0}
    reference_runs = _reference_runs(settings, data.train_images, run_dir, notebook)
    references = {"source": settings.references.source,
                  "trained_here": [r.lmbda for r in reference_runs],
                  "steps": sum(r.steps for r in reference_runs)}
    ev = settings.evaluation
    evaluation = {"datasets": list(ev.datasets), "images": data.kodak_images, "methods": list(ev.methods),
                  "classical": list(ev.classical), "padding": ev.padding, "bd_methods": list(ev.bd_methods),
                  "curves_include_anchor": ev.curves_include_anchor}
    work = work_items(settings, notebooks, runs, data, costs, anchor_run, reference_runs, run_dir)
    return ExperimentPlan(profile=settings.name, anchor=anchor, references=references, runs=runs, data=data,
                          evaluation=evaluation,
                          costs=costs, work=work, notes=_notes(settings, data, anchor_run, notebook))


def _notes(settings: Settings, data: DataPlan, anchor_run: RunEntry | None, notebook: Mapping) -> list[str]:
    """What the researcher must provide or know before the run (missing checkpoints or data)."""
    notes = []
    if anchor_run is not None and settings.model.stf == type(settings.model.stf)():
        notes.append(f"no anchor checkpoint: 02_fixed_rate would train the published STF from scratch "
                     f"({anchor_run.steps:,} steps); pass -p anchor_checkpoint=stf_0483.pth.tar")
    if "fixed-rate" in settings.evaluation.methods and settings.references.source != "scratch" \
            and not (settings.references.source == "full" and "full" in settings.adaptation.methods) \
            and not notebook.get("reference_checkpoints"):
        notes.append("fixed-rate references are evaluated but neither trained (method full) nor given: pass "
                     "-p \"reference_checkpoints={0.0018: stf_0018.pth.tar, ...}\"")
    if data.counts_from == "requested":
        notes.append("training data not found: step counts use the requested image counts (see data)")
    return notes


def work_items(settings: Settings, notebooks: Sequence[NotebookCall], runs: Sequence[RunEntry], data: DataPlan,
               costs: Costs, anchor_run: RunEntry | None, reference_runs: Sequence[RunEntry] = (),
               run_dir: Path | None = None) -> list[WorkItem]:
    """The estimate of each notebook in ``notebooks`` (the driver's list and order): work and seconds.

    ``watch``: the files each item grows in ``run_dir`` (none without a run folder).
    """
    layout = RunLayout(run_dir) if run_dir is not None else None
    adaptation = {(r.method, r.lmbda): r for r in runs}
    fixed = ([anchor_run] if anchor_run is not None else []) + list(reference_runs)
    step_full = costs.step_seconds.get("full", max(costs.step_seconds.values()))
    items = []
    for call in notebooks:
        name = call.notebook
        if name == "02_fixed_rate" and fixed:
            label = " + ".join(f"{'anchor' if r is anchor_run else 'reference'} lambda {r.lmbda:g}" for r in fixed)
            steps = sum(r.steps for r in fixed)
            watch = tuple(layout.anchor_log(r.lmbda) for r in fixed) if layout else ()
            items.append(WorkItem(name, label, steps, "step", steps * step_full, watch=watch))
        elif name == "03_adapt":
            run = adaptation[(call.parameters["method"], float(call.parameters["lmbda"]))]
            items.append(_adaptation_item(settings, run, data, costs, step_full, layout))
        elif name == "04_evaluate":
            items.append(_evaluation_item(settings, data, costs, layout))
        elif name == "05_figures":
            items.append(WorkItem(name, TASK_LABELS[name], 1, "task", costs.complexity_seconds))
        else:  # little work of its own: reading files, or 02_fixed_rate with nothing to train
            items.append(WorkItem(name, TASK_LABELS.get(name, name), 1, "task", FIXED_SECONDS.get(name, 0.0)))
    return items


def _adaptation_item(settings: Settings, run: RunEntry, data: DataPlan, costs: Costs, step_full: float,
                     layout: RunLayout | None) -> WorkItem:
    """One 03_adapt: its steps (none when done), and the per-epoch Kodak check when the profile asks for it."""
    check = settings.adaptation.epoch_check
    n_checks = math.ceil(run.epochs) * (check.images or data.kodak_images) if check.enabled else 0
    seconds = 0.0 if run.done else run.steps * costs.step_seconds.get(run.method, step_full) \
        + n_checks * costs.image_seconds
    return WorkItem("03_adapt", f"{run.method} lambda {run.lmbda:g}", 0 if run.done else run.steps, "step", seconds,
                    watch=(layout.rate_log(run.method, run.lmbda),) if layout else ())


def _evaluation_item(settings: Settings, data: DataPlan, costs: Costs, layout: RunLayout | None) -> WorkItem:
    """04_evaluate: every learned model on the test images, and the classical codecs at their qualities."""
    n_models = 1 + len(settings.targets) * len(settings.evaluation.methods)
    learned = n_models * data.kodak_images
    classical = data.kodak_images * sum(len((settings.evaluation.qualities or {}).get(c, range(8)))
                                        for c in settings.evaluation.classical)
    return WorkItem("04_evaluate", TASK_LABELS["04_evaluate"], learned, "image",
                    learned * costs.image_seconds + classical * costs.classical_image_seconds,
                    watch=(layout.eval_dir / RESULTS_CSV,) if layout else ())


__all__ = ["ExperimentPlan", "RunEntry", "DataPlan", "Costs", "WorkItem", "NotebookCall", "make_plan", "measure_costs",
           "prior_costs", "plan_data", "training_runs", "work_items", "format_seconds"]
