"""The experiment's settings: a profile YAML loaded into typed, validated dataclasses.

Every default and every check of a profile lives here, so that the pipeline, the
``alice`` commands, the plan and the benchmarks read one object instead of
re-reading nested dicts with their own ``.get(..., default)``. Sections:

* ``model``       the STF size (:class:`~alice_lib.models.stf.STFConfig`), the LoRA layout, the loss metric
* ``data``        where training / validation / test images come from and how many are asked for
* ``anchor``      the frozen base model: its lambda, shipped weights, and the budget to train it
* ``references``  where the fixed-rate curve comes from: published, trained from scratch, or fine-tunes
* ``adaptation``  the methods trained per target lambda, their schedules (:class:`TrainingSettings`),
                  the runs a profile ships (``adapt.weights``) and where each run starts (``adapt.start``)
* ``evaluation``  test sets, padding, BD-rate methods, whether curves include the anchor
* ``complexity``  which model and image the complexity table measures

and one switch, ``use_shipped`` (default true): false ignores every weight file the profile
names (anchor, references, adaptation runs), so that a run retrains all of it with the
profile's recipes. Plus the method names (:data:`TRAINING_MODES`, :data:`RESULT_LABEL`), each defined once.
A run writes its resolved settings once (:func:`save_settings`, into the run folder of
:mod:`alice_lib.run_folder`); each notebook loads that file back to equal settings.

Overrides use dotted keys (``adapt.epochs=2``, ``data.train_images=8``,
``targets=[0.0067]``); :func:`split_parameters` separates them from notebook
parameters such as ``kodak_dir`` or ``anchor_checkpoint``.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .lora import LoRAConfig
from .models.stf import STFConfig
from .run_folder import RunLayout, lmbda_tag
from .utils import atomic_write_bytes

PACKAGE_DIR = Path(__file__).resolve().parent
PROFILE_DIR = PACKAGE_DIR / "profiles"

# Method trained per target lambda -> the training mode of lora.mark_trainable / count_parameters.
TRAINING_MODES: dict[str, str] = {"alice": "lora", "vanilla": "vanilla", "full": "full"}
# How each trained method's models count in the parameter table: a ``full`` model is a fixed-rate model.
RESULT_LABEL: dict[str, str] = {"alice": "alice", "vanilla": "vanilla", "full": "fixed-rate"}
# Methods an evaluation can list: the fixed-rate curve, the trained methods by name, MALICE (ALICE merged).
EVALUATED_METHODS = ("fixed-rate", "alice", "malice", "vanilla", "full")
# Where the fixed-rate curve comes from (see ReferenceSettings); ``full``: the ``full`` method's models.
REFERENCE_SOURCES = ("full", "scratch", "published")
ADAPTATION_STARTS = ("anchor", "neighbour")  # adapt.start: see Settings.start_of
SCHEDULES = ("cosine", "plateau", "constant", "hold-cosine")
SCHEDULE_UNITS = ("step", "epoch")
PRECISIONS = ("fp32", "bf16", "auto")
METRICS = ("mse", "ms-ssim")
VAL_SOURCES = ("held_out", "openimages-test", "folder")
TRAIN_SOURCES = ("auto", "openimages")
PADDINGS = ("reference", "replicate")  # reference: zeros, centred, to 128; replicate: edges, right/bottom, to 64
BD_METHODS = ("cubic", "akima")
CLASSICAL = ("jpeg", "webp", "avif")

# Notebook parameters that are not profile settings (``alice run -p KEY=VALUE``).
NOTEBOOK_PARAMETERS = ("kodak_dir", "train_dir", "val_dir", "anchor_checkpoint", "reference_checkpoints",
                       "allow_download", "lmbda", "method", "overrides")


class SettingsError(ValueError):
    """A profile or override that cannot describe an experiment; the message names the key."""


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class TrainingSettings:
    """One training schedule (the anchor's, or one adaptation method's).

    Length is ``epochs`` over the training images found (converted to steps by
    :meth:`steps_for`) or a fixed ``steps`` count, never both: a step count that
    disagrees with the data is how the paper profile once ran 3,000 passes.
    ``batch_size`` is global: the number of images per optimiser step, whatever the
    number of processes.
    """

    lr: float
    batch_size: int
    crop: int
    epochs: int | None = None
    steps: int | None = None
    schedule: str = "cosine"
    schedule_unit: str = "step"
    flip: bool = True
    seed: int = 0
    checkpoint_every: int | None = None
    precision: str = "fp32"
    tf32: bool = False
    num_workers: int | None = None  # None: the training loop decides (0 on a CPU, workers on a GPU)
    validate_every: int | None = None  # with ``steps``: validate and log every N steps instead of every pass
    hyper_init_gain: float = 1.0  # from random weights: h_a's last layer x this (alice_lib/train/hyperprior.py)
    hyper_lr_scale: float = 1.0  # the hyperprior path learns at lr x this (alice_lib/train/hyperprior.py)
    mosaic: int = 1  # >1: each training image is a mosaic x mosaic grid of crops (data.Mosaics)
    average_decay: float = 0.0  # >0: moving average of the weights, validated and shipped (train.WeightAverage)
    decay_fraction: float = 0.2  # hold-cosine: the last fraction of the steps over which the lr decays to 0
    also_train: tuple[str, ...] = ()  # ablations: modules an adaptation trains as well (train.prepare_method)

    def __post_init__(self) -> None:
        object.__setattr__(self, "also_train", tuple([self.also_train] if isinstance(self.also_train, str)
                                                     else self.also_train))
        if (self.epochs is None) == (self.steps is None):
            raise SettingsError("give exactly one of epochs and steps")
        if self.validate_every is not None and self.epochs is not None:
            raise SettingsError("validate_every goes with steps; with epochs validation is once per epoch")
        for name in ("epochs", "steps", "batch_size", "crop", "checkpoint_every", "validate_every", "mosaic"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value <= 0):
                raise SettingsError(f"{name} must be a positive integer, got {value!r}")
        if not float(self.lr) > 0:
            raise SettingsError(f"lr must be positive, got {self.lr!r}")
        for name in ("hyper_init_gain", "hyper_lr_scale"):
            if not float(getattr(self, name)) > 0:
                raise SettingsError(f"{name} must be positive (1: unchanged), got {getattr(self, name)!r}")
        if not 0 <= float(self.average_decay) < 1:
            raise SettingsError(f"average_decay must be in [0, 1) (0: no average), got {self.average_decay!r}")
        if not 0 < float(self.decay_fraction) <= 1:
            raise SettingsError(f"decay_fraction must be in (0, 1], got {self.decay_fraction!r}")
        _choice("schedule", self.schedule, SCHEDULES)
        if self.schedule == "hold-cosine" and self.schedule_unit != "step":
            raise SettingsError("schedule: hold-cosine counts steps (schedule_unit: step)")
        _choice("schedule_unit", self.schedule_unit, SCHEDULE_UNITS)
        _choice("precision", self.precision, PRECISIONS)
        if self.schedule_unit == "epoch" and self.epochs is None:
            raise SettingsError("schedule_unit: epoch needs the length in epochs")

    @property
    def input_size(self) -> int:
        """The side of one training image: the crop, or a mosaic of crops."""
        return self.crop * self.mosaic

    def steps_per_epoch(self, n_train: int) -> int:
        """Optimiser steps in one pass over ``n_train`` images at the global batch (last partial batch dropped)."""
        per_epoch = int(n_train) // self.batch_size
        if per_epoch == 0:
            raise SettingsError(f"{n_train} training images are fewer than one batch of {self.batch_size}")
        return per_epoch

    def steps_for(self, n_train: int) -> int:
        """Total optimiser steps: ``epochs * (n_train // batch_size)``, or the fixed ``steps``."""
        if self.steps is not None:
            return int(self.steps)
        return int(self.epochs) * self.steps_per_epoch(n_train)

    def epochs_for(self, n_train: int) -> float:
        """Passes over the data the run makes (fractional for a fixed step count)."""
        if self.epochs is not None:
            return float(self.epochs)
        return self.steps / max(1, int(n_train) // self.batch_size)


@dataclass(frozen=True)
class ModelSettings:
    """The STF size, the adapters' layout and the distortion metric of the loss."""

    stf: STFConfig = field(default_factory=STFConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    metric: str = "mse"

    def __post_init__(self) -> None:
        _choice("metric", self.metric, METRICS)


@dataclass(frozen=True)
class DataSettings:
    """Where images come from and how many are asked for.

    ``train_images``: at most this many training images (the OpenImages download
    count); None uses every image found. ``val_source``: ``held_out`` takes the last
    ``val_images`` of the training folder (a CPU choice), ``openimages-test`` the
    OpenImages test split (the reference), ``folder`` the folder ``val_dir``.
    ``cache``: keep decoded images in memory (None: decided by the folder's size).
    """

    kodak_dir: str | None = None
    train_dir: str | None = None
    train_source: str = "auto"
    train_images: int | None = None
    val_source: str = "held_out"
    val_dir: str | None = None
    val_images: int = 0
    val_crop: int = 256
    cache: bool | None = None

    def __post_init__(self) -> None:
        _choice("train_source", self.train_source, TRAIN_SOURCES)
        _choice("val_source", self.val_source, VAL_SOURCES)
        if self.train_images is not None and self.train_images <= 0:
            raise SettingsError(f"train_images must be positive or null, got {self.train_images}")
        if self.val_images < 0:
            raise SettingsError(f"val_images must be >= 0, got {self.val_images}")
        if self.val_source == "folder" and not self.val_dir:
            raise SettingsError("val_source: folder needs val_dir")


@dataclass(frozen=True)
class AnchorSettings:
    """The frozen base: its lambda, the weights a profile ships, the budget to train it when absent."""

    lmbda: float
    train: TrainingSettings
    weights: str | None = None

    @property
    def shipped_weights(self) -> Path | None:
        return PACKAGE_DIR / "weights" / self.weights if self.weights else None


@dataclass(frozen=True)
class ReferenceSettings:
    """Where the fixed-rate reference at each target lambda comes from.

    * ``full``: the ``full`` method (every weight fine-tuned from the anchor) stands in
      for it, labelled ``fixed-rate``.
    * ``scratch``: one model per target trained from random weights with exactly the
      anchor's recipe (``anchor.train``), as the paper's references are; the profile may
      ship them (``weights``, a file-name pattern with ``{lmbda}`` in ``alice_lib/weights``).
      A ``full`` method, if listed, is then its own curve, ``full``.
    * ``published``: checkpoints passed as ``reference_checkpoints`` (the paper profile).
    """

    source: str = "full"
    weights: str | None = None

    def __post_init__(self) -> None:
        _choice("references.source", self.source, REFERENCE_SOURCES)
        if self.weights is not None and "{lmbda}" not in self.weights:
            raise SettingsError("references.weights must contain '{lmbda}', e.g. cpu_fixed_{lmbda}.safetensors")

    def shipped_weights(self, lmbda: float) -> Path | None:
        """The file the profile ships for ``lmbda`` (it may not exist yet), or None."""
        if self.weights is None:
            return None
        return PACKAGE_DIR / "weights" / self.weights.format(lmbda=lmbda_tag(lmbda))


@dataclass(frozen=True)
class EpochCheck:
    """After each epoch, code ``images`` Kodak images (None: all) with real bitstreams into a CSV."""

    enabled: bool = False
    images: int | None = None


@dataclass(frozen=True)
class AdaptationSettings:
    """The methods trained at each target lambda, each with its resolved schedule."""

    methods: tuple[str, ...]
    schedules: Mapping[str, TrainingSettings]
    epoch_check: EpochCheck = field(default_factory=EpochCheck)
    weights: str | None = None  # shipped runs: a file-name pattern with {method} and {lmbda} in alice_lib/weights
    start: str = "anchor"  # each run starts from the anchor (the paper), or from its neighbour's result

    def __post_init__(self) -> None:
        for method in self.methods:
            _choice("adapt.methods", method, tuple(TRAINING_MODES))
        _choice("adapt.start", self.start, ADAPTATION_STARTS)
        if self.weights is not None and not ("{method}" in self.weights and "{lmbda}" in self.weights):
            raise SettingsError("adapt.weights must contain '{method}' and '{lmbda}', "
                                "e.g. cpu_{method}_{lmbda}.safetensors")

    def shipped_weights(self, method: str, lmbda: float) -> Path | None:
        """The file the profile ships for one adaptation run (it may not exist yet), or None.

        ``alice``: its adapter file; ``vanilla`` and ``full``: what they changed of the anchor,
        in float16 (:func:`~alice_lib.checkpoints.save_weight_delta`). Each with its training
        log beside it (``<name>.metrics.csv``).
        """
        if self.weights is None:
            return None
        return PACKAGE_DIR / "weights" / self.weights.format(method=method, lmbda=lmbda_tag(lmbda))

    def training(self, method: str) -> TrainingSettings:
        """The schedule of one method (the section's common keys with the method's own on top)."""
        _choice("method", method, tuple(TRAINING_MODES))
        return self.schedules[method]


@dataclass(frozen=True)
class EvaluationSettings:
    """What the evaluation codes and how it compares.

    ``curves_include_anchor``: whether the anchor's point joins every method's RD
    curve (False in the reference: a curve is the method's adapted models only).
    """

    datasets: tuple[str, ...] = ("kodak",)
    max_images: int | None = None
    methods: tuple[str, ...] = EVALUATED_METHODS
    classical: tuple[str, ...] = CLASSICAL
    qualities: Mapping[str, tuple[int, ...]] | None = None
    published_points: bool = False
    padding: str = "replicate"
    bd_methods: tuple[str, ...] = ("akima",)
    curves_include_anchor: bool = True

    def __post_init__(self) -> None:
        _choice("eval.padding", self.padding, PADDINGS)
        if not self.bd_methods:
            raise SettingsError("eval.bd_methods must name at least one of " + ", ".join(BD_METHODS))
        for name in self.bd_methods:
            _choice("eval.bd_methods", name, BD_METHODS)
        for name in self.methods:
            _choice("eval.methods", name, EVALUATED_METHODS)
        for name in self.classical:
            _choice("eval.classical", name, CLASSICAL)


@dataclass(frozen=True)
class ComplexitySettings:
    """``model: published`` measures the full-size STF, ``profile`` the profile's own size."""

    model: str = "profile"
    image: str = "kodim01.png"
    repeats: int = 3

    def __post_init__(self) -> None:
        _choice("complexity.model", self.model, ("published", "profile"))


# ----------------------------------------------------------------------------- the experiment
@dataclass(frozen=True)
class Settings:
    """A whole experiment, built once per run and read through its typed fields.

    ``raw`` is the profile as a dict after overrides (what :func:`save_settings` writes);
    equality compares the settings, not ``raw`` or ``source``.
    """

    name: str
    model: ModelSettings
    data: DataSettings
    anchor: AnchorSettings
    targets: tuple[float, ...]
    adaptation: AdaptationSettings
    evaluation: EvaluationSettings
    complexity: ComplexitySettings
    references: ReferenceSettings = field(default_factory=ReferenceSettings)
    use_shipped: bool = True  # False: every weight file the profile names is ignored and trained here instead
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    source: str = field(default="", compare=False)  # where it was read from: provenance, not a setting

    def result_label(self, method: str) -> str:
        """How a trained method is labelled in results: its name, except that ``full`` is the
        fixed-rate curve when the references are its models (``references.source: full``)."""
        _choice("method", method, tuple(TRAINING_MODES))
        if method == "full" and self.references.source == "full":
            return "fixed-rate"
        return method

    def references_to_train(self, run_dir: str | os.PathLike | None = None) -> tuple[float, ...]:
        """Targets whose reference 02_fixed_rate trains from scratch: ``references.source: scratch``,
        no weights shipped for that lambda and none already in the run folder."""
        if self.references.source != "scratch":
            return ()
        layout = RunLayout(run_dir) if run_dir is not None else None
        return tuple(t for t in self.targets
                     if not ((p := self.references.shipped_weights(t)) and p.exists())
                     and not (layout and layout.fixed_rate(t).exists()))

    def start_of(self, lmbda: float) -> float | None:
        """The target whose trained run an adaptation at ``lmbda`` starts from, or None: the anchor.

        ``adapt.start: anchor`` (the paper's independent adapters): always None.
        ``neighbour`` (the progressive scheme of Xu, Huang and Wu, 2026): the next target
        on the way from ``lmbda`` to the anchor's lambda, so the runs go outwards from the
        anchor, each from the last one's result.
        """
        if self.adaptation.start == "anchor":
            return None
        between = [t for t in self.targets
                   if min(lmbda, self.anchor.lmbda) < t < max(lmbda, self.anchor.lmbda)]
        return min(between, key=lambda t: abs(math.log(t / lmbda)), default=None)

    def adaptation_order(self) -> tuple[float, ...]:
        """The targets in the order they can be trained: any order starting from the anchor,
        outwards from it when each run starts from its neighbour."""
        if self.adaptation.start == "anchor":
            return self.targets
        return tuple(sorted(self.targets, key=lambda t: abs(math.log(t / self.anchor.lmbda))))

    @property
    def lmbdas(self) -> tuple[float, ...]:
        """Every lambda of the experiment: the anchor's and the targets, ascending."""
        return tuple(sorted({self.anchor.lmbda, *self.targets}))


# ----------------------------------------------------------------------------- loading
def profile_path(profile: str | os.PathLike) -> Path:
    """A profile name (``smoke``, ``cpu``, ``paper``) or a YAML path, as a path that exists."""
    path = Path(profile)
    if not path.suffix:
        path = PROFILE_DIR / f"{profile}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml") if not p.stem.startswith("lora_"))
        raise SettingsError(f"unknown profile {profile!r}: no {path} (known: {', '.join(known)})")
    return path


def load_settings(profile: str | os.PathLike | Mapping | Settings,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """Load, override and validate a profile; a :class:`Settings` passes through (with overrides applied)."""
    if isinstance(profile, Settings):
        raw, source = copy.deepcopy(dict(profile.raw)), profile.source
    elif isinstance(profile, Mapping):
        raw, source = _plain(profile), "<dict>"
    else:
        path = profile_path(profile)
        raw, source = yaml.safe_load(path.read_text()) or {}, str(path)
    for key, value in (overrides or {}).items():
        if key.startswith("lora.") and isinstance(raw.get("lora"), str):
            raw["lora"] = _lora(raw["lora"]).to_dict()  # a named file: its keys, so that one of them can change
        _set_dotted(raw, key, _plain(value))  # as a YAML profile would say it: save_settings writes raw
    try:
        return _build(raw, source)
    except (TypeError, ValueError) as error:  # SettingsError, and the models' own config checks
        raise SettingsError(f"profile {source}: {error}") from error


def save_settings(settings: Settings, path: str | os.PathLike) -> Path:
    """Write ``settings`` as a profile YAML (overrides applied) that loads back to equal settings.

    ``alice run`` writes it once into the run folder and gives its path to every notebook,
    so that all of them run on the same settings even if the profile is edited meanwhile.
    """
    text = (f"# The settings of this run: {settings.source}, overrides applied (written by alice run).\n"
            + yaml.safe_dump(dict(settings.raw), sort_keys=False))
    atomic_write_bytes(path, text.encode())
    if load_settings(path) != settings:  # e.g. a value YAML cannot carry
        raise SettingsError(f"{path} does not load back to the settings it was written from")
    return Path(path)


def _plain(value: Any) -> Any:
    """Dicts, lists and scalars only, what a YAML profile holds (overrides may bring tuples or paths)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def split_parameters(parameters: Mapping[str, Any] | None) -> tuple[dict, dict]:
    """``(overrides, notebook_parameters)`` from ``-p KEY=VALUE`` pairs.

    Dotted keys and top-level profile keys (``targets``) are settings overrides;
    the rest are notebook parameters (:data:`NOTEBOOK_PARAMETERS`).
    """
    overrides, notebook = {}, {}
    for key, value in (parameters or {}).items():
        if "." in key or key in _SECTIONS:
            overrides[key] = value
        elif key in NOTEBOOK_PARAMETERS:
            notebook[key] = value
        else:
            raise SettingsError(f"unknown parameter {key!r}: use a dotted setting (e.g. adapt.epochs=2) or one of "
                                f"{', '.join(NOTEBOOK_PARAMETERS)}")
    return overrides, notebook


_SECTIONS = ("name", "model", "lora", "metric", "data", "anchor", "references", "targets", "adapt", "eval",
             "complexity", "use_shipped")
_TRAINING_KEYS = {f.name for f in fields(TrainingSettings)}


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise SettingsError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    """``raw[a][b] = value`` for ``key = "a.b"`` (intermediate sections created)."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SettingsError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[leaf] = value


def _build(raw: dict, source: str) -> Settings:
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        raise SettingsError(f"unknown sections {sorted(unknown)}")
    for key in ("name", "anchor", "targets", "adapt"):
        if key not in raw:
            raise SettingsError(f"lacks the section {key!r}")
    model = ModelSettings(stf=STFConfig(**(raw.get("model") or {})), lora=_lora(raw.get("lora", "lora_8_8.yaml")),
                          metric=raw.get("metric", "mse"))
    use_shipped = raw.get("use_shipped", True)
    if not isinstance(use_shipped, bool):
        raise SettingsError(f"use_shipped must be true or false, got {use_shipped!r}")
    anchor = dict(raw["anchor"])
    weights = anchor.pop("weights", None)
    anchor_settings = AnchorSettings(lmbda=float(anchor.pop("lmbda")), weights=weights if use_shipped else None,
                                     train=_training("anchor.train", anchor.pop("train", {})))
    _no_extra("anchor", anchor)
    targets = tuple(float(t) for t in raw["targets"])
    if not targets or any(t <= 0 for t in targets):
        raise SettingsError(f"targets must be positive lambdas, got {raw['targets']!r}")
    return Settings(name=str(raw["name"]), model=model, data=_section(DataSettings, "data", raw.get("data")),
                    anchor=anchor_settings, targets=targets, adaptation=_adaptation(raw["adapt"], use_shipped),
                    evaluation=_evaluation(raw.get("eval") or {}),
                    complexity=_section(ComplexitySettings, "complexity", raw.get("complexity")),
                    references=_references(raw.get("references"), use_shipped), use_shipped=use_shipped,
                    raw=raw, source=source)


def _references(spec: Mapping | None, use_shipped: bool) -> ReferenceSettings:
    references = _section(ReferenceSettings, "references", spec)
    return references if use_shipped else replace(references, weights=None)


def _lora(spec: str | Mapping) -> LoRAConfig:
    if isinstance(spec, Mapping):
        return LoRAConfig.from_dict(dict(spec))
    return LoRAConfig.from_yaml(PROFILE_DIR / spec if not Path(spec).is_absolute() else spec)


def _no_extra(section: str, leftover: Mapping) -> None:
    if leftover:
        raise SettingsError(f"{section}: unknown keys {sorted(leftover)}")


def _section(cls, name: str, spec: Mapping | None):
    """A flat section as its dataclass; unknown keys are an error, not silently ignored."""
    spec = dict(spec or {})
    known = {f.name for f in fields(cls)}
    _no_extra(name, {k: v for k, v in spec.items() if k not in known})
    return cls(**spec)


def _training(name: str, spec: Mapping) -> TrainingSettings:
    spec = dict(spec)
    _no_extra(name, {k: v for k, v in spec.items() if k not in _TRAINING_KEYS})
    try:
        return TrainingSettings(**spec)
    except TypeError as error:
        raise SettingsError(f"{name}: {error}") from error
    except SettingsError as error:
        raise SettingsError(f"{name}: {error}") from error


def _adaptation(spec: Mapping, use_shipped: bool = True) -> AdaptationSettings:
    spec = dict(spec)
    weights = spec.pop("weights", None)
    start = spec.pop("start", "anchor")
    methods = tuple(spec.pop("methods", tuple(TRAINING_MODES)))
    per_method = {m: dict(spec.pop(m) or {}) for m in TRAINING_MODES if m in spec}
    check = spec.pop("epoch_check", {}) or {}
    check = EpochCheck(**check) if isinstance(check, Mapping) else EpochCheck(enabled=bool(check))
    # Every method gets a schedule, listed or not: a notebook may train one the profile does not list.
    schedules = {m: _training(f"adapt.{m}", {**spec, **per_method.get(m, {})}) for m in TRAINING_MODES}
    return AdaptationSettings(methods=methods, schedules=schedules, epoch_check=check,
                              weights=weights if use_shipped else None, start=start)


def _evaluation(spec: Mapping) -> EvaluationSettings:
    spec = dict(spec)
    for key in ("datasets", "methods", "classical", "bd_methods"):
        if key in spec:
            spec[key] = tuple(spec[key])
    if spec.get("qualities") is not None:
        spec["qualities"] = {k: tuple(v) for k, v in spec["qualities"].items()}
    return _section(EvaluationSettings, "eval", spec)


__all__ = [
    "Settings", "ModelSettings", "DataSettings", "AnchorSettings", "TrainingSettings", "AdaptationSettings",
    "EpochCheck", "EvaluationSettings", "ComplexitySettings", "ReferenceSettings", "REFERENCE_SOURCES",
    "SettingsError", "load_settings", "save_settings", "split_parameters", "profile_path",
    "TRAINING_MODES", "RESULT_LABEL", "EVALUATED_METHODS", "PROFILE_DIR", "PACKAGE_DIR",
]
