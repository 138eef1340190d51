"""Rate-distortion training: one loop for fixed-rate models, vanilla fine-tuning and ALICE adapters.

What trains is decided before the loop, by ``requires_grad`` (see
:func:`alice_lib.lora.mark_trainable`): the loop optimises every parameter that
requires a gradient. The bottleneck quantiles (CompressAI's auxiliary loss) get
their own optimizer when they are trainable, as in CompressAI's example script.

A run folder holds ``last.pt`` (written at the end of every epoch, atomically),
``best.pt`` (lowest validation loss) and ``metrics.csv`` (one row per epoch).
Calling :func:`train` again on the same folder resumes where ``last.pt`` left
off: step, epoch, optimizers, scheduler and random state.
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pytorch_msssim import ms_ssim
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

CHECKPOINT_FORMAT = "alice-train-v1"


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (the profiles in ``alice_lib/profiles`` set them)."""

    lmbda: float
    steps: int
    batch_size: int = 8
    lr: float = 1e-4
    aux_lr: float = 1e-3
    optimizer: str = "adam"  # "adam" | "sgd"
    schedule: str = "cosine"  # "cosine" | "plateau" | "constant"
    clip_max_norm: float = 1.0
    metric: str = "mse"  # "mse" | "ms-ssim"
    seed: int = 0
    num_workers: int = 0
    steps_per_epoch: int | None = None  # None: one pass over the training set

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}")
        if self.schedule not in ("cosine", "plateau", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}")
        if self.metric not in ("mse", "ms-ssim"):
            raise ValueError(f"unknown metric {self.metric!r}")
        if self.steps <= 0:
            raise ValueError("steps must be positive")


class RateDistortionLoss(nn.Module):
    """``lambda * 255^2 * MSE + bpp`` (or ``lambda * (1 - MS-SSIM) + bpp``), as in STF and ALICE."""

    def __init__(self, lmbda: float, metric: str = "mse"):
        super().__init__()
        self.lmbda, self.metric = lmbda, metric

    def forward(self, output: dict, target: Tensor) -> dict[str, Tensor]:
        n, _, h, w = target.shape
        bpp = sum(-torch.log2(lik).sum() for lik in output["likelihoods"].values()) / (n * h * w)
        x_hat = output["x_hat"]
        mse = torch.mean((x_hat - target) ** 2)
        if self.metric == "mse":
            distortion = 255**2 * mse
        else:
            distortion = 1 - ms_ssim(x_hat.clamp(0, 1), target, data_range=1.0)
        return {"loss": self.lmbda * distortion + bpp, "bpp": bpp, "mse": mse}


def _split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    main, aux = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (aux if name.endswith("quantiles") else main).append(p)
    if not main:
        raise ValueError("nothing to train: no parameter requires a gradient (see lora.mark_trainable)")
    return main, aux


def _atomic_save(obj: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a kill never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def psnr_from_mse(mse: float) -> float:
    return 10 * math.log10(1 / mse) if mse > 0 else float("inf")


@torch.no_grad()
def validate(model: nn.Module, data: Dataset, criterion: RateDistortionLoss, batch_size: int = 4) -> dict:
    """Mean loss, bpp (from likelihoods) and PSNR over ``data`` in eval mode (rounded latents)."""
    was_training = model.training
    model.eval()
    totals = {"loss": 0.0, "bpp": 0.0, "mse": 0.0}
    count = 0
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
        out = criterion(model(batch), batch)
        for key in totals:
            totals[key] += out[key].item() * len(batch)
        count += len(batch)
    model.train(was_training)
    means = {key: value / count for key, value in totals.items()}
    means["psnr"] = psnr_from_mse(means["mse"])
    return means


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last checkpoint is left untouched."""


def train(model: nn.Module, train_data: Dataset, run_dir: str | Path, config: TrainConfig,
          val_data: Dataset | None = None, resume: bool = True, extra_state: dict | None = None,
          progress: bool = True) -> dict:
    """Train ``model`` in place; returns the final metrics row.

    ``extra_state`` (e.g. the model configuration and training mode) is stored in
    every checkpoint so that the files describe themselves.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path, csv_path = run_dir / "last.pt", run_dir / "best.pt", run_dir / "metrics.csv"
    criterion = RateDistortionLoss(config.lmbda, config.metric)
    main_params, aux_params = _split_parameters(model)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(main_params, lr=config.lr)
    else:
        optimizer = torch.optim.SGD(main_params, lr=config.lr, momentum=0.9)
    aux_optimizer = torch.optim.Adam(aux_params, lr=config.aux_lr) if aux_params else None
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    elif config.schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=4)
    else:
        scheduler = None

    torch.manual_seed(config.seed)
    state = {"step": 0, "epoch": 0, "best_loss": math.inf}
    if resume and last_path.exists():
        ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if aux_optimizer is not None:
            aux_optimizer.load_state_dict(ckpt["aux_optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        state = {k: ckpt[k] for k in state}
    elif csv_path.exists():
        csv_path.unlink()  # a fresh run must not append to an older run's log

    def checkpoint() -> dict:
        return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "aux_optimizer": aux_optimizer.state_dict() if aux_optimizer else {},
                "scheduler": scheduler.state_dict() if scheduler else {}, "rng": torch.get_rng_state(),
                "train_config": asdict(config), **state, **(extra_state or {})}

    steps_per_epoch = config.steps_per_epoch or max(1, len(train_data) // config.batch_size)
    model.train()
    bar = tqdm(total=config.steps, initial=state["step"], desc=f"train λ={config.lmbda}", disable=not progress,
               unit="step")
    last_row: dict = {}
    while state["step"] < config.steps:
        sampler_gen = torch.Generator().manual_seed(config.seed * 100_003 + state["epoch"])
        loader = DataLoader(train_data, batch_size=config.batch_size, shuffle=True, drop_last=True,
                            generator=sampler_gen, num_workers=config.num_workers)
        sums = {"loss": 0.0, "bpp": 0.0, "mse": 0.0}
        n_batches, started = 0, time.time()
        batches = iter(loader)
        while n_batches < steps_per_epoch and state["step"] < config.steps:
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            out = criterion(model(batch), batch)
            if not torch.isfinite(out["loss"]):
                raise NonFiniteLossError(
                    f"non-finite loss ({out['loss'].item()}) at step {state['step'] + 1}; "
                    f"run stopped, last good checkpoint kept at {last_path}")
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            if config.clip_max_norm > 0:
                nn.utils.clip_grad_norm_(main_params, config.clip_max_norm)
            optimizer.step()
            if aux_optimizer is not None:
                aux_optimizer.zero_grad(set_to_none=True)
                aux_loss = model.aux_loss()
                aux_loss.backward()
                aux_optimizer.step()
            if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                scheduler.step()
            for key in sums:
                sums[key] += out[key].item()
            n_batches += 1
            state["step"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss'].item():.3f}", bpp=f"{out['bpp'].item():.3f}")
        state["epoch"] += 1
        row = {"epoch": state["epoch"], "step": state["step"],
               **{f"train_{k}": v / n_batches for k, v in sums.items()},
               "train_psnr": psnr_from_mse(sums["mse"] / n_batches),
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - started}
        if val_data is not None:
            val = validate(model, val_data, criterion)
            row.update({f"val_{k}": v for k, v in val.items()})
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val["loss"])
            if val["loss"] < state["best_loss"]:
                state["best_loss"] = val["loss"]
                _atomic_save(checkpoint(), best_path)
        _append_csv(csv_path, row)
        _atomic_save(checkpoint(), last_path)
        last_row = row
    bar.close()
    if val_data is None and not best_path.exists() and last_path.exists():
        _atomic_save(torch.load(last_path, map_location="cpu", weights_only=True), best_path)
    return last_row


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
