"""The rate-distortion objective of STF, ALICE and CompressAI, and its measurement on held-out images."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..evaluation.metrics import ms_ssim_index
from ..utils import bpp_from_likelihoods, model_device, psnr_from_mse
from .config import METRICS


class NonFiniteLossError(FloatingPointError):
    """The loss (or the gradient) became NaN or infinite; the last checkpoint is left untouched."""


class RateDistortionLoss(nn.Module):
    """``lambda * 255^2 * MSE + bpp`` (or ``lambda * (1 - MS-SSIM) + bpp``), as in STF, ALICE and CompressAI.

    ``bpp`` is the rate estimated from the likelihoods, ``sum(-log2 p) / (N * H * W)``
    (Ballé et al., ICLR 2018). The MS-SSIM variant is computed on the unclamped
    reconstruction (as CompressAI does, so that gradients reach out-of-range pixels)
    and returns ``ms_ssim`` too. A model with a hyperprior also gets ``bpp_z``, the
    hyper-latent's share of the rate, and ``z_bits``, its bits per image (about 0
    when the hyperprior has collapsed).
    """

    def __init__(self, lmbda: float, metric: str = "mse"):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}")
        self.lmbda, self.metric = lmbda, metric

    def forward(self, output: dict, target: Tensor) -> dict[str, Tensor]:
        n, _, h, w = target.shape
        bpp = bpp_from_likelihoods(output["likelihoods"], n * h * w)
        x_hat = output["x_hat"]
        mse = torch.mean((x_hat - target) ** 2)
        result = {"bpp": bpp, "mse": mse}
        if isinstance(output["likelihoods"], Mapping) and "z" in output["likelihoods"]:
            result["bpp_z"] = bpp_from_likelihoods([output["likelihoods"]["z"]], n * h * w)
            result["z_bits"] = result["bpp_z"] * h * w  # per image: the collapse check in metrics.csv
        if self.metric == "mse":
            distortion = 255**2 * mse
        else:
            result["ms_ssim"] = ms_ssim_index(x_hat, target)
            distortion = 1 - result["ms_ssim"]
        return {"loss": self.lmbda * distortion + bpp, **result}


def float_output(output: dict) -> dict:
    """The model's output in float32 (after a bf16 autocast forward: the loss is computed in float32)."""
    return {"x_hat": output["x_hat"].float(),
            "likelihoods": {key: value.float() for key, value in output["likelihoods"].items()}}


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters: (main, aux); aux are the entropy bottleneck's ``quantiles`` (CompressAI's aux loss)."""
    main, aux = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (aux if name.endswith("quantiles") else main).append(p)
    if not main:
        raise ValueError("nothing to train: no parameter requires a gradient (see lora.mark_trainable)")
    return main, aux


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
