"""What updates the weights: the optimizers, the learning-rate schedule and the moving average of the weights."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from .config import TrainConfig
from .hyperprior import hyperprior_groups

Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau


def optimizers(config: TrainConfig, model: nn.Module, main: list[nn.Parameter],
               aux: list[nn.Parameter]) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """The main optimizer (Adam or SGD) and, when the quantiles train, CompressAI's auxiliary Adam."""
    groups = hyperprior_groups(model, main, config.lr, config.hyper_lr_scale)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return optimizer, (torch.optim.Adam(aux, lr=config.aux_lr) if aux else None)


class HoldThenCosine(torch.optim.lr_scheduler.LambdaLR):
    """The learning rate held for ``steps - decay`` steps, then a cosine to zero over the last ``decay``.

    The factor is a function of the step alone, so the schedule needs no state of its
    own: :meth:`seek` puts it at any step, which is how a run resumes into it, from
    its own checkpoint or from one that trained at a constant rate (a long run is
    held at ``lr`` while it may still be extended, then ended with the decay).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int, decay_fraction: float):
        self.decay = max(1, round(steps * decay_fraction))
        self.hold = steps - self.decay
        hold, decay = self.hold, self.decay
        super().__init__(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(max(step - hold, 0), decay) / decay)))

    def seek(self, step: int) -> None:
        """The learning rates of ``step`` (steps taken so far) in the optimizer."""
        self.last_epoch = step
        self._last_lr = [base * self.lr_lambdas[0](step) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


def steps_every_step(config: TrainConfig, scheduler: Scheduler | None) -> bool:
    """Whether the schedule advances after every optimisation step (else once per epoch, or never)."""
    return isinstance(scheduler, HoldThenCosine) or (
        isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and config.schedule_unit == "step")


def scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Scheduler | None:
    """Cosine over the steps or over the epochs (``schedule_unit``), held then cosine, plateau per epoch, or none."""
    if config.schedule == "hold-cosine":
        return HoldThenCosine(optimizer, config.steps, config.decay_fraction)
    if config.schedule == "cosine":
        t_max = config.steps if config.schedule_unit == "step" else config.epochs(steps_per_epoch)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=config.plateau_factor, patience=config.plateau_patience)
    return None


class WeightAverage:
    """An exponential moving average of the trainable parameters (Polyak and Juditsky, 1992).

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
