"""Coding an image into an :class:`~alice_lib.codec.format.AliceFile` and back, tile by tile.

An image is cut into tiles on a grid of the model's total stride (64 for every STF
of this project) and each tile is coded as an independent STF bitstream. The
memory of a coder is therefore the image itself (8 bits per sample) plus what the
model needs for one tile, whatever the image size; the price is that no context
crosses a tile border (measured on Kodak: see the README's compress section).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..utils import model_device, to_uint8
from .format import DEFAULT_TILE, MAX_SIDE, AliceFile, AliceFormatError, tile_boxes, z_shape_of
from .rate import RateControl

__all__ = ["as_uint8", "tile_shape", "encode", "decode", "tiles_of"]


def as_uint8(image: Tensor) -> Tensor:
    """A uint8 ``[3, H, W]`` image from uint8 ``[3, H, W]`` or float ``[(1,) 3, H, W]`` in [0, 1]."""
    if image.dtype != torch.uint8:
        if image.dim() == 4 and image.shape[0] == 1:
            image = image[0]
        image = to_uint8(image)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got {tuple(image.shape)}")
    return image


def tile_shape(height: int, width: int, tile: int | None, stride: int) -> tuple[int, int]:
    """The tile actually used: ``tile`` rounded up to the stride, no larger than the padded image.

    ``tile=None`` (or 0) codes the image as one tile.
    """
    padded = (-(-height // stride) * stride, -(-width // stride) * stride)
    if not tile:
        return padded
    side = -(-int(tile) // stride) * stride
    return min(side, padded[0]), min(side, padded[1])


def tiles_of(image: Tensor, tile: tuple[int, int]):
    """``(box, float [1, 3, h, w] in [0, 1])`` for each tile of a uint8 image, made one at a time."""
    for box in tile_boxes(image.shape[-2], image.shape[-1], *tile):
        top, left, h, w = box
        yield box, image[:, top:top + h, left:left + w].float().div(255).unsqueeze(0)


def encode(rate_control: RateControl, image: Tensor, control: float | None = None,
           tile: int | None = DEFAULT_TILE) -> AliceFile:
    """Code ``image`` (uint8 ``[3, H, W]``) at ``control`` (default: the anchor) in tiles of ``tile`` pixels."""
    u8 = as_uint8(image)
    h, w = u8.shape[-2:]
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise ValueError(f"image size {h}x{w} outside 1..{MAX_SIDE} per side")
    control = rate_control.anchor_control if control is None else control
    model = rate_control.model_at(control)
    stride = model.config.total_stride
    shape = tile_shape(h, w, tile, stride)
    device = model_device(model)
    streams = []
    for _, x in tiles_of(u8, shape):
        enc = model.compress(x.to(device))
        streams.append((enc["strings"][0][0], enc["strings"][1][0]))
    mode = "fixed" if not rate_control.sets else rate_control.mode
    return AliceFile(base_hash=rate_control.base_hash[:16], adapter_id=rate_control.identity(control)[:16],
                     mode=mode, control=float(control), height=h, width=w, tile=shape, stride=stride,
                     streams=streams)


def _fitting(rate_control: RateControl, alice: AliceFile) -> RateControl:
    """``rate_control`` in the file's mode, after checking the file was made with these weights."""
    if alice.base_hash != rate_control.base_hash[:16]:
        raise AliceFormatError(f"the file was made with base weights {alice.base_hash}, but the loaded model's "
                               f"base weights are {rate_control.base_hash}; load the matching model")
    if alice.mode != "fixed" and alice.mode != rate_control.mode:
        rate_control = rate_control.with_mode(alice.mode)
    lo, hi = rate_control.range
    if not lo - 1e-9 <= alice.control <= hi + 1e-9:
        raise AliceFormatError(f"the file's lambda {alice.lmbda:g} is outside the loaded adapters' range "
                               f"{rate_control.lmbdas[0]:g} .. {rate_control.lmbdas[-1]:g}; load its adapters")
    identity = rate_control.identity(alice.control)[:16]
    if identity != alice.adapter_id:
        raise AliceFormatError(f"the file was made with adapters {alice.adapter_id}, but the loaded adapters at "
                               f"lambda {alice.lmbda:g} are {identity}; load the adapters it was made with")
    return rate_control


def _z_shapes(alice: AliceFile, stride: int) -> list[tuple[int, int]]:
    if alice.v1_z_shape is None:
        if alice.stride != stride:
            raise AliceFormatError(f"the file was coded with stride {alice.stride}, the loaded model's is {stride}")
        return alice.z_shapes()
    expected = z_shape_of(alice.height, alice.width, stride)
    if alice.v1_z_shape != expected:
        raise AliceFormatError(f"z shape {alice.v1_z_shape} does not match a {alice.height}x{alice.width} image "
                               f"for this model (expected {expected})")
    return [expected]


def decode(rate_control: RateControl, alice: AliceFile) -> Tensor:
    """Decode an :class:`AliceFile` to uint8 ``[3, H, W]`` after checking it fits ``rate_control``."""
    model = _fitting(rate_control, alice).model_at(alice.control)
    z_shapes = _z_shapes(alice, model.config.total_stride)
    image = torch.empty(3, alice.height, alice.width, dtype=torch.uint8)
    for (top, left, h, w), (y, z), z_shape in zip(alice.boxes, alice.streams, z_shapes):
        image[:, top:top + h, left:left + w] = _decode_tile(model, y, z, z_shape, (h, w))
    return image


def _decode_tile(model, y: bytes, z: bytes, z_shape: tuple[int, int], size: tuple[int, int]) -> Tensor:
    try:
        x_hat = model.decompress([[y], [z]], z_shape, size)["x_hat"]
    except (RuntimeError, ValueError, IndexError, OverflowError) as error:  # only past a CRC collision
        raise AliceFormatError(f"the bitstream could not be decoded ({type(error).__name__}: {error})") from error
    if x_hat.shape[-2:] != size or not bool(torch.isfinite(x_hat).all()):
        raise AliceFormatError("the bitstream decoded to an invalid image")
    return to_uint8(x_hat[0]).cpu()


def estimate(model, image: Tensor, tile: int | None = DEFAULT_TILE) -> tuple[float, Tensor]:
    """(bits estimated from the eval forward's likelihoods, its rounded reconstruction), tile by tile.

    The cheap stand-in for the real coder that the target search iterates on.
    """
    from ..utils import bits_from_likelihoods

    u8 = as_uint8(image)
    h, w = u8.shape[-2:]
    shape = tile_shape(h, w, tile, model.config.total_stride)
    rec = torch.empty_like(u8)
    bits = 0.0
    device = model_device(model)
    with torch.no_grad():
        for (top, left, th, tw), x in tiles_of(u8, shape):
            out = model(x.to(device))
            bits += float(bits_from_likelihoods({k: v.double() for k, v in out["likelihoods"].items()}))
            rec[:, top:top + th, left:left + tw] = to_uint8(out["x_hat"][0]).cpu()
    if not math.isfinite(bits):
        raise ValueError("the rate estimate is not finite")
    return bits, rec
