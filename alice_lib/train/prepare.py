"""What a run starts from: its model's first weights, the parameters its method trains, its images.

Shared by the pipeline's notebooks (``02_fixed_rate``, ``03_adapt``) and ``alice train``,
so that a run started either way starts the same.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset, Subset

from ..checkpoints import load_state_dict_checked, read_checkpoint
from ..data import ImageFolder, Mosaics
from ..lora import LoRAConfig, inject_lora, mark_trainable
from ..models.stf import STFConfig, SymmetricalTransFormer
from ..settings import TRAINING_MODES, DataSettings, TrainingSettings
from .hyperprior import amplify_hyper_latent

#: ``also_train`` shorthand for every module of the entropy model (hyperprior, slice transforms, LRP).
ENTROPY_MODEL_ALIAS = "entropy"


def start_model(config: STFConfig, schedule: TrainingSettings,
                init: str | os.PathLike | None = None) -> SymmetricalTransFormer:
    """An STF of ``config``: the weights of ``init`` (a model file or a training checkpoint), or random ones.

    Random weights are seeded by the schedule, and the hyperprior starts as its
    ``hyper_init_gain`` says (:mod:`.hyperprior`); given weights are never rescaled.
    """
    torch.manual_seed(schedule.seed)
    model = SymmetricalTransFormer(config)
    if init is None:
        amplify_hyper_latent(model, schedule.hyper_init_gain)
    else:
        state, _, _ = read_checkpoint(init)
        load_state_dict_checked(model, state, source=str(init))
    return model


def also_trained(schedule: TrainingSettings) -> list[str]:
    """The schedule's ``also_train`` modules, with ``entropy`` spelled out (an ablation's extra modules)."""
    return [module for name in schedule.also_train
            for module in (SymmetricalTransFormer.ENTROPY_MODEL if name == ENTROPY_MODEL_ALIAS else (name,))]


def prepare_method(model: SymmetricalTransFormer, method: str, lora: LoRAConfig,
                   schedule: TrainingSettings) -> list[str]:
    """Make ``model`` train as ``method`` does (adapters injected for ``alice``); the names of what trains.

    The adapters are initialised from the schedule's seed; ``also_train`` adds whole
    modules to what an adaptation trains (ablations, not the paper's methods).
    """
    if method not in TRAINING_MODES:
        raise ValueError(f"unknown method {method!r}; choose one of {tuple(TRAINING_MODES)}")
    also = also_trained(schedule)
    if also and TRAINING_MODES[method] == "full":
        raise ValueError("also_train goes with the methods that freeze something (alice, vanilla); "
                         "full trains every weight already")
    if method == "alice":
        inject_lora(model, lora, generator=torch.Generator().manual_seed(schedule.seed))
    return mark_trainable(model, TRAINING_MODES[method], lora, also)


def training_data(train_dir: str | os.PathLike, data: DataSettings, schedule: TrainingSettings,
                  val_dir: str | os.PathLike | None = None) -> tuple[Dataset, Dataset | None]:
    """Random-crop training images (mosaics where the schedule asks) and the validation set (centre crops).

    ``data.val_source: held_out`` takes the last ``val_images`` of the training folder
    (at most a quarter of it); otherwise the images of ``val_dir`` validate, e.g. the
    OpenImages test split.
    """
    train_set = ImageFolder(train_dir, schedule.crop, train=True, max_images=data.train_images, cache=data.cache,
                            flip=schedule.flip)
    if data.val_source != "held_out":
        if val_dir is None:
            raise ValueError(f"val_source {data.val_source!r} needs a validation folder")
        val_set = ImageFolder(val_dir, data.val_crop, train=False, max_images=data.val_images or None,
                              cache=data.cache)
        return _mosaics(train_set, schedule), val_set
    n_val = min(data.val_images, len(train_set) // 4)
    if n_val == 0:
        return _mosaics(train_set, schedule), None
    val_set = ImageFolder(train_dir, data.val_crop, train=False, max_images=data.train_images, cache=data.cache)
    if len(val_set) != len(train_set):  # a different crop skipped other files: validate on the train crops
        val_set = ImageFolder(train_dir, schedule.crop, train=False, max_images=data.train_images, cache=data.cache)
    split = len(train_set) - n_val
    return _mosaics(Subset(train_set, range(split)), schedule), Subset(val_set, range(split, len(val_set)))


def _mosaics(train_set: Dataset, schedule: TrainingSettings) -> Dataset:
    """The training crops, tiled into mosaics where the schedule asks (validation stays plain crops)."""
    return Mosaics(train_set, schedule.mosaic) if schedule.mosaic > 1 else train_set

