"""The rate explorer without a front end: the picture, the rate control, JPEG at the same bytes, the crop,
the RD reference point, and :class:`View` / :class:`Explorer` (see :mod:`alice_lib.explore`)."""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from ..checkpoints import load_stf, shipped_weights
from ..codec import AliceFile, RateControl, compress_to_target, decode, encode, read_alice, write_alice
from ..data import list_images, read_image
from ..data_sources import resolve_kodak
from ..evaluation import read_tables, summarize
from ..evaluation.classical import ClassicalCoded, code_classical_image, decode_classical, encode_classical
from ..evaluation.metrics import image_quality, psnr_rgb
from ..figures import save_figure
from ..run_folder import REPO_ROOT, RunLayout, default_run_dir
from ..settings import Settings, load_settings
from ..utils import atomic_write_bytes, to_uint8
from .drawing import draw_view

__all__ = ["DEFAULT_IMAGE", "JPEG_QUALITIES", "Picture", "open_picture", "load_rate_control", "downscale",
           "largest_quality_within", "JpegMatch", "JpegLadder", "Box", "largest_error_box", "box_around",
           "RdReference", "rd_reference", "View", "Explorer", "load_explorer"]

DEFAULT_IMAGE = "kodim23.png"
#: Without Kodak, this scikit-image photograph (741x500, the closest to Kodak's size) if present.
FALLBACK_IMAGE = "skimage_motorcycle_left.png"
#: Every quality Pillow's JPEG takes: each one's size is measured, so none is missed.
JPEG_QUALITIES = tuple(range(1, 101))
#: The curves drawn under the point: the references, ALICE, and the codec it is compared with.


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
