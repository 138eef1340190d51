"""`alice compress` with its defaults against JPEG 4:4:4 at equal or fewer bytes, on photographs
that are neither Kodak nor training images.

The photographs are scikit-image's bundled samples (``skimage.data``, offline): eight colour
photographs and four greyscale ones repeated on three channels, twelve in all, none of them
in Kodak or in the BSDS training folder. Each is coded as ``alice compress`` codes it by
default (the shipped anchor at its own lambda, or ``--anchor`` / ``--adapters`` / ``--lmbda``),
into a real ``.alice`` file; JPEG 4:4:4 takes the largest quality whose whole file is no
larger than the whole ``.alice`` file (the explorer's rule, ``alice_lib.explore``). The gap
is ALICE's PSNR minus JPEG's; the issue's aim is a median gap of at least 0 dB.

    python benchmarks/photos_vs_jpeg.py [--anchor FILE --adapters A.safetensors ...] [--out photos.csv]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from alice_lib.explore import Explorer, load_rate_control, open_picture
from alice_lib.settings import load_settings

COLOUR = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle")
GREY = ("camera", "moon", "brick", "gravel")


def sample_photographs(folder: Path) -> list[Path]:
    """The twelve photographs as PNG files in ``folder`` (greyscale ones on three channels)."""
    import skimage.data

    paths = []
    for name in COLOUR + GREY:
        pixels = getattr(skimage.data, name)()
        pixels = pixels[0] if isinstance(pixels, tuple) else pixels  # stereo_motorcycle: the left view
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=2)
        path = folder / f"{name}.png"
        Image.fromarray(pixels[..., :3].astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def compare(paths: list[Path], anchor: str | None, adapters: list[str] | None, lmbda: float | None,
            profile: str = "cpu") -> pd.DataFrame:
    settings = load_settings(profile)
    rate_control = load_rate_control(settings, anchor, adapters)
    control = math.log(lmbda or settings.anchor.lmbda)
    rows = []
    for path in paths:
        view = Explorer(open_picture(path), rate_control).view(control)
        record = view.record()
        rows.append({key: record[key] for key in ("image", "width", "height", "alice_file_bytes", "alice_bpp",
                                                  "alice_psnr", "jpeg_quality", "jpeg_fits", "jpeg_bytes",
                                                  "jpeg_psnr", "psnr_gap_db")})
        print(view.describe(), flush=True)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchor", help="model file (default: the cpu profile's shipped anchor)")
    parser.add_argument("--adapters", nargs="*", help="adapter files (default: the shipped ones)")
    parser.add_argument("--lmbda", type=float, help="default: the anchor's own lambda, as alice compress")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the table here (CSV)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        table = compare(sample_photographs(Path(tmp)), args.anchor, args.adapters, args.lmbda)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    gaps = table["psnr_gap_db"]
    print(f"median gap {gaps.median():+.2f} dB (best {gaps.max():+.2f}, worst {gaps.min():+.2f}) over "
          f"{len(table)} photographs; JPEG no larger than .alice on {int(table['jpeg_fits'].sum())}")
    if args.out:
        table.to_csv(args.out, index=False)
        print(f"written: {args.out}")
    return table


if __name__ == "__main__":
    main()
