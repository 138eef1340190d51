"""The hyperprior options of a schedule: how a small STF's hyper-latent is kept alive.

Two options of :class:`~alice_lib.settings.TrainingSettings`, both neutral at 1 (the
published STF recipe), and the only hyperprior switches the training code has:

* ``hyper_init_gain`` (model initialisation): a model trained from random weights
  starts with the last convolution of ``h_a`` multiplied by this
  (:func:`amplify_hyper_latent`). At the CPU profile's size the hyper-latent
  ``z = h_a(y)`` of random weights varies by about 0.003 against a rounding step of
  1, so the hyperprior starts out carrying nothing and training leaves it so.
* ``hyper_lr_scale`` (optimiser): the hyperprior path, ``h_a``, ``h_mean_s``,
  ``h_scale_s`` and the bottleneck's density
  (:attr:`~alice_lib.models.stf.SymmetricalTransFormer.HYPERPRIOR`), learns at
  ``lr`` times this in a parameter group of its own (:func:`hyperprior_groups`); the
  schedule scales both groups alike.

Recipe v2 (300 and 0.125) keeps the hyper-latent varying in about half its elements
to the end of the anchor's training, where the published recipe leaves it constant;
the anchor codes no better for it, but an anchor whose hyperprior carries
information is one whose frozen entropy model ALICE can adapt through. Measured in
``docs/studies/hyperprior.md``,
which also records the two other switches tried then and removed since, because
neither gained anything: additive noise instead of rounding for the hyper-latent
(the same validation loss, 11.293 against 11.291, and a hyper-latent still constant)
and pricing its rate in gradually (the hyper-latent faded within 700 steps of being
fully priced).
"""

from __future__ import annotations

import torch
from torch import nn


def amplify_hyper_latent(model: nn.Module, gain: float) -> None:
    """Scale the last layer of ``h_a`` of a freshly initialised STF by ``gain`` (1: unchanged).

    Only for random weights: given weights are never rescaled (the callers start from
    a checkpoint or call this, not both).
    """
    if gain == 1.0:
        return
    if not gain > 0:
        raise ValueError(f"hyper-latent gain must be positive, got {gain!r}")
    with torch.no_grad():
        last = model.h_a[-1]
        last.weight.mul_(gain)
        last.bias.mul_(gain)


def hyperprior_groups(model: nn.Module, params: list[nn.Parameter], lr: float, scale: float) -> list[dict]:
    """The optimiser's parameter groups for ``params``: one, or the hyperprior path apart at ``lr * scale``.

    The order (the rest first, then the hyperprior path) is the order in every checkpoint's
    optimizer state, so it must not change.
    """
    if scale == 1.0:
        return [{"params": params}]
    modules = getattr(model, "HYPERPRIOR", ())  # SymmetricalTransFormer.HYPERPRIOR
    hyper_ids = {id(p) for name, p in model.named_parameters() if name.split(".")[0] in modules}
    hyper = [p for p in params if id(p) in hyper_ids]
    if not hyper:
        raise ValueError(f"hyper_lr_scale is set but no trainable parameter is in the hyperprior path {modules}")
    return [{"params": [p for p in params if id(p) not in hyper_ids]}, {"params": hyper, "lr": lr * scale}]
