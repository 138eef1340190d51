"""What tiled coding costs in rate-distortion, and what it saves in memory (a script, not a test).

1. BD-rate on Kodak of tiled against untiled coding with the shipped CPU model and
   its adapters (real ``.alice`` payloads, every trained rate), one row per tile size:

       python benchmarks/tiling.py bd [--tiles 512 256] [--max-images 12]

2. Peak resident memory of ``alice compress`` and ``alice decompress`` of a large
   photo-like image (Kodak images mirrored to the size asked for), each in a fresh
   process, from GNU time's "Maximum resident set size":

       python benchmarks/tiling.py memory [--size 6000x4000] [--tile 1024]

3. The bound for the published-size STF (``STFConfig()``, conformance-rule weights):
   peak resident memory of coding one tile, which is what tiling bounds:

       python benchmarks/tiling.py published [--tile 1024]
"""

from __future__ import annotations

import argparse
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KODAK = REPO.parent / "shared" / "data" / "kodak"
sys.path.insert(0, str(REPO))


def bd(args: argparse.Namespace) -> None:
    import pandas as pd
    import torch

    from alice_lib.checkpoints import load_stf
    from alice_lib.cli import shipped_weights
    from alice_lib.codec import RateControl, decode, encode
    from alice_lib.data import list_images, read_image
    from alice_lib.evaluation.bd import bd_rate
    from alice_lib.evaluation.metrics import psnr_rgb

    torch.set_num_threads(args.threads)
    anchor, adapters = shipped_weights()
    rc = RateControl(load_stf(anchor), adapters, anchor_lmbda=0.0483, copy=False)
    rows = []
    paths = list_images(args.kodak)[: args.max_images]
    tiles = [None, *args.tiles]
    for path in paths:
        image = read_image(path)
        for control in rc.controls:
            for tile in tiles:
                f = encode(rc, image, control, tile=tile)
                rows.append({"image": path.name, "lmbda": math.exp(control), "tile": tile or 0, "bpp": f.bpp,
                             "psnr": psnr_rgb(image, decode(rc, f))})
        print(f"{path.name} done", file=sys.stderr)
    df = pd.DataFrame(rows)
    mean = df.groupby(["tile", "lmbda"], as_index=False)[["bpp", "psnr"]].mean()
    ref = mean[mean["tile"] == 0]
    print(f"{len(paths)} Kodak images, {len(rc.controls)} rates, shipped CPU model; BD-rate against untiled:")
    for tile in args.tiles:
        cur = mean[mean["tile"] == tile]
        value = bd_rate(ref["bpp"], ref["psnr"], cur["bpp"], cur["psnr"])
        d_bpp = (cur["bpp"].to_numpy() / ref["bpp"].to_numpy() - 1).mean() * 100
        d_psnr = (cur["psnr"].to_numpy() - ref["psnr"].to_numpy()).mean()
        print(f"tile {tile}: BD-rate {value:+.2f} %  (mean bpp {d_bpp:+.2f} %, mean PSNR {d_psnr:+.3f} dB)")
    if args.out:
        df.to_csv(args.out, index=False)


def _child_peak(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in GiB, wall seconds) of a command, from GNU time's "Maximum resident set size"."""
    start = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    line = next(x for x in out.stderr.splitlines() if "Maximum resident set size" in x)
    return int(line.split(":")[1]) / 2**20, wall


def _large_image(path: Path, height: int, width: int) -> None:
    """A photo-like test image: Kodak photographs mirrored side by side up to the size asked for."""
    import numpy as np
    from PIL import Image

    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(KODAK.glob("*.png"))[:8]]
    rows, y, k = [], 0, 0
    while y < height:
        row, x = [], 0
        while x < width:
            t = tiles[k % len(tiles)][:, ::(-1) ** k]
            k += 1
            row.append(t[:512, :768])
            x += 768
        rows.append(np.concatenate(row, axis=1)[:, :width])
        y += 512
    Image.fromarray(np.concatenate(rows, axis=0)[:height]).save(path, compress_level=1)


def memory(args: argparse.Namespace) -> None:
    width, height = map(int, args.size.split("x"))
    folder = Path(tempfile.mkdtemp(prefix="alice_mem_"))
    source = folder / "large.png"
    _large_image(source, height, width)
    alice = [sys.executable, "-m", "alice_lib.cli"]
    which = args.which
    if which in ("compress", "both"):
        peak, wall = _child_peak(alice + ["compress", str(source), "-o", str(folder), "--tile", str(args.tile),
                                          "--threads", str(args.threads)])
        print(f"compress   {width}x{height} tile {args.tile}: peak RSS {peak:.2f} GiB, {wall:.0f} s")
    if which in ("decompress", "both"):
        if not (folder / "large.alice").exists():
            raise SystemExit("run compress first (in another process)")
        peak, wall = _child_peak(alice + ["decompress", str(folder / "large.alice"), "-o", str(folder / "out"),
                                          "--threads", str(args.threads)])
        print(f"decompress {width}x{height} tile {args.tile}: peak RSS {peak:.2f} GiB, {wall:.0f} s")
    print(f"files in {folder}")


def published(args: argparse.Namespace) -> None:
    import torch

    from alice_lib.checkpoints import deterministic_weights_
    from alice_lib.models.stf import STFConfig, SymmetricalTransFormer

    torch.set_num_threads(args.threads)
    model = deterministic_weights_(SymmetricalTransFormer(STFConfig())).eval()
    model.update(force=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    x = torch.rand(1, 3, args.tile, args.tile)
    start = time.perf_counter()
    coded = model.compress(x)
    enc = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"published STF, one {args.tile}x{args.tile} tile: resident before {base:.2f} GiB (weights, tables), "
          f"after compress {enc:.2f} GiB ({time.perf_counter() - start:.0f} s)", flush=True)
    start = time.perf_counter()
    model.decompress(coded["strings"], coded["shape"], coded["image_size"])
    dec = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"after decompress {dec:.2f} GiB ({time.perf_counter() - start:.0f} s); a W x H image adds 3 * W * H "
          f"bytes (input or output) to the larger of the two")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("bd")
    p.add_argument("--tiles", type=int, nargs="+", default=[512, 256])
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--kodak", type=Path, default=KODAK)
    p.add_argument("--out", type=Path, default=None, help="CSV of every (image, rate, tile)")
    p = sub.add_parser("memory")
    p.add_argument("--size", default="6000x4000", help="WIDTHxHEIGHT")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--which", choices=("compress", "decompress", "both"), default="both")
    p = sub.add_parser("published")
    p.add_argument("--tile", type=int, default=512)
    for p in sub.choices.values():
        p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    {"bd": bd, "memory": memory, "published": published}[args.what](args)


if __name__ == "__main__":
    main()
