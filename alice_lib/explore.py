"""Exploring the rate by hand (``notebooks/06_explore.ipynb``): one image, one slider, JPEG at the same bytes.

Why: the first question a reader of ALICE asks is what a given rate looks like, how the
image degrades as the adapters move from the anchor towards the lowest trained lambda,
and how that compares with JPEG at the same size. The notebook is a few cells; the work
is here, and all of it runs (and is tested) without a widget front end.

A :class:`View` is one position of the controls, everything in it measured on real files:

* the image coded into an ``.alice`` file (:func:`alice_lib.codec.encode`, the tiles
  ``alice compress`` makes) at a control value ``ln(lambda)`` in either mode of
  :class:`~alice_lib.codec.RateControl` (``interpolate`` or CALICE-style ``alpha``), and
  decoded from its bitstreams (:func:`alice_lib.codec.decode`): what a receiver sees;
* JPEG 4:4:4 with the evaluation's options (:data:`~alice_lib.evaluation.CLASSICAL_CODECS`)
  at the largest quality whose whole file is no larger than the whole ``.alice`` file, header
  included (:func:`largest_quality_within`); when even quality 1 is larger, quality 1, with
  :attr:`JpegMatch.fits` False;
* PSNR and MS-SSIM of both (:func:`alice_lib.evaluation.metrics.image_quality`);
* a crop, the user's or where the decoded image's squared error is largest
  (:func:`largest_error_box`);
* the point (bpp, PSNR, MS-SSIM) over the RD curves of the last evaluated run
  (``runs/<profile>/eval``) or, when there is none, of the committed ``reports/<profile>/``
  (:func:`rd_reference`); its bpp counts the bitstreams, as the curves' learned points do.

Responsive on a CPU (:class:`Explorer`): the model and adapters are loaded once and
shared by both modes (a move rewrites the adapted layers in place: 1 to 5 ms measured for
the CPU model), every JPEG quality's size is measured once per image and scale, and
views are kept per (mode, control, scale). While the slider moves a downscaled preview is
coded; the full image once it rests (:class:`Debounce`). The widgets
(:class:`ExplorerPanel`) are a thin layer over :class:`Explorer`.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import Tensor

from .checkpoints import load_stf, shipped_weights
from .codec import AliceFile, RateControl, compress_to_target, decode, encode, read_alice, write_alice
from .data import list_images, read_image
from .data_sources import resolve_kodak
from .evaluation import read_tables, summarize
from .evaluation.classical import ClassicalCoded, code_classical_image, decode_classical, encode_classical
from .evaluation.metrics import image_quality, psnr_rgb
from .figures import METHOD_STYLES, PAPER_RC, draw_rd, save_figure
from .run_folder import REPO_ROOT, RunLayout, default_run_dir
from .settings import Settings, load_settings
from .utils import atomic_write_bytes, to_uint8

__all__ = ["DEFAULT_IMAGE", "JPEG_QUALITIES", "RD_METHODS", "Picture", "open_picture", "load_rate_control",
           "downscale", "largest_quality_within", "JpegMatch", "JpegLadder", "Box", "largest_error_box",
           "box_around", "RdReference", "rd_reference", "View", "Explorer", "load_explorer", "draw_view",
           "figure_png", "image_png", "RdPicture", "Debounce", "ExplorerPanel"]

DEFAULT_IMAGE = "kodim23.png"
#: Without Kodak, this scikit-image photograph (741x500, the closest to Kodak's size) if present.
FALLBACK_IMAGE = "skimage_motorcycle_left.png"
#: Every quality Pillow's JPEG takes: each one's size is measured, so none is missed.
JPEG_QUALITIES = tuple(range(1, 101))
#: The curves drawn under the point: the references, ALICE, and the codec it is compared with.
RD_METHODS = ("fixed-rate", "alice", "jpeg")


# ----------------------------------------------------------------------------- the image
@dataclass(frozen=True, eq=False)  # holds a tensor: compared by identity
class Picture:
    """The image explored: ``pixels`` uint8 ``[3, H, W]``; ``name`` as the evaluation's tables name images."""

    pixels: Tensor
    name: str
    source: str  # where it came from, in words (a fallback says so)


def open_picture(image: str | Path = DEFAULT_IMAGE, kodak_dir: str | Path | None = None) -> Picture:
    """``image`` as a path of one's own, else as a file name in the Kodak folder.

    Kodak is found as everywhere else (:func:`alice_lib.data.resolve_kodak`: ``data/kodak``,
    then ``../shared/data/kodak``), never downloaded here. Without it a scikit-image
    photograph stands in, and :attr:`Picture.source` says so.
    """
    path = Path(image).expanduser()
    if path.is_file():
        return Picture(read_image(path), path.name, f"your image {path}")
    if path.name != str(image):  # a path, not a Kodak file name: no stand-in for a typo
        raise FileNotFoundError(f"{path} does not exist")
    found = resolve_kodak(kodak_dir, allow_download=False)
    if found.kind != "fallback":
        path = found.path / str(image)
        if not path.is_file():
            raise FileNotFoundError(f"{image} is neither a file nor an image of the Kodak folder {found.path}")
        return Picture(read_image(path), path.name, f"Kodak, {found.path}")
    names = {p.name: p for p in list_images(found.path)}
    path = names.get(FALLBACK_IMAGE) or next(iter(names.values()))
    return Picture(read_image(path), path.name,
                   f"NOT KODAK: {image} was asked for, but no Kodak folder was found; a scikit-image "
                   f"photograph ({path}) stands in, so the RD curves of the tables are the Kodak mean")


def load_rate_control(settings: Settings, anchor: str | Path | None = None,
                      adapters: Sequence[str | Path] | None = None, mode: str = "interpolate") -> RateControl:
    """The rate control of ``anchor`` and ``adapters``; by default the CPU profile's shipped weights.

    Loaded once per explorer (``copy=False``: the one model is rewritten in place); both
    modes share it through :meth:`RateControl.with_mode`.
    """
    if anchor is None:
        anchor, shipped = shipped_weights()
        adapters = shipped if adapters is None else adapters
    return RateControl(load_stf(anchor), [Path(p) for p in adapters or []], mode=mode,
                       anchor_lmbda=settings.anchor.lmbda, copy=False)


def downscale(image: Tensor, scale: float) -> Tensor:
    """``image`` (uint8 ``[3, H, W]``) resized by ``scale`` with area averaging: a preview without aliasing."""
    if scale >= 1:
        return image
    h, w = image.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return to_uint8(F.interpolate(image[None].float().div(255), size=size, mode="area")[0])


# ----------------------------------------------------------------------------- JPEG at the same bytes
def largest_quality_within(sizes: Mapping[int, int], budget: int) -> tuple[int, bool]:
    """(the largest quality whose file is at most ``budget`` bytes, True), or (the smallest quality, False).

    A lookup in every quality's size rather than a bisection: nothing guarantees that a
    JPEG file grows with its quality, and a bisection would then miss the largest one.
    """
    if not sizes:
        raise ValueError("no JPEG sizes to choose from")
    fitting = [q for q, n in sizes.items() if n <= budget]
    return (max(fitting), True) if fitting else (min(sizes), False)


@dataclass(frozen=True, eq=False)  # holds a tensor: compared by identity
class JpegMatch:
    """The JPEG shown beside a view: its quality, the byte budget it had, whether it fits it."""

    quality: int
    budget: int
    fits: bool  # False: even quality 1 is larger than the budget (and quality 1 is shown)
    coded: ClassicalCoded

    @property
    def bytes(self) -> int:
        return len(self.coded.data)


class JpegLadder:
    """Every JPEG quality's file size for one image, measured once, then one lookup per move.

    About half a second for a Kodak image on one core, against a search per move that
    would re-encode several qualities every time the slider moves.
    """

    def __init__(self, image: Tensor, qualities: Sequence[int] = JPEG_QUALITIES):
        self.image, self.qualities = image, tuple(qualities)
        self._sizes: dict[int, int] | None = None
        self._coded: dict[int, ClassicalCoded] = {}

    @property
    def sizes(self) -> dict[int, int]:
        if self._sizes is None:
            self._sizes = {q: len(encode_classical(self.image, "jpeg", q)) for q in self.qualities}
        return self._sizes

    def match(self, budget: int) -> JpegMatch:
        quality, fits = largest_quality_within(self.sizes, budget)
        if quality not in self._coded:
            self._coded[quality] = code_classical_image(self.image, "jpeg", quality)
        return JpegMatch(quality, int(budget), fits, self._coded[quality])


# ----------------------------------------------------------------------------- the crop
@dataclass(frozen=True)
class Box:
    """A crop: top-left corner and size in pixels of the image it was made for."""

    top: int
    left: int
    height: int
    width: int

    def cut(self, image: Tensor) -> Tensor:
        return image[..., self.top:self.top + self.height, self.left:self.left + self.width]


def largest_error_box(original: Tensor, decoded: Tensor, size: int = 128) -> Box:
    """The ``size`` square (smaller if the image is) where ``decoded``'s squared error sums highest.

    Every position is tried (summed-area table, exact), so the crop shows where the codec
    fails most rather than a place picked on a grid.
    """
    h, w = original.shape[-2:]
    bh, bw = min(size, h), min(size, w)
    err = (original.double() - decoded.double()).pow(2).sum(0)
    table = F.pad(err.cumsum(0).cumsum(1), (1, 0, 1, 0))
    sums = table[bh:, bw:] - table[:-bh, bw:] - table[bh:, :-bw] + table[:-bh, :-bw]
    index = int(sums.argmax())
    return Box(index // sums.shape[1], index % sums.shape[1], bh, bw)


def box_around(centre: tuple[float, float], shape: Sequence[int], size: int = 128) -> Box:
    """The ``size`` square centred at ``centre`` (fractions of height and width), kept inside the image."""
    h, w = shape[-2:]
    bh, bw = min(size, h), min(size, w)
    top = min(max(round(centre[0] * h - bh / 2), 0), h - bh)
    left = min(max(round(centre[1] * w - bw / 2), 0), w - bw)
    return Box(top, left, bh, bw)


# ----------------------------------------------------------------------------- the RD curves
@dataclass(frozen=True, eq=False)  # holds a table: compared by identity
class RdReference:
    """The RD curves a view's point is drawn over, and where they come from."""

    summary: pd.DataFrame  # one row per rate point (evaluation's summary schema)
    folder: Path
    origin: str            # "run" (the last evaluated run) or "reports" (the committed tables)
    per_image: bool        # this image's own rows of results.csv, not the mean over the data set
    curves_include_anchor: bool = False

    @property
    def description(self) -> str:
        where = "last evaluated run" if self.origin == "run" else "committed reports"
        return f"{'this image' if self.per_image else 'data-set mean'}, {where} ({self.folder})"


def rd_reference(settings: Settings, image_name: str, run_dir: str | Path | None = None) -> RdReference | None:
    """The curves of the last evaluated run (``<run>/eval``) or else of ``reports/<profile>/`` in the repository.

    The image's own rows when the tables have them (a Kodak image: its point then sits
    on its own curves), else the data-set mean. None when neither folder holds tables.
    """
    candidates = (("run", RunLayout(run_dir or default_run_dir(settings.name)).eval_dir),
                  ("reports", REPO_ROOT / "reports" / settings.name))
    anchor = settings.evaluation.curves_include_anchor
    for origin, folder in candidates:
        try:
            tables = read_tables(folder)
        except FileNotFoundError:
            continue
        rows = tables.results[tables.results["image"] == image_name] if "image" in tables.results else []
        if len(rows):
            return RdReference(summarize(rows), folder, origin, True, anchor)
        return RdReference(tables.summary, folder, origin, False, anchor)
    return None


# ----------------------------------------------------------------------------- one view
@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class View:
    """One position of the controls: the ``.alice`` file, its decode, JPEG at its bytes, the metrics."""

    image_name: str
    original: Tensor   # the image as coded (downscaled for a preview)
    scale: float       # 1.0, or the preview's
    mode: str
    control: float     # ln(lambda)
    alice: AliceFile
    decoded: Tensor
    quality: dict      # psnr, ms_ssim, ms_ssim_db of the decode
    jpeg: JpegMatch
    seconds: dict      # where the time of this view went
    note: str = ""     # e.g. what a bpp target search found

    @property
    def lmbda(self) -> float:
        return math.exp(self.control)

    @property
    def preview(self) -> bool:
        return self.scale < 1

    @property
    def bpp(self) -> float:
        """The bitstreams' bits per pixel, counted as the RD curves count learned codecs."""
        return self.alice.bpp

    @property
    def psnr_gap_db(self) -> float:
        """ALICE's PSNR minus JPEG's, at no more JPEG bytes than ``.alice`` bytes."""
        return self.quality["psnr"] - self.jpeg.coded.row["psnr"]

    def point(self) -> dict[str, float]:
        """The view's point on the RD curves: bpp, PSNR, MS-SSIM and MS-SSIM in dB."""
        return {"bpp": self.bpp, "psnr": self.quality["psnr"], "ms_ssim": self.quality["ms_ssim"],
                "ms_ssim_db": self.quality["ms_ssim_db"]}

    def record(self) -> dict:
        """What the view shows, as JSON-ready numbers (the notebook writes and re-checks it)."""
        jpeg = self.jpeg.coded.row
        return {"image": self.image_name, "height": self.alice.height, "width": self.alice.width,
                "scale": self.scale, "mode": self.mode, "lmbda": self.lmbda, "control": self.control,
                "alice_file_bytes": self.alice.file_bytes, "alice_payload_bytes": self.alice.payload_bytes,
                **{f"alice_{k}": v for k, v in self.point().items()},
                "jpeg_quality": self.jpeg.quality, "jpeg_fits": self.jpeg.fits, "jpeg_bytes": self.jpeg.bytes,
                "jpeg_bpp": jpeg["bpp"], "jpeg_psnr": jpeg["psnr"], "jpeg_ms_ssim": jpeg["ms_ssim"],
                "psnr_gap_db": self.psnr_gap_db, "seconds": self.seconds, "note": self.note}

    def describe(self) -> str:
        """One line: rate, bytes, both qualities and the gap."""
        jpeg = self.jpeg.coded.row
        fit = "" if self.jpeg.fits else " (even quality 1 is LARGER than the .alice file)"
        size = f"{self.alice.width}x{self.alice.height}" + (" preview" if self.preview else "")
        return (f"{self.image_name} {size}, lambda {self.lmbda:.5f} ({self.mode}): .alice {self.alice.file_bytes:,} B, "
                f"{self.bpp:.3f} bpp, {self.quality['psnr']:.2f} dB; JPEG q{self.jpeg.quality} "
                f"{self.jpeg.bytes:,} B{fit}, {jpeg['psnr']:.2f} dB; gap {self.psnr_gap_db:+.2f} dB")


# ----------------------------------------------------------------------------- the explorer
class Explorer:
    """One image and one rate control: views at any rate (cached), their figure, the files on request."""

    def __init__(self, picture: Picture, rate_control: RateControl, *, reference: RdReference | None = None,
                 preview_scale: float = 0.5, crop_size: int = 128, cache_size: int = 64):
        if not 0 < preview_scale <= 1:
            raise ValueError(f"preview_scale must be in (0, 1], got {preview_scale}")
        self.picture, self.rc, self.reference = picture, rate_control, reference
        self.preview_scale, self.crop_size, self.cache_size = preview_scale, crop_size, cache_size
        self._images: dict[float, Tensor] = {1.0: picture.pixels}
        self._ladders: dict[float, JpegLadder] = {}
        self._views: OrderedDict[tuple, View] = OrderedDict()

    @property
    def lmbdas(self) -> list[float]:
        """The trained lambdas and the anchor's: the ends and the knots of the slider."""
        return list(self.rc.lmbdas)

    def image(self, scale: float = 1.0) -> Tensor:
        if scale not in self._images:
            self._images[scale] = downscale(self.picture.pixels, scale)
        return self._images[scale]

    def ladder(self, scale: float = 1.0) -> JpegLadder:
        if scale not in self._ladders:
            self._ladders[scale] = JpegLadder(self.image(scale))
        return self._ladders[scale]

    def view(self, control: float, mode: str = "interpolate", scale: float = 1.0) -> View:
        """The view at ``control`` (ln lambda, clamped to the covered range) in ``mode``, at ``scale``."""
        rc = self.rc.with_mode(mode)
        control = rc.clamp(float(control))
        key = (mode, control, scale)
        if key not in self._views:
            start = time.perf_counter()
            alice = encode(rc, self.image(scale), control)
            decoded = decode(rc, alice)
            self._keep(key, self._finish(alice, decoded, mode, scale, time.perf_counter() - start))
        self._views.move_to_end(key)
        return self._views[key]

    def view_at_bpp(self, target_bpp: float, mode: str = "interpolate") -> View:
        """The full-size view whose bitstreams meet ``target_bpp`` (:func:`alice_lib.codec.compress_to_target`)."""
        rc = self.rc.with_mode(mode)
        start = time.perf_counter()
        result = compress_to_target(rc, self.image(), target_bpp=target_bpp)
        decoded = decode(rc, result.alice)
        note = (f"target {target_bpp:g} bpp: " + ("hit" if result.hit else
                f"outside what lambda {rc.lmbdas[0]:g}..{rc.lmbdas[-1]:g} reaches, coded at the "
                f"{result.clamped_to} end" if result.clamped else "missed the band; closest kept")
                + f" ({result.coder_calls} coder runs)")
        view = self._finish(result.alice, decoded, mode, 1.0, time.perf_counter() - start, note)
        self._keep((mode, result.control, 1.0), view)
        return view

    def _finish(self, alice: AliceFile, decoded: Tensor, mode: str, scale: float, coding: float,
                note: str = "") -> View:
        start = time.perf_counter()
        jpeg = self.ladder(scale).match(alice.file_bytes)
        mid = time.perf_counter()
        quality = image_quality(self.image(scale), decoded)
        seconds = {"code": coding, "jpeg": mid - start, "metrics": time.perf_counter() - mid}
        return View(self.picture.name, self.image(scale), scale, mode, alice.control, alice, decoded, quality,
                    jpeg, seconds, note)

    def _keep(self, key: tuple, view: View) -> None:
        self._views[key] = view
        while len(self._views) > self.cache_size:
            self._views.popitem(last=False)

    def box(self, view: View, centre: tuple[float, float] | None = None) -> Box:
        """The crop: around ``centre`` (fractions of the image) or, without one, where the error is largest."""
        size = max(16, round(self.crop_size * view.scale))
        if centre is None:
            return largest_error_box(view.original, view.decoded, size)
        return box_around(centre, view.original.shape, size)

    def figure(self, view: View, centre: tuple[float, float] | None = None) -> Figure:
        return draw_view(view, self.box(view, centre), self.reference, self.picture.source)

    # ------------------------------------------------------------------ files
    def file_stem(self, view: View) -> str:
        return f"{Path(view.image_name).stem}-{view.mode}-lambda{view.lmbda:.5f}"

    def write_alice(self, view: View, folder: str | Path) -> Path:
        """The view's ``.alice`` file in ``folder`` (a preview is coded at full size first)."""
        if view.preview:
            view = self.view(view.control, view.mode)
        return write_alice(Path(folder) / f"{self.file_stem(view)}.alice", view.alice)

    def write_outputs(self, view: View, folder: str | Path, centre: tuple[float, float] | None = None,
                      dpi: int = 100) -> dict[str, Path]:
        """The ``.alice`` file, the JPEG beside it, the figure (PNG) and the record (JSON) of a full view."""
        if view.preview:
            raise ValueError("write the files of a full-size view, not of a preview")
        folder, stem = Path(folder), self.file_stem(view)
        paths = {"alice": self.write_alice(view, folder),
                 "jpeg": atomic_write_bytes(folder / f"{stem}-jpeg-q{view.jpeg.quality}.jpg", view.jpeg.coded.data),
                 "figure": save_figure(self.figure(view, centre), folder, stem, dpi=dpi, formats=("png",))[0]}
        record = {**view.record(), "files": {k: str(p) for k, p in paths.items()}, "source": self.picture.source,
                  "rd_curves": self.reference.description if self.reference else None}
        paths["record"] = atomic_write_bytes(folder / f"{stem}.json", json.dumps(record, indent=2).encode())
        return paths

    def check_files(self, files: Mapping[str, str | Path]) -> dict[str, float]:
        """The written ``.alice`` and JPEG files read back: their sizes, and the PSNR gap measured from them.

        From the files, not from the view in memory, so that what the notebook asserts is
        what a reader of the files would see.
        """
        alice_path, jpeg_path = Path(files["alice"]), Path(files["jpeg"])
        original = self.image()
        alice = psnr_rgb(original, decode(self.rc, read_alice(alice_path)))
        jpeg = psnr_rgb(original, decode_classical(jpeg_path.read_bytes()))
        return {"alice_bytes": alice_path.stat().st_size, "jpeg_bytes": jpeg_path.stat().st_size,
                "alice_psnr": alice, "jpeg_psnr": jpeg, "psnr_gap_db": alice - jpeg}


def load_explorer(image: str | Path = DEFAULT_IMAGE, *, profile: str = "cpu", kodak_dir: str | Path | None = None,
                  anchor: str | Path | None = None, adapters: Sequence[str | Path] | None = None,
                  run_dir: str | Path | None = None, preview_scale: float = 0.5, threads: int = 1) -> Explorer:
    """An :class:`Explorer` of ``image`` with the profile's anchor lambda and RD tables, the shipped weights by default.

    ``threads``: torch's intra-op threads. One by default: on a 2-core machine shared with
    other work, two threads made coding and MS-SSIM several times slower (measured).
    """
    torch.set_num_threads(max(1, int(threads)))
    settings = load_settings(profile)
    picture = open_picture(image, kodak_dir)
    return Explorer(picture, load_rate_control(settings, anchor, adapters), preview_scale=preview_scale,
                    reference=rd_reference(settings, picture.name, run_dir))


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


# ----------------------------------------------------------------------------- the widgets
def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Debounce:
    """A burst of slider moves becomes one preview (of the latest value) and, once it rests, one full view.

    Why: a kernel handles widget messages one at a time; coding every value a drag passes
    through would queue seconds of work behind the slider. ``gather`` seconds collect the
    messages already queued; ``rest`` seconds without a move count as a release. Moves that
    queued up behind a running preview are only seen after it, so a rest is confirmed by
    ``gather`` more seconds without a move before the full view is made. Without a running
    event loop (a script, a test without one) the full view is made at once.
    """

    def __init__(self, preview: Callable[[], None], full: Callable[[], None], *, gather: float = 0.1,
                 rest: float = 0.6):
        self.preview, self.full, self.gather, self.rest = preview, full, gather, rest
        self._preview = self._full = None

    def moved(self) -> None:
        loop = _running_loop()
        if loop is None:
            self.full()
            return
        if self._preview is None:
            self._preview = loop.call_later(self.gather, self._run_preview)
        self._arm(loop, self.rest, self._settle)

    def _arm(self, loop: asyncio.AbstractEventLoop, delay: float, callback: Callable[[], None]) -> None:
        if self._full is not None:
            self._full.cancel()
        self._full = loop.call_later(delay, callback)

    def _run_preview(self) -> None:
        self._preview = None
        self.preview()

    def _settle(self) -> None:
        """Rested as far as seen: let moves queued behind a preview arrive (they re-arm the rest) first."""
        self._arm(_running_loop(), self.gather, self._run_full)

    def _run_full(self) -> None:
        self._full = None
        if self._preview is not None:  # a move arrived after the last preview: its preview is moot now
            self._preview.cancel()
            self._preview = None
        self.full()


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


class ExplorerPanel:
    """The controls and the pictures: a lambda slider, a target-bpp box, the mode, the crop, a write button.

    Built on :class:`Explorer`; ``ipywidgets`` is imported here only. Without a widget
    front end (papermill, nbval) the panel is built and displayed as inert text, and
    nothing in it runs.
    """

    def __init__(self, explorer: Explorer, view: View, out_dir: str | Path):
        import ipywidgets as w

        self.ex, self.view, self.out_dir = explorer, view, Path(out_dir)
        lo, hi = math.log10(explorer.lmbdas[0]), math.log10(explorer.lmbdas[-1])
        self.step = (hi - lo) / 1000  # fine enough that a value set here reads back unchanged (5 digits)
        self.slider = w.FloatLogSlider(value=view.lmbda, base=10, min=lo, max=hi, step=self.step,
                                       description="lambda", readout_format=".4f", continuous_update=True,
                                       layout=w.Layout(width="520px"))
        self.mode = w.ToggleButtons(options=["interpolate", "alpha"], value=view.mode, description="mode")
        self.target = w.BoundedFloatText(value=round(view.bpp, 3), min=0.01, max=8.0, step=0.01,
                                         description="target bpp", layout=w.Layout(width="180px"))
        self.go = w.Button(description="code at target bpp")
        self.crop = w.ToggleButtons(options=["largest error", "chosen"], value="largest error", description="crop")
        self.crop_y = w.FloatSlider(value=0.5, min=0, max=1, step=0.01, description="crop y", continuous_update=False)
        self.crop_x = w.FloatSlider(value=0.5, min=0, max=1, step=0.01, description="crop x", continuous_update=False)
        self.save = w.Button(description="write .alice", icon="save")
        self.saved, self.status = w.HTML(), w.HTML()
        self.captions = [w.HTML(layout=w.Layout(height="4em")) for _ in range(3)]  # the pictures stay aligned
        self.images = [w.Image(format="png", layout=w.Layout(width="100%")) for _ in range(3)]
        self.crops = [w.Image(format="png") for _ in range(3)]
        self.rd = w.Image(format="png", layout=w.Layout(width="760px"))  # its own size, not stretched
        knots = ", ".join(f"{x:g}" for x in explorer.lmbdas)
        column = w.Layout(width="33%")
        self.widget = w.VBox([
            w.HBox([self.slider, w.HTML(f"&nbsp;trained: {knots} (anchor {explorer.rc.anchor_lmbda:g})")]),
            w.HBox([self.mode, self.target, self.go]),
            w.HBox([self.crop, self.crop_y, self.crop_x]),
            w.HBox([self.save, self.saved]), self.status,
            w.HBox([w.VBox([c, i], layout=column) for c, i in zip(self.captions, self.images)]),
            w.HBox(self.crops), self.rd])
        self.debounce = Debounce(self._preview, self._full)
        self.rd_picture = RdPicture(explorer.reference)
        self._originals: dict[tuple, bytes] = {}
        self._wire()
        self.show(view)

    def _repr_mimebundle_(self, **kwargs) -> dict:
        """The widgets for a front end; for anything else a sentence instead of the widgets' long repr."""
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = (f"Explorer controls for {self.ex.picture.name} (a lambda slider, a target-bpp box, "
                                f"the mode, the crop, a write button): they need a widget front end such as "
                                f"JupyterLab. Shown now: {self.view.describe()}")
        return bundle

    def _wire(self) -> None:
        self.slider.observe(lambda _: self._moved(), names="value")
        self.mode.observe(lambda _: self.show(self.ex.view(self.view.control, self.mode.value)), names="value")
        self.target.observe(lambda _: self._to_target(), names="value")
        self.go.on_click(lambda _: self._to_target())
        self.crop.observe(lambda _: self.show(self.view), names="value")
        for s in (self.crop_x, self.crop_y):
            s.observe(lambda _: self._chosen(), names="value")
        self.save.on_click(lambda _: self._write())

    def _control(self) -> float:
        return math.log(self.slider.value)

    def _moved(self) -> None:
        if abs(self._control() - self.view.control) < 0.5 * self.step * math.log(10):
            return  # the front end snapped a value set here to its step: not a move
        self.debounce.moved()

    def _preview(self) -> None:
        self.show(self.ex.view(self._control(), self.mode.value, self.ex.preview_scale))

    def _full(self) -> None:
        self.show(self.ex.view(self._control(), self.mode.value))

    def _to_target(self) -> None:
        self.status.value = f"searching for {self.target.value:g} bpp ..."
        view = self.ex.view_at_bpp(self.target.value, self.mode.value)
        self.view = view
        self.slider.value = view.lmbda
        self.show(view)

    def _chosen(self) -> None:
        self.crop.value = "chosen"
        self.show(self.view)

    def _centre(self) -> tuple[float, float] | None:
        return (self.crop_y.value, self.crop_x.value) if self.crop.value == "chosen" else None

    def show(self, view: View) -> None:
        """Put ``view`` into the pictures and say what it cost."""
        self.view = view
        start = time.perf_counter()
        box = self.ex.box(view, self._centre())
        zoom = max(1, round(256 / box.height))
        pictures = (view.original, view.decoded, view.jpeg.coded.reconstruction)
        for caption, image, crop, picture, title in zip(self.captions, self.images, self.crops, pictures,
                                                        _titles(view)):
            caption.value = "<br>".join(title.split("\n"))
            image.value = self._png(picture, box) if picture is view.original else image_png(picture, box)
            crop.value = image_png(box.cut(picture), zoom=zoom)
        self.rd.value = self.rd_picture.png(view)
        seconds = {**view.seconds, "display": time.perf_counter() - start}
        kind = f"preview at {view.scale:g} of the size" if view.preview else "full image"
        self.status.value = (f"<b>{kind}</b>: {view.describe()}<br>seconds (when first made): "
                             + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items())
                             + (f"<br>{view.note}" if view.note else "")
                             + "<br><small>bytes: whole files; ALICE's bpp: its bitstreams, as the RD curves "
                               "count learned codecs (JPEG's: the whole file, as its curve)</small>")

    def _png(self, original: Tensor, box: Box) -> bytes:
        """The original's picture, made once per scale and crop (it changes with nothing else)."""
        key = (tuple(original.shape), box)
        if key not in self._originals:
            self._originals = {key: image_png(original, box)}
        return self._originals[key]

    def _write(self) -> None:
        path = self.ex.write_alice(self.view, self.out_dir)
        self.saved.value = f"wrote <code>{path.resolve()}</code> ({path.stat().st_size:,} bytes)"
