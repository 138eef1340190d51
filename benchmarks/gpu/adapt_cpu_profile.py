"""The CPU profile's adaptation at a longer budget, on one GPU: the main job's step 3, N times longer.

Issue 10 asks how many adaptation steps bring ALICE within +5 % BD-rate of the CPU references.
On the 2-core machine four times the main job's 300 steps took +52.8 % to +30.8 %
(``docs/studies/adaptation-budget.md``); ten to a hundred times is GPU work
(``docs/gpu.md``). This driver runs exactly the main job's code path,
:func:`alice_lib.pipeline.adapt` with the CPU profile's adaptation settings and ``adapt.steps``
overridden, once per (method, target lambda), every run a process of its own sharing the GPU.
The anchor is the shipped one, so the adapters it returns load onto this machine's anchor.

On the GPU machine (compressai built there as ``docs/gpu.md`` says)::

    python benchmarks/gpu/adapt_cpu_profile.py --data DIR --out $OUT --steps 3000 --methods alice \\
        --deadline-s 500

Each run writes ``last.pt`` every ``--checkpoint-every`` steps; at the deadline the runs still
going are stopped and their checkpoints returned. Run the same command with ``--resume-from``
the returned folder to continue them (the cosine schedule is the full run's; nothing restarts).
``$OUT/rates/<method>-<lambda>/`` then holds what the main job's run folder holds there: the
artefact once finished, ``train/metrics.csv``, and ``train/last.pt`` while unfinished.

Back on this machine, install the finished artefacts into a run folder and let the main job
evaluate them (its step 3 finds them trained and skips to Kodak)::

    python benchmarks/gpu/adapt_cpu_profile.py --install RESULTS --run-dir runs/gpu-adapt3000
    alice run --profile cpu --run-dir runs/gpu-adapt3000 --reports-dir runs/gpu-adapt3000/reports \\
        -p adapt.steps=3000 -p 'adapt.methods=[alice]' -p 'eval.methods=[fixed-rate, alice]'
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from alice_lib.run_folder import RunLayout

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_cpu_models import _wait  # noqa: E402  (the same process handling as the anchor's driver)

METHODS = ("alice", "vanilla")


def overrides(steps: int, methods: list[str], checkpoint_every: int, workers: int) -> dict:
    """The settings overrides of the run: the main job's adaptation with another step count."""
    return {"adapt.steps": steps, "adapt.methods": list(methods), "adapt.checkpoint_every": checkpoint_every,
            "adapt.num_workers": workers, "eval.methods": ["fixed-rate", *methods]}


def prepare(run_dir: Path, data: str) -> None:
    """A run folder with the shipped anchor and the training photographs (no Kodak needed to adapt)."""
    from alice_lib.data_sources import resolve_training
    from alice_lib.pipeline import load_profile, prepare_anchor, record_sources

    record_sources(run_dir, {"train": resolve_training(data, allow_download=False)})
    prepare_anchor(load_profile("cpu"), run_dir, progress=False)


def worker(run_dir: Path, method: str, lmbda: float, settings_overrides: dict) -> None:
    """One adaptation run on the GPU, one CPU thread (the data loader has its own workers)."""
    import torch

    from alice_lib.pipeline import adapt, load_profile

    torch.set_num_threads(1)
    settings = load_profile("cpu", settings_overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    summary = adapt(settings, run_dir, lmbda, method, progress=False, device=device)
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}), flush=True)


def export(run_dir: Path, out: Path, method: str, lmbda: float) -> dict:
    """Copy one run's artefact and log to ``out`` (its checkpoint too while it is unfinished)."""
    layout = RunLayout(run_dir)
    artefact, training = layout.rate_artifact(method, lmbda), layout.rate_training(method, lmbda)
    target = out / artefact.parent.relative_to(run_dir)
    (target / "train").mkdir(parents=True, exist_ok=True)
    finished = artefact.exists()
    wanted = [training / "metrics.csv"] + ([artefact] if finished else [training / "last.pt"])
    copied = []
    for source in (path for path in wanted if path.exists()):
        shutil.copy2(source, target / source.relative_to(artefact.parent))
        copied.append(source.name)
    return {"finished": finished, "files": copied}


def resume(results: Path, run_dir: Path) -> None:
    """Put a previous call's returned ``rates/`` back, so that its runs continue from ``last.pt``."""
    if (results / "rates").is_dir():
        shutil.copytree(results / "rates", run_dir / "rates", dirs_exist_ok=True)


def install(results: Path, run_dir: Path) -> list[Path]:
    """Copy the finished artefacts and logs of ``results`` into a run folder; refuse unfinished runs."""
    rates = sorted(p for p in (results / "rates").glob("*-*") if p.is_dir())
    if not rates:
        raise SystemExit(f"{results}/rates holds no runs")
    unfinished = [p.name for p in rates if not any(p.glob("*.safetensors"))]
    if unfinished:
        raise SystemExit(f"unfinished runs (continue them with --resume-from {results}): {', '.join(unfinished)}")
    copied = []
    for rate in rates:
        shutil.copytree(rate, run_dir / "rates" / rate.name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("last.pt"))
        copied.append(run_dir / "rates" / rate.name)
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="training photographs (the BSDS folder)")
    parser.add_argument("--out", type=Path, help="where the results go ($OUT on the GPU machine)")
    parser.add_argument("--steps", type=int, help="adaptation steps per run (the main job: 300)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["alice"])
    parser.add_argument("--lmbda", type=float, action="append", help="a target (repeatable; default: all five)")
    parser.add_argument("--deadline-s", type=float, default=520.0,
                        help="stop the runs still going after this many seconds and return their checkpoints")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--num-workers", type=int, default=1, help="data-loader workers per run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/adapt-cpu-profile"), help="the run folder there")
    parser.add_argument("--resume-from", type=Path, help="a previous call's returned folder")
    parser.add_argument("--install", type=Path, help="here: install this returned folder into --run-dir")
    parser.add_argument("--run-dir", type=Path, help="with --install: the main job's run folder")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "LMBDA", "OVERRIDES"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        method, lmbda, settings_overrides = args.worker
        return worker(args.work, method, float(lmbda), json.loads(settings_overrides))
    if args.install:
        if not args.run_dir:
            parser.error("--install needs --run-dir")
        for path in install(args.install, args.run_dir):
            print(f"installed {path}")
        return
    if not (args.data and args.out and args.steps):
        parser.error("training needs --data, --out and --steps")

    from alice_lib.settings import load_settings

    started = time.time()
    targets = args.lmbda or list(load_settings("cpu").targets)
    settings_overrides = overrides(args.steps, args.methods, args.checkpoint_every, args.num_workers)
    prepare(args.work, args.data)
    if args.resume_from:
        resume(args.resume_from, args.work)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(m, l) for m in args.methods for l in targets]
    processes = {}
    for method, lmbda in runs:
        log = args.out / f"{method}-{lmbda}.log"
        command = [sys.executable, __file__, "--work", str(args.work),
                   "--worker", method, str(lmbda), json.dumps(settings_overrides)]
        processes[(method, lmbda)] = subprocess.Popen(command, cwd=REPO, stdout=log.open("w"),
                                                      stderr=subprocess.STDOUT)
    status = _wait(processes, started + args.deadline_s)
    report = {"steps": args.steps, "overrides": settings_overrides, "seconds": round(time.time() - started, 1),
              "runs": {f"{m}-{l}": {"status": status[(m, l)], **export(args.work, args.out, m, l)} for m, l in runs}}
    (args.out / "plan.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
