"""The paper scale on a GPU: training-step cost and the complexity table (``../shared/GPU.md`` item 2).

* Training: the full-size STF (``STFConfig()``, random weights: timing does not depend on
  the values) at batch 16 of 256x256 crops for ALICE (LoRA), vanilla and full fine-tuning,
  fp32 and bf16 autocast, through ``benchmarks/train_step.py`` (one process per mode):
  median step time, images per second, peak GPU memory.
* Complexity: :func:`alice_lib.evaluation.measure_complexity` on the GPU for STF,
  STF+ALICE unmerged and MALICE (:func:`alice_lib.evaluation.complexity_models` of the paper
  profile) on one 768x512 image, with real entropy coding (the rANS coder runs on the CPU).

Writes ``train_step.json`` and ``complexity.csv`` into ``--out``; each part that fails
writes its error instead, so one failure does not lose the others.

Usage: ``python benchmarks/gpu/paper_scale.py --out DIR --image kodim01.png [--steps 100]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def train_steps(out: Path, steps: int, warmup: int, precisions: list[str]) -> None:
    results = []
    for precision in precisions:
        path = out / f"train_step_{precision}.json"
        command = [sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--size", "paper", "--device", "cuda",
                   "--batch-size", "16", "--crop", "256", "--steps", str(steps), "--warmup", str(warmup),
                   "--precision", precision, "--threads", "4", "--json", str(path)]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        print(done.stdout, done.stderr[-2000:] if done.returncode else "", flush=True)
        results += json.loads(path.read_text()) if path.exists() else [{"precision": precision,
                                                                         "error": done.stderr[-2000:]}]
    (out / "train_step.json").write_text(json.dumps(results, indent=1))


def complexity(out: Path, image: Path, repeats: int, device: str = "cuda") -> None:
    import torch

    from alice_lib.data import read_image
    from alice_lib.evaluation import complexity_models, measure_complexity
    from alice_lib.settings import load_settings

    models = {name: model.to(device) for name, model in complexity_models(load_settings("paper")).items()}
    table = measure_complexity(models, read_image(image), repeats=repeats, flops=False)
    table["gpu"] = torch.cuda.get_device_name() if device.startswith("cuda") else "none"
    table["torch"] = torch.__version__
    table.to_csv(out / "complexity.csv", index=False)
    print(table.to_string(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--image", type=Path, required=True, help="a 768x512 image (kodim01.png)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="where the complexity models run")
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "complexity"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = {"complexity": lambda: complexity(args.out, args.image, args.repeats, args.device),
             "train": lambda: train_steps(args.out, args.steps, args.warmup, args.precisions)}
    for name, run in parts.items():
        if name in args.skip:
            continue
        try:
            run()
        except Exception:  # keep what the other parts measured
            (args.out / f"{name}_error.txt").write_text(traceback.format_exc())
            traceback.print_exc()


if __name__ == "__main__":
    main()
