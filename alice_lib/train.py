"""Rate-distortion training: one loop for fixed-rate models, vanilla fine-tuning and ALICE adapters.

What trains is decided before the loop, by ``requires_grad`` (see
:func:`alice_lib.lora.mark_trainable`): the loop optimises every parameter that
requires a gradient. The bottleneck quantiles (CompressAI's auxiliary loss) get
their own optimizer when they are trainable, as in CompressAI's example script.

:func:`train` is four named steps, each on one screen: :func:`_setup` (optimizers,
schedule, data order), :func:`_resume` (``last.pt``), :func:`_train_step` (one
optimisation step) and :func:`_end_epoch` (metrics row, validation, schedule,
checkpoints).

**Data order.** ``batch_size`` is the *global* batch. Step ``i`` of epoch ``e``
takes positions ``i*B .. (i+1)*B`` of the epoch's sequence of images (passes over
the data, each a permutation fixed by the seed, the epoch and the pass; see
:class:`GlobalBatchSampler`); under ``torchrun`` with W processes rank ``r``
takes slice ``r`` of that global batch (``B / W`` images), so W processes see
exactly the batches one process sees. Each image's random crop is drawn from a
generator seeded by (seed, epoch, position): crops do not depend on the number of
DataLoader workers or processes, and a run resumes mid-epoch at the right batch.

**Files.** A run folder holds ``last.pt`` (written at the end of every epoch and,
with ``checkpoint_every``, every N steps within an epoch; atomically), ``best.pt``
(lowest validation loss; without validation data, the final state) and
``metrics.csv`` (one row per epoch). With ``checkpoint_frozen=False`` (adaptation
runs) the two checkpoints hold only the parameters that train, plus ``frozen_hash``,
the SHA-256 of everything else: an adapter run's ``last.pt`` is then a few hundred
kB instead of the whole model, small enough to commit or to carry between machines,
and :func:`load_weights` puts it back only onto the same frozen weights. Calling
:func:`train` again on the same folder resumes where ``last.pt`` left off: step,
epoch, position in the epoch, optimizers, scheduler and random state, so that an
interrupted and resumed run ends with the same weights, bit for bit, as an
uninterrupted one (same hardware, same thread count, same number of processes).

**More than one process.** :func:`train` wraps the model in
``DistributedDataParallel`` when ``torch.distributed`` is initialised; only rank 0
writes checkpoints and the CSV and shows the progress bar. The quantisation noise
is drawn per rank (seed + rank; rank 0's stream is that of a one-process run) and
the checkpoint keeps every rank's random state. A 2-process run therefore equals a
1-process run with the same global batch up to that noise (and floating-point
summation order); ``tests/test_train.py`` checks it with the noise made a function
of the latent values. Every rank validates on the whole validation set; the CSV's
training columns are averaged over the ranks. The folder must be shared by all
ranks (one node).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from pytorch_msssim import ms_ssim
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .utils import (atomic_copy, atomic_save, atomic_write, bpp_from_likelihoods, model_device, psnr_from_mse,
                    tensors_hash)
from .utils import state_dict_hash  # noqa: F401 - the CLI's --hash-file; kept importable from here

# Unchanged since the first version: later versions only add optional keys
# (rng_cuda, rng_per_rank, world_size, in_epoch), and read checkpoints that lack them.
CHECKPOINT_FORMAT = "alice-train-v1"
_CHECKPOINT_KEYS = frozenset({"format", "model", "optimizer", "aux_optimizer", "scheduler", "rng", "rng_cuda",
                              "rng_per_rank", "world_size", "train_config", "step", "epoch", "best_loss",
                              "in_epoch", "frozen_hash", "average"})
# Settings that change how a run is executed, not its numbers: a resume with other values is silent.
_RESULT_NEUTRAL = frozenset({"num_workers", "checkpoint_every", "checkpoint_frozen", "ddp_find_unused_parameters"})


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (the profiles in ``alice_lib/profiles`` set them).

    ``batch_size`` is the global batch: under ``torchrun`` with W processes each
    process takes ``batch_size // W`` images of every batch (W must divide it), so a
    step sees ``batch_size`` images whatever W is.

    ``schedule_unit`` (cosine only): ``"step"`` anneals over ``steps`` and steps the
    schedule after every optimisation step; ``"epoch"`` anneals over the number of
    epochs, ``ceil(steps / steps_per_epoch)``, and steps it once per epoch (the ALICE
    reference's way). An epoch is ``steps_per_epoch`` steps (``None``: one pass over
    the training set); validation, the CSV row and ``best.pt`` come once per epoch.

    ``checkpoint_every``: also write ``last.pt`` every N steps within an epoch (an
    epoch of 300,000 images is 18,750 steps); a resume continues the same epoch at
    the next batch, bit-exactly. ``checkpoint_frozen=False``: checkpoints keep only
    the trainable parameters and a hash of the frozen rest (see the module's
    docstring). ``precision``: ``"bf16"`` runs the model's forward
    pass under bfloat16 autocast (CUDA or CPU; the loss is computed in float32);
    ``"auto"`` does so only where bfloat16 has hardware behind it (:func:`fast_bf16`),
    and the precision that ran is a column of ``metrics.csv``.
    ``tf32``: allow TF32 matmuls and convolutions on CUDA during the run (``False``
    turns cuDNN's default TF32 off too: plain float32). ``average_decay``: keep an
    exponential moving average of the trained weights with this decay (0: none; see
    :class:`WeightAverage`); validation and ``best.pt`` then judge the average, and
    ``load_weights(..., averaged=True)`` loads it. ``num_workers``: DataLoader
    worker processes; ``None`` picks 0 on the CPU and up to 8 per process on a GPU
    (memory is then pinned); the crops do not depend on it.
    """

    lmbda: float
    steps: int
    batch_size: int = 8
    lr: float = 1e-4
    aux_lr: float = 1e-3
    optimizer: str = "adam"  # "adam" | "sgd"
    schedule: str = "cosine"  # "cosine" | "plateau" | "constant"
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
    hyper_quantization: str = "ste"  # "ste" (STF) | "noise": the hyper-latent in training, see STF's attribute
    hyper_rate_warmup: int = 0  # steps over which the hyper-latent's rate enters the loss, weight 0 -> 1
    hyper_lr_scale: float = 1.0  # learning rate of the hyperprior path (h_a, h_s, bottleneck) = lr x this
    average_decay: float = 0.0  # > 0: keep an exponential moving average of the weights (validated and shipped)

    @classmethod
    def from_schedule(cls, schedule, lmbda: float, metric: str, n_train: int) -> TrainConfig:
        """The run of a :class:`~alice_lib.settings.TrainingSettings` schedule on ``n_train`` images.

        Epoch-length schedules become steps from the data found (``epochs * (n_train //
        batch)``, one validation per epoch); step-length ones validate every
        ``validate_every`` steps (None: every pass over the data).
        """
        by_epoch = schedule.epochs is not None
        return cls(lmbda=float(lmbda), steps=schedule.steps_for(n_train), batch_size=schedule.batch_size,
                   lr=float(schedule.lr), schedule=schedule.schedule, schedule_unit=schedule.schedule_unit,
                   steps_per_epoch=schedule.steps_per_epoch(n_train) if by_epoch else schedule.validate_every,
                   metric=metric, seed=schedule.seed, num_workers=schedule.num_workers,
                   checkpoint_every=schedule.checkpoint_every, precision=schedule.precision, tf32=schedule.tf32,
                   hyper_lr_scale=float(schedule.hyper_lr_scale),
                   average_decay=float(schedule.average_decay))

    def __post_init__(self) -> None:
        choices = {"optimizer": ("adam", "sgd"), "schedule": ("cosine", "plateau", "constant"),
                   "schedule_unit": ("step", "epoch"), "metric": ("mse", "ms-ssim"),
                   "precision": ("fp32", "bf16", "auto"),
                   "hyper_quantization": ("ste", "noise")}
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
        if self.hyper_rate_warmup < 0:
            raise ValueError("hyper_rate_warmup must be >= 0 (0: the full rate from the first step)")
        if not 0 <= self.average_decay < 1:
            raise ValueError("average_decay must be in [0, 1) (0: no moving average)")
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


# ---------------------------------------------------------------------------- loss
def msssim_window(size: int) -> int:
    """Largest odd Gaussian window (at most 11, the standard one) that MS-SSIM's 4 downsamplings allow.

    ``pytorch_msssim`` needs the smaller image side to exceed ``(win - 1) * 16``:
    161 px for the standard 11-tap window, so 128 px training crops use 7 taps, 64 px use 3.
    """
    win = min(11, (size - 1) // 16 + 1)
    win -= 1 - win % 2  # odd
    if win < 3:
        raise ValueError(f"MS-SSIM needs images of at least 33 px on the smaller side, got {size}")
    return win


def ms_ssim_index(x_hat: Tensor, target: Tensor) -> Tensor:
    """Mean MS-SSIM (data range 1, five scales) with the window adapted to the image size."""
    return ms_ssim(x_hat, target, data_range=1.0, win_size=msssim_window(min(target.shape[-2:])))


class RateDistortionLoss(nn.Module):
    """``lambda * 255^2 * MSE + bpp`` (or ``lambda * (1 - MS-SSIM) + bpp``), as in STF, ALICE and CompressAI.

    ``bpp`` is the rate estimated from the likelihoods, ``sum(-log2 p) / (N * H * W)``.
    The MS-SSIM variant is computed on the unclamped reconstruction (as CompressAI
    does, so that gradients reach out-of-range pixels) and returns ``ms_ssim`` too.
    """

    def __init__(self, lmbda: float, metric: str = "mse"):
        super().__init__()
        if metric not in ("mse", "ms-ssim"):
            raise ValueError(f"unknown metric {metric!r}")
        self.lmbda, self.metric = lmbda, metric

    def forward(self, output: dict, target: Tensor) -> dict[str, Tensor]:
        n, _, h, w = target.shape
        bpp = bpp_from_likelihoods(output["likelihoods"], n * h * w)
        x_hat = output["x_hat"]
        mse = torch.mean((x_hat - target) ** 2)
        result = {"bpp": bpp, "mse": mse}
        if isinstance(output["likelihoods"], Mapping) and "z" in output["likelihoods"]:
            # the hyper-latent's share of the rate: ~0 means the hyperprior has collapsed
            result["bpp_z"] = bpp_from_likelihoods([output["likelihoods"]["z"]], n * h * w)
            result["z_bits"] = result["bpp_z"] * h * w  # per image: the collapse check in metrics.csv
        if self.metric == "mse":
            distortion = 255**2 * mse
        else:
            result["ms_ssim"] = ms_ssim_index(x_hat, target)
            distortion = 1 - result["ms_ssim"]
        return {"loss": self.lmbda * distortion + bpp, **result}


def _split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters: (main, aux); aux are the entropy bottleneck's ``quantiles``."""
    main, aux = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (aux if name.endswith("quantiles") else main).append(p)
    if not main:
        raise ValueError("nothing to train: no parameter requires a gradient (see lora.mark_trainable)")
    return main, aux


class NonFiniteLossError(FloatingPointError):
    """The loss (or the gradient) became NaN or infinite; the last checkpoint is left untouched."""


# ---------------------------------------------------------------------------- model
def amplify_hyper_latent(model: nn.Module, gain: float) -> None:
    """Scale the last layer of ``h_a`` of a freshly initialised STF by ``gain`` (1: unchanged).

    At the CPU profile's size the hyper-latent ``z = h_a(y)`` of random weights varies by
    about 0.003 against a rounding step of 1, so the hyperprior starts out carrying nothing
    and training leaves it so (``reports/cpu/hyperprior/``). Recipe v2 starts it 300x larger.
    """
    if gain == 1.0:
        return
    if not gain > 0:
        raise ValueError(f"hyper-latent gain must be positive, got {gain!r}")
    with torch.no_grad():
        last = model.h_a[-1]
        last.weight.mul_(gain)
        last.bias.mul_(gain)


class WeightAverage:
    """An exponential moving average of the trainable parameters (Polyak averaging).

    The average of the last few thousand steps codes better than the weights of the
    last step, whose noise the small training batches of the CPU scale make large.
    The decay warms up as ``min(decay, (1 + t) / (10 + t))`` at update ``t`` (as in
    TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``), so that early
    averages do not remember the random initialisation. Kept in float32 whatever the
    autocast precision. Buffers (the entropy coder's tables) are not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {name: p for name, p in model.named_parameters()
                       if p.requires_grad and not name.endswith("quantiles")}
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.shadow.values()), [p.detach().float() for p in self.params.values()],
                             1 - decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"updates": self.updates, "weights": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["weights"])
        if missing:
            raise ValueError(f"the checkpoint's weight average lacks {sorted(missing)[:3]}")
        self.updates = int(state["updates"])
        for key, value in self.shadow.items():
            value.copy_(state["weights"][key])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the duration (validation); the live ones afterwards."""
        live = {name: p.detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(live[name])


# ---------------------------------------------------------------------------- files
def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`train` (on the CPU), with a clear error for anything else."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a training checkpoint of format {CHECKPOINT_FORMAT!r} (found {found!r})")
    return ckpt


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    if not path.exists():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    """Write the whole CSV atomically (a kill never leaves half a row)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, restval="")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def _append_csv(path: Path, row: dict) -> None:
    """Add one row; the header becomes the union of the file's columns and the row's (file order first)."""
    header, rows = _read_csv(path)
    merged = header + [key for key in row if key not in header]
    _write_csv(path, merged, rows + [row])


def _truncate_csv(path: Path, epoch: int) -> None:
    """Drop rows after ``epoch`` (a run killed between writing its CSV row and its checkpoint)."""
    header, rows = _read_csv(path)
    kept = [r for r in rows if r.get("epoch") and int(float(r["epoch"])) <= epoch]
    if len(kept) != len(rows):
        _write_csv(path, header, kept)


def _last_csv_row(path: Path) -> dict:
    _, rows = _read_csv(path)
    if not rows:
        return {}
    out = {}
    for key, value in rows[-1].items():
        try:
            out[key] = int(value) if key in ("epoch", "step") else float(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


# ---------------------------------------------------------------------------- distributed and random state
def _dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, position ...): nearby inputs give unrelated streams."""
    words = np.random.SeedSequence([v % 2**64 for v in values]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


# ---------------------------------------------------------------------------- data order
class GlobalBatchSampler:
    """Batch sampler: this process's share of the global batches of one epoch, with per-image seeds.

    An epoch's sequence of images is a series of passes over the dataset, each a
    random permutation fixed by ``(seed, epoch, pass)``; a pass yields
    ``len(dataset) // global_batch`` batches (the incomplete tail is dropped). Step
    ``i`` is the global batch ``i`` of that sequence; rank ``r`` of ``world`` takes
    its ``r``-th slice. Every item is ``(index, item_seed)``, the seed fixed by
    ``(seed, epoch, position in the epoch)`` (see :class:`SeededItems`).
    :meth:`set_epoch` chooses the epoch and the steps to yield, so that a resumed
    run starts at the right batch.
    """

    def __init__(self, size: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} not divisible by {world} processes")
        self.size, self.global_batch, self.seed, self.rank = size, global_batch, seed, rank
        self.local_batch = global_batch // world
        self.batches_per_pass = size // global_batch
        self.epoch, self.start, self.stop = 0, 0, self.batches_per_pass
        self._cached: tuple[tuple[int, int], Tensor] | None = None

    def set_epoch(self, epoch: int, start: int, stop: int) -> None:
        """Yield steps ``start .. stop - 1`` of ``epoch`` on the next iteration."""
        self.epoch, self.start, self.stop = epoch, start, stop

    def _permutation(self, epoch: int, pass_index: int) -> Tensor:
        key = (epoch, pass_index)
        if self._cached is None or self._cached[0] != key:
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, epoch, pass_index, 1))
            self._cached = key, torch.randperm(self.size, generator=generator)
        return self._cached[1]

    def batch(self, epoch: int, step: int) -> list[tuple[int, int]]:
        """This rank's ``(index, item_seed)`` pairs of step ``step`` of ``epoch``."""
        pass_index, within = divmod(step, self.batches_per_pass)
        order = self._permutation(epoch, pass_index)
        first = within * self.global_batch + self.rank * self.local_batch
        position = step * self.global_batch + self.rank * self.local_batch
        return [(int(order[first + k]), _mix_seed(self.seed, epoch, position + k, 2))
                for k in range(self.local_batch)]

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            yield self.batch(self.epoch, step)


class SeededItems(Dataset):
    """``dataset[index]`` drawn with torch's global generator seeded by ``item_seed``, for items ``(index, item_seed)``.

    Random crops (and flips) of :class:`alice_lib.data.ImageFolder` and
    :class:`SyntheticImages` then depend on the image's place in the epoch only,
    not on which DataLoader worker or process loads it. The caller's random state
    is restored afterwards (the main process's noise stream is untouched when
    ``num_workers=0``).
    """

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, int]) -> Tensor:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.data[index]


def _auto_workers(config: TrainConfig, device: torch.device, world: int) -> int:
    """``config.num_workers``, or for ``None`` 0 on the CPU (workers would take the cores) and up to 8 on CUDA."""
    if config.num_workers is not None:
        return config.num_workers
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // world - 1))


# ---------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(model: nn.Module, data: Dataset, criterion: RateDistortionLoss, batch_size: int = 4,
             device: torch.device | str | None = None) -> dict:
    """Mean loss, bpp (from likelihoods), MSE and PSNR (and MS-SSIM) over ``data`` in eval mode (rounded latents).

    PSNR is that of the mean MSE. Always float32 (the choice of ``best.pt`` rests on it).
    """
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    count = 0
    try:
        for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
            batch = batch.to(device)
            out = criterion(model(batch), batch)
            for key, value in out.items():
                totals[key] = totals.get(key, 0.0) + value.item() * len(batch)
            count += len(batch)
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("validation set is empty")
    means = {key: value / count for key, value in totals.items()}
    means["psnr"] = psnr_from_mse(means["mse"])
    return means


# ---------------------------------------------------------------------------- one run, in named steps
@dataclass
class _EpochProgress:
    """The running totals of the epoch in progress (saved in a mid-epoch checkpoint)."""

    sums: Tensor  # float64, one per metric key: the sum over this epoch's steps of this rank's batch means
    batches: int = 0
    seconds_before: float = 0.0  # time spent on this epoch before a resume
    started: float = field(default_factory=time.time)

    @classmethod
    def fresh(cls, n_metrics: int) -> _EpochProgress:
        return cls(torch.zeros(n_metrics, dtype=torch.float64))

    def add(self, values: list[float]) -> None:
        self.sums += torch.tensor(values, dtype=torch.float64)
        self.batches += 1

    def seconds(self) -> float:
        return self.seconds_before + time.time() - self.started


@dataclass
class _Run:
    """What one call of :func:`train` holds between its steps."""

    model: nn.Module
    config: TrainConfig
    run_dir: Path
    device: torch.device
    rank: int
    world: int
    criterion: RateDistortionLoss
    main_params: list[nn.Parameter]
    aux_params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    aux_optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None
    sampler: GlobalBatchSampler
    loader: DataLoader
    steps_per_epoch: int
    extra_state: dict
    precision: str = "fp32"  # what ran: config.precision with "auto" resolved on this device
    average: WeightAverage | None = None
    hyper_keys: tuple[str, ...] = ()  # ("bpp_z", "z_bits") for a model with a hyperprior
    net: nn.Module | None = None  # the model, or its DistributedDataParallel wrapper
    state: dict = field(default_factory=lambda: {"step": 0, "epoch": 0, "best_loss": math.inf})

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def metric_keys(self) -> list[str]:
        return (["loss", "bpp", "mse"] + (["ms_ssim"] if self.config.metric == "ms-ssim" else [])
                + list(self.hyper_keys))

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    @property
    def csv_path(self) -> Path:
        return self.run_dir / "metrics.csv"


def _main_groups(model: nn.Module, main: list[nn.Parameter], config: TrainConfig) -> list[dict]:
    """One parameter group, or two when the hyperprior path learns at its own rate (the schedule scales both)."""
    if config.hyper_lr_scale == 1.0:
        return [{"params": main}]
    modules = getattr(model, "HYPERPRIOR", ())  # SymmetricalTransFormer.HYPERPRIOR
    hyper_ids = {id(p) for name, p in model.named_parameters() if name.split(".")[0] in modules}
    hyper = [p for p in main if id(p) in hyper_ids]
    if not hyper:
        raise ValueError(f"hyper_lr_scale is set but no trainable parameter is in the hyperprior path {modules}")
    return [{"params": [p for p in main if id(p) not in hyper_ids]},
            {"params": hyper, "lr": config.lr * config.hyper_lr_scale}]


def _optimizers(config: TrainConfig, model: nn.Module, main: list[nn.Parameter], aux: list[nn.Parameter]):
    """The main optimizer (Adam or SGD) and, when the quantiles train, CompressAI's auxiliary Adam."""
    groups = _main_groups(model, main, config)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return optimizer, (torch.optim.Adam(aux, lr=config.aux_lr) if aux else None)


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Cosine over the steps or over the epochs (``schedule_unit``), plateau per epoch, or none."""
    if config.schedule == "cosine":
        t_max = config.steps if config.schedule_unit == "step" else config.epochs(steps_per_epoch)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=config.plateau_factor, patience=config.plateau_patience)
    return None


def _setup(model: nn.Module, train_data: Dataset, run_dir: Path, config: TrainConfig,
           extra_state: dict | None) -> _Run:
    """Set-up: check the batch against the processes, build optimizers, schedule and data order, seed."""
    rank, world = _dist_info()
    extra_state = dict(extra_state or {})
    clashes = _CHECKPOINT_KEYS & set(extra_state)
    if clashes:
        raise ValueError(f"extra_state may not use the checkpoint's own keys {sorted(clashes)}")
    config.per_process_batch(world)
    device = model_device(model)
    sampler = GlobalBatchSampler(len(train_data), config.batch_size, config.seed, rank, world)
    if sampler.batches_per_pass == 0:
        raise ValueError(f"the training set ({len(train_data)} images) is smaller than one batch of "
                         f"{config.batch_size} (the global batch, {world} process(es))")
    steps_per_epoch = config.steps_per_epoch or sampler.batches_per_pass
    workers = _auto_workers(config, device, world)
    # The loader's own generator: its base seed (unused, items are seeded) must not consume the noise stream.
    loader = DataLoader(SeededItems(train_data), batch_sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(config.seed))
    main_params, aux_params = _split_parameters(model)
    optimizer, aux_optimizer = _optimizers(config, model, main_params, aux_params)
    if rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    # Each rank draws its own quantisation noise; rank 0's stream is that of a one-process run.
    torch.manual_seed(config.seed + rank)
    random.seed(config.seed + rank)
    np.random.seed((config.seed + rank) % 2**32)
    return _Run(model=model, config=config, run_dir=Path(run_dir), device=device, rank=rank, world=world,
                criterion=RateDistortionLoss(config.lmbda, config.metric), main_params=main_params,
                aux_params=aux_params, optimizer=optimizer, aux_optimizer=aux_optimizer,
                scheduler=_scheduler(config, optimizer, steps_per_epoch), sampler=sampler, loader=loader,
                steps_per_epoch=steps_per_epoch, extra_state=extra_state,
                precision=resolved_precision(config.precision, device),
                average=WeightAverage(model, config.average_decay) if config.average_decay else None,
                hyper_keys=("bpp_z", "z_bits") if hasattr(model, "entropy_bottleneck") else ())


def _fresh_start(run: _Run) -> _EpochProgress:
    """A fresh run must not append to an older run's log nor keep its best checkpoint."""
    if run.is_main:
        run.csv_path.unlink(missing_ok=True)
        run.best_path.unlink(missing_ok=True)
    return _EpochProgress.fresh(len(run.metric_keys))


def _resume(run: _Run) -> _EpochProgress:
    """Resume from ``last.pt``: weights, optimizers, schedule, random state, step, epoch and place in the epoch.

    Reads every checkpoint of format ``alice-train-v1``, including those written
    before mid-epoch checkpoints existed (they resume at the start of their epoch).
    """
    ckpt = load_checkpoint(run.last_path)
    load_weights(run.model, ckpt, run.last_path)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.aux_optimizer is not None:
        if ckpt.get("aux_optimizer"):
            run.aux_optimizer.load_state_dict(ckpt["aux_optimizer"])
        else:
            warnings.warn(f"{run.last_path} has no auxiliary optimizer state; the aux optimizer starts afresh")
    if run.scheduler is not None and ckpt.get("scheduler"):
        run.scheduler.load_state_dict(ckpt["scheduler"])
    _restore_rng(run, ckpt)
    if run.average is not None:
        if "average" in ckpt:
            run.average.load_state_dict(ckpt["average"])
        else:
            warnings.warn(f"{run.last_path} has no weight average; the average starts from the resumed weights")
            run.average = WeightAverage(run.model, run.config.average_decay)
    run.state = {key: ckpt[key] for key in run.state}
    old = ckpt.get("train_config") or {}
    changed = {f.name for f in fields(run.config) if f.name in old and f.name not in _RESULT_NEUTRAL
               and old[f.name] != getattr(run.config, f.name)}
    if changed:
        warnings.warn(f"resuming {run.last_path} with a changed configuration: {sorted(changed)}")
    if run.is_main:
        _truncate_csv(run.csv_path, run.state["epoch"])
    return _progress_from(run, ckpt.get("in_epoch"), ckpt.get("world_size", 1))


def _restore_rng(run: _Run, ckpt: dict) -> None:
    """This rank's random state from the checkpoint; reseeded (with a warning) if the process count changed."""
    saved_world = ckpt.get("world_size", 1)
    if run.world == 1:
        _set_rng_state({"cpu": ckpt["rng"], "cuda": ckpt.get("rng_cuda")}, run.device)
    elif saved_world == run.world and "rng_per_rank" in ckpt:
        _set_rng_state(ckpt["rng_per_rank"][run.rank], run.device)
    else:
        warnings.warn(f"{run.last_path} was written by {saved_world} process(es), this run has {run.world}: "
                      "the noise is reseeded (the data order is not affected), the run will not match an "
                      "uninterrupted one bit for bit")
        torch.manual_seed(run.config.seed + run.rank + 1_000_003 * (ckpt["epoch"] + 1) + ckpt["step"])


def _progress_from(run: _Run, in_epoch: dict | None, saved_world: int) -> _EpochProgress:
    """The epoch totals a mid-epoch checkpoint saved (fresh ones at an epoch boundary)."""
    progress = _EpochProgress.fresh(len(run.metric_keys))
    if not in_epoch:
        return progress
    progress.batches, progress.seconds_before = int(in_epoch["batches"]), float(in_epoch["seconds"])
    per_rank = in_epoch.get("sums_per_rank")
    if per_rank is not None and saved_world == run.world:
        progress.sums = _fit_sums(per_rank[run.rank].clone(), len(run.metric_keys))
    elif run.is_main:  # the ranks' mean so far; the row divides the all-reduced sum by the world size
        progress.sums = _fit_sums(in_epoch["sums"].clone() * run.world, len(run.metric_keys))
    return progress


def _fit_sums(sums: Tensor, n_metrics: int) -> Tensor:
    """Epoch totals saved before the hyper-latent columns existed: zeros for the new columns."""
    if len(sums) < n_metrics:
        sums = torch.cat([sums, sums.new_zeros(n_metrics - len(sums))])
    return sums


def _wrap_ddp(run: _Run) -> None:
    """The network the steps call: DDP (parameters broadcast from rank 0, after any resume) or the model."""
    run.net = run.model
    if run.distributed:
        run.net = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
            find_unused_parameters=run.config.ddp_find_unused_parameters,
            forward_sync_buffers=False)  # buffers copied from rank 0 once, here; none changes in a forward


def _checkpoint(run: _Run, progress: _EpochProgress | None = None) -> dict:
    """The checkpoint dict; ``progress``: the unfinished epoch's totals. Collective under DDP."""
    ckpt = {"format": CHECKPOINT_FORMAT, **_model_state(run.model, run.config.checkpoint_frozen),
            "optimizer": run.optimizer.state_dict(),
            "aux_optimizer": run.aux_optimizer.state_dict() if run.aux_optimizer else {},
            "scheduler": run.scheduler.state_dict() if run.scheduler else {}, "rng": torch.get_rng_state(),
            "train_config": asdict(run.config), **run.state, **run.extra_state}
    if run.average is not None:
        ckpt["average"] = run.average.state_dict()
    own = _rng_state(run.device)
    if own["cuda"] is not None:
        ckpt["rng_cuda"] = own["cuda"]
    if progress is not None:
        ckpt["in_epoch"] = {"batches": progress.batches, "seconds": progress.seconds(),
                            "sums": progress.sums.clone()}
    if run.distributed:
        gathered: list = [None] * run.world
        mine = {"rng": {k: (v.cpu() if v is not None else None) for k, v in own.items()},
                "sums": progress.sums.clone() if progress is not None else None}
        dist.all_gather_object(gathered, mine)
        ckpt["rng_per_rank"] = [g["rng"] for g in gathered]
        ckpt["world_size"] = run.world
        if progress is not None:
            ckpt["in_epoch"]["sums_per_rank"] = [g["sums"] for g in gathered]
            ckpt["in_epoch"]["sums"] = torch.stack([g["sums"] for g in gathered]).mean(0)
    return ckpt


def _model_state(model: nn.Module, with_frozen: bool) -> dict:
    """The checkpoint's weights: the whole state dict, or the trainable parameters and the frozen rest's hash."""
    state = model.state_dict()
    if with_frozen:
        return {"model": state}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {"model": {k: v for k, v in state.items() if k in trainable},
            "frozen_hash": tensors_hash({k: v for k, v in state.items() if k not in trainable})}


def load_weights(model: nn.Module, ckpt: dict, source: str | Path = "the checkpoint",
                 averaged: bool = False) -> None:
    """Load a :func:`train` checkpoint's weights into ``model``, whole or trainable-only (``frozen_hash``).

    A trainable-only checkpoint goes onto the model's own frozen weights, which must be
    those it was trained with (the same anchor, the same adapters injected): anything
    else is refused with a clear error rather than loaded half-matching. ``averaged``:
    the moving average of the weights where the run kept one (``average_decay``), as
    validated and shipped; the last step's weights otherwise.
    """
    if averaged and "average" in ckpt:
        average = ckpt["average"]["weights"]
        ckpt = {**ckpt, "model": {k: average.get(k, v).to(v.dtype) for k, v in ckpt["model"].items()}}
    if "frozen_hash" not in ckpt:
        model.load_state_dict(ckpt["model"])
        return
    state = model.state_dict()
    foreign = sorted(set(ckpt["model"]) - set(state))
    if foreign:
        raise ValueError(f"{source} holds weights this model does not have, e.g. {foreign[:3]}")
    frozen = {k: v for k, v in state.items() if k not in ckpt["model"]}
    if tensors_hash(frozen) != ckpt["frozen_hash"]:
        raise ValueError(f"{source} holds only the trained weights of a run, and this model's other weights "
                         "are not the ones that run was trained on (another anchor, or other trainable parameters)")
    model.load_state_dict({**frozen, **ckpt["model"]})


def _float_output(output: dict) -> dict:
    """The model's output in float32 (after a bf16 autocast forward: the loss is computed in float32)."""
    return {"x_hat": output["x_hat"].float(),
            "likelihoods": {key: value.float() for key, value in output["likelihoods"].items()}}


def _stop_if_not_finite(run: _Run, loss: Tensor, out: dict) -> None:
    """Raise :class:`NonFiniteLossError` on every rank together when any rank's loss is not finite."""
    finite = bool(torch.isfinite(loss.detach()).item())
    if run.distributed:
        flag = torch.tensor([1.0 if finite else 0.0], device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag.item() > 0)
    if not finite:
        raise NonFiniteLossError(
            f"non-finite loss ({loss.item()}, bpp {out['bpp'].item()}, mse {out['mse'].item()}) "
            f"at step {run.state['step'] + 1}; run stopped, last good checkpoint kept at {run.last_path}")


def _aux_step(run: _Run) -> None:
    """CompressAI's auxiliary step on the quantiles (gradients averaged by hand: DDP has no ``aux_loss``)."""
    run.aux_optimizer.zero_grad(set_to_none=True)
    run.model.aux_loss().backward()
    if run.distributed:
        for p in run.aux_params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(run.world)
    run.aux_optimizer.step()


def _train_step(run: _Run, batch: Tensor) -> list[float]:
    """One step: forward (bf16 autocast if asked), loss, backward, clipping, update, aux step, per-step schedule."""
    config = run.config
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16"):
        output = run.net(batch)
    out = run.criterion(_float_output(output), batch)
    loss = out["loss"]
    if config.hyper_rate_warmup and run.state["step"] < config.hyper_rate_warmup and "bpp_z" in out:
        # Like KL annealing against posterior collapse (Bowman et al., 2016): the hyper-latent's
        # bits are priced in gradually, so the hyperprior can become useful before it costs.
        loss = loss - (1 - run.state["step"] / config.hyper_rate_warmup) * out["bpp_z"]
    _stop_if_not_finite(run, loss, out)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(run.main_params, config.clip_max_norm if config.clip_max_norm > 0
                                         else math.inf)
    if not torch.isfinite(grad_norm):
        raise NonFiniteLossError(
            f"non-finite gradient norm at step {run.state['step'] + 1} (loss {loss.item()}); "
            f"run stopped before the update, last good checkpoint kept at {run.last_path}")
    run.optimizer.step()
    if run.average is not None:
        run.average.update()
    if run.aux_optimizer is not None:
        _aux_step(run)
    if isinstance(run.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and config.schedule_unit == "step":
        run.scheduler.step()
    return [out[key].item() for key in run.metric_keys]


def _train_epoch(run: _Run, progress: _EpochProgress, bar: tqdm) -> None:
    """The remaining steps of the current epoch, with the mid-epoch checkpoints of ``checkpoint_every``."""
    config, state = run.config, run.state
    start = progress.batches
    stop = max(start, min(run.steps_per_epoch, start + config.steps - state["step"]))
    run.sampler.set_epoch(state["epoch"], start, stop)
    for batch in run.loader:
        values = _train_step(run, batch.to(run.device, non_blocking=True))
        progress.add(values)
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{values[0]:.3f}", bpp=f"{values[1]:.3f}")
        every = config.checkpoint_every
        if every and state["step"] % every == 0 and progress.batches < stop:
            ckpt = _checkpoint(run, progress)
            if run.is_main:
                atomic_save(ckpt, run.last_path)


def _end_epoch(run: _Run, progress: _EpochProgress, val_data: Dataset | None) -> dict:
    """End of epoch: the metrics row, validation and ``best.pt``, the per-epoch schedule, ``last.pt``."""
    sums = progress.sums
    if run.distributed:  # the row describes every rank's batches
        reduced = sums.to(run.device)
        dist.all_reduce(reduced)
        sums = reduced.cpu() / run.world
    means = {key: sums[i].item() / max(progress.batches, 1) for i, key in enumerate(run.metric_keys)}
    run.state["epoch"] += 1
    row = {"epoch": run.state["epoch"], "step": run.state["step"],
           **{f"train_{k}": means[k] for k in ("loss", "bpp", "mse")}, "train_psnr": psnr_from_mse(means["mse"]),
           "lr": run.optimizer.param_groups[0]["lr"], "seconds": progress.seconds(), "precision": run.precision}
    for key in ("ms_ssim", *run.hyper_keys):
        if key in means:
            row[f"train_{key}"] = means[key]
    plateau_value = means["loss"]
    if val_data is not None:
        with run.average.applied() if run.average is not None else contextlib.nullcontext():
            val = validate(run.model, val_data, run.criterion, device=run.device)
        row.update({f"val_{k}": v for k, v in val.items()})
        plateau_value = val["loss"]
        if val["loss"] < run.state["best_loss"]:
            run.state["best_loss"] = val["loss"]
            ckpt = _checkpoint(run)
            if run.is_main:
                atomic_save(ckpt, run.best_path)
    if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        run.scheduler.step(plateau_value)
    elif isinstance(run.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and run.config.schedule_unit == "epoch":
        run.scheduler.step()
    ckpt = _checkpoint(run)
    if run.is_main:
        _append_csv(run.csv_path, row)
        atomic_save(ckpt, run.last_path)
    return row


@contextlib.contextmanager
def _tf32(enabled: bool, device: torch.device) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN as ``enabled`` says, for the run only (the previous flags come back)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _finish(run: _Run, last_row: dict, val_data: Dataset | None) -> dict:
    """Without validation data the best model is the final one; every rank waits for rank 0's files."""
    if run.distributed:
        dist.barrier()
    if run.is_main and last_row and val_data is None:
        atomic_copy(run.last_path, run.best_path)
    if run.distributed:
        dist.barrier()
    return last_row or _last_csv_row(run.csv_path)


def train(model: nn.Module, train_data: Dataset, run_dir: str | Path, config: TrainConfig,
          val_data: Dataset | None = None, resume: bool = True, extra_state: dict | None = None,
          progress: bool = True, on_epoch_end: Callable[[dict], None] | None = None) -> dict:
    """Train ``model`` in place (on the device of its parameters); returns the final metrics row.

    ``train_data`` items are float images ``[3, H, W]`` whose randomness (crops) comes
    from torch's global generator; it is seeded per item (see :class:`SeededItems`).
    ``extra_state`` (e.g. the model configuration and training mode) is stored in
    every checkpoint so that the files describe themselves. ``on_epoch_end(row)`` is
    called on every rank after each epoch's checkpoint is written (raise in it to
    stop the run; the checkpoint just written is the place to resume from).
    A run that is already complete returns the last row of its ``metrics.csv``.
    """
    with _hyper_quantization(model, config.hyper_quantization):
        return _train(model, train_data, Path(run_dir), config, val_data, resume, extra_state, progress,
                      on_epoch_end)


@contextlib.contextmanager
def _hyper_quantization(model: nn.Module, mode: str) -> Iterator[None]:
    """The model's training-time hyper-latent quantisation for the run, restored afterwards."""
    if not hasattr(model, "hyper_quantization"):
        yield
        return
    previous, model.hyper_quantization = model.hyper_quantization, mode
    try:
        yield
    finally:
        model.hyper_quantization = previous


def _train(model: nn.Module, train_data: Dataset, run_dir: Path, config: TrainConfig, val_data: Dataset | None,
           resume: bool, extra_state: dict | None, progress: bool,
           on_epoch_end: Callable[[dict], None] | None) -> dict:
    run = _setup(model, train_data, run_dir, config, extra_state)
    epoch = _resume(run) if resume and run.last_path.exists() else _fresh_start(run)
    _wrap_ddp(run)
    run.net.train()
    bar = tqdm(total=config.steps, initial=run.state["step"], desc=f"train λ={config.lmbda}",
               disable=not (progress and run.is_main), unit="step", dynamic_ncols=True)
    last_row: dict = {}
    try:
        with _tf32(config.tf32, run.device):
            while run.state["step"] < config.steps or epoch.batches:
                _train_epoch(run, epoch, bar)
                last_row = _end_epoch(run, epoch, val_data)
                epoch = _EpochProgress.fresh(len(run.metric_keys))
                if on_epoch_end is not None:
                    on_epoch_end(last_row)
    finally:
        bar.close()
    return _finish(run, last_row, val_data)


# ---------------------------------------------------------------------------- data for smoke runs
class SyntheticImages(Dataset):
    """Smooth random colour images (sums of low-frequency waves), for tests and smoke runs without data.

    Image ``i`` is fixed by ``seed`` and ``i``; ``train=True`` takes a random crop
    (from torch's global generator, as :class:`alice_lib.data.ImageFolder` does).
    """

    def __init__(self, count: int, crop: int, size: int | None = None, train: bool = True, seed: int = 0):
        self.count, self.crop, self.train = count, crop, train
        self.size = size or crop + crop // 2
        if self.size < crop:
            raise ValueError("size must be at least the crop")
        self._images = [self._make(seed * 1_000_003 + i) for i in range(count)]

    def _make(self, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        coords = torch.linspace(0, 1, self.size)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        image = torch.zeros(3, self.size, self.size)
        for _ in range(4):
            fx, fy = (torch.rand(2, generator=g) * 6).tolist()
            phase = float(torch.rand((), generator=g)) * 6.283
            wave = torch.sin(6.283 * (fx * xx + fy * yy) + phase)
            image += torch.rand(3, 1, 1, generator=g) * wave
        image -= image.amin(dim=(1, 2), keepdim=True)
        image /= image.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)
        return (image * 255).round() / 255

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Tensor:
        image, c = self._images[index], self.crop
        if self.train:
            top = int(torch.randint(0, self.size - c + 1, ()).item())
            left = int(torch.randint(0, self.size - c + 1, ()).item())
        else:
            top = left = (self.size - c) // 2
        return image[:, top:top + c, left:left + c].clone()


# ---------------------------------------------------------------------------- command line
def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m alice_lib.train",
        description="Train an STF (full), fine-tune its MLP layers (vanilla) or train ALICE adapters (lora). "
                    "Launch with `torchrun --nproc_per_node=N -m alice_lib.train ...` for DistributedDataParallel "
                    "(gloo on CPU, nccl on GPUs); --batch-size is the global batch, split evenly over the "
                    "processes.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="image folder; the last --val-images images validate")
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic smooth images instead of a folder")
    p.add_argument("--run-dir", required=True, help="run folder (last.pt, best.pt, metrics.csv); resumed if present")
    p.add_argument("--profile", default="cpu", help="profile name in alice_lib/profiles or a YAML path (model: ...)")
    p.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model field, YAML value (e.g. depths=[1,1,1,1]); repeatable")
    p.add_argument("--mode", choices=("full", "vanilla", "lora"), default="full")
    p.add_argument("--init", help="checkpoint to start from (a train checkpoint or a plain state dict)")
    p.add_argument("--also-train", action="append", default=[], metavar="MODULE",
                   help="ablation: also train this top-level module in vanilla/lora mode; repeatable; "
                        "'entropy' = the whole entropy model (hyperprior, slice transforms, LRP)")
    p.add_argument("--lora-config", help="LoRA YAML (lora_8_8.yml format); default: the profile's `lora`, "
                                         "else LoRAConfig()")
    p.add_argument("--lmbda", type=float, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=8,
                   help="global batch: each of W processes takes batch-size / W images (W must divide it)")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--mosaic", type=int, default=1, metavar="N",
                   help="train on NxN mosaics of crops (data.Mosaics; validation keeps plain crops)")
    p.add_argument("--val-crop", type=int, default=256)
    p.add_argument("--val-images", type=int, default=0)
    p.add_argument("--max-images", type=int)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--aux-lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--schedule", choices=("cosine", "plateau", "constant"), default="cosine")
    p.add_argument("--schedule-unit", choices=("step", "epoch"), default="step",
                   help="cosine: anneal over the steps, stepped every step (default), or over the epochs, "
                        "stepped once per epoch (the ALICE reference)")
    p.add_argument("--metric", choices=("mse", "ms-ssim"), default="mse")
    p.add_argument("--clip-max-norm", type=float, default=1.0)
    p.add_argument("--hyper-rate-warmup", type=int, default=0, metavar="N",
                   help="price the hyper-latent's rate in over the first N steps (weight 0 -> 1), against "
                        "hyperprior collapse; 0 (default): the full rate from the first step")
    p.add_argument("--hyper-init-gain", type=float, default=1.0, metavar="G",
                   help="a model from random weights: multiply the hyper-analysis's last convolution by G, so that "
                        "the hyper-latent varies by more than its rounding step from the start (trial)")
    p.add_argument("--hyper-lr-scale", type=float, default=1.0, metavar="S",
                   help="the hyperprior path (h_a, h_mean_s, h_scale_s, bottleneck) learns at lr x S, against "
                        "hyperprior collapse (trial); 1 (default): one learning rate")
    p.add_argument("--hyper-quantization", choices=("ste", "noise"), default="ste",
                   help="the hyper-latent seen by the hyper-synthesis in training: rounded with a straight-through "
                        "gradient (ste, STF's reference) or with additive uniform noise (noise, Balle et al. 2018)")
    p.add_argument("--average-decay", type=float, default=0.0, metavar="D",
                   help="keep a moving average of the weights with decay D (e.g. 0.999); validation and best.pt "
                        "judge the average, which is what ships; 0 (default): none")
    p.add_argument("--steps-per-epoch", type=int, help="steps per epoch (validation, CSV row, best.pt); "
                                                       "default: one pass over the training images")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="also write last.pt every N steps within an epoch (resumes at the next batch)")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="bf16: bfloat16 autocast of the forward pass (CUDA or CPU); loss in float32; "
                        "auto: bf16 where the hardware has bf16 units (a GPU, a CPU with AMX), else fp32")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls and convolutions on CUDA")
    p.add_argument("--no-flip", action="store_true",
                   help="random crops only, no random horizontal flip (the ALICE reference)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers per process (default: 0 on the CPU, "
                                                   "up to 8 on a GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads per process")
    p.add_argument("--backend", choices=("gloo", "nccl"), help="process-group backend (default: nccl on GPUs)")
    p.add_argument("--device", help="cpu / cuda (default: cuda if available)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if run-dir has last.pt")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--hash-file", help="after training, each rank writes its state-dict SHA-256 here "
                                       "('{rank}' in the path is replaced by the rank)")
    return p


def _model_settings(args: argparse.Namespace):
    """The profile's model settings (alice_lib.settings) with ``--model-set KEY=VALUE`` overrides."""
    from .settings import load_settings

    overrides = {}
    for item in args.model_set:
        key, _, text = item.partition("=")
        overrides[f"model.{key.strip()}"] = _parse_value(text)
    return load_settings(args.profile, overrides).model


def _cli_device(args: argparse.Namespace) -> tuple[torch.device, bool]:
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


def _cli_model(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, dict]:
    """The STF of the profile (``--init`` weights, adapters for ``--mode``) and the checkpoint's extra state."""
    from .models.stf import SymmetricalTransFormer

    settings = _model_settings(args)
    config = settings.stf
    torch.manual_seed(args.seed)
    model = SymmetricalTransFormer(config)
    if args.init:
        state = torch.load(args.init, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    else:
        amplify_hyper_latent(model, args.hyper_init_gain)
    extra = {"model_config": config.to_dict(), "mode": args.mode, "lmbda": args.lmbda}
    if args.mode in ("lora", "vanilla"):
        from . import lora

        lora_config = lora.LoRAConfig.from_yaml(args.lora_config) if args.lora_config else settings.lora
        if args.mode == "lora":
            lora.inject_lora(model, lora_config, generator=torch.Generator().manual_seed(args.seed))
        also = [m for name in args.also_train
                for m in (SymmetricalTransFormer.ENTROPY_MODEL if name == "entropy" else (name,))]
        lora.mark_trainable(model, args.mode, lora_config, also)
        extra["lora_config"] = lora_config.to_dict()
        if also:
            extra["also_train"] = also
    elif args.also_train:
        raise ValueError("--also-train needs --mode vanilla or lora (full trains everything already)")
    return model.to(device), extra


def _cli_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset | None]:
    """Training crops and the held-out validation images (the folder's last ``--val-images``)."""
    if args.synthetic:
        val = (SyntheticImages(args.val_images, args.val_crop, train=False, seed=args.seed + 1)
               if args.val_images else None)
        return SyntheticImages(args.synthetic, args.crop, seed=args.seed), val
    from torch.utils.data import Subset

    from .data import ImageFolder, Mosaics

    train_folder = ImageFolder(args.data, args.crop, train=True, max_images=args.max_images, flip=not args.no_flip)
    n = len(train_folder)
    split = n - args.val_images
    if split <= 0:
        raise ValueError(f"--val-images {args.val_images} leaves no training image out of {n}")
    train_set = Subset(train_folder, range(split))
    if args.mosaic > 1:
        train_set = Mosaics(train_set, args.mosaic)
    if not args.val_images:
        return train_set, None
    val_folder = ImageFolder(args.data, args.val_crop, train=False, max_images=args.max_images)
    return train_set, Subset(val_folder, range(split, n))


def _cli_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        lmbda=args.lmbda, steps=args.steps, batch_size=args.batch_size, lr=args.lr, aux_lr=args.aux_lr,
        optimizer=args.optimizer, schedule=args.schedule, schedule_unit=args.schedule_unit,
        clip_max_norm=args.clip_max_norm, metric=args.metric, seed=args.seed, num_workers=args.num_workers,
        steps_per_epoch=args.steps_per_epoch, checkpoint_every=args.checkpoint_every, precision=args.precision,
        tf32=args.tf32, hyper_quantization=args.hyper_quantization, hyper_rate_warmup=args.hyper_rate_warmup,
        hyper_lr_scale=args.hyper_lr_scale, average_decay=args.average_decay)


def main(argv: list[str] | None = None) -> dict:
    """Command-line training; under ``torchrun`` every process runs this."""
    args = _build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, launched = _cli_device(args)
    rank, _ = _dist_info()
    try:
        config = _cli_config(args)
        model, extra = _cli_model(args, device)
        train_data, val_data = _cli_datasets(args)
        row = train(model, train_data, args.run_dir, config, val_data=val_data, resume=not args.no_resume,
                    extra_state=extra, progress=not args.no_progress)
        if args.hash_file:
            path = Path(args.hash_file.replace("{rank}", str(rank)))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(state_dict_hash(model) + "\n")
        if rank == 0:
            print({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        return row
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
