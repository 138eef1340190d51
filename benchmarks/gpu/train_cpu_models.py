"""Train the CPU profile's six fixed-rate models side by side on one GPU, within a time budget.

``../shared/GPU.md`` item 1. Measured on one H200 with six processes sharing it: 0.186 s per
step of 16 crops of 256 px each, about 25 times the 2-core machine's speed per model (1.2 s
per step of 4 crops at 1 thread), six at a time. This driver runs the workbook's own
training loop (``alice train``, the recipe of ``docs/studies/anchor-training.md``
with batch 16) for the anchor (lambda 0.0483) and the five references, each from random
weights, one process per lambda, all with the same number of steps:

1. calibrate: every process runs ``--calibration-steps`` steps at once, which gives the
   step time when all share the GPU;
2. choose the budget: as many steps (a multiple of 100) as fit in what is left of
   ``--budget-s``, so that the cosine schedule ends when the time does;
3. train; each process is stopped at the deadline if the estimate was wrong (its
   ``last.pt`` of the last finished epoch then stands, and the log says so);
4. export: ``weights-<lambda>.safetensors`` (the anchor in float32, the references in
   float16 to fit the transfer limit) and ``logs.tar.gz`` (metrics, stdout, ``plan.json``).

Usage (on the GPU machine)::

    python benchmarks/gpu/train_cpu_models.py --data DIR --out DIR --budget-s 380

A further cosine cycle from each model's last step, all six alike (how the shipped models
got their second cycle; ``--steps`` skips the calibration)::

    python benchmarks/gpu/train_cpu_models.py --data DIR --out DIR2 --work /tmp/w2 --budget-s 240 \
        --init-from /tmp/cpu-models --lr 4e-4 --seed 43 --steps 1000 --steps-per-epoch 100

Back on this machine, ``--ship DIR`` turns the returned ``weights-<lambda>.safetensors`` (or,
for models trained on the CPU, each ``DIR/fixed-rate-<lambda>/last.pt``; ``--only LAMBDA`` picks
some) into shipped models in float16 (``alice_lib/weights/cpu_anchor.safetensors``, and
references from scratch as ``cpu_scratch_<lambda>.safetensors``: the profile's own references
are fine-tuned from the anchor, so these are a curve of their own, loaded with
``-p references.source=scratch -p references.weights=cpu_scratch_{lmbda}.safetensors``), each
with its coder tables built from exactly the stored values and the training facts in its metadata.
(Until issue 25 the CPU profile's anchor and references were these six, at embed 12.)::

    python benchmarks/gpu/train_cpu_models.py --ship /work/.device/3 --facts facts.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from alice_lib.run_folder import lmbda_tag
from alice_lib.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
CPU = load_settings("cpu")
ANCHOR = CPU.anchor.lmbda
LAMBDAS = (ANCHOR, *CPU.targets)
RECIPE = ["--profile", "cpu", "--threads", "1", "--no-progress", "-p", "anchor.train.schedule=cosine",
          "-p", "data.val_images=16", "-p", "anchor.train.num_workers=1"]
VALIDATIONS = 20  # rows of metrics.csv per run
SCRATCH_REFERENCES = "cpu_scratch_{lmbda}.safetensors"  # where the profile names none (references.source: full)


def _launch(args: argparse.Namespace, run_dir: Path, lmbda: float, steps: int, per_epoch: int,
            log: Path) -> subprocess.Popen:
    schedule = {"steps": steps, "validate_every": per_epoch, "batch_size": args.batch_size, "crop": args.crop,
                "lr": args.lr, "seed": args.seed, "hyper_init_gain": args.hyper_init_gain,
                "hyper_lr_scale": args.hyper_lr_scale}
    command = [sys.executable, "-m", "alice_lib.cli", "train", "--train-dir", str(run_dir), "--lmbda", str(lmbda),
               "--no-resume", *RECIPE, "-p", f"data.train_dir={args.data}",
               *[arg for key, value in schedule.items() for arg in ("-p", f"anchor.train.{key}={value}")]]
    if args.init_from:
        command += ["--init", str(args.init_from / f"fixed-rate-{lmbda}" / "last.pt")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait(processes: dict[float, subprocess.Popen], deadline: float) -> dict[float, str]:
    """Wait for every process; terminate those still running at the deadline."""
    status = {}
    for lmbda, process in processes.items():
        try:
            process.wait(timeout=max(1.0, deadline - time.time()))
            status[lmbda] = f"exit {process.returncode}"
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait(timeout=30)
            status[lmbda] = "stopped at the deadline"
    return status


def _epoch_seconds(run_dir: Path) -> list[float]:
    with (run_dir / "metrics.csv").open() as f:
        return [float(row["seconds"]) for row in csv.DictReader(f)]


def calibrate(args: argparse.Namespace, deadline: float) -> float:
    """Seconds per step with every process sharing the GPU (the slowest process, second half)."""
    work, half = args.work, args.calibration_steps // 2
    processes = {l: _launch(args, work / f"calibrate-{l}", l, 2 * half, half, work / f"calibrate-{l}.log")
                 for l in LAMBDAS}
    status = _wait(processes, deadline)
    failed = {l: s for l, s in status.items() if s != "exit 0"}
    if failed:
        tail = (work / f"calibrate-{next(iter(failed))}.log").read_text()[-3000:]
        sys.exit(f"calibration failed: {failed}\n{tail}")
    return max(_epoch_seconds(work / f"calibrate-{l}")[-1] / half for l in LAMBDAS)


def export(run_dir: Path, out: Path, lmbda: float) -> dict:
    """The model weights of ``last.pt``: float32 for the anchor, float16 floats for the references."""
    from safetensors.torch import save_file

    from alice_lib.train import load_checkpoint

    ckpt = load_checkpoint(run_dir / "last.pt")
    half = lmbda != ANCHOR
    tensors = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in ckpt["model"].items()}
    meta = {k: json.dumps(ckpt.get(k)) for k in ("step", "epoch") if k in ckpt}
    save_file(tensors, str(out / f"weights-{lmbda}.safetensors"), metadata=meta)
    return {"step": ckpt.get("step"), "dtype": "float16" if half else "float32"}


def trained_weights(results: Path, lmbda: float) -> tuple[dict, dict]:
    """One model's state dict and facts (its step, where known) from a results folder: the GPU's
    ``weights-<lambda>.safetensors``, or the ``fixed-rate-<lambda>/last.pt`` of a training folder
    (the CPU track, ``docs/studies/anchor-training.md``)."""
    from safetensors.torch import load_file

    from alice_lib.train import load_checkpoint

    exported, run = results / f"weights-{lmbda}.safetensors", results / f"fixed-rate-{lmbda}" / "last.pt"
    if exported.exists():
        return load_file(str(exported)), {}
    if run.exists():
        ckpt = load_checkpoint(run)
        return ckpt["model"], {"step": ckpt["step"]}
    raise FileNotFoundError(f"no weights for lambda {lmbda} in {results} ({exported.name} or {run.parent.name}/last.pt)")


def ship(results: Path, weights_dir: Path, facts: dict, lambdas: tuple[float, ...] = LAMBDAS) -> list[Path]:
    """The profile's shipped files from a results folder (see the module doc and :func:`trained_weights`)."""
    import torch

    from alice_lib.checkpoints import load_state_dict_checked, ship_stf
    from alice_lib.models.stf import SymmetricalTransFormer

    written = []
    for lmbda in lambdas:
        state, found = trained_weights(results, lmbda)
        model = SymmetricalTransFormer(CPU.model.stf)
        load_state_dict_checked(model, state, source=f"{results} ({lmbda})")
        name = CPU.anchor.weights if lmbda == ANCHOR else (CPU.references.weights or SCRATCH_REFERENCES).format(
            lmbda=lmbda_tag(lmbda))
        written.append(ship_stf(weights_dir / name, model, {"lmbda": lmbda, **found, **facts}, dtype=torch.float16))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--ship", type=Path, help="here: write the shipped weights from this results folder")
    parser.add_argument("--facts", type=Path, help="with --ship: JSON of training facts for the metadata")
    parser.add_argument("--only", type=float, action="append", metavar="LAMBDA",
                        help="with --ship: ship only this model; repeatable (default: all six)")
    parser.add_argument("--weights-dir", type=Path, default=REPO / "alice_lib" / "weights")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cpu-models"))
    parser.add_argument("--budget-s", type=float, help="wall time for calibration and training")
    parser.add_argument("--calibration-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", type=int, help="a fixed step count (no calibration)")
    parser.add_argument("--steps-per-epoch", type=int, help=f"default: {VALIDATIONS} validations per run")
    parser.add_argument("--init-from", type=Path, help="a previous --work folder: continue each model from it")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--hyper-init-gain", type=float, default=CPU.anchor.train.hyper_init_gain,
                        help="default: the cpu profile's; recipe v2 (docs/studies/recipe-v2.md) uses 300")
    parser.add_argument("--hyper-lr-scale", type=float, default=CPU.anchor.train.hyper_lr_scale,
                        help="default: the cpu profile's; recipe v2 uses 0.125")
    parser.add_argument("--startup-s", type=float, default=25.0, help="expected start-up time of a process")
    args = parser.parse_args()
    if args.ship:
        facts = json.loads(args.facts.read_text()) if args.facts else {}
        for path in ship(args.ship, args.weights_dir, facts, tuple(args.only or LAMBDAS)):
            print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        return
    if not (args.data and args.out and args.budget_s):
        parser.error("training needs --data, --out and --budget-s")
    started = time.time()
    deadline = started + args.budget_s
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.steps:
        step_s, steps = None, args.steps
    else:
        step_s = calibrate(args, started + args.budget_s / 3)
        left = deadline - time.time() - args.startup_s
        steps = max(100, int(left / (step_s * 1.08)) // 100 * 100)  # 8 % for the validations
    per_epoch = args.steps_per_epoch or max(1, steps // VALIDATIONS)
    plan = {"calibration_s_per_step": step_s, "steps": steps, "steps_per_epoch": per_epoch,
            "processes": len(LAMBDAS), "recipe": RECIPE, "lr": args.lr, "seed": args.seed,
            "init_from": str(args.init_from) if args.init_from else None,
            "batch_size": args.batch_size, "crop": args.crop, "hyper_init_gain": args.hyper_init_gain,
            "hyper_lr_scale": args.hyper_lr_scale, "calibrated_after_s": time.time() - started}
    print(json.dumps(plan), flush=True)

    runs = {l: args.work / f"fixed-rate-{l}" for l in LAMBDAS}
    processes = {l: _launch(args, runs[l], l, steps, per_epoch, args.work / f"fixed-rate-{l}.log")
                 for l in LAMBDAS}
    plan["status"] = _wait(processes, deadline)
    plan["trained_after_s"] = time.time() - started
    plan["exported"] = {str(l): export(runs[l], args.out, l) for l in LAMBDAS if (runs[l] / "last.pt").exists()}
    (args.work / "plan.json").write_text(json.dumps(plan, indent=1))
    with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
        for l in LAMBDAS:
            for name in (f"fixed-rate-{l}/metrics.csv", f"fixed-rate-{l}.log", f"calibrate-{l}/metrics.csv"):
                if (args.work / name).exists():
                    tar.add(args.work / name, arcname=name)
        tar.add(args.work / "plan.json", arcname="plan.json")
    print(json.dumps(plan), flush=True)


if __name__ == "__main__":
    main()
