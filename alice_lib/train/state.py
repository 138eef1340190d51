"""A run's files and its state between processes: checkpoints, random state, ``metrics.csv``, DDP ranks.

**Files.** A run folder holds ``last.pt`` (written at the end of every epoch and,
with ``checkpoint_every``, every N steps within an epoch; atomically), ``best.pt``
(lowest validation loss; without validation data, the final state) and
``metrics.csv`` (one row per epoch). With ``checkpoint_frozen=False`` (adaptation
runs) the two checkpoints hold only the parameters that train, plus ``frozen_hash``,
the SHA-256 of everything else: an adapter run's ``last.pt`` is then a few hundred
kB instead of the whole model, small enough to commit or to carry between machines,
and :func:`load_weights` puts it back only onto the same frozen weights.

**Resuming.** :func:`resume_from_last` restores step, epoch, position in the epoch, optimizers,
scheduler, moving average and random state from ``last.pt``, so that an interrupted
and resumed run ends with the same weights, bit for bit, as an uninterrupted one
(same hardware, same thread count, same number of processes). Under DDP the
checkpoint keeps every rank's random state and epoch totals. Checkpoints are dicts
of plain tensors and numbers, read with ``weights_only=True``; every checkpoint of
format ``alice-train-v1`` resumes, including those of the first version and those
written before ``train.py`` became this package (``tests/fixtures/pre_split_run``).
"""

from __future__ import annotations

import csv
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..utils import atomic_write, tensors_hash
from .optim import HoldThenCosine, WeightAverage

if TYPE_CHECKING:  # the loop's state; this module reads and writes it
    from .loop import Run

# Unchanged since the first version: later versions only add optional keys
# (rng_cuda, rng_per_rank, world_size, in_epoch, average), and read checkpoints that lack them.
CHECKPOINT_FORMAT = "alice-train-v1"
CHECKPOINT_KEYS = frozenset({"format", "model", "optimizer", "aux_optimizer", "scheduler", "rng", "rng_cuda",
                             "rng_per_rank", "world_size", "train_config", "step", "epoch", "best_loss",
                             "in_epoch", "frozen_hash", "average"})
# Settings that change how a run is executed, not its numbers: a resume with other values is silent.
_RESULT_NEUTRAL = frozenset({"num_workers", "checkpoint_every", "checkpoint_frozen", "ddp_find_unused_parameters"})
# Trial switches removed since (they gained nothing: train/hyperprior.py) with their neutral values: a
# checkpoint that ran with another value resumes without it, and says so.
_REMOVED_SWITCHES = {"hyper_quantization": "ste", "hyper_rate_warmup": 0}


# ---------------------------------------------------------------------------- processes and random state
def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------- the epoch in progress
@dataclass
class EpochProgress:
    """The running totals of the epoch in progress (saved in a mid-epoch checkpoint)."""

    sums: Tensor  # float64, one per metric key: the sum over this epoch's steps of this rank's batch means
    batches: int = 0
    seconds_before: float = 0.0  # time spent on this epoch before a resume
    started: float = field(default_factory=time.time)

    @classmethod
    def fresh(cls, n_metrics: int) -> EpochProgress:
        return cls(torch.zeros(n_metrics, dtype=torch.float64))

    def add(self, values: list[float]) -> None:
        self.sums += torch.tensor(values, dtype=torch.float64)
        self.batches += 1

    def seconds(self) -> float:
        return self.seconds_before + time.time() - self.started


# ---------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`~alice_lib.train.train` (on the CPU), with a clear error for anything else."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a training checkpoint of format {CHECKPOINT_FORMAT!r} (found {found!r})")
    return ckpt


def model_state(model: nn.Module, with_frozen: bool) -> dict:
    """The checkpoint's weights: the whole state dict, or the trainable parameters and the frozen rest's hash."""
    state = model.state_dict()
    if with_frozen:
        return {"model": state}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {"model": {k: v for k, v in state.items() if k in trainable},
            "frozen_hash": tensors_hash({k: v for k, v in state.items() if k not in trainable})}


def load_weights(model: nn.Module, ckpt: dict, source: str | Path = "the checkpoint",
                 averaged: bool = False) -> None:
    """Load a training checkpoint's weights into ``model``, whole or trainable-only (``frozen_hash``).

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


def checkpoint(run: Run, progress: EpochProgress | None = None) -> dict:
    """The checkpoint dict; ``progress``: the unfinished epoch's totals. Collective under DDP."""
    ckpt = {"format": CHECKPOINT_FORMAT, **model_state(run.model, run.config.checkpoint_frozen),
            "optimizer": run.optimizer.state_dict(),
            "aux_optimizer": run.aux_optimizer.state_dict() if run.aux_optimizer else {},
            "scheduler": run.scheduler.state_dict() if run.scheduler else {}, "rng": torch.get_rng_state(),
            "train_config": asdict(run.config), **run.state, **run.extra_state}
    if run.average is not None:
        ckpt["average"] = run.average.state_dict()
    own = rng_state(run.device)
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


def resume_from_last(run: Run) -> EpochProgress:
    """Resume from ``last.pt``: weights, optimizers, schedule, average, random state, step, epoch, place in the epoch.

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
    if isinstance(run.scheduler, HoldThenCosine):
        run.scheduler.seek(int(ckpt["step"]))  # a function of the step: also after a constant-rate start
    elif run.scheduler is not None and ckpt.get("scheduler"):
        run.scheduler.load_state_dict(ckpt["scheduler"])
    _restore_rng(run, ckpt)
    if run.average is not None:
        if "average" in ckpt:
            run.average.load_state_dict(ckpt["average"])
        else:
            warnings.warn(f"{run.last_path} has no weight average; the average starts from the resumed weights")
            run.average = WeightAverage(run.model, run.config.average_decay)
    run.state = {key: ckpt[key] for key in run.state}
    _warn_on_changes(run, ckpt.get("train_config") or {})
    if run.is_main:
        truncate_csv(run.csv_path, run.state["epoch"])
    return _progress_from(run, ckpt.get("in_epoch"), ckpt.get("world_size", 1))


def _warn_on_changes(run: Run, old: dict) -> None:
    """Warn when the run resumes with other numbers than it started with, or without a removed switch it used."""
    changed = {f.name for f in fields(run.config) if f.name in old and f.name not in _RESULT_NEUTRAL
               and old[f.name] != getattr(run.config, f.name)}
    if changed:
        warnings.warn(f"resuming {run.last_path} with a changed configuration: {sorted(changed)}")
    dropped = {k: old[k] for k, neutral in _REMOVED_SWITCHES.items() if old.get(k, neutral) != neutral}
    if dropped:
        warnings.warn(f"{run.last_path} was trained with {dropped}, switches that no longer exist; "
                      "it resumes without them")


def _restore_rng(run: Run, ckpt: dict) -> None:
    """This rank's random state from the checkpoint; reseeded (with a warning) if the process count changed."""
    saved_world = ckpt.get("world_size", 1)
    if run.world == 1:
        set_rng_state({"cpu": ckpt["rng"], "cuda": ckpt.get("rng_cuda")}, run.device)
    elif saved_world == run.world and "rng_per_rank" in ckpt:
        set_rng_state(ckpt["rng_per_rank"][run.rank], run.device)
    else:
        warnings.warn(f"{run.last_path} was written by {saved_world} process(es), this run has {run.world}: "
                      "the noise is reseeded (the data order is not affected), the run will not match an "
                      "uninterrupted one bit for bit")
        torch.manual_seed(run.config.seed + run.rank + 1_000_003 * (ckpt["epoch"] + 1) + ckpt["step"])


def _progress_from(run: Run, in_epoch: dict | None, saved_world: int) -> EpochProgress:
    """The epoch totals a mid-epoch checkpoint saved (fresh ones at an epoch boundary)."""
    progress = EpochProgress.fresh(len(run.metric_keys))
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


# ---------------------------------------------------------------------------- metrics.csv
def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    """(header, rows) of a metrics file; empty when it does not exist."""
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


def append_csv(path: Path, row: dict) -> None:
    """Add one row; the header becomes the union of the file's columns and the row's (file order first)."""
    header, rows = read_csv(path)
    merged = header + [key for key in row if key not in header]
    _write_csv(path, merged, rows + [row])


def truncate_csv(path: Path, epoch: int) -> None:
    """Drop rows after ``epoch`` (a run killed between writing its CSV row and its checkpoint)."""
    header, rows = read_csv(path)
    kept = [r for r in rows if r.get("epoch") and int(float(r["epoch"])) <= epoch]
    if len(kept) != len(rows):
        _write_csv(path, header, kept)


def last_csv_row(path: Path) -> dict:
    """The last row with numbers as numbers (``epoch`` and ``step`` as integers)."""
    _, rows = read_csv(path)
    if not rows:
        return {}
    out = {}
    for key, value in rows[-1].items():
        try:
            out[key] = int(value) if key in ("epoch", "step") else float(value)
        except (TypeError, ValueError):
            out[key] = value
    return out
