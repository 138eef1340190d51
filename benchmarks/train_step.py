"""Training-step time and peak memory for LoRA, vanilla and full training (issue 3, item 9).

The same small STF (``STFConfig(embed_dim=12, depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 6),
num_slices=4)``, the CPU profile's size), the same batch (8 smooth synthetic 128x128 crops)
and the same step as :func:`alice_lib.train.train`: forward, rate-distortion loss at
lambda 0.0067, backward, gradient clipping at 1.0, Adam on the trainable parameters,
then the auxiliary quantile step when the quantiles train (full mode only).

What is measured, per mode, each in a fresh Python process so that one mode's memory
cannot hide in another's peak:

* ``step``: median wall time of ``--steps`` timed steps after ``--warmup`` untimed ones
  (and the min-max range);
* ``peak RSS``: the process's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``),
  which includes the interpreter, torch, compressai and the model;
* ``train mem``: peak RSS minus the RSS just before the first training step (model, optimizer
  objects and batch already allocated): the activations, gradients and optimizer state
  that training adds. Glibc may keep freed memory, so this is an upper bound.

``--precision bf16`` runs the forward pass under bfloat16 autocast, as
``TrainConfig(precision="bf16")`` does (the loss in float32); ``--stream FOLDER``
also times :class:`alice_lib.data.ImageFolder` decoding one random crop per item
from disk (``cache=False``, the mode used for folders above
:data:`alice_lib.data.CACHE_MAX_IMAGES`), to compare with the step time.

``--device cuda`` runs on a GPU (timings synchronised; memory is then
``torch.cuda.max_memory_allocated`` over the timed steps) and ``--size paper`` uses the
full-size STF (``STFConfig()``, 99.9M parameters) instead of the CPU profile's; ``--json PATH``
also writes the results (``../shared/GPU.md`` item 2).

Usage: ``.venv/bin/python benchmarks/train_step.py [--steps 8] [--threads 2] [--precision bf16]
[--stream ../shared/data/bsds432] [--device cuda --size paper --batch-size 16 --crop 256]
[--size e32-d1111-w8 --batch-size 4 --crop 256 --modes full]`` (a pilot candidate of the CPU scale).
Timings on a shared machine vary with what else runs; compare modes within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from cpu_scale_pilot import CANDIDATES  # this folder is on sys.path when a benchmark runs as a script

REPO = Path(__file__).resolve().parents[1]
MODES = ("lora", "vanilla", "full")
MODEL = dict(embed_dim=12, depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 6), num_slices=4, drop_path_rate=0.0)
SIZES = {"cpu": MODEL, "paper": {}}  # paper: STFConfig()'s defaults, the published size
# The CPU-scale pilot's candidates (benchmarks/cpu_scale_pilot.py), by name: --size e32-d1111-w8
SIZES.update({name: {**{key: yaml.safe_load(value) for key, value in overrides.items()}, "num_slices": 4,
                     "drop_path_rate": 0.0}
              for name, overrides in CANDIDATES.items()})


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(mode: str, steps: int, warmup: int, batch_size: int, crop: int, threads: int,
            precision: str = "fp32", size: str = "cpu", device: str = "cpu") -> dict:
    """One mode, in this process."""
    import torch
    from torch import nn

    from alice_lib import lora
    from alice_lib.data import SyntheticImages
    from alice_lib.models.stf import STFConfig, SymmetricalTransFormer
    from alice_lib.train import RateDistortionLoss, float_output, split_parameters

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    model = SymmetricalTransFormer(STFConfig(**SIZES[size]))
    if mode == "lora":
        lora.inject_lora(model, lora.LoRAConfig(), generator=torch.Generator().manual_seed(0))
    lora.mark_trainable(model, mode)
    model.to(dev).train()
    main, aux = split_parameters(model)
    optimizer = torch.optim.Adam(main, lr=1e-4)
    aux_optimizer = torch.optim.Adam(aux, lr=1e-3) if aux else None
    criterion = RateDistortionLoss(0.0067)
    data = SyntheticImages(batch_size, crop, seed=0)
    batch = torch.stack([data[i] for i in range(batch_size)]).to(dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            output = model(batch)
        out = criterion(float_output(output), batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        nn.utils.clip_grad_norm_(main, 1.0)
        optimizer.step()
        if aux_optimizer is not None:
            aux_optimizer.zero_grad(set_to_none=True)
            model.aux_loss().backward()
            aux_optimizer.step()

    rss_before = _rss_mib()
    times = []
    for i in range(warmup + steps):
        if cuda and i == warmup:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            before = torch.cuda.memory_allocated(dev)
        started = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    peak = _peak_rss_mib()
    result = {"mode": mode, "size": size, "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
              "precision": precision, "batch_size": batch_size, "crop": crop, "steps": steps,
              "trainable": sum(p.numel() for p in main + aux), "total": sum(p.numel() for p in model.parameters()),
              "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
              "images_per_s": batch_size / statistics.median(times), "torch": torch.__version__,
              "peak_rss_mib": peak, "rss_before_mib": rss_before, "train_mem_mib": peak - rss_before}
    if cuda:  # on a GPU the device's memory is what limits the batch
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        result["train_mem_mib"] = (torch.cuda.max_memory_allocated(dev) - before) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--stream", metavar="FOLDER", help="also time streamed crops (decode per item) from FOLDER")
    parser.add_argument("--size", choices=tuple(SIZES), default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.warmup, args.batch_size, args.crop, args.threads,
                                 args.precision, args.size, args.device)))
        return

    import platform

    import torch

    print(f"STF {args.size} {SIZES[args.size]}, {args.device}, batch {args.batch_size}x3x{args.crop}x{args.crop}, {args.threads} thread(s), "
          f"{args.steps} timed steps after {args.warmup} warm-up, {args.precision}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
          f"load average {os.getloadavg()[0]:.1f}")
    results = []
    for mode in args.modes:
        command = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--batch-size", str(args.batch_size), "--crop", str(args.crop),
                   "--threads", str(args.threads), "--precision", args.precision, "--size", args.size,
                   "--device", args.device]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    full = next((r for r in results if r["mode"] == "full"), None)
    header = (f"{'mode':8} {'trainable':>10} {'of total':>9} {'step median':>12} {'(min-max)':>15} "
              f"{'peak RSS':>10} {'train mem':>10}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['mode']:8} {r['trainable']:>10,} {r['trainable'] / r['total']:>9.2%} {r['median_s']:>11.3f}s "
              f"{'(' + format(r['min_s'], '.2f') + '-' + format(r['max_s'], '.2f') + ')':>15} "
              f"{r['peak_rss_mib']:>7.0f}MiB {r['train_mem_mib']:>7.0f}MiB")
    if full:
        for r in results:
            if r is not full:
                print(f"{r['mode']}: step time x{r['median_s'] / full['median_s']:.2f}, "
                      f"train mem x{r['train_mem_mib'] / full['train_mem_mib']:.2f} of full training")
    if args.stream:
        per_item = stream_seconds(args.stream, args.crop, min(64, 8 * args.batch_size))
        print(f"streamed crops from {args.stream}: {per_item * 1000:.1f} ms per image decoded from disk, "
              f"{per_item * args.batch_size:.2f} s per batch of {args.batch_size} in one process "
              f"(DataLoader workers overlap it with the step on a GPU)")


def stream_seconds(folder: str, crop: int, items: int) -> float:
    """Median seconds to read, decode and crop one image with ``ImageFolder(cache=False)``."""
    import torch

    from alice_lib.data import ImageFolder

    data = ImageFolder(folder, crop, train=True, cache=False, flip=False)
    times = []
    for i in range(items):
        torch.manual_seed(i)
        started = time.perf_counter()
        data[i % len(data)]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


if __name__ == "__main__":
    main()
