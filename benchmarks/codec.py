"""Codec benchmark: where the time of STF goes on this machine (a script, not a test).

For the published-size STF (conformance weights rule) and a small configuration, on
one Kodak image: median wall time of analysis, synthesis, compress and decompress,
the peak extra resident memory of one compress and of one decompress, bitstream
bytes, bpp from the bytes, and bpp estimated from the likelihoods of the eval-mode
forward (and their ratio).

    python benchmarks/codec.py [--image ../shared/data/kodak/kodim01.png] [--repeats 3] [--threads N]

Peak memory is measured by :func:`alice_lib.evaluation.complexity.peak_memory`: the rise of the
process's resident high-water mark over its level before the call (weights excluded).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from alice_lib.checkpoints import deterministic_weights_
from alice_lib.evaluation.complexity import peak_memory
from alice_lib.data import read_image
from alice_lib.models.stf import STFConfig, SymmetricalTransFormer

CONFIGS = {
    "STF (published size)": STFConfig(),
    "STF (cpu profile)": STFConfig(embed_dim=12, depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 6), num_slices=4,
                                   drop_path_rate=0.0),
}
DEFAULT_IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak" / "kodim01.png"


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, one-off kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def benchmark(name: str, config: STFConfig, x: torch.Tensor, repeats: int) -> dict:
    model = deterministic_weights_(SymmetricalTransFormer(config)).eval()
    model.update(force=True)
    padded = model._pad(x)
    y = model.analysis(padded)
    coded = model.compress(x)
    n_bytes = sum(len(s) for strings in coded["strings"] for s in strings)
    pixels = x.shape[-2] * x.shape[-1]
    likelihoods = model(x)["likelihoods"]
    bpp_estimate = sum(-torch.log2(v).sum().item() for v in likelihoods.values()) / pixels
    cpu = torch.device("cpu")
    enc_peak, memory_kind = peak_memory(lambda: model.compress(x), cpu)
    dec_peak, _ = peak_memory(lambda: model.decompress(coded["strings"], coded["shape"], coded["image_size"]), cpu)
    return {
        "model": name,
        "params_M": model.num_parameters() / 1e6,
        "analysis_s": median_seconds(lambda: model.analysis(padded), repeats),
        "synthesis_s": median_seconds(lambda: model.synthesis(y), repeats),
        "compress_s": median_seconds(lambda: model.compress(x), repeats),
        "decompress_s": median_seconds(
            lambda: model.decompress(coded["strings"], coded["shape"], coded["image_size"]), repeats),
        "compress_peak_MiB": enc_peak,
        "decompress_peak_MiB": dec_peak,
        "bytes": n_bytes,
        "bpp": 8 * n_bytes / pixels,
        "bpp_estimated": bpp_estimate,
        "bytes_over_estimate": 8 * n_bytes / pixels / bpp_estimate if bpp_estimate else math.nan,
        "memory_kind": memory_kind,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = read_image(args.image)[None].float() / 255
    print(f"image {args.image.name} {tuple(x.shape[-2:])}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name, config in CONFIGS.items():
        row = benchmark(name, config, x, args.repeats)
        print(" | ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
