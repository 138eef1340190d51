"""The ``alice`` command.

``alice run --profile cpu`` runs the workbook's notebooks in order.
``alice compress IN.png OUT.alice [--lmbda L | --bpp B | --psnr P]`` codes an image,
``alice decompress IN.alice OUT.png`` decodes it and ``alice info IN.alice`` prints
the header (:mod:`alice_lib.codec`: continuous rate beyond ALICE, VCIP 2024).
By default the CPU profile's shipped weights are used
(``alice_lib/weights/cpu_anchor.safetensors`` and ``cpu_alice_<lambda>.safetensors``);
``--model`` / ``--adapters`` choose others.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_ANCHOR = "cpu_anchor.safetensors"
_SHIPPED_ADAPTER = re.compile(r"^cpu_alice_(\d+(?:\.\d+)?(?:e-?\d+)?)\.safetensors$")


class CLIError(Exception):
    """An expected failure: printed as one line on stderr, exit status 1."""


def _run(args: argparse.Namespace) -> int:
    from .pipeline import PipelineError, run_pipeline

    started = time.time()
    try:
        reports = run_pipeline(args.profile, run_dir=args.run_dir, reports_dir=args.reports_dir,
                               parameters=_parameters(args.param), kernel_name=args.kernel)
    except PipelineError as error:
        print(f"alice run: {error}", file=sys.stderr)
        return 1
    print(f"alice run: profile {args.profile} finished in {time.time() - started:.0f} s; "
          f"figures and tables in {reports}")
    return 0


def _parameters(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings as notebook parameters (VALUE parsed as YAML: numbers, lists, dicts)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"alice run: --param expects KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def shipped_weights(weights_dir: Path | None = None) -> tuple[Path, list[Path]]:
    """The CPU profile's shipped anchor and adapter files (``cpu_alice_<lambda>.safetensors``)."""
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    anchor = weights_dir / SHIPPED_ANCHOR
    if not anchor.is_file():
        raise CLIError(f"the shipped CPU model {anchor} is missing (reinstall the package, or pass --model PATH "
                       f"[--adapters PATH ...])")
    adapters = sorted((p for p in weights_dir.glob("cpu_alice_*.safetensors") if _SHIPPED_ADAPTER.match(p.name)),
                      key=lambda p: float(_SHIPPED_ADAPTER.match(p.name).group(1)))
    return anchor, adapters


def _anchor_lmbda(path: Path, given: float | None) -> float:
    from .checkpoints import read_checkpoint
    from .codec import ANCHOR_LMBDA

    if given is not None:
        return given
    try:
        _, _, meta = read_checkpoint(path)
        return float(meta.get("lmbda", ANCHOR_LMBDA))
    except (ValueError, TypeError):
        return ANCHOR_LMBDA


def load_rate_control(args: argparse.Namespace, mode: str = "interpolate"):
    """The RateControl of ``--model`` / ``--adapters`` (default: the shipped CPU weights)."""
    import torch

    from .checkpoints import load_stf
    from .codec import RateControl

    if args.model:
        model_path = Path(args.model)
        adapters = [Path(p) for p in args.adapters or []]
    else:
        model_path, shipped = shipped_weights()
        adapters = [Path(p) for p in args.adapters] if args.adapters else shipped
    for path in [model_path, *adapters]:
        if not path.is_file():
            raise CLIError(f"{path} does not exist")
    torch.set_num_threads(max(1, args.threads))
    model = load_stf(model_path)
    return RateControl(model, adapters, mode=mode, anchor_lmbda=_anchor_lmbda(model_path, args.anchor_lmbda),
                       copy=False)


def _check_paths(src: str, dst: str) -> tuple[Path, Path]:
    from .codec import same_file

    src_path, dst_path = Path(src), Path(dst)
    if not src_path.exists():
        raise CLIError(f"{src_path} does not exist")
    if not src_path.is_file():
        raise CLIError(f"{src_path} is not a file")
    if same_file(src_path, dst_path):
        raise CLIError(f"the output {dst_path} is the input file; refusing to overwrite it")
    if dst_path.is_dir():
        raise CLIError(f"the output {dst_path} is a directory")
    if not dst_path.parent.exists() and str(dst_path.parent):
        raise CLIError(f"the output folder {dst_path.parent} does not exist")
    return src_path, dst_path


def _expected_errors():
    from .codec import AliceFormatError

    return (CLIError, AliceFormatError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, OSError)


def _guard(name: str, fn, args: argparse.Namespace) -> int:
    try:
        return fn(args)
    except _expected_errors() as error:
        print(f"alice {name}: error: {error}", file=sys.stderr)
        return 1


def _compress(args: argparse.Namespace) -> int:
    from .codec import compress_to_target, encode, write_alice
    from .data import read_image

    src, dst = _check_paths(args.input, args.output)
    chosen = [x is not None for x in (args.lmbda, args.bpp, args.psnr)]
    if sum(chosen) > 1:
        raise CLIError("give at most one of --lmbda, --bpp and --psnr")
    image = read_image(src)
    rc = load_rate_control(args, args.mode)
    started = time.time()
    note = ""
    if args.bpp is not None or args.psnr is not None:
        result = compress_to_target(rc, image, target_bpp=args.bpp, target_psnr=args.psnr, tol=args.tol)
        alice = result.alice
        if result.clamped:
            note = (f" (target outside the covered range lambda {rc.lmbdas[0]:g}..{rc.lmbdas[-1]:g}: "
                    f"coded at the {result.clamped_to} end)")
        elif not result.hit:
            note = " (target missed the tolerance band; closest result kept)"
        note = f", psnr {result.achieved_psnr:.2f} dB{note}"
    else:
        lmbda = rc.anchor_lmbda if args.lmbda is None else args.lmbda
        if not (lmbda > 0 and math.isfinite(lmbda)):
            raise CLIError(f"--lmbda must be positive, got {lmbda}")
        lo, hi = rc.lmbdas[0], rc.lmbdas[-1]
        if not lo * (1 - 1e-9) <= lmbda <= hi * (1 + 1e-9):
            raise CLIError(f"--lmbda {lmbda:g} is outside the covered range {lo:g}..{hi:g} of the loaded weights")
        alice = encode(rc, image, rc.clamp(math.log(lmbda)))
    write_alice(dst, alice, input_path=src)
    print(f"alice compress: {src} -> {dst}: {alice.height}x{alice.width}, lambda {alice.lmbda:.5g} "
          f"({alice.mode}), {alice.payload_bytes} bytes of bitstream, {alice.bpp:.4f} bpp{note} "
          f"in {time.time() - started:.1f} s")
    return 0


def _decompress(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from .codec import atomic_write_bytes, decode, read_alice

    src, dst = _check_paths(args.input, args.output)
    fmt = Image.registered_extensions().get(dst.suffix.lower())
    if fmt is None:
        raise CLIError(f"unknown image extension {dst.suffix!r} for {dst} (use .png)")
    alice = read_alice(src)  # validated (CRC included) before any model is loaded
    rc = load_rate_control(args, alice.mode if alice.mode != "fixed" else "interpolate")
    image = decode(rc, alice)
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())).save(buffer, format=fmt)
    atomic_write_bytes(dst, buffer.getvalue(), protect=[src])
    print(f"alice decompress: {src} -> {dst}: {alice.height}x{alice.width}, lambda {alice.lmbda:.5g}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .codec import read_alice

    alice = read_alice(args.input)
    for key, value in alice.info().items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        print(f"{key:11s} {value}")
    return 0


def _add_weights(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--model", default=None, help="anchor STF weights (default: the shipped CPU model)")
    sub.add_argument("--adapters", nargs="+", default=None, metavar="PATH",
                     help="ALICE adapter files trained on the model (default: the shipped CPU adapters; none with "
                          "--model)")
    sub.add_argument("--anchor-lmbda", type=float, default=None,
                     help="lambda of the anchor model (default: from its metadata, else 0.0483)")
    sub.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alice", description="ALICE workbook (VCIP 2024) on STF")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the notebooks of a profile with papermill (resumes)")
    run.add_argument("--profile", default="cpu", help="smoke | cpu | paper | path to a profile YAML")
    run.add_argument("--run-dir", default=None, help="default: runs/<profile>")
    run.add_argument("--reports-dir", default=None, help="default: reports/<profile>")
    run.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebooks' own)")
    run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                     help="notebook parameter, e.g. kodak_dir=/data/kodak or anchor_checkpoint=stf_0483.pth.tar")
    run.set_defaults(handler=_run)

    comp = commands.add_parser("compress", help="code an image into a .alice file")
    comp.add_argument("input", help="image file (PNG, JPEG, ...)")
    comp.add_argument("output", help=".alice file to write (atomically)")
    rate = comp.add_mutually_exclusive_group()
    rate.add_argument("--lmbda", type=float, default=None,
                      help="rate as a lambda inside the covered range (default: the anchor's)")
    rate.add_argument("--bpp", type=float, default=None, help="target bits per pixel (within --tol)")
    rate.add_argument("--psnr", type=float, default=None, help="target PSNR in dB")
    comp.add_argument("--tol", type=float, default=0.03, help="relative bpp tolerance (default 0.03)")
    comp.add_argument("--mode", choices=("interpolate", "alpha"), default="interpolate",
                      help="how intermediate rates are made (default interpolate)")
    _add_weights(comp)
    comp.set_defaults(handler=lambda a: _guard("compress", _compress, a))

    dec = commands.add_parser("decompress", help="decode a .alice file into an image")
    dec.add_argument("input", help=".alice file")
    dec.add_argument("output", help="image to write (atomically), e.g. out.png")
    _add_weights(dec)
    dec.set_defaults(handler=lambda a: _guard("decompress", _decompress, a))

    info = commands.add_parser("info", help="print the header of a .alice file")
    info.add_argument("input", help=".alice file")
    info.set_defaults(handler=lambda a: _guard("info", _info, a))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
