"""A weights-only float16 snapshot of a long training run in progress, small enough to commit.

Full training checkpoints (``last.pt``, with the optimiser state) stay outside git. If the
machine that trains is lost, the snapshot is the fallback: a model file of the run's
moving average of the weights (where it keeps one, else its last weights), in float16
with coder tables built from the stored values, plus the step it was taken at. A new run
starts from it (its optimiser state starts afresh).

    python benchmarks/snapshot_run.py RUN_DIR snapshots/cpu-anchor.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alice_lib.checkpoints import ship_stf
from alice_lib.models.stf import STFConfig, SymmetricalTransFormer
from alice_lib.train import load_checkpoint, load_weights


def snapshot(run_dir: Path, out: Path) -> Path:
    """``run_dir/last.pt`` as a float16 model file at ``out`` (the moving average where the run keeps one)."""
    path = run_dir / "last.pt"
    ckpt = load_checkpoint(path)
    if "model_config" not in ckpt or "frozen_hash" in ckpt:
        raise ValueError(f"{path} is not a full-model training checkpoint with its model_config")
    model = SymmetricalTransFormer(STFConfig(**ckpt["model_config"]))
    load_weights(model, ckpt, path, averaged=True)
    meta = {"step": ckpt["step"], "lmbda": ckpt.get("lmbda"), "averaged": "average" in ckpt,
            "source": f"weights-only snapshot of {run_dir.name} at step {ckpt['step']}"}
    return ship_stf(out, model, meta)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    out = snapshot(args.run_dir, args.out)
    print(f"snapshot written: {out} ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
