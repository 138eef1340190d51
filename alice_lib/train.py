"""Rate-distortion training: one loop for fixed-rate models, vanilla fine-tuning and ALICE adapters.

What trains is decided before the loop, by ``requires_grad`` (see
:func:`alice_lib.lora.mark_trainable`): the loop optimises every parameter that
requires a gradient. The bottleneck quantiles (CompressAI's auxiliary loss) get
their own optimizer when they are trainable, as in CompressAI's example script.

A run folder holds ``last.pt`` (written at the end of every epoch, atomically),
``best.pt`` (lowest validation loss; without validation data, the final state)
and ``metrics.csv`` (one row per epoch). Calling :func:`train` again on the same
folder resumes where ``last.pt`` left off: step, epoch, optimizers, scheduler and
random state, so that an interrupted and resumed run ends with the same weights,
bit for bit, as an uninterrupted one (same hardware, same thread count).

More than one process: launched by ``torchrun`` (see :func:`main`, ``python -m
alice_lib.train --help``), :func:`train` wraps the model in
``DistributedDataParallel`` when ``torch.distributed`` is initialised, shards the
training set with a ``DistributedSampler`` (``batch_size`` is per process), and
only rank 0 writes checkpoints and the CSV and shows the progress bar. Every rank
draws its own noise and crops (seed + rank) and the checkpoint keeps every rank's
random state, so a distributed run resumes bit-exactly too (with as many processes).
Every rank validates on the whole validation set (identical results, so the
plateau schedule and the choice of ``best.pt`` agree); the CSV's training columns
are averaged over the ranks. The folder must be shared by all ranks (one node).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from pytorch_msssim import ms_ssim
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

# Unchanged since the first version: later versions only add optional keys
# (rng_cuda, rng_per_rank, world_size), and read checkpoints that lack them.
CHECKPOINT_FORMAT = "alice-train-v1"
_CHECKPOINT_KEYS = frozenset({"format", "model", "optimizer", "aux_optimizer", "scheduler", "rng", "rng_cuda",
                              "rng_per_rank", "world_size", "train_config", "step", "epoch", "best_loss"})


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (the profiles in ``alice_lib/profiles`` set them).

    ``batch_size`` is per process: under ``torchrun`` with W processes one step sees
    ``W * batch_size`` images.
    """

    lmbda: float
    steps: int
    batch_size: int = 8
    lr: float = 1e-4
    aux_lr: float = 1e-3
    optimizer: str = "adam"  # "adam" | "sgd"
    schedule: str = "cosine"  # "cosine" | "plateau" | "constant"
    clip_max_norm: float = 1.0  # 0: no clipping
    metric: str = "mse"  # "mse" | "ms-ssim"
    seed: int = 0
    num_workers: int = 0
    steps_per_epoch: int | None = None  # None: one pass over the training set
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    plateau_factor: float = 0.5  # "plateau": lr *= factor after `patience` epochs without improvement
    plateau_patience: int = 4  # (validation loss, else the epoch's training loss)
    ddp_find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected 'adam' or 'sgd'")
        if self.schedule not in ("cosine", "plateau", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}; expected 'cosine', 'plateau' or 'constant'")
        if self.metric not in ("mse", "ms-ssim"):
            raise ValueError(f"unknown metric {self.metric!r}; expected 'mse' or 'ms-ssim'")
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
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            raise ValueError("steps_per_epoch must be positive (or None for one pass over the data)")
        if not 0 < self.plateau_factor < 1:
            raise ValueError("plateau_factor must be in (0, 1)")


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
        bpp = sum(-torch.log2(lik).sum() for lik in output["likelihoods"].values()) / (n * h * w)
        x_hat = output["x_hat"]
        mse = torch.mean((x_hat - target) ** 2)
        result = {"bpp": bpp, "mse": mse}
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


# ---------------------------------------------------------------------------- files
def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file in the same folder, fsync, then rename: a kill never leaves half a file.

    If writing fails the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _atomic_save(obj: dict, path: Path) -> None:
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _atomic_copy(source: Path, path: Path) -> None:
    _atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _append_csv(path: Path, row: dict) -> None:
    """Append one row; if its columns differ from the file's header, rewrite the file with the union."""
    header, rows = _read_csv(path)
    if header and list(row) != header:
        merged = header + [key for key in row if key not in header]
        _write_csv(path, merged, rows + [row])
        return
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


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


def psnr_from_mse(mse: float) -> float:
    return 10 * math.log10(1 / mse) if mse > 0 else float("inf")


def state_dict_hash(model: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes): equal iff the weights are."""
    module = model.module if hasattr(model, "module") else model
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------------------- distributed
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


# ---------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(model: nn.Module, data: Dataset, criterion: RateDistortionLoss, batch_size: int = 4,
             device: torch.device | str | None = None) -> dict:
    """Mean loss, bpp (from likelihoods), MSE and PSNR (and MS-SSIM) over ``data`` in eval mode (rounded latents).

    PSNR is that of the mean MSE.
    """
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    device = torch.device(device) if device is not None else next(model.parameters()).device
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


class NonFiniteLossError(FloatingPointError):
    """The loss (or the gradient) became NaN or infinite; the last checkpoint is left untouched."""


# ---------------------------------------------------------------------------- training
def train(model: nn.Module, train_data: Dataset, run_dir: str | Path, config: TrainConfig,
          val_data: Dataset | None = None, resume: bool = True, extra_state: dict | None = None,
          progress: bool = True, on_epoch_end: Callable[[dict], None] | None = None) -> dict:
    """Train ``model`` in place (on the device of its parameters); returns the final metrics row.

    ``extra_state`` (e.g. the model configuration and training mode) is stored in
    every checkpoint so that the files describe themselves. ``on_epoch_end(row)`` is
    called on every rank after each epoch's checkpoint is written (raise in it to
    stop the run; the checkpoint just written is the place to resume from).
    A run that is already complete returns the last row of its ``metrics.csv``.
    """
    run_dir = Path(run_dir)
    rank, world = _dist_info()
    distributed = dist.is_available() and dist.is_initialized()
    is_main = rank == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path, csv_path = run_dir / "last.pt", run_dir / "best.pt", run_dir / "metrics.csv"
    extra_state = dict(extra_state or {})
    clashes = _CHECKPOINT_KEYS & set(extra_state)
    if clashes:
        raise ValueError(f"extra_state may not use the checkpoint's own keys {sorted(clashes)}")
    device = next(model.parameters()).device
    criterion = RateDistortionLoss(config.lmbda, config.metric)
    main_params, aux_params = _split_parameters(model)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(main_params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(main_params, lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    aux_optimizer = torch.optim.Adam(aux_params, lr=config.aux_lr) if aux_params else None
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    elif config.schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=config.plateau_factor, patience=config.plateau_patience)
    else:
        scheduler = None

    # Each rank draws its own noise and crops; rank 0's stream is that of a one-process run.
    torch.manual_seed(config.seed + rank)
    random.seed(config.seed + rank)
    np.random.seed((config.seed + rank) % 2**32)
    state = {"step": 0, "epoch": 0, "best_loss": math.inf}
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if aux_optimizer is not None:
            if ckpt.get("aux_optimizer"):
                aux_optimizer.load_state_dict(ckpt["aux_optimizer"])
            else:
                warnings.warn(f"{last_path} has no auxiliary optimizer state; the aux optimizer starts afresh")
        if scheduler is not None and ckpt.get("scheduler"):
            scheduler.load_state_dict(ckpt["scheduler"])
        saved_world = ckpt.get("world_size", 1)
        if world == 1:
            _set_rng_state({"cpu": ckpt["rng"], "cuda": ckpt.get("rng_cuda")}, device)
        elif saved_world == world and "rng_per_rank" in ckpt:
            _set_rng_state(ckpt["rng_per_rank"][rank], device)
        else:
            warnings.warn(f"{last_path} was written by {saved_world} process(es), this run has {world}: "
                          "random streams are reseeded, the run will not match an uninterrupted one")
            torch.manual_seed(config.seed + rank + 1_000_003 * (ckpt["epoch"] + 1))
        state = {k: ckpt[k] for k in state}
        old = ckpt.get("train_config") or {}
        changed = {f.name for f in fields(config) if f.name in old and old[f.name] != getattr(config, f.name)}
        if changed:
            warnings.warn(f"resuming {last_path} with a changed configuration: {sorted(changed)}")
        if is_main:
            _truncate_csv(csv_path, state["epoch"])
    elif is_main:
        # A fresh run must not append to an older run's log nor keep its best checkpoint.
        csv_path.unlink(missing_ok=True)
        best_path.unlink(missing_ok=True)

    net: nn.Module = model
    if distributed:
        # Parameters and buffers are broadcast from rank 0 here, after any resume.
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.ddp_find_unused_parameters, broadcast_buffers=False)

    def checkpoint() -> dict:
        """Collective under DDP (the random states of all ranks are gathered)."""
        ckpt = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "aux_optimizer": aux_optimizer.state_dict() if aux_optimizer else {},
                "scheduler": scheduler.state_dict() if scheduler else {}, "rng": torch.get_rng_state(),
                "train_config": asdict(config), **state, **extra_state}
        own = _rng_state(device)
        if own["cuda"] is not None:
            ckpt["rng_cuda"] = own["cuda"]
        if distributed:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, {k: (v.cpu() if v is not None else None) for k, v in own.items()})
            ckpt["rng_per_rank"] = gathered
            ckpt["world_size"] = world
        return ckpt

    sampler = None
    if distributed:
        sampler = torch.utils.data.DistributedSampler(train_data, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=config.seed, drop_last=True)

    def epoch_loader(epoch: int) -> DataLoader:
        """The loader of one epoch; its order depends only on the seed and the epoch (resumable)."""
        common = dict(batch_size=config.batch_size, drop_last=True, num_workers=config.num_workers,
                      pin_memory=device.type == "cuda")
        if sampler is not None:
            sampler.set_epoch(epoch * 1000)
            return DataLoader(train_data, sampler=sampler, **common)
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        return DataLoader(train_data, shuffle=True, generator=generator, **common)

    batches_per_pass = len(epoch_loader(state["epoch"]))
    if batches_per_pass == 0:
        raise ValueError(f"the training set ({len(train_data)} images) is smaller than one batch of "
                         f"{config.batch_size} per process ({world} process(es))")
    steps_per_epoch = config.steps_per_epoch or batches_per_pass

    net.train()
    bar = tqdm(total=config.steps, initial=state["step"], desc=f"train λ={config.lmbda}",
               disable=not (progress and is_main), unit="step", dynamic_ncols=True)
    last_row: dict = {}
    metric_keys = ["loss", "bpp", "mse"] + (["ms_ssim"] if config.metric == "ms-ssim" else [])
    try:
        while state["step"] < config.steps:
            rerun = 0
            loader = epoch_loader(state["epoch"])
            batches = iter(loader)
            sums = torch.zeros(len(metric_keys), dtype=torch.float64)
            n_batches, started = 0, time.time()
            while n_batches < steps_per_epoch and state["step"] < config.steps:
                try:
                    batch = next(batches)
                except StopIteration:  # steps_per_epoch longer than one pass: go round again
                    rerun += 1
                    if sampler is not None:  # a new order; without DDP the loader's generator moves on
                        sampler.set_epoch(state["epoch"] * 1000 + rerun)
                    batches = iter(loader)
                    batch = next(batches)
                batch = batch.to(device, non_blocking=True)
                out = criterion(net(batch), batch)
                loss = out["loss"]
                finite = bool(torch.isfinite(loss.detach()).item())
                if distributed:  # every rank stops together
                    flag = torch.tensor([1.0 if finite else 0.0], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                    finite = bool(flag.item() > 0)
                if not finite:
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss.item()}, bpp {out['bpp'].item()}, mse {out['mse'].item()}) "
                        f"at step {state['step'] + 1}; run stopped, last good checkpoint kept at {last_path}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(
                    main_params, config.clip_max_norm if config.clip_max_norm > 0 else math.inf)
                if not torch.isfinite(grad_norm):
                    raise NonFiniteLossError(
                        f"non-finite gradient norm at step {state['step'] + 1} (loss {loss.item()}); "
                        f"run stopped before the update, last good checkpoint kept at {last_path}")
                optimizer.step()
                if aux_optimizer is not None:
                    aux_optimizer.zero_grad(set_to_none=True)
                    aux_loss = model.aux_loss()  # the unwrapped module: DDP has no aux_loss
                    aux_loss.backward()
                    if distributed:
                        for p in aux_params:
                            if p.grad is not None:
                                dist.all_reduce(p.grad)
                                p.grad.div_(world)
                    aux_optimizer.step()
                if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                    scheduler.step()
                values = [out[key].item() for key in metric_keys]
                for i, value in enumerate(values):
                    sums[i] += value
                n_batches += 1
                state["step"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{values[0]:.3f}", bpp=f"{values[1]:.3f}")
            if distributed:  # the row describes every rank's batches
                reduced = sums.to(device)
                dist.all_reduce(reduced)
                sums = reduced.cpu() / world
            means = {key: sums[i].item() / n_batches for i, key in enumerate(metric_keys)}
            state["epoch"] += 1
            row = {"epoch": state["epoch"], "step": state["step"],
                   **{f"train_{k}": means[k] for k in ("loss", "bpp", "mse")},
                   "train_psnr": psnr_from_mse(means["mse"]),
                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - started}
            if "ms_ssim" in means:
                row["train_ms_ssim"] = means["ms_ssim"]
            plateau_value = means["loss"]
            if val_data is not None:
                val = validate(model, val_data, criterion, device=device)
                row.update({f"val_{k}": v for k, v in val.items()})
                plateau_value = val["loss"]
                if val["loss"] < state["best_loss"]:
                    state["best_loss"] = val["loss"]
                    ckpt = checkpoint()
                    if is_main:
                        _atomic_save(ckpt, best_path)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(plateau_value)
            ckpt = checkpoint()
            if is_main:
                _append_csv(csv_path, row)
                _atomic_save(ckpt, last_path)
            del ckpt
            last_row = row
            if on_epoch_end is not None:
                on_epoch_end(row)
    finally:
        bar.close()
    if distributed:
        dist.barrier()
    if is_main and last_row and val_data is None:
        _atomic_copy(last_path, best_path)  # without validation the best model is the final one
    if distributed:
        dist.barrier()
    return last_row or _last_csv_row(csv_path)


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
                    "(gloo on CPU, nccl on GPUs); --batch-size is per process.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="image folder; the last --val-images images validate")
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic smooth images instead of a folder")
    p.add_argument("--run-dir", required=True, help="run folder (last.pt, best.pt, metrics.csv); resumed if present")
    p.add_argument("--profile", default="cpu", help="profile name in alice_lib/profiles or a YAML path (model: ...)")
    p.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model field, YAML value (e.g. depths=[1,1,1,1]); repeatable")
    p.add_argument("--mode", choices=("full", "vanilla", "lora"), default="full")
    p.add_argument("--init", help="checkpoint to start from (a train checkpoint or a plain state dict)")
    p.add_argument("--lora-config", help="LoRA YAML (lora_8_8.yml format); default: the profile's `lora`, "
                                         "else LoRAConfig()")
    p.add_argument("--lmbda", type=float, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--val-crop", type=int, default=256)
    p.add_argument("--val-images", type=int, default=0)
    p.add_argument("--max-images", type=int)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--aux-lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--schedule", choices=("cosine", "plateau", "constant"), default="cosine")
    p.add_argument("--metric", choices=("mse", "ms-ssim"), default="mse")
    p.add_argument("--clip-max-norm", type=float, default=1.0)
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads per process")
    p.add_argument("--backend", choices=("gloo", "nccl"), help="process-group backend (default: nccl on GPUs)")
    p.add_argument("--device", help="cpu / cuda (default: cuda if available)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if run-dir has last.pt")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--hash-file", help="after training, each rank writes its state-dict SHA-256 here "
                                       "('{rank}' in the path is replaced by the rank)")
    return p


def _profile_path(name: str) -> Path:
    path = Path(name)
    return path if path.exists() else Path(__file__).with_name("profiles") / f"{name}.yaml"


def _profile_lora(name: str) -> Path | None:
    """The LoRA YAML a profile names (``lora: lora_8_8.yaml``, next to the profile), if any."""
    import yaml

    path = _profile_path(name)
    entry = (yaml.safe_load(path.read_text()) or {}).get("lora")
    return path.with_name(entry) if isinstance(entry, str) else None


def _model_config(args):
    import yaml

    from .models.stf import STFConfig

    values = dict((yaml.safe_load(_profile_path(args.profile).read_text()) or {}).get("model", {}))
    for item in args.model_set:
        key, _, text = item.partition("=")
        values[key.strip()] = _parse_value(text)
    return STFConfig(**values)


def main(argv: list[str] | None = None) -> dict:
    """Command-line training; under ``torchrun`` every process runs this."""
    args = _build_parser().parse_args(argv)
    from .models.stf import SymmetricalTransFormer

    if args.threads:
        torch.set_num_threads(args.threads)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cuda = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
    if launched and not dist.is_initialized():
        dist.init_process_group(args.backend or ("nccl" if cuda else "gloo"))
    rank, _ = _dist_info()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    try:
        config = _model_config(args)
        torch.manual_seed(args.seed)
        model = SymmetricalTransFormer(config)
        if args.init:
            state = torch.load(args.init, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        lora_config = None
        if args.mode in ("lora", "vanilla"):
            from . import lora

            lora_path = args.lora_config or _profile_lora(args.profile)
            lora_config = lora.LoRAConfig.from_yaml(lora_path) if lora_path else lora.LoRAConfig()
            if args.mode == "lora":
                lora.inject_lora(model, lora_config, generator=torch.Generator().manual_seed(args.seed))
            lora.mark_trainable(model, args.mode, lora_config)
        model.to(device)
        if args.synthetic:
            train_data: Dataset = SyntheticImages(args.synthetic, args.crop, seed=args.seed)
            val_data = (SyntheticImages(args.val_images, args.val_crop, train=False, seed=args.seed + 1)
                        if args.val_images else None)
        else:
            from torch.utils.data import Subset

            from .data import ImageFolder

            tr = ImageFolder(args.data, args.crop, train=True, max_images=args.max_images)
            n = len(tr)
            split = n - args.val_images
            if split <= 0:
                raise ValueError(f"--val-images {args.val_images} leaves no training image out of {n}")
            train_data = Subset(tr, range(split))
            val_data = None
            if args.val_images:
                va = ImageFolder(args.data, args.val_crop, train=False, max_images=args.max_images)
                val_data = Subset(va, range(split, n))
        train_config = TrainConfig(
            lmbda=args.lmbda, steps=args.steps, batch_size=args.batch_size, lr=args.lr, aux_lr=args.aux_lr,
            optimizer=args.optimizer, schedule=args.schedule, clip_max_norm=args.clip_max_norm,
            metric=args.metric, seed=args.seed, num_workers=args.num_workers,
            steps_per_epoch=args.steps_per_epoch)
        extra = {"model_config": config.to_dict(), "mode": args.mode, "lmbda": args.lmbda}
        if lora_config is not None:
            extra["lora_config"] = lora_config.to_dict()
        row = train(model, train_data, args.run_dir, train_config, val_data=val_data, resume=not args.no_resume,
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
