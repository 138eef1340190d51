"""Image quality: PSNR and MS-SSIM of a decoded 8-bit image, and the MS-SSIM a training loss uses.

The coded-image metrics compare the original ``uint8`` image with the reconstruction rounded to
``uint8`` (:func:`alice_lib.utils.to_uint8`), because a decoded image is stored and shown
in 8 bits; measuring the float output would credit a codec with precision no file keeps.
This is what CompressAI's ``eval_model`` and the ALICE reference do. Training
(:class:`alice_lib.train.RateDistortionLoss` with ``metric="ms-ssim"``) uses
:func:`ms_ssim_index` on float images instead, with a window fitted to its crops.
"""

from __future__ import annotations

import math
import warnings

from pytorch_msssim import ms_ssim
from torch import Tensor

from ..utils import psnr_from_mse

__all__ = ["MS_SSIM_MIN_SIDE", "psnr_rgb", "ms_ssim_rgb", "ms_ssim_to_db", "image_quality", "msssim_window",
           "ms_ssim_index"]

#: pytorch_msssim's five-scale pyramid needs the smaller side to exceed (11 - 1) * 2**4.
MS_SSIM_MIN_SIDE = 161


def _check_pair(original: Tensor, reconstruction: Tensor) -> None:
    if original.shape != reconstruction.shape:
        raise ValueError(f"shapes differ: {tuple(original.shape)} vs {tuple(reconstruction.shape)}")


def psnr_rgb(original: Tensor, reconstruction: Tensor) -> float:
    """PSNR in dB of two ``uint8 [3, H, W]`` images (peak 255, MSE over pixels and channels); inf if equal."""
    _check_pair(original, reconstruction)
    mse = (original.double() - reconstruction.double()).pow(2).mean().item()
    return psnr_from_mse(mse, peak=255.0)


def ms_ssim_rgb(original: Tensor, reconstruction: Tensor) -> float:
    """MS-SSIM (5 scales, 11x11 Gaussian, data range 1) of two ``uint8 [3, H, W]`` images.

    ``NaN`` with a warning when a side is under :data:`MS_SSIM_MIN_SIDE` pixels: the
    five-scale pyramid of Wang et al. (2003) is not defined there, and a value from
    fewer scales would not be comparable with published numbers.
    """
    _check_pair(original, reconstruction)
    if min(original.shape[-2:]) < MS_SSIM_MIN_SIDE:
        warnings.warn(f"MS-SSIM needs both sides >= {MS_SSIM_MIN_SIDE} px, image is "
                      f"{tuple(original.shape[-2:])}: reporting NaN", stacklevel=2)
        return math.nan
    a = original.unsqueeze(0).float().div(255)
    b = reconstruction.unsqueeze(0).float().div(255)
    return float(ms_ssim(a, b, data_range=1.0))


def ms_ssim_to_db(value: float | None) -> float:
    """``-10 log10(1 - MS-SSIM)``, the scale RD plots use (inf at 1; None and NaN give NaN)."""
    if value is None or math.isnan(value):
        return math.nan
    return math.inf if value >= 1 else -10 * math.log10(1 - value)


def image_quality(original: Tensor, reconstruction: Tensor) -> dict[str, float]:
    """``psnr``, ``ms_ssim`` and ``ms_ssim_db`` of a ``uint8`` reconstruction: the metric fields of a result row."""
    ms = ms_ssim_rgb(original, reconstruction)
    return {"psnr": psnr_rgb(original, reconstruction), "ms_ssim": ms, "ms_ssim_db": ms_ssim_to_db(ms)}


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
    """Mean MS-SSIM (Wang et al., 2003; data range 1, five scales) of float batches, differentiable.

    The window is fitted to the image size (:func:`msssim_window`), so that the small
    crops of training have a value; the loss of STF and CompressAI's MS-SSIM models.
    """
    return ms_ssim(x_hat, target, data_range=1.0, win_size=msssim_window(min(target.shape[-2:])))
