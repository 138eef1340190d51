"""The configuration of one training run (:class:`TrainConfig`), built from a profile's schedule in one place.

A profile describes a schedule as a :class:`~alice_lib.settings.TrainingSettings`
(length in epochs or steps, crops, learning rate ...); :meth:`TrainConfig.from_schedule`
turns it, with the run's lambda, the loss metric and the number of training images,
into what the loop needs. The pipeline's notebooks and ``alice train`` both build
their configuration there and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..settings import PRECISIONS, SCHEDULE_UNITS, SCHEDULES, TrainingSettings

METRICS = ("mse", "ms-ssim")
OPTIMIZERS = ("adam", "sgd")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    ``batch_size`` is the global batch: under ``torchrun`` with W processes each
    process takes ``batch_size // W`` images of every batch (W must divide it), so a
    step sees ``batch_size`` images whatever W is.

    ``schedule``: ``"hold-cosine"`` keeps ``lr`` for the first ``1 - decay_fraction`` of
    the steps and then anneals it to zero along a cosine (:class:`~.optim.HoldThenCosine`):
    a long run can be extended while it holds, and a constant run resumes into it.
    ``schedule_unit`` (cosine only): ``"step"`` anneals over ``steps`` and steps the
    schedule after every optimisation step; ``"epoch"`` anneals over the number of
    epochs, ``ceil(steps / steps_per_epoch)``, and steps it once per epoch (the ALICE
    reference's way). An epoch is ``steps_per_epoch`` steps (``None``: one pass over
    the training set); validation, the CSV row and ``best.pt`` come once per epoch.

    ``checkpoint_every``: also write ``last.pt`` every N steps within an epoch (an
    epoch of 300,000 images is 18,750 steps); a resume continues the same epoch at
    the next batch, bit-exactly. ``checkpoint_frozen=False``: checkpoints keep only
    the trainable parameters and a hash of the frozen rest (see :mod:`.state`).
    ``precision``: ``"bf16"`` runs the model's forward pass under bfloat16 autocast
    (CUDA or CPU; the loss is computed in float32); ``"auto"`` does so only where
    bfloat16 has hardware behind it (:func:`fast_bf16`), and the precision that ran
    is a column of ``metrics.csv``. ``tf32``: allow TF32 matmuls and convolutions on
    CUDA during the run (``False`` turns cuDNN's default TF32 off too: plain float32).
    ``hyper_lr_scale``: the hyperprior path learns at ``lr`` times this
    (:mod:`.hyperprior`). ``average_decay``: keep an exponential moving average of
    the trained weights with this decay (0: none; :class:`~.optim.WeightAverage`);
    validation and ``best.pt`` then judge the average, and
    ``load_weights(..., averaged=True)`` loads it. ``num_workers``: DataLoader worker
    processes; ``None`` picks 0 on the CPU and up to 8 per process on a GPU (memory
    is then pinned); the crops do not depend on it.
    """

    lmbda: float
    steps: int
    batch_size: int = 8
    lr: float = 1e-4
    aux_lr: float = 1e-3
    optimizer: str = "adam"  # "adam" | "sgd"
    schedule: str = "cosine"  # "cosine" | "plateau" | "constant" | "hold-cosine"
    decay_fraction: float = 0.2  # hold-cosine: the cosine takes the last fraction of the steps
    schedule_unit: str = "step"  # "step" | "epoch" (cosine: T_max in steps or in epochs)
    clip_max_norm: float = 1.0  # 0: no clipping
    metric: str = "mse"  # "mse" | "ms-ssim"
    seed: int = 0
    num_workers: int | None = None  # None: 0 on CPU, up to 8 per process on CUDA
    steps_per_epoch: int | None = None  # None: one pass over the training set
    checkpoint_every: int | None = None  # also write last.pt every N steps within an epoch
    checkpoint_frozen: bool = True  # False: checkpoints hold the trainable parameters only (+ frozen_hash)
    precision: str = "fp32"  # "fp32" | "bf16" (autocast of the forward pass) | "auto" (bf16 where it is fast)
    tf32: bool = False  # TF32 matmul / cuDNN on CUDA
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    plateau_factor: float = 0.5  # "plateau": lr *= factor after `patience` epochs without improvement
    plateau_patience: int = 4  # (validation loss, else the epoch's training loss)
    ddp_find_unused_parameters: bool = False
    hyper_lr_scale: float = 1.0  # learning rate of the hyperprior path (h_a, h_s, bottleneck) = lr x this
    average_decay: float = 0.0  # > 0: keep an exponential moving average of the weights (validated and shipped)

    @classmethod
    def from_schedule(cls, schedule: TrainingSettings, lmbda: float, metric: str, n_train: int,
                      checkpoint_frozen: bool = True) -> TrainConfig:
        """The run of a profile's schedule at ``lmbda`` on ``n_train`` images: the one place a config is built.

        Epoch-length schedules become steps from the data found (``epochs * (n_train //
        batch)``, one validation per epoch); step-length ones validate every
        ``validate_every`` steps (None: every pass over the data). Adaptation runs pass
        ``checkpoint_frozen=False``: their checkpoints keep what trains only.
        """
        by_epoch = schedule.epochs is not None
        return cls(lmbda=float(lmbda), steps=schedule.steps_for(n_train), batch_size=schedule.batch_size,
                   lr=float(schedule.lr), schedule=schedule.schedule, schedule_unit=schedule.schedule_unit,
                   steps_per_epoch=schedule.steps_per_epoch(n_train) if by_epoch else schedule.validate_every,
                   metric=metric, seed=schedule.seed, num_workers=schedule.num_workers,
                   checkpoint_every=schedule.checkpoint_every, checkpoint_frozen=checkpoint_frozen,
                   precision=schedule.precision, tf32=schedule.tf32, hyper_lr_scale=float(schedule.hyper_lr_scale),
                   average_decay=float(schedule.average_decay), decay_fraction=float(schedule.decay_fraction))

    def __post_init__(self) -> None:
        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "schedule_unit": SCHEDULE_UNITS,
                   "metric": METRICS, "precision": PRECISIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {allowed}")
        if self.steps <= 0:
            raise ValueError("steps must be positive")
        if self.batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if not (self.lr > 0 and self.aux_lr > 0):
            raise ValueError("lr and aux_lr must be positive")
        if self.lmbda < 0:
            raise ValueError("lmbda must not be negative")
        if self.clip_max_norm < 0:
            raise ValueError("clip_max_norm must be >= 0 (0 disables clipping)")
        if not 0 <= self.average_decay < 1:
            raise ValueError("average_decay must be in [0, 1) (0: no moving average)")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError("decay_fraction must be in (0, 1]")
        if self.schedule == "hold-cosine" and self.schedule_unit != "step":
            raise ValueError("schedule hold-cosine counts steps (schedule_unit 'step')")
        if not self.hyper_lr_scale > 0:
            raise ValueError("hyper_lr_scale must be positive (1: the hyperprior learns at lr)")
        for name in ("steps_per_epoch", "checkpoint_every"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (or None)")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError("num_workers must be >= 0 (or None for automatic)")
        if not 0 < self.plateau_factor < 1:
            raise ValueError("plateau_factor must be in (0, 1)")

    def per_process_batch(self, world: int) -> int:
        """Images per process and step under ``world`` processes; a clear error if ``world`` does not divide."""
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} is the global batch and must be divisible by the "
                             f"number of processes ({world})")
        return self.batch_size // world

    def epochs(self, steps_per_epoch: int) -> int:
        """Number of epochs of a run of ``steps`` steps, the last one possibly short."""
        return -(-self.steps // steps_per_epoch)


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix units serve ``device``: a CUDA GPU that supports bf16, or a CPU with AMX-BF16.

    Without AMX, a CPU emulates bf16 matmuls with AVX-512 and a training step of the CPU
    profile gets slower, not faster (measured 1.5x slower on a 2-core Xeon without AMX;
    1.8-2.3x faster on one with it, ``docs/cpu-scale/README.md``).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags.split()


def resolved_precision(precision: str, device: torch.device) -> str:
    """``"fp32"`` or ``"bf16"``: what ``precision`` (``"auto"`` included) means on ``device``."""
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision
