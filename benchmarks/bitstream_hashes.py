"""SHA-256 of the real bitstreams the main job's evaluation codes (a script, not a test).

A refactoring must leave the coded bits as they were. This script builds a CPU-profile
run folder with one tree's code (``--tree``; default: this repository), installs the
shipped anchor and fixed-rate references and the shipped ALICE adapters through the
pipeline's own steps, adds a vanilla model file (not shipped: made once with
``--train-vanilla``), and codes a few Kodak images with each model exactly as
``04_evaluate`` does (``pipeline.eval_models``, eval mode, coder tables updated,
``compress`` on the evaluation's input batch and padding). One row per (model, image):
the bitstream's bytes and the SHA-256 of its strings, length-prefixed in coding order.

Run it with the code of two trees on the same weight files and compare the tables::

    git worktree add /tmp/wt-start 1377909
    python benchmarks/bitstream_hashes.py --tree /tmp/wt-start --run-dir /tmp/bits/start \\
        --train-vanilla /tmp/bits/vanilla-0.0018.safetensors          # once, with the starting code
    python benchmarks/bitstream_hashes.py --tree /tmp/wt-start --run-dir /tmp/bits/start \\
        --vanilla /tmp/bits/vanilla-0.0018.safetensors --out /tmp/bits/before.csv
    python benchmarks/bitstream_hashes.py --run-dir /tmp/bits/now \\
        --vanilla /tmp/bits/vanilla-0.0018.safetensors --out /tmp/bits/after.csv

Both trees need only what ``alice_lib.pipeline`` offers in both (``load_profile``,
``prepare_data``, ``prepare_anchor``, ``prepare_references``, ``adapt``, ``eval_models``,
``RunLayout``, ``lmbda_tag``), ``settings.PACKAGE_DIR`` and ``evaluation.coding``.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_IMAGES = ("kodim01.png", "kodim13.png", "kodim23.png")
DEFAULT_LMBDA = 0.0018
# The evaluation's row names (pipeline.eval_models): the anchor, a reference, ALICE and vanilla at one lambda.
MODEL_NAMES = ("anchor", "fixed-rate-{tag}", "alice-{tag}", "vanilla-{tag}")


def use_tree(tree: Path) -> None:
    """Import ``alice_lib`` from ``tree`` (call before anything imports it)."""
    if "alice_lib" in sys.modules:
        raise RuntimeError("alice_lib is already imported; choose the tree first")
    sys.path.insert(0, str(Path(tree).resolve()))


def strings_sha256(strings) -> tuple[str, int]:
    """SHA-256 of a (nested) list of byte strings, each prefixed by its length, and their total bytes."""
    digest, total = hashlib.sha256(), 0
    for string in _flat(strings):
        digest.update(len(string).to_bytes(8, "little") + bytes(string))
        total += len(string)
    return digest.hexdigest(), total


def _flat(strings) -> Iterable[bytes]:
    if isinstance(strings, (bytes, bytearray)):
        yield strings
        return
    for item in strings:
        yield from _flat(item)


def train_vanilla(run_dir: Path, out: Path, lmbda: float = DEFAULT_LMBDA, steps: int = 4,
                  train_dir: Path = SHARED / "bsds432", kodak_dir: Path = SHARED / "kodak") -> Path:
    """A vanilla model at ``lmbda`` from a few adaptation steps of the main job's ``adapt`` (not a result:
    a weight file that both trees then code)."""
    from alice_lib import pipeline

    settings = pipeline.load_profile("cpu", {"adapt.steps": steps, "data.val_images": 0})
    pipeline.prepare_data(settings, run_dir, kodak=str(kodak_dir), train_folder=str(train_dir),
                          allow_download=False)
    pipeline.prepare_anchor(settings, run_dir)
    pipeline.adapt(settings, run_dir, lmbda, "vanilla", progress=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pipeline.RunLayout(run_dir).rate_artifact("vanilla", lmbda), out)
    return out


def install_models(run_dir: Path, vanilla: Path, lmbda: float = DEFAULT_LMBDA) -> None:
    """The shipped anchor and references through ``prepare_anchor`` / ``prepare_references``, the shipped
    ALICE adapters and ``vanilla`` as that lambda's trained artefacts."""
    from alice_lib import pipeline
    from alice_lib.settings import PACKAGE_DIR

    settings = pipeline.load_profile("cpu")
    layout = pipeline.RunLayout(run_dir)
    pipeline.prepare_anchor(settings, run_dir)
    pipeline.prepare_references(settings, run_dir)
    shipped_adapters = PACKAGE_DIR / "weights" / f"cpu_alice_{pipeline.lmbda_tag(lmbda)}.safetensors"
    for method, source in (("alice", shipped_adapters), ("vanilla", Path(vanilla))):
        target = layout.rate_artifact(method, lmbda)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def bitstream_hashes(run_dir: Path, images: Sequence[Path], names: Sequence[str]) -> list[dict]:
    """One row per (model, image): the evaluation's models named ``names``, coded as ``04_evaluate`` codes."""
    import torch

    from alice_lib import pipeline
    from alice_lib.data import read_image
    from alice_lib.evaluation.coding import image_batch, pad_reference

    settings = pipeline.load_profile("cpu")
    entries = {entry.name: entry for entry in pipeline.eval_models(settings, Path(run_dir))}
    rows = []
    for name in names:
        model = entries[name].load()
        model.eval()
        model.update(force=True)
        for path in images:
            x = image_batch(read_image(path))
            if settings.evaluation.padding == "reference":
                x, _ = pad_reference(x)
            with torch.no_grad():
                sha256, n_bytes = strings_sha256(model.compress(x)["strings"])
            rows.append({"model": name, "image": Path(path).name, "bytes": n_bytes, "sha256": sha256})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=REPO, help="the checkout whose alice_lib codes (default: this)")
    parser.add_argument("--run-dir", type=Path, required=True, help="a scratch run folder for this tree")
    parser.add_argument("--vanilla", type=Path, help="the vanilla model file both trees code")
    parser.add_argument("--train-vanilla", type=Path, metavar="OUT", help="make that file first, with this tree")
    parser.add_argument("--kodak", type=Path, default=SHARED / "kodak")
    parser.add_argument("--images", nargs="+", default=list(DEFAULT_IMAGES))
    parser.add_argument("--lmbda", type=float, default=DEFAULT_LMBDA)
    parser.add_argument("--out", type=Path, help="CSV of the rows (default: printed only)")
    args = parser.parse_args(argv)
    use_tree(args.tree)
    import alice_lib
    import pandas as pd
    import torch

    from alice_lib.pipeline import lmbda_tag  # both trees: the pipeline has it (run_folder is newer)

    torch.set_num_threads(1)  # the same arithmetic in every run, whatever the machine's load
    print(f"alice_lib from {Path(alice_lib.__file__).parent}")
    if args.train_vanilla:
        print(f"vanilla model: {train_vanilla(args.run_dir / 'vanilla', args.train_vanilla, args.lmbda)}")
        args.vanilla = args.vanilla or args.train_vanilla
    if args.vanilla is None:
        parser.error("give --vanilla (a model file) or --train-vanilla OUT")
    install_models(args.run_dir, args.vanilla, args.lmbda)
    names = [name.format(tag=lmbda_tag(args.lmbda)) for name in MODEL_NAMES]
    table = pd.DataFrame(bitstream_hashes(args.run_dir, [args.kodak / n for n in args.images], names))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
