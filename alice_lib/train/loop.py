"""The one training loop of fixed-rate models, vanilla fine-tuning and ALICE adapters.

What trains is decided before the loop, by ``requires_grad`` (see
:func:`alice_lib.lora.mark_trainable`): the loop optimises every parameter that
requires a gradient. The bottleneck quantiles (CompressAI's auxiliary loss) get
their own optimizer when they are trainable, as in CompressAI's example script.

:func:`train` is named steps, each on one screen: :func:`_setup` (optimizers,
schedule, data order), :func:`~.state.resume_from_last` (``last.pt``), :func:`_train_step`
(one optimisation step), :func:`_train_epoch` and :func:`_end_epoch` (metrics row,
validation, schedule, checkpoints). The data order is :mod:`.sampling`'s, the files
and the resume :mod:`.state`'s.

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

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..utils import atomic_copy, atomic_save, model_device, psnr_from_mse
from .config import TrainConfig, resolved_precision
from .loss import NonFiniteLossError, RateDistortionLoss, float_output, split_parameters, validate
from .optim import Scheduler, WeightAverage, optimizers, scheduler, steps_every_step
from .sampling import GlobalBatchSampler, SeededItems, auto_workers
from .state import CHECKPOINT_KEYS, EpochProgress, append_csv, checkpoint, dist_info, last_csv_row, resume_from_last


@dataclass
class Run:
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
    scheduler: Scheduler | None
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


def _setup(model: nn.Module, train_data: Dataset, run_dir: Path, config: TrainConfig,
           extra_state: dict | None) -> Run:
    """Set-up: check the batch against the processes, build optimizers, schedule and data order, seed."""
    rank, world = dist_info()
    extra_state = dict(extra_state or {})
    clashes = CHECKPOINT_KEYS & set(extra_state)
    if clashes:
        raise ValueError(f"extra_state may not use the checkpoint's own keys {sorted(clashes)}")
    config.per_process_batch(world)
    device = model_device(model)
    sampler = GlobalBatchSampler(len(train_data), config.batch_size, config.seed, rank, world)
    if sampler.batches_per_pass == 0:
        raise ValueError(f"the training set ({len(train_data)} images) is smaller than one batch of "
                         f"{config.batch_size} (the global batch, {world} process(es))")
    steps_per_epoch = config.steps_per_epoch or sampler.batches_per_pass
    workers = auto_workers(config, device, world)
    # The loader's own generator: its base seed (unused, items are seeded) must not consume the noise stream.
    loader = DataLoader(SeededItems(train_data), batch_sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(config.seed))
    main_params, aux_params = split_parameters(model)
    optimizer, aux_optimizer = optimizers(config, model, main_params, aux_params)
    if rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    # Each rank draws its own quantisation noise; rank 0's stream is that of a one-process run.
    torch.manual_seed(config.seed + rank)
    random.seed(config.seed + rank)
    np.random.seed((config.seed + rank) % 2**32)
    return Run(model=model, config=config, run_dir=Path(run_dir), device=device, rank=rank, world=world,
               criterion=RateDistortionLoss(config.lmbda, config.metric), main_params=main_params,
               aux_params=aux_params, optimizer=optimizer, aux_optimizer=aux_optimizer,
               scheduler=scheduler(config, optimizer, steps_per_epoch), sampler=sampler, loader=loader,
               steps_per_epoch=steps_per_epoch, extra_state=extra_state,
               precision=resolved_precision(config.precision, device),
               average=WeightAverage(model, config.average_decay) if config.average_decay else None,
               hyper_keys=("bpp_z", "z_bits") if hasattr(model, "entropy_bottleneck") else ())


def _fresh_start(run: Run) -> EpochProgress:
    """A fresh run must not append to an older run's log nor keep its best checkpoint."""
    if run.is_main:
        run.csv_path.unlink(missing_ok=True)
        run.best_path.unlink(missing_ok=True)
    return EpochProgress.fresh(len(run.metric_keys))


def _wrap_ddp(run: Run) -> None:
    """The network the steps call: DDP (parameters broadcast from rank 0, after any resume) or the model."""
    run.net = run.model
    if run.distributed:
        run.net = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
            find_unused_parameters=run.config.ddp_find_unused_parameters,
            forward_sync_buffers=False)  # buffers copied from rank 0 once, here; none changes in a forward


def _stop_if_not_finite(run: Run, loss: Tensor, out: dict) -> None:
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


def _aux_step(run: Run) -> None:
    """CompressAI's auxiliary step on the quantiles (gradients averaged by hand: DDP has no ``aux_loss``)."""
    run.aux_optimizer.zero_grad(set_to_none=True)
    run.model.aux_loss().backward()
    if run.distributed:
        for p in run.aux_params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(run.world)
    run.aux_optimizer.step()


def _train_step(run: Run, batch: Tensor) -> list[float]:
    """One step: forward (bf16 autocast if asked), loss, backward, clipping, update, aux step, per-step schedule."""
    config = run.config
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16"):
        output = run.net(batch)
    out = run.criterion(float_output(output), batch)
    loss = out["loss"]
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
    if steps_every_step(config, run.scheduler):
        run.scheduler.step()
    return [out[key].item() for key in run.metric_keys]


def _train_epoch(run: Run, progress: EpochProgress, bar: tqdm) -> None:
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
            ckpt = checkpoint(run, progress)
            if run.is_main:
                atomic_save(ckpt, run.last_path)


def _end_epoch(run: Run, progress: EpochProgress, val_data: Dataset | None) -> dict:
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
            ckpt = checkpoint(run)
            if run.is_main:
                atomic_save(ckpt, run.best_path)
    if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        run.scheduler.step(plateau_value)
    elif isinstance(run.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and run.config.schedule_unit == "epoch":
        run.scheduler.step()
    ckpt = checkpoint(run)
    if run.is_main:
        append_csv(run.csv_path, row)
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


def _finish(run: Run, last_row: dict, val_data: Dataset | None) -> dict:
    """Without validation data the best model is the final one; every rank waits for rank 0's files."""
    if run.distributed:
        dist.barrier()
    if run.is_main and last_row and val_data is None:
        atomic_copy(run.last_path, run.best_path)
    if run.distributed:
        dist.barrier()
    return last_row or last_csv_row(run.csv_path)


def train(model: nn.Module, train_data: Dataset, run_dir: str | Path, config: TrainConfig,
          val_data: Dataset | None = None, resume: bool = True, extra_state: dict | None = None,
          progress: bool = True, on_epoch_end: Callable[[dict], None] | None = None) -> dict:
    """Train ``model`` in place (on the device of its parameters); returns the final metrics row.

    ``train_data`` items are float images ``[3, H, W]`` whose randomness (crops) comes
    from torch's global generator; it is seeded per item (see :class:`~.sampling.SeededItems`).
    ``extra_state`` (e.g. the model configuration and training mode) is stored in
    every checkpoint so that the files describe themselves. Calling it again on the
    same folder resumes where ``last.pt`` left off (``resume=False``: starts afresh).
    ``on_epoch_end(row)`` is called on every rank after each epoch's checkpoint is
    written (raise in it to stop the run; the checkpoint just written is the place to
    resume from). A run that is already complete returns the last row of its ``metrics.csv``.
    """
    run = _setup(model, train_data, Path(run_dir), config, extra_state)
    epoch = resume_from_last(run) if resume and run.last_path.exists() else _fresh_start(run)
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
                epoch = EpochProgress.fresh(len(run.metric_keys))
                if on_epoch_end is not None:
                    on_epoch_end(last_row)
    finally:
        bar.close()
    return _finish(run, last_row, val_data)

