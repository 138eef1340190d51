"""Swin-Transformer building blocks used by STF.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows", ICCV 2021; arranged for image compression by Zou et al., "The Devil Is
in the Details: Window-based Attention for Image Compression", CVPR 2022 (STF).

Tokens travel as ``[B, H*W, C]`` sequences with their spatial size passed
alongside, as in the published STF code, so that the parameter names and the
arithmetic match its checkpoints. Module attribute names (``norm1``, ``attn.qkv``,
``mlp.fc1``, ``downsample.reduction`` ...) are part of the checkpoint format:
do not rename them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def trunc_normal_(tensor: Tensor, std: float, bound: float = 2.0) -> Tensor:
    """Fill with N(0, std^2) truncated to [-bound, bound] by inverse-CDF sampling, in place.

    The sampling order of the Swin / STF reference initialisation (one uniform draw per
    value), so that seeded models initialise exactly as they did with timm.
    """
    cdf = 0.5 * (1 + math.erf(bound / std / math.sqrt(2)))
    tensor.uniform_(1 - 2 * cdf, 2 * cdf - 1).erfinv_().mul_(std * math.sqrt(2)).clamp_(-bound, bound)
    return tensor


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole sample's residual branch with probability ``p``.

    Defined here rather than imported from timm, whose import (torchvision, dynamo)
    costs seconds of every command's start-up; the arithmetic is the usual one
    (keep with probability ``1 - p``, scale the kept samples by ``1 / (1 - p)``).
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep) if keep > 0 else x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """The Swin MLP: ``fc2(drop(GELU(fc1(x))))``; ``fc1`` / ``fc2`` are checkpoint (and adapter) names."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def window_partition(x: Tensor, window: int) -> Tensor:
    """``[B, H, W, C]`` -> ``[B * nW, window, window, C]`` (H, W multiples of window)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def window_reverse(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`window_partition`."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def relative_position_index(window: int) -> Tensor:
    """Index into the ``(2w-1)^2`` bias table for every pair of positions in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)  # [2, w*w]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with a learned relative position bias."""

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.window, self.num_heads = dim, window, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attention of ``[B * nW, n, C]`` windows; ``mask`` ``[nW, n, n]`` (0 / -100) for shifted windows.

        PyTorch's fused scaled-dot-product attention, with the relative position bias
        (and the shift mask) as its additive mask: one kernel instead of five passes
        over the ``n x n`` scores.
        """
        bw, n, c = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, heads).permute(2, 0, 1)  # [heads, n, n]
        if mask is not None:  # windows of one image share a mask: batch as [B, nW, heads, n, n]
            n_windows = mask.shape[0]
            q, k, v = (t.reshape(bw // n_windows, n_windows, heads, n, -1) for t in (q, k, v))
            bias = bias.unsqueeze(0) + mask.unsqueeze(1)
        drop = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=drop, scale=self.scale)
        x = x.reshape(bw, heads, n, -1).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(x))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP, each with a residual connection."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor, h: int, w: int, mask: Tensor | None) -> Tensor:
        b, _, c = x.shape
        ws = self.window
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        pad_b, pad_r = (-h) % ws, (-w) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(x, ws).reshape(-1, ws * ws, c)
        windows = self.attn(windows, mask if self.shift else None)
        x = window_reverse(windows.view(-1, ws, ws, c), ws, hp, wp)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x[:, :h, :w, :].reshape(b, h * w, c)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def shifted_window_mask(h: int, w: int, window: int, shift: int, device: torch.device) -> Tensor:
    """Additive attention mask (0 or -100) that keeps shifted windows from mixing regions."""
    hp, wp = -(-h // window) * window, -(-w // window) * window
    regions = torch.zeros(1, hp, wp, 1, device=device)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bounds:
        for cols in bounds:
            regions[:, rows, cols, :] = label
            label += 1
    windows = window_partition(regions, window).reshape(-1, window * window)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class PatchMerging(nn.Module):
    """Encoder down-sampling: 2x2 neighbours concatenated (4C), normalised, projected to 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, h: int, w: int) -> tuple[Tensor, int, int]:
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        x = self.reduction(self.norm(x.view(b, -1, 4 * c)))
        return x, (h + 1) // 2, (w + 1) // 2


class PatchSplit(nn.Module):
    """Decoder up-sampling (STF): normalise, project C to 2C, pixel-shuffle to C/2 at twice the size."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: Tensor, h: int, w: int) -> tuple[Tensor, int, int]:
        b, n, c = x.shape
        x = self.reduction(self.norm(x))
        x = self.shuffle(x.transpose(1, 2).reshape(b, 2 * c, h, w))
        return x.permute(0, 2, 3, 1).reshape(b, 4 * n, c // 2), 2 * h, 2 * w


class SwinStage(nn.Module):
    """``depth`` Swin blocks alternating plain and shifted windows, then an optional resampling.

    Registered as ``layers.i`` (encoder) and ``syn_layers.i`` (decoder) in STF.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: list[float] | None = None, resample: type[nn.Module] | None = None):
        super().__init__()
        drop_path = drop_path or [0.0] * depth
        self.window, self.shift = window, window // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else self.shift, mlp_ratio, qkv_bias,
                      drop, attn_drop, drop_path[i])
            for i in range(depth)
        )
        self.downsample = resample(dim) if resample is not None else None

    def forward(self, x: Tensor, h: int, w: int) -> tuple[Tensor, int, int]:
        mask = shifted_window_mask(h, w, self.window, self.shift, x.device) if len(self.blocks) > 1 else None
        for block in self.blocks:
            x = block(x, h, w, mask)
        if self.downsample is None:
            return x, h, w
        return self.downsample(x, h, w)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution followed by LayerNorm over channels."""

    def __init__(self, patch: int, in_channels: int, dim: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % self.patch, 0, (-h) % self.patch))
        x = self.proj(x)
        b, c, hh, ww = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, hh, ww)
