"""STF: the Symmetrical TransFormer image codec.

Zou, Song, Zhang, "The Devil Is in the Details: Window-based Attention for Image
Compression", CVPR 2022. A Swin-Transformer analysis / synthesis transform, a
hyperprior, and a channel-conditional Gaussian entropy model over latent slices
with latent residual prediction (Minnen & Singh, ICIP 2020).

Every width is derived from :class:`STFConfig`, so the published model (the
defaults, 99,855,639 parameters) and the small CPU-scale models are the same code.
Attribute names and registration order reproduce the published state dict, which
``tests/test_conformance.py`` checks key by key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ._compressai import lean_compressai

lean_compressai()  # before the first compressai import: skips its dataset and point-cloud imports

from compressai.ans import BufferedRansEncoder, RansDecoder  # noqa: E402
from compressai.entropy_models import EntropyBottleneck, GaussianConditional  # noqa: E402
from compressai.layers import conv3x3, subpel_conv3x3  # noqa: E402
from compressai.models.base import CompressionModel  # noqa: E402
from compressai.models.utils import conv  # noqa: E402
from compressai.ops import quantize_ste  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from .swin import PatchEmbed, PatchMerging, PatchSplit, SwinStage  # noqa: E402

# Slice-transform widths of the published model (224-176-128-64) in units of entropy_width / 24.
_SLICE_TRANSFORM_WIDTHS = (14, 11, 8, 4)


@dataclass(frozen=True)
class STFConfig:
    """Every size of an STF model. The defaults are the published model."""

    embed_dim: int = 48
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 4
    mlp_ratio: float = 4.0
    num_slices: int = 12
    patch_size: int = 2
    qkv_bias: bool = True
    drop_path_rate: float = 0.2
    #: Width of the entropy model (hyperprior and slice transforms). ``None``: the latent's
    #: channel count M, as published, so that the entropy model grows with the transforms.
    #: A small model spends its parameters on the transforms instead (``profiles/cpu.yaml``):
    #: the hyper-analysis maps the M latent channels to this width, the hyper-synthesis
    #: returns features of this width to the slice transforms, whose widths scale with it.
    entropy_channels: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "num_heads", tuple(self.num_heads))
        if len(self.depths) != len(self.num_heads):
            raise ValueError("depths and num_heads need one entry per stage")
        if self.entropy_channels is not None and self.entropy_channels < 8:
            raise ValueError(f"entropy_channels must be at least 8 (or None), got {self.entropy_channels}")
        if self.latent_channels % self.num_slices:
            raise ValueError(f"{self.latent_channels} latent channels do not split into {self.num_slices} slices")
        for stage, heads in enumerate(self.num_heads):
            if self.stage_dim(stage) % heads:
                raise ValueError(f"stage {stage}: width {self.stage_dim(stage)} not divisible by {heads} heads")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    @property
    def latent_channels(self) -> int:  # M: 384 in the published model
        return self.stage_dim(self.num_stages - 1)

    @property
    def entropy_width(self) -> int:  # E: the entropy model's width, M (384) in the published model
        return self.entropy_channels or self.latent_channels

    @property
    def hyper_channels(self) -> int:  # N: 192 in the published model
        return self.entropy_width // 2

    @property
    def hyper_widths(self) -> list[int]:
        """E -> N in four equal steps (384-336-288-240-192 in the published model)."""
        e, n = self.entropy_width, self.hyper_channels
        return [e - k * (e - n) // 4 for k in range(5)]

    @property
    def slice_channels(self) -> int:
        return self.latent_channels // self.num_slices

    @property
    def max_support_slices(self) -> int:
        return self.num_slices // 2

    @property
    def slice_transform_widths(self) -> list[int]:
        e = self.entropy_width
        return [round(e * k / 24) for k in _SLICE_TRANSFORM_WIDTHS] + [self.slice_channels]

    @property
    def latent_stride(self) -> int:
        return self.patch_size * 2 ** (self.num_stages - 1)

    @property
    def total_stride(self) -> int:
        """What an input's height and width must divide by (y stride times the hyper's 4)."""
        return self.latent_stride * 4

    def to_dict(self) -> dict:
        d = asdict(self)
        d["depths"], d["num_heads"] = list(self.depths), list(self.num_heads)
        return d


def _slice_transform(in_channels: int, widths: list[int]) -> nn.Sequential:
    """3x3 convolutions with GELU between them (the published cc / lrp transforms)."""
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        if i:
            layers.append(nn.GELU())
        layers.append(conv(in_channels, width, stride=1, kernel_size=3))
        in_channels = width
    return nn.Sequential(*layers)


def _hyper_analysis(latent_channels: int, widths: list[int]) -> nn.Sequential:
    m0, m1, m2, m3, n = widths
    return nn.Sequential(
        conv3x3(latent_channels, m0), nn.GELU(), conv3x3(m0, m1), nn.GELU(), conv3x3(m1, m2, stride=2),
        nn.GELU(), conv3x3(m2, m3), nn.GELU(), conv3x3(m3, n, stride=2),
    )


def _hyper_synthesis(widths: list[int]) -> nn.Sequential:
    m0, m1, m2, m3, n = widths
    return nn.Sequential(
        conv3x3(n, m3), nn.GELU(), subpel_conv3x3(m3, m2, 2), nn.GELU(), conv3x3(m2, m1),
        nn.GELU(), subpel_conv3x3(m1, m0, 2), nn.GELU(), conv3x3(m0, m0),
    )


class SymmetricalTransFormer(CompressionModel):
    """STF (Zou et al., CVPR 2022) with the CompressAI interface.

    ``forward`` returns the reconstruction and likelihoods for training (additive
    noise for the likelihoods and straight-through rounding for the latents in
    training mode, as STF does; rounding in eval mode). ``compress`` /
    ``decompress`` produce and read real rANS bitstreams. Inputs of any size are
    padded (edge replication) to :attr:`STFConfig.total_stride` and cropped back.
    """

    #: Top-level modules of the entropy model (hyperprior, slice transforms, LRP, entropy
    #: coders): what ALICE keeps frozen. Ablations unfreeze them by these names.
    ENTROPY_MODEL = ("h_a", "h_mean_s", "h_scale_s", "cc_mean_transforms", "cc_scale_transforms",
                     "lrp_transforms", "entropy_bottleneck", "gaussian_conditional")
    #: The part of it that makes, codes and reads the hyper-latent (training's ``hyper_lr_scale``,
    #: :mod:`alice_lib.train.hyperprior`).
    HYPERPRIOR = ("h_a", "h_mean_s", "h_scale_s", "entropy_bottleneck")

    def __init__(self, config: STFConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = STFConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a config or keyword overrides, not both")
        self.config = cfg = config
        n_stages = cfg.num_stages
        rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()

        def drop_rates(depths: tuple[int, ...], stage: int) -> list[float]:
            start = sum(depths[:stage])
            return rates[start:start + depths[stage]]

        # Registration order reproduces the published state-dict order.
        self.layers = nn.ModuleList(
            SwinStage(cfg.stage_dim(i), cfg.depths[i], cfg.num_heads[i], cfg.window_size, cfg.mlp_ratio,
                      cfg.qkv_bias, drop_path=drop_rates(cfg.depths, i),
                      resample=PatchMerging if i < n_stages - 1 else None)
            for i in range(n_stages)
        )
        depths_rev, heads_rev = cfg.depths[::-1], cfg.num_heads[::-1]
        self.syn_layers = nn.ModuleList(
            SwinStage(cfg.stage_dim(n_stages - 1 - i), depths_rev[i], heads_rev[i], cfg.window_size,
                      cfg.mlp_ratio, cfg.qkv_bias, drop_path=drop_rates(depths_rev, i),
                      resample=PatchSplit if i < n_stages - 1 else None)
            for i in range(n_stages)
        )
        self.h_a = _hyper_analysis(cfg.latent_channels, cfg.hyper_widths)
        self.h_mean_s = _hyper_synthesis(cfg.hyper_widths)
        self.h_scale_s = _hyper_synthesis(cfg.hyper_widths)
        # The slice transforms see the hyperprior's features (E channels) and the decoded slices.
        m, s, support = cfg.entropy_width, cfg.slice_channels, cfg.max_support_slices
        widths = cfg.slice_transform_widths
        self.cc_mean_transforms = nn.ModuleList(
            _slice_transform(m + s * min(i, support), widths) for i in range(cfg.num_slices))
        self.cc_scale_transforms = nn.ModuleList(
            _slice_transform(m + s * min(i, support), widths) for i in range(cfg.num_slices))
        self.lrp_transforms = nn.ModuleList(
            _slice_transform(m + s * min(i + 1, support + 1), widths) for i in range(cfg.num_slices))
        self.entropy_bottleneck = EntropyBottleneck(cfg.hyper_channels)
        self.gaussian_conditional = GaussianConditional(None)
        self.patch_embed = PatchEmbed(cfg.patch_size, 3, cfg.embed_dim)
        self.end_conv = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, cfg.embed_dim * cfg.patch_size**2, kernel_size=5, padding=2),
            nn.PixelShuffle(cfg.patch_size),
            nn.Conv2d(cfg.embed_dim, 3, kernel_size=3, padding=1),
        )

    # ------------------------------------------------------------------ transforms
    def analysis(self, x: Tensor) -> Tensor:
        """Image ``[B, 3, H, W]`` (H, W multiples of the latent stride) -> latent ``y``."""
        x = self.patch_embed(x)
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        for stage in self.layers:
            x, h, w = stage(x, h, w)
        return x.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()

    def synthesis(self, y: Tensor) -> Tensor:
        """Latent ``y_hat`` -> image (not clamped)."""
        b, c, h, w = y.shape
        x = y.permute(0, 2, 3, 1).reshape(b, h * w, c)
        for stage in self.syn_layers:
            x, h, w = stage(x, h, w)
        return self.end_conv(x.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous())

    # ------------------------------------------------------------------ padding
    def _pad(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an RGB batch [B, 3, H, W], got shape {tuple(x.shape)}")
        stride = self.config.total_stride
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % stride, (-w) % stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return x

    # ------------------------------------------------------------------ entropy model
    def _slice_parameters(self, index: int, latent_means: Tensor, latent_scales: Tensor,
                          decoded: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Mean and scale of slice ``index`` from the hyperprior and the previous decoded slices."""
        support = decoded[: self.config.max_support_slices]
        mean_support = torch.cat([latent_means, *support], dim=1)
        mu = self.cc_mean_transforms[index](mean_support)
        scale = self.cc_scale_transforms[index](torch.cat([latent_scales, *support], dim=1))
        return mu, scale, mean_support

    def _refine(self, index: int, mean_support: Tensor, y_hat_slice: Tensor) -> Tensor:
        """Latent residual prediction: add a bounded correction to the quantised slice."""
        lrp = self.lrp_transforms[index](torch.cat([mean_support, y_hat_slice], dim=1))
        return y_hat_slice + 0.5 * torch.tanh(lrp)

    def _scale_indexes(self, scale: Tensor) -> Tensor:
        """Index into the scale table of each scale: CompressAI's ``build_indexes`` in one search.

        ``build_indexes`` counts, for each of the 63 table entries, which scales are at
        most that entry (63 passes over the slice); the count of entries below the
        bounded scale is the same integer, found by binary search.
        """
        gc = self.gaussian_conditional
        scale = gc.lower_bound_scale(scale)
        return torch.searchsorted(gc.scale_table[:-1].contiguous(), scale.contiguous()).int()

    def _hyper_decode(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        return self.h_mean_s(z_hat), self.h_scale_s(z_hat)

    def forward(self, x: Tensor) -> dict:
        h, w = x.shape[-2:]
        y = self.analysis(self._pad(x))
        z = self.h_a(y)
        _, z_likelihoods = self.entropy_bottleneck(z)
        # The hyper-synthesis sees z rounded around the bottleneck's medians, with a straight-through
        # gradient in training (STF's reference training; the likelihoods see additive noise).
        z_offset = self.entropy_bottleneck._get_medians()
        z_hat = quantize_ste(z - z_offset) + z_offset
        latent_means, latent_scales = self._hyper_decode(z_hat)

        y_hat_slices: list[Tensor] = []
        y_likelihoods: list[Tensor] = []
        for index, y_slice in enumerate(y.chunk(self.config.num_slices, 1)):
            mu, scale, mean_support = self._slice_parameters(index, latent_means, latent_scales, y_hat_slices)
            _, likelihood = self.gaussian_conditional(y_slice, scale, mu)
            y_likelihoods.append(likelihood)
            y_hat_slice = quantize_ste(y_slice - mu) + mu
            y_hat_slices.append(self._refine(index, mean_support, y_hat_slice))

        x_hat = self.synthesis(torch.cat(y_hat_slices, dim=1))[..., :h, :w]
        return {"x_hat": x_hat, "likelihoods": {"y": torch.cat(y_likelihoods, dim=1), "z": z_likelihoods}}

    def _coding_tables(self) -> tuple[list, list, list]:
        """The Gaussian coder's tables as the lists rANS wants, converted once per table version.

        Converting them costs ~10 ms a call; tiled coding calls once per tile. The cache
        key changes whenever ``update()`` replaces or ``load_state_dict`` rewrites a table.
        """
        gc = self.gaussian_conditional
        if gc._quantized_cdf.numel() == 0:
            raise RuntimeError("entropy tables are empty: call model.update() (or load an updated checkpoint)")
        tables = (gc._quantized_cdf, gc._cdf_length, gc._offset)
        key = tuple((t.data_ptr(), t._version) for t in tables)
        cached = self.__dict__.get("_coding_tables_cache")
        if cached is None or cached[0] != key:
            cached = (key, (gc.quantized_cdf.tolist(), gc.cdf_length.reshape(-1).int().tolist(),
                            gc.offset.reshape(-1).int().tolist()))
            self.__dict__["_coding_tables_cache"] = cached
        return cached[1]

    @torch.no_grad()
    def compress(self, x: Tensor) -> dict:
        """Encode images ``[B, 3, H, W]`` in [0, 1] into rANS bitstreams.

        Returns ``{"strings": [y_strings, z_strings], "shape": z_shape, "image_size": (H, W)}``
        with one ``y`` and one ``z`` string per image of the batch: a batch is coded
        as independent images that happen to share a size.
        """
        cdf, cdf_lengths, offsets = self._coding_tables()
        h, w = x.shape[-2:]
        y = self.analysis(self._pad(x))
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        latent_means, latent_scales = self._hyper_decode(z_hat)

        y_hat_slices: list[Tensor] = []
        symbols, indexes = [], []
        for index, y_slice in enumerate(y.chunk(self.config.num_slices, 1)):
            mu, scale, mean_support = self._slice_parameters(index, latent_means, latent_scales, y_hat_slices)
            q = self.gaussian_conditional.quantize(y_slice, "symbols", mu)
            symbols.append(q.flatten(1))
            indexes.append(self._scale_indexes(scale).flatten(1))
            if index < self.config.max_support_slices:  # later slices condition nothing: skip their LRP
                y_hat_slices.append(self._refine(index, mean_support, q + mu))

        # One list conversion per image for the whole latent, not one per slice or symbol.
        symbols_all, indexes_all = torch.cat(symbols, 1).int(), torch.cat(indexes, 1).int()
        y_strings = []
        for sym, idx in zip(symbols_all.tolist(), indexes_all.tolist()):
            encoder = BufferedRansEncoder()
            encoder.encode_with_indexes(sym, idx, cdf, cdf_lengths, offsets)
            y_strings.append(encoder.flush())
        return {"strings": [y_strings, z_strings], "shape": tuple(z.shape[-2:]), "image_size": (h, w)}

    @torch.no_grad()
    def decompress(self, strings: list, shape, image_size: tuple[int, int] | None = None) -> dict:
        """Decode ``compress`` output to ``{"x_hat": [B, 3, H, W]}`` clamped to [0, 1].

        ``image_size`` (from ``compress``) crops the padding away; without it the
        padded size is returned, as in CompressAI.
        """
        y_strings, z_strings = strings
        if len(y_strings) != len(z_strings):
            raise ValueError("y and z strings disagree on the batch size")
        cdf, cdf_lengths, offsets = self._coding_tables()
        z_hat = self.entropy_bottleneck.decompress(z_strings, tuple(shape))
        latent_means, latent_scales = self._hyper_decode(z_hat)
        decoders = []
        for y_string in y_strings:
            decoder = RansDecoder()
            decoder.set_stream(y_string)
            decoders.append(decoder)

        y_hat_slices: list[Tensor] = []
        for index in range(self.config.num_slices):
            mu, scale, mean_support = self._slice_parameters(index, latent_means, latent_scales, y_hat_slices)
            idx = self._scale_indexes(scale).flatten(1).tolist()
            values = [dec.decode_stream(i, cdf, cdf_lengths, offsets) for dec, i in zip(decoders, idx)]
            q = torch.tensor(values, dtype=torch.int32, device=mu.device).view(mu.shape)
            y_hat_slice = self.gaussian_conditional.dequantize(q, mu)
            y_hat_slices.append(self._refine(index, mean_support, y_hat_slice))

        x_hat = self.synthesis(torch.cat(y_hat_slices, dim=1)).clamp_(0, 1)
        if image_size is not None:
            x_hat = x_hat[..., : image_size[0], : image_size[1]]
        return {"x_hat": x_hat}

    # ------------------------------------------------------------------ helpers
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
