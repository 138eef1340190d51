"""``alice train``: one training run of a profile, configured as ``alice run`` is (``-p section.key=value``).

Without ``--method`` the run is the profile's fixed-rate recipe, ``anchor.train``: a
model from random weights (or ``--init``) at ``--lmbda``, by default the anchor's,
as ``02_fixed_rate`` trains the anchor and the references. ``--method alice|vanilla|full``
adapts a model at ``--lmbda`` with the schedule ``adapt.<method>``, as ``03_adapt``
does, from ``--init`` (by default the anchor the profile ships). Every number comes
from the profile and its overrides; :meth:`~.config.TrainConfig.from_schedule` turns
them into the loop's configuration. Under ``torchrun`` every process runs this:
``torchrun --nproc_per_node=2 -m alice_lib.cli train ...`` (gloo on the CPU, nccl on
GPUs); ``batch_size`` is the global batch, split evenly over the processes.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from dataclasses import MISSING, fields
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import Dataset

from ..data import SyntheticImages
from ..data_sources import OPENIMAGES_TRAIN_IMAGES, resolve_training, resolve_validation
from ..models.stf import STFConfig
from ..settings import (METRICS, TRAINING_MODES, DataSettings, Settings, TrainingSettings, load_settings,
                        split_parameters)
from ..utils import state_dict_hash
from .config import TrainConfig
from .loop import train
from .prepare import ENTROPY_MODEL_ALIAS, also_trained, prepare_method, start_model, training_data
from .state import dist_info

RANDOM_INIT = "random"  # --init random: random weights whatever the method


def overrides_help() -> str:
    """The methods and the settings ``-p`` can override, listed from the settings' own fields (the help's epilog)."""
    def keys(cls, skip: tuple[str, ...] = ()) -> str:
        text = ", ".join(_field_text(f) for f in fields(cls) if f.name not in skip)
        return textwrap.fill(text, width=100, initial_indent="    ", subsequent_indent="    ")

    return "\n".join([
        f"methods (--method): {', '.join(TRAINING_MODES)}",
        "",
        "overrides (-p KEY=VALUE, VALUE as YAML; defaults shown; `alice plan --profile P` prints a profile's):",
        "  the schedule: anchor.train.KEY without --method; adapt.KEY or adapt.METHOD.KEY with --method",
        keys(TrainingSettings),
        f"    (also_train: modules an adaptation trains as well, '{ENTROPY_MODEL_ALIAS}' for the whole entropy model)",
        "  the lambda of a run without --lmbda: anchor.lmbda",
        "  the data: data.KEY", keys(DataSettings, skip=("kodak_dir",)),
        "  the model: model.KEY", keys(STFConfig),
        f"  the loss: metric={'|'.join(METRICS)}; the adapters' layout: lora=FILE.yaml (in alice_lib/profiles)",
        "",
        "examples:",
        "  alice train --profile cpu --train-dir runs/v2-anchor -p anchor.train.hyper_init_gain=300 \\",
        "    -p anchor.train.hyper_lr_scale=0.125 -p anchor.train.steps=8000     # recipe v2's anchor",
        "  alice train --profile cpu --train-dir runs/alice-0.0018 --method alice --lmbda 0.0018 -p adapt.steps=1200",
        "  (the CPU-scale pilot's runs: benchmarks/cpu_scale_pilot.py)"])


def _field_text(f) -> str:
    """``name=default`` as YAML would write the default (``name`` alone for a required field)."""
    if f.default is MISSING and f.default_factory is MISSING:
        return f.name
    value = f.default if f.default is not MISSING else f.default_factory()
    text = yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True)
    return f"{f.name}={text.removesuffix(chr(10)).removesuffix('...').strip()}"


def run(args: argparse.Namespace, parameters: dict) -> dict:
    """The run ``alice train`` describes (parsed by :func:`alice_lib.cli.build_parser`); its last metrics row."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device, launched = _device(args)
    rank, _ = dist_info()
    try:
        settings = _settings(args.profile, parameters)
        schedule = settings.anchor.train if args.method is None else settings.adaptation.training(args.method)
        lmbda = _lmbda(args, settings)
        model = start_model(settings.model.stf, schedule, _init(args, settings))
        extra = {"model_config": settings.model.stf.to_dict(), "mode": args.method or "full", "lmbda": lmbda}
        if args.method is not None:
            prepare_method(model, args.method, settings.model.lora, schedule)
            extra.update(_adaptation_state(settings, args.method, schedule))
        elif schedule.also_train:
            raise ValueError("anchor.train.also_train: a model trained from its first weights trains every weight")
        train_set, val_set = _datasets(args, settings, schedule)
        config = TrainConfig.from_schedule(schedule, lmbda, settings.model.metric, len(train_set),
                                           checkpoint_frozen=args.method is None)
        row = train(model.to(device), train_set, args.train_dir, config, val_data=val_set,
                    resume=not args.no_resume, extra_state=extra, progress=not args.no_progress)
        _write_hash(args.hash_file, model, rank)
        if rank == 0:
            print({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        return row
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()


def _settings(profile: str, parameters: dict) -> Settings:
    overrides, notebook = split_parameters(parameters)
    if notebook:
        raise ValueError(f"{sorted(notebook)} are parameters of `alice run`'s notebooks; alice train takes "
                         "settings (data.train_dir=..., anchor.train.lr=...)")
    return load_settings(profile, overrides)


def _lmbda(args: argparse.Namespace, settings: Settings) -> float:
    if args.lmbda is not None:
        return float(args.lmbda)
    if args.method is not None:
        raise ValueError(f"--method {args.method} needs the --lmbda to adapt to")
    return settings.anchor.lmbda


def _init(args: argparse.Namespace, settings: Settings) -> Path | None:
    """The first weights: ``--init``; for a method, by default the profile's shipped anchor; else random."""
    if args.init == RANDOM_INIT:
        return None
    if args.init:
        return Path(args.init)
    if args.method is None:
        return None
    shipped = settings.anchor.shipped_weights
    if shipped is None or not shipped.exists():
        raise ValueError(f"--method {args.method} adapts a trained model and profile {settings.name} ships none: "
                         f"give --init PATH (or --init {RANDOM_INIT})")
    return shipped


def _adaptation_state(settings: Settings, method: str, schedule: TrainingSettings) -> dict:
    """What an adaptation's checkpoints record beside the weights: the adapters' layout, the extra modules."""
    state = {"lora_config": settings.model.lora.to_dict()} if TRAINING_MODES[method] != "full" else {}
    if schedule.also_train:
        state["also_train"] = also_trained(schedule)
    return state


def _datasets(args: argparse.Namespace, settings: Settings, schedule: TrainingSettings) -> tuple[Dataset,
                                                                                                Dataset | None]:
    """The training and validation images: ``--synthetic N`` smooth images, or the data settings' folders.

    The folders are found as ``01_data`` finds them (``data.train_dir``, else the nearby
    photographs) but never downloaded here.
    """
    spec = settings.data
    if args.synthetic:
        val = (SyntheticImages(spec.val_images, spec.val_crop, train=False, seed=schedule.seed + 1)
               if spec.val_images else None)
        return SyntheticImages(args.synthetic, schedule.crop, seed=schedule.seed), val
    train_dir = resolve_training(spec.train_dir, source=spec.train_source, allow_download=False,
                                 n_images=spec.train_images or OPENIMAGES_TRAIN_IMAGES).path
    val = resolve_validation(spec.val_source, spec.val_dir, spec.val_images, allow_download=False)
    return training_data(train_dir, spec, schedule, val.path if val is not None else None)


def _device(args: argparse.Namespace) -> tuple[torch.device, bool]:
    """(device, launched by torchrun); joins the process group when there is one."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cuda = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
    if launched and not dist.is_initialized():
        dist.init_process_group(args.backend or ("nccl" if cuda else "gloo"))
    if not cuda:
        return torch.device("cpu"), launched
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device, launched


def _write_hash(pattern: str | None, model: nn.Module, rank: int) -> None:
    """Each rank's state-dict SHA-256 into ``pattern`` (``{rank}`` replaced), for the DDP checks."""
    if not pattern:
        return
    path = Path(pattern.replace("{rank}", str(rank)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(state_dict_hash(model) + "\n")
