"""STF compress / decompress speed of this tree against an earlier revision, interleaved in one process.

The models of ``--rev`` (``alice_lib/models/stf.py`` and ``swin.py`` read with
``git show``) and of the working tree get the same weights (the conformance rule);
their calls alternate, so that a loaded machine slows both alike, and the medians,
their ratio, and the equality of bitstreams and reconstructions are printed.

    python benchmarks/codec_compare.py --rev 1679559 [--image kodim01.png] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from alice_lib.checkpoints import deterministic_weights_
from alice_lib.data import read_image
from alice_lib.models.stf import STFConfig, SymmetricalTransFormer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO.parent / "shared" / "data" / "kodak" / "kodim01.png"


def model_class_at(rev: str) -> type:
    """``SymmetricalTransFormer`` as defined at git revision ``rev``, imported as a private package."""
    folder = Path(tempfile.mkdtemp(prefix="stf_ref_")) / "stf_ref"
    folder.mkdir()
    for name in ("__init__.py", "stf.py", "swin.py", "_compressai.py"):
        shown = subprocess.run(["git", "show", f"{rev}:alice_lib/models/{name}"], cwd=REPO, capture_output=True,
                               text=True)
        if shown.returncode == 0:
            (folder / name).write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location("stf_ref", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["stf_ref"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("stf_ref.stf").SymmetricalTransFormer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="1679559", help="git revision to compare with (default: before issue 11)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = read_image(args.image)[None].float() / 255
    models = {}
    for label, cls in (("ref", model_class_at(args.rev)), ("new", SymmetricalTransFormer)):
        model = deterministic_weights_(cls(STFConfig())).eval()
        model.update(force=True)
        models[label] = model
    coded = {k: m.compress(x) for k, m in models.items()}
    same_bits = coded["ref"]["strings"] == coded["new"]["strings"]
    rec = {k: m.decompress(coded[k]["strings"], coded[k]["shape"], coded[k]["image_size"])["x_hat"]
           for k, m in models.items()}
    times: dict[str, list[float]] = {f"{k}_{op}": [] for k in models for op in ("compress", "decompress")}
    for _ in range(args.repeats):
        for k, m in models.items():
            start = time.perf_counter()
            m.compress(x)
            times[f"{k}_compress"].append(time.perf_counter() - start)
            start = time.perf_counter()
            m.decompress(coded[k]["strings"], coded[k]["shape"], coded[k]["image_size"])
            times[f"{k}_decompress"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"image {args.image.name} {tuple(x.shape[-2:])}, {args.threads} threads, {args.repeats} interleaved "
          f"repeats, reference {args.rev}")
    print(f"bitstreams identical: {same_bits}; reconstructions identical: {torch.equal(rec['ref'], rec['new'])} "
          f"(max abs diff {(rec['ref'] - rec['new']).abs().max().item():.3g})")
    for op in ("compress", "decompress"):
        ref, new = med[f"ref_{op}"], med[f"new_{op}"]
        every = {k: [round(t, 2) for t in times[f"{k}_{op}"]] for k in models}
        print(f"{op:10s} reference {ref:.3f} s  this tree {new:.3f} s  speed-up {ref / new:.2f}x  "
              f"(all: ref {every['ref']}, new {every['new']})")


if __name__ == "__main__":
    main()
