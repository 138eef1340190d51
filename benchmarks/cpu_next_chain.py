"""Issue 25's remaining training on this machine, cut into pieces a session can finish and commit.

A session's files outside the repository do not outlive it (the anchor's run folder, optimiser
state included, was lost with its machine between two sessions), so each piece ends in files
that are committed: the budget's table, then every trained run shipped in
``alice_lib/weights/`` under the CPU profile's names (``alice_lib/profiles/cpu.yaml``; staged in
``weights/next/`` under ``docs/cpu-scale/cpu-next.yaml`` until all fifteen existed).
``run`` does whatever comes next, in order, and resumes within a session:

1. **budget** (done): the full fine-tune at lambda 0.0018 in doublings (``fine_tune_budget.py``),
   its report in ``docs/cpu-scale/budget/``; N is the first with obj(2N) > 0.99 obj(N). The chain
   stops there, so that the profile's ``adapt.steps`` is set from it and committed (the rule named
   no N within 1,600 steps; 800 was chosen, docs/cpu-scale/README.md).
2. **runs** (done): ``alice run --profile cpu`` (references, ALICE and vanilla at the five
   targets, on the shipped anchor, ``adapt.steps`` each): shipped runs are installed, the others
   trained; the evaluation codes one Kodak image, a check that every notebook runs.
3. **progressive** (once all fifteen runs are shipped): ALICE with each adapter started from its
   neighbour's (``progressive_start.py``), and its table against the independent runs. The first
   rate down from the anchor (0.025) starts from the anchor in both schemes: the shipped independent
   run stands for it. Each lower rate gets a quarter of the independent budget
   (``PROGRESSIVE_STEPS``), validated every 50 steps: Xu, Huang and Wu report 97 % fewer steps,
   and four runs of 200 steps fit beside the rest of a session (about half an hour).

``stage`` (before a session ends) ships each run trained here into ``alice_lib/weights/``
with its log (``pipeline.ship_run``), to commit.

Training runs under jemalloc where it is installed (``apt-get install libjemalloc2``): under
glibc's allocator the anchor's training took 76,000 page faults per second and 1.85 s per step,
under jemalloc 740 and 1.5-1.6 s (docs/cpu-scale/README.md).

    apt-get install -y libjemalloc2      # once per machine
    nohup nice -n 5 python benchmarks/cpu_next_chain.py run >> /work/cpu-scale-runs/chain.log 2>&1 &
    python benchmarks/cpu_next_chain.py stage     # then: git add alice_lib/weights && git commit
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from alice_lib import pipeline as wb  # noqa: E402
from alice_lib.run_folder import RunLayout  # noqa: E402
from alice_lib.settings import Settings, load_settings  # noqa: E402
from fine_tune_budget import budget  # noqa: E402  (the issue's rule, in one place)

PROFILE = ROOT / "alice_lib" / "profiles" / "cpu.yaml"
JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
BUDGET_DIR = ROOT / "docs" / "cpu-scale" / "budget"
PROGRESSIVE_STEPS = 200  # per rate below the first: a quarter of the independent runs' 800


def committed_budget(out: Path = BUDGET_DIR) -> int | None:
    """The N that the budget's committed table (``budget.csv``: N, obj_N, obj_2N) names, if any."""
    if not (out / "budget.csv").exists():
        return None
    table = pd.read_csv(out / "budget.csv")
    at = {**dict(zip(table["N"], table["obj_N"])), **dict(zip(2 * table["N"], table["obj_2N"]))}
    return budget(sorted(at), [at[n] for n in sorted(at)])


def _runs(settings: Settings) -> list[tuple[str, float]]:
    return [(method, lmbda) for method in settings.adaptation.methods for lmbda in settings.targets]


def trained_here(settings: Settings, run_dir: Path) -> list[tuple[str, float]]:
    """The (method, lambda) runs that ``run_dir`` trained (not installed from staged files) and finished."""
    layout = RunLayout(run_dir)
    return [(method, lmbda) for method, lmbda in _runs(settings)
            if layout.rate_artifact(method, lmbda).exists() and not layout.rate_source(method, lmbda).exists()]


def unstaged(settings: Settings) -> list[tuple[str, float]]:
    """The (method, lambda) runs with no staged file yet."""
    return [(method, lmbda) for method, lmbda in _runs(settings)
            if not settings.adaptation.shipped_weights(method, lmbda).exists()]


def stage(args: argparse.Namespace) -> list[Path]:
    settings = load_settings(args.profile)
    missing = unstaged(settings)
    staged = [wb.ship_run(settings, args.root / "main", method, lmbda)
              for method, lmbda in trained_here(settings, args.root / "main") if (method, lmbda) in missing]
    for path in staged:
        print(f"staged: {path.relative_to(ROOT)} ({path.stat().st_size / 1e6:.2f} MB)")
    print(f"still to train: {unstaged(settings) or 'nothing'}")
    return staged


def _environment() -> dict[str, str]:
    """This process's environment, with jemalloc preloaded where it is installed and nothing else is."""
    env = dict(os.environ)
    if JEMALLOC.exists() and not env.get("LD_PRELOAD"):
        env.update(LD_PRELOAD=str(JEMALLOC), MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")  # keep pages mapped
    return env


def _call(command: list[str], log: Path) -> None:
    print("$", " ".join(command), flush=True)
    with open(log, "a") as out:
        if subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=_environment()):
            raise SystemExit(f"failed: {' '.join(command)} (its output: {log})")


def _alice_run(args: argparse.Namespace) -> None:
    """The profile's main job in ``ROOT/main``: shipped runs installed, the others trained, one Kodak image."""
    _call([sys.executable, "-m", "alice_lib.cli", "run", "--profile", str(args.profile), "--run-dir",
           str(args.root / "main"), "--reports-dir", str(args.root / "main-reports"), "-p", "eval.max_images=1"], args.root / "main.log")


def run(args: argparse.Namespace) -> None:
    settings = load_settings(args.profile)
    anchor = settings.anchor.shipped_weights
    python, bench = sys.executable, ROOT / "benchmarks"
    args.root.mkdir(parents=True, exist_ok=True)
    if not (BUDGET_DIR / "budget.csv").exists():
        _call([python, str(bench / "fine_tune_budget.py"), "train", "--init", str(anchor),
               "--root", str(args.root / "budget"), "--threads", str(args.threads)], args.root / "budget.log")
        _call([python, str(bench / "fine_tune_budget.py"), "report", "--root", str(args.root / "budget"),
               "--out", str(BUDGET_DIR)], args.root / "budget.log")
        raise SystemExit(f"the budget is measured ({BUDGET_DIR}, N = {committed_budget()}): set adapt.steps "
                         f"in {args.profile} to it (or to what the plan holds), commit both, run again")
    n = settings.adaptation.training(settings.adaptation.methods[0]).steps  # one budget for every method
    print(f"budget: {n} steps (the profile's adapt.steps; the rule's N: {committed_budget()})", flush=True)
    if unstaged(settings):
        _alice_run(args)
        print("every run trained: stage them (python benchmarks/cpu_next_chain.py stage) and commit", flush=True)
        return
    out = ROOT / "docs" / "cpu-scale" / "progressive"
    _call([python, str(bench / "progressive_start.py"), "train", "--profile", str(args.profile), "--anchor",
           str(anchor), "--start", "neighbour", "--first-shipped", "-p", f"adapt.steps={PROGRESSIVE_STEPS}", "-p",
           "adapt.validate_every=50", "--run-dir", str(args.root / "progressive"), "--threads", str(args.threads),
           "--no-progress"], args.root / "progressive.log")
    if not (args.root / "main").exists():
        _alice_run(args)  # installs the shipped runs: the independent runs' logs to compare with
    _call([python, str(bench / "progressive_start.py"), "report", "--profile", str(args.profile),
           "--independent", str(args.root / "main"), "--progressive", str(args.root / "progressive"),
           "--out", str(out)], args.root / "progressive.log")
    print(f"done: the progressive table is in {out}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "stage"))
    parser.add_argument("--profile", type=Path, default=PROFILE)
    parser.add_argument("--root", type=Path, default=Path("/work/cpu-scale-runs"),
                        help="the runs' folders (outside the repository)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    {"run": run, "stage": stage}[args.command](args)


if __name__ == "__main__":
    main()
