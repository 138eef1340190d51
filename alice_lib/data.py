"""Image data: the one image reader, image-folder datasets, and a look at a folder.

* **Datasets.** :class:`ImageFolder` takes random crops for training and centre
  crops for validation (as CompressAI's ``ImageFolder`` and the STF / ALICE
  training scripts do). Files that are not 8-bit RGB (grayscale, palette with or
  without transparency, RGBA, 16-bit) are converted by :func:`to_rgb`; files that
  cannot be read, or are smaller than the crop, are skipped with a warning so that
  one odd file never stops a run. An empty folder is a clear error. Small folders
  are kept decoded in memory; large ones (OpenImages) are decoded per item.
  :class:`Mosaics` tiles crops into larger training images. :class:`SyntheticImages`
  makes smooth random images for tests and smoke runs without data.
* **Looking at a folder.** :func:`count_images`, :func:`dataset_summary` (a table of
  sizes and modes) and :func:`thumbnail_grid` (a matplotlib figure) for the data notebook.

Where the folders come from (Kodak, training photographs, downloads, the offline
fallback) is :mod:`alice_lib.data_sources`.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

if TYPE_CHECKING:  # heavy imports only where they are used
    import pandas
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm"}

#: :class:`ImageFolder` with ``cache=None`` keeps decoded images in memory up to this many
#: images (BSDS, a CPU subset) and decodes per item beyond (OpenImages: 300,000 images).
CACHE_MAX_IMAGES = 2000


# --------------------------------------------------------------------------- images

def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image (grayscale, palette, RGBA, 16-bit) as 8-bit RGB.

    16-bit grey keeps its 8 most significant bits; transparent pixels (RGBA, LA,
    palette with a transparency entry) are composited onto white.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: keep the 8 most significant bits rather than clipping at 255.
        array = np.asarray(image, dtype=np.uint32) >> 8
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.nan_to_num(np.asarray(image, dtype=np.float32))
        if array.size and array.max() <= 1.0:  # float images in [0, 1]
            array = array * 255.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as a ``uint8`` tensor ``[3, H, W]`` as it is displayed; a clear error if it is not an image.

    The EXIF orientation tag is applied (``ImageOps.exif_transpose``): phones store
    portrait photos sideways with a tag, and every viewer shows them upright, so the
    codec, the evaluation and the training data must see them upright too. This is
    the one image reader of the package. Pillow's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``) holds.
    """
    try:
        with Image.open(path) as image:
            rgb = to_rgb(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path} is not a readable image: {error}") from error
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` (by suffix, hidden files ignored), sorted.

    Raises ``FileNotFoundError`` if the folder does not exist and ``ValueError`` if it
    holds no image file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return files


def _warn_skipped(folder: str | Path, skipped: list[str]) -> None:
    if skipped:
        message = (f"{folder}: skipped {len(skipped)} file(s): {', '.join(skipped[:5])}"
                   + (" ..." if len(skipped) > 5 else ""))
        warnings.warn(message, stacklevel=3)
        logger.warning(message)


class ImageFolder(Dataset):
    """Crops of the images of a folder as float tensors ``[3, crop, crop]`` in [0, 1].

    ``train=True`` takes a random crop (and, with ``flip=True``, a random horizontal
    flip; the ALICE reference uses the random crop only) each time, ``train=False``
    the centre crop. The randomness comes from torch's global generator, so a caller
    that seeds it per item (as :func:`alice_lib.train.train` does) gets reproducible
    crops whatever the number of DataLoader workers. Images smaller than the crop and
    files that are not readable images are skipped with a warning; a file whose
    header reads but whose pixels do not decode is dropped with a warning when first
    loaded and another image is used in its place.

    ``cache``: ``True`` keeps every decoded image in memory (fast epochs on a CPU),
    ``False`` decodes each item from disk (streaming: memory stays flat at 300,000
    images), ``None`` (the default) caches folders of at most
    :data:`CACHE_MAX_IMAGES` usable images and streams larger ones. With DataLoader
    workers each worker holds its own cache. ``folder`` may be a :class:`DataSource`.
    """

    def __init__(self, folder: str | os.PathLike, crop: int, train: bool = True, max_images: int | None = None,
                 cache: bool | None = None, flip: bool = True):
        folder = Path(folder)
        self.crop, self.train, self.flip = crop, train, flip
        self.files: list[Path] = []
        skipped: list[str] = []
        for path in list_images(folder):
            try:
                with Image.open(path) as image:
                    width, height = image.size
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
                skipped.append(f"{path.name} (unreadable)")
                continue
            if min(width, height) < crop:
                skipped.append(f"{path.name} ({width}x{height} < {crop})")
                continue
            self.files.append(path)
            if max_images and len(self.files) >= max_images:
                break
        _warn_skipped(folder, skipped)
        if not self.files:
            raise ValueError(f"no usable image of at least {crop}x{crop} px in {folder}")
        self.cache = len(self.files) <= CACHE_MAX_IMAGES if cache is None else bool(cache)
        self._images: dict[int, torch.Tensor] = {}
        self._broken: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def _image(self, index: int) -> torch.Tensor:
        if index in self._images:
            return self._images[index]
        image = read_image(self.files[index])
        if self.cache:
            self._images[index] = image
        return image

    def _load(self, index: int) -> torch.Tensor:
        """The image at ``index``, or the next one that decodes (with a warning for each failure)."""
        for offset in range(len(self.files)):
            candidate = (index + offset) % len(self.files)
            if candidate in self._broken:
                continue
            try:
                return self._image(candidate)
            except ValueError as error:
                self._broken.add(candidate)
                warnings.warn(f"skipping {self.files[candidate]}: {error}", stacklevel=3)
                logger.warning("skipping %s: %s", self.files[candidate], error)
        raise ValueError(f"none of the {len(self.files)} images of this dataset decodes")

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self._load(index)
        _, h, w = image.shape
        c = self.crop
        if self.train:
            top = int(torch.randint(0, h - c + 1, ()).item())
            left = int(torch.randint(0, w - c + 1, ()).item())
        else:
            top, left = (h - c) // 2, (w - c) // 2
        patch = image[:, top:top + c, left:left + c]
        if self.train and self.flip and torch.rand(()) < 0.5:
            patch = patch.flip(-1)
        return patch.float().div_(255)


class Mosaics(Dataset):
    """Item ``i``: crop ``i`` of ``tiles`` and ``side**2 - 1`` random others, as one ``side x side`` image.

    Larger training inputs from small photographs: adapters trained from an anchor with a
    live hyperprior on 256 px crops (a 4x4 hyper-latent, all of it next to the border)
    learn a cost that does not hold inside whole images; 2x2 mosaics remove that effect
    (``docs/studies/recipe-v2.md``). The others come from torch's global generator, which
    the training loop seeds per item, so mosaics are reproducible like the crops.
    """

    def __init__(self, tiles: Dataset, side: int = 2):
        if int(side) != side or side < 1:
            raise ValueError(f"mosaic side must be a positive integer, got {side!r}")
        self.tiles, self.side = tiles, int(side)

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> torch.Tensor:
        others = torch.randint(len(self.tiles), (self.side ** 2 - 1,)).tolist()
        tiles = [self.tiles[i] for i in (index, *others)]
        rows = [torch.cat(tiles[r * self.side:(r + 1) * self.side], dim=-1) for r in range(self.side)]
        return torch.cat(rows, dim=-2)



class SyntheticImages(Dataset):
    """Smooth random colour images (sums of low-frequency waves), for tests and smoke runs without data.

    Image ``i`` is fixed by ``seed`` and ``i``; ``train=True`` takes a random crop
    (from torch's global generator, as :class:`alice_lib.data.ImageFolder` does).
    """

    def __init__(self, count: int, crop: int, size: int | None = None, train: bool = True, seed: int = 0):
        self.count, self.crop, self.train = count, crop, train
        self.size = size or crop + crop // 2
        if self.size < crop:
            raise ValueError("size must be at least the crop")
        self._images = [self._make(seed * 1_000_003 + i) for i in range(count)]

    def _make(self, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        coords = torch.linspace(0, 1, self.size)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        image = torch.zeros(3, self.size, self.size)
        for _ in range(4):
            fx, fy = (torch.rand(2, generator=g) * 6).tolist()
            phase = float(torch.rand((), generator=g)) * 6.283
            wave = torch.sin(6.283 * (fx * xx + fy * yy) + phase)
            image += torch.rand(3, 1, 1, generator=g) * wave
        image -= image.amin(dim=(1, 2), keepdim=True)
        image /= image.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)
        return (image * 255).round() / 255

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        image, c = self._images[index], self.crop
        if self.train:
            top = int(torch.randint(0, self.size - c + 1, ()).item())
            left = int(torch.randint(0, self.size - c + 1, ()).item())
        else:
            top = left = (self.size - c) // 2
        return image[:, top:top + c, left:left + c].clone()


# --------------------------------------------------------------------------- inspection

def count_images(folder: str | Path) -> int:
    """Number of image files in ``folder`` (0 when it is absent or holds none), without opening them."""
    try:
        return len(list_images(folder))
    except (FileNotFoundError, ValueError):
        return 0


def dataset_summary(folder: str | os.PathLike) -> "pandas.DataFrame":
    """One row per image of ``folder``: ``file``, ``width``, ``height``, ``mode``.

    Unreadable files are skipped with a warning.
    """
    import pandas as pd

    folder = Path(folder)
    rows, skipped = [], []
    for path in list_images(folder):
        try:
            with Image.open(path) as image:
                rows.append({"file": path.name, "width": image.width, "height": image.height, "mode": image.mode})
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            skipped.append(f"{path.name} (unreadable)")
    _warn_skipped(folder, skipped)
    return pd.DataFrame(rows, columns=["file", "width", "height", "mode"])


def thumbnail_grid(folder: str | os.PathLike, n: int = 24, *, columns: int = 6, cell_inches: float = 2.0,
                   thumb_px: int = 256, title: str | None = None) -> "Figure":
    """A grid of the first ``n`` images of ``folder`` with their names, as a matplotlib ``Figure``.

    The figure is built without pyplot (no global state; a notebook displays it
    when it is a cell's value, and ``fig.savefig`` works). Unreadable files are
    skipped with a warning.
    """
    from matplotlib.figure import Figure

    folder = Path(folder)
    thumbs: list[tuple[str, np.ndarray]] = []
    skipped: list[str] = []
    for path in list_images(folder):
        if len(thumbs) >= n:
            break
        try:
            with Image.open(path) as image:
                rgb = to_rgb(image)
            rgb.thumbnail((thumb_px, thumb_px))
            thumbs.append((path.name, np.asarray(rgb)))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            skipped.append(f"{path.name} (unreadable)")
    _warn_skipped(folder, skipped)
    if not thumbs:
        raise ValueError(f"no readable image in {folder}")
    columns = max(1, min(columns, len(thumbs)))
    rows = -(-len(thumbs) // columns)
    figure = Figure(figsize=(columns * cell_inches, rows * cell_inches * 0.8), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (name, array) in zip(axes.flat, thumbs):
        ax.imshow(array)
        ax.set_title(name, fontsize=7)
    if title:
        figure.suptitle(title)
    return figure
