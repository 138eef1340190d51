"""Image folders for training and evaluation.

Training takes random crops, validation takes centre crops (as CompressAI's
``ImageFolder`` and the STF / ALICE training scripts do). Files that are not
8-bit RGB are converted; files that cannot be read, or are smaller than the
crop, are skipped with a warning so that one odd file never stops a run.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image (grayscale, palette, RGBA, 16-bit) as 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: keep the 8 most significant bits rather than clipping at 255.
        array = np.asarray(image, dtype=np.uint32) >> 8
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as a ``uint8`` tensor ``[3, H, W]``; a clear error if it is not an image."""
    try:
        with Image.open(path) as image:
            rgb = to_rgb(image)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path} is not a readable image: {error}") from error
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted; a clear error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return files


class ImageFolder(Dataset):
    """Crops of the images of a folder as float tensors ``[3, crop, crop]`` in [0, 1].

    ``train=True`` takes a random crop (and a random horizontal flip) each time,
    ``train=False`` the centre crop. Images smaller than the crop are skipped with
    a warning. ``cache=True`` keeps decoded images in memory (fast epochs on CPU).
    """

    def __init__(self, folder: str | Path, crop: int, train: bool = True, max_images: int | None = None,
                 cache: bool = True):
        self.crop, self.train, self.cache = crop, train, cache
        self.files: list[Path] = []
        skipped: list[str] = []
        for path in list_images(folder):
            try:
                with Image.open(path) as image:
                    width, height = image.size
            except (UnidentifiedImageError, OSError):
                skipped.append(f"{path.name} (unreadable)")
                continue
            if min(width, height) < crop:
                skipped.append(f"{path.name} ({width}x{height} < {crop})")
                continue
            self.files.append(path)
            if max_images and len(self.files) >= max_images:
                break
        if skipped:
            warnings.warn(f"{folder}: skipped {len(skipped)} file(s): {', '.join(skipped[:5])}"
                          + (" ..." if len(skipped) > 5 else ""), stacklevel=2)
        if not self.files:
            raise ValueError(f"no usable image of at least {crop}x{crop} px in {folder}")
        self._images: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.files)

    def _image(self, index: int) -> torch.Tensor:
        if index in self._images:
            return self._images[index]
        image = read_image(self.files[index])
        if self.cache:
            self._images[index] = image
        return image

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self._image(index)
        _, h, w = image.shape
        c = self.crop
        if self.train:
            top = int(torch.randint(0, h - c + 1, ()).item())
            left = int(torch.randint(0, w - c + 1, ()).item())
        else:
            top, left = (h - c) // 2, (w - c) // 2
        patch = image[:, top:top + c, left:left + c]
        if self.train and torch.rand(()) < 0.5:
            patch = patch.flip(-1)
        return patch.float().div_(255)
