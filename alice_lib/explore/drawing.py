"""The explorer's pictures: a view's matplotlib figure, the widgets' RD picture, and PNG bytes of both."""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import Tensor

from ..figures import METHOD_STYLES, PAPER_RC, draw_rd

if TYPE_CHECKING:  # the figures read views; nothing here makes one
    from .core import Box, RdReference, View

__all__ = ["RD_METHODS", "draw_view", "figure_png", "image_png", "RdPicture"]

#: The curves drawn under the point: the references, ALICE, and the codec it is compared with.
RD_METHODS = ("fixed-rate", "alice", "jpeg")


# ----------------------------------------------------------------------------- the figure
def _show(ax, image: Tensor, title: str, box: Box | None = None) -> None:
    ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest" if box is None else "antialiased")
    if box is not None:
        ax.add_patch(Rectangle((box.left - 0.5, box.top - 0.5), box.width, box.height, fill=False,
                               edgecolor="#FFD700", linewidth=1.2))
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()  # no ticks to draw: a third of the figure's time otherwise


def _titles(view: View) -> tuple[str, str, str]:
    h, w = view.original.shape[-2:]
    jpeg, q = view.jpeg.coded.row, view.quality
    fits = (f"{view.jpeg.bytes:,} B <= {view.jpeg.budget:,} B" if view.jpeg.fits else
            f"{view.jpeg.bytes:,} B: LARGER than {view.jpeg.budget:,} B, even quality 1 does not fit")
    return (f"Original: {view.image_name}, {w}x{h}",
            f"ALICE, lambda {view.lmbda:.5f} ({view.mode}): {view.alice.file_bytes:,} B\n"
            f"{view.bpp:.3f} bpp, PSNR {q['psnr']:.2f} dB, MS-SSIM {q['ms_ssim']:.4f}",
            f"JPEG 4:4:4 quality {view.jpeg.quality}: {fits}\n"
            f"{jpeg['bpp']:.3f} bpp, PSNR {jpeg['psnr']:.2f} dB, MS-SSIM {jpeg['ms_ssim']:.4f}")


def _draw_curves(ax, reference: RdReference | None, metric: str) -> None:
    """The RD curves of ``reference`` (the report's drawing, :func:`alice_lib.figures.draw_rd`), or a note."""
    if reference is not None:
        draw_rd(ax, reference.summary, metric, methods=RD_METHODS, published=False,
                curves_include_anchor=reference.curves_include_anchor, legend=None)
    else:
        ax.set_xlabel("Rate (bpp)")
        ax.text(0.5, 0.5, "no evaluated run and no committed tables", transform=ax.transAxes, ha="center")


def _point_markers(ax) -> tuple:
    """The two markers of a view on ``ax``: ALICE's point and its JPEG's (placed by :func:`_place_points`)."""
    alice = ax.plot([], [], marker="o", markersize=9, linestyle="none", color=METHOD_STYLES["alice"]["color"],
                    markeredgecolor="black", label="ALICE, this view")[0]
    jpeg = ax.plot([], [], marker="D", markersize=7, linestyle="none", color=METHOD_STYLES["jpeg"]["color"],
                   markeredgecolor="black", label="JPEG")[0]
    return alice, jpeg


def _place_points(markers: tuple, view: View, metric: str) -> None:
    """Put a view's points on its markers; hollow for a preview (a smaller image: not on the curves' scale)."""
    face = "white" if view.preview else None
    jpeg = view.jpeg.coded.row
    for marker, x, y, label in ((markers[0], view.bpp, view.point()[metric],
                                 "ALICE, " + ("preview (not comparable)" if view.preview else "this view")),
                                (markers[1], jpeg["bpp"], jpeg[metric], f"JPEG q{view.jpeg.quality}")):
        marker.set_data([x], [y])
        marker.set_markerfacecolor(face or marker.get_color())
        marker.set_label(label)


def _fit_limits(ax, view: View, metric: str) -> None:
    """Widen the axes so that both points stay inside (the curves' own limits may exclude them)."""
    jpeg = view.jpeg.coded.row
    xs, ys = [view.bpp, jpeg["bpp"]], [view.point()[metric], jpeg[metric]]
    ys = [y for y in ys if math.isfinite(y)]
    x0, x1 = ax.get_xlim()
    ax.set_xlim(min(x0, 0.0), max(x1, max(xs) * 1.1))
    if ys:
        y0, y1 = ax.get_ylim()
        ax.set_ylim(min(y0, min(ys) - 0.5), max(y1, max(ys) + 0.5))


def draw_view(view: View, box: Box, reference: RdReference | None = None, source: str = "") -> Figure:
    """Original, decoded and JPEG (the crop marked), the three crops, the point on the PSNR and MS-SSIM curves."""
    with matplotlib.rc_context(PAPER_RC):
        fig = Figure(figsize=(15, 7.4))
        grid = fig.add_gridspec(2, 12, height_ratios=(1.15, 1), left=0.03, right=0.99, top=0.86, bottom=0.15,
                                hspace=0.3, wspace=0.9)
        pictures = (view.original, view.decoded, view.jpeg.coded.reconstruction)
        for i, (image, title, name) in enumerate(zip(pictures, _titles(view), ("Original", "ALICE", "JPEG"))):
            _show(fig.add_subplot(grid[0, 4 * i:4 * i + 4]), image, title, box)
            _show(fig.add_subplot(grid[1, 2 * i:2 * i + 2]), box.cut(image), f"{name}, crop")
        for i, metric in enumerate(("psnr", "ms_ssim_db")):
            ax = fig.add_subplot(grid[1, 6 + 3 * i:9 + 3 * i])
            _draw_curves(ax, reference, metric)
            _place_points(_point_markers(ax), view, metric)
            _fit_limits(ax, view, metric)
        fig.legend(*ax.get_legend_handles_labels(), loc="lower right", ncol=3, frameon=False,
                   bbox_to_anchor=(0.99, 0.0))
        fig.suptitle(_headline(view, reference, source), fontsize=9)
    return fig


def _headline(view: View, reference: RdReference | None, source: str) -> str:
    preview = (f"PREVIEW at {view.scale:g} of the size (the full image is coded when the slider rests)  |  "
               if view.preview else "")
    curves = reference.description if reference else "no RD tables found"
    note = f"  |  {view.note}" if view.note else ""
    gap = f"PSNR gap ALICE - JPEG: {view.psnr_gap_db:+.2f} dB"
    return f"{preview}{gap}{note}\nRD curves: {curves}" + (f"\nimage: {source}" if source.startswith("NOT") else "")


def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    """A figure as PNG bytes (lossless: a codec comparison must not be shown through another codec)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, pil_kwargs={"compress_level": 1})  # fast; a local socket carries it
    return buffer.getvalue()


# ----------------------------------------------------------------------------- the widgets' pictures
def image_png(image: Tensor, box: Box | None = None, zoom: int = 1) -> bytes:
    """A uint8 ``[3, H, W]`` image as PNG bytes (lossless, fast), the crop outlined, magnified ``zoom`` times.

    What the widgets show: the browser gets the pixels themselves, not a figure's resampling.
    """
    if box is not None:
        image = _outline(image, box)
    array = image.permute(1, 2, 0).contiguous().numpy()
    if zoom > 1:
        array = array.repeat(zoom, axis=0).repeat(zoom, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _outline(image: Tensor, box: Box, width: int = 2) -> Tensor:
    """A copy of ``image`` with a yellow frame just outside ``box`` (inside the image)."""
    out = image.clone()
    h, w = image.shape[-2:]
    top, left = max(box.top - width, 0), max(box.left - width, 0)
    bottom, right = min(box.top + box.height + width, h), min(box.left + box.width + width, w)
    yellow = torch.tensor([255, 215, 0], dtype=torch.uint8)[:, None, None]
    for rows, cols in (((top, box.top), (left, right)), ((box.top + box.height, bottom), (left, right)),
                       ((top, bottom), (left, box.left)), ((top, bottom), (box.left + box.width, right))):
        out[:, rows[0]:rows[1], cols[0]:cols[1]] = yellow
    return out


class RdPicture:
    """The widgets' RD picture: the curves drawn once, then per view only the two points move.

    A new figure per move cost about twice the drawing time (measured: 0.26 s against
    0.15 s on the shared 2-core machine).
    """

    METRICS = ("psnr", "ms_ssim_db")

    def __init__(self, reference: RdReference | None, dpi: int = 100):
        self.dpi = dpi
        with matplotlib.rc_context(PAPER_RC):
            self.fig = Figure(figsize=(8.0, 2.6))  # fixed margins: a constrained layout doubles the drawing time
            self.axes = self.fig.subplots(1, 2, gridspec_kw={"left": 0.065, "right": 0.73, "bottom": 0.16,
                                                             "top": 0.97, "wspace": 0.25})
            for ax, metric in zip(self.axes, self.METRICS):
                _draw_curves(ax, reference, metric)
            self.markers = [_point_markers(ax) for ax in self.axes]
        self.limits = [(ax.get_xlim(), ax.get_ylim()) for ax in self.axes]

    def png(self, view: View) -> bytes:
        """The curves with ``view``'s points, as PNG bytes."""
        with matplotlib.rc_context(PAPER_RC):
            for ax, markers, metric, (xlim, ylim) in zip(self.axes, self.markers, self.METRICS, self.limits):
                _place_points(markers, view, metric)
                ax.set_xlim(xlim)
                ax.set_ylim(ylim)
                _fit_limits(ax, view, metric)
            self.axes[1].legend(loc="upper left", bbox_to_anchor=(1.03, 1.0), frameon=False, borderaxespad=0.0)
        return figure_png(self.fig, self.dpi)

