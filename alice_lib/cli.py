"""The ``alice`` command.

``alice run --profile cpu`` runs the workbook's notebooks in order, showing progress in
training steps and images coded; ``alice plan --profile paper [--json]`` prints what
that run will do (every training run, the data, the evaluation) and how long it takes;
``alice train --profile cpu --train-dir DIR [--method M --lmbda L] [-p KEY=VALUE ...]``
runs one training of the profile (:mod:`alice_lib.train.command`).
``alice compress IN... -o DIR [--lmbda L | --bpp B | --psnr P]`` codes images (one
model load for all of them, a failing file reported without stopping the others),
``alice decompress IN.alice... -o DIR`` decodes them and ``alice info IN.alice`` prints
a header without importing torch (:mod:`alice_lib.codec`: continuous rate beyond
ALICE, VCIP 2024). ``IN OUT`` with one input still works.
By default the CPU profile's shipped weights are used
(``alice_lib/weights/cpu_anchor.safetensors`` and ``cpu_alice_<lambda>.safetensors``);
``--model`` / ``--adapters`` choose others.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from .codec.format import DEFAULT_TILE  # no torch: the format module is light

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # checkpoints.WEIGHTS_DIR, without importing torch


class CLIError(Exception):
    """An expected failure: printed as one line on stderr, exit status 1."""


def _run(args: argparse.Namespace) -> int:
    from .driver import run_pipeline
    from .pipeline import PipelineError

    started = time.time()
    try:
        reports = run_pipeline(args.profile, run_dir=args.run_dir, reports_dir=args.reports_dir,
                               parameters=_parameters(args.param, "run"), kernel_name=args.kernel,
                               measure=not args.no_measure)
    except PipelineError as error:
        print(f"alice run: {error}", file=sys.stderr)
        return 1
    print(f"alice run: profile {args.profile} finished in {time.time() - started:.0f} s; "
          f"figures and tables in {reports}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    """Print the resolved experiment before anything runs (``--json``: one JSON object)."""
    import json

    from .driver import notebook_order
    from .planning import make_plan
    from .run_folder import default_run_dir
    from .settings import SettingsError, load_settings, split_parameters

    parameters = _parameters(args.param, "plan")
    try:
        overrides, notebook_parameters = split_parameters(parameters)
        settings = load_settings(args.profile, overrides)
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(settings.name)
        plan = make_plan(settings, notebook_order(settings), notebook_parameters, run_dir=run_dir,
                         measure=not args.no_measure, requested_only=args.requested_counts)
    except (SettingsError, FileNotFoundError) as error:
        print(f"alice plan: {error}", file=sys.stderr)
        return 1
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.describe())
    return 0


def _train(args: argparse.Namespace) -> int:
    """One training run of the profile, resumed where its folder's ``last.pt`` left off."""
    from .settings import SettingsError
    from .train.command import run as run_training

    try:
        run_training(args, _parameters(args.param, "train"))
    except (SettingsError, ValueError, FileNotFoundError) as error:
        print(f"alice train: {error}", file=sys.stderr)
        return 1
    return 0


class _TrainHelp(argparse.Action):
    """``alice train --help``: the options and every setting ``-p`` overrides (listed only now: it imports torch)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from .train.command import overrides_help

        parser.epilog = overrides_help()
        parser.print_help()
        parser.exit()


def _add_train(commands) -> None:
    train = commands.add_parser(
        "train", help="one training run of a profile: its fixed-rate recipe, or an adaptation method",
        add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model with the profile's fixed-rate recipe (anchor.train; from random weights unless\n"
                    "--init), or adapt one with --method (adapt.<method>, from --init or the profile's anchor).\n"
                    "Resumes from the folder's last.pt. Under torchrun (`torchrun --nproc_per_node=N -m\n"
                    "alice_lib.cli train ...`) each process takes batch_size / N images of every batch.")
    train.add_argument("-h", "--help", action=_TrainHelp, help="show this help and the settings -p overrides")
    train.add_argument("--profile", default="cpu", help="smoke | cpu | paper | path to a profile YAML")
    train.add_argument("--train-dir", required=True, help="the run's folder (last.pt, best.pt, metrics.csv)")
    train.add_argument("--method", default=None, metavar="METHOD",
                       help="adapt with this method's schedule, adapt.<method> (--help lists the methods); "
                            "default: the fixed-rate recipe")
    train.add_argument("--lmbda", type=float, default=None,
                       help="the run's lambda (default without --method: anchor.lmbda)")
    train.add_argument("--init", default=None, metavar="PATH|random",
                       help="first weights: a model file or a training checkpoint; 'random' for random weights "
                            "(default: random for the fixed-rate recipe, the profile's anchor for --method)")
    train.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                       help="a setting, as for alice run (anchor.train.lr=5e-4, model.embed_dim=32, "
                            "data.train_dir=DIR); --help lists them")
    train.add_argument("--synthetic", type=int, default=None, metavar="N",
                       help="N smooth synthetic images instead of the data folders (tests, smoke runs)")
    train.add_argument("--threads", type=int, default=None, help="torch threads per process")
    train.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    train.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                       help="process-group backend under torchrun (default: nccl on GPUs)")
    train.add_argument("--no-resume", action="store_true", help="start afresh even if the folder has last.pt")
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--hash-file", default=None,
                       help="after training, each rank writes its state-dict SHA-256 here ('{rank}' replaced)")
    train.set_defaults(handler=_train)


def _parameters(pairs: list[str], command: str = "run") -> dict:
    """``KEY=VALUE`` strings (VALUE parsed as YAML: numbers, lists, dicts).

    Dotted keys override the profile's settings (``adapt.epochs=2``); plain keys are
    notebook parameters (``kodak_dir=/data/kodak``).
    """
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not all(part.isidentifier() for part in key.split(".")):
            raise SystemExit(f"alice {command}: --param expects KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def shipped_weights(weights_dir: Path | None = None) -> tuple[Path, list[Path]]:
    """The CPU profile's shipped anchor and adapters (:func:`alice_lib.checkpoints.shipped_weights`) of
    ``weights_dir`` (default :data:`WEIGHTS_DIR`); a :class:`CLIError` when the anchor is absent."""
    from .checkpoints import shipped_weights as find

    try:
        return find(weights_dir or WEIGHTS_DIR)
    except FileNotFoundError as error:
        raise CLIError(f"{error}; or pass --model PATH [--adapters PATH ...]") from None


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


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .codec import AliceFormatError

    return (CLIError, AliceFormatError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, OSError)


def _guard(name: str, fn, args: argparse.Namespace) -> int:
    try:
        return fn(args)
    except _expected_errors() as error:
        print(f"alice {name}: error: {error}", file=sys.stderr)
        return 1


def _jobs(inputs: list[str], out_dir: str | None, suffix: str, is_output) -> list[tuple[Path, Path]]:
    """(input, output) pairs: ``IN... -o DIR`` -> ``DIR/<stem><suffix>``; ``IN OUT`` when OUT looks like an output.

    Without ``-o`` each output goes beside its input. Two inputs that would write the
    same output are refused before anything is coded.
    """
    if out_dir is None and len(inputs) == 2 and is_output(Path(inputs[1])):
        return [(Path(inputs[0]), Path(inputs[1]))]
    if out_dir is not None:
        folder = Path(out_dir)
        if folder.exists() and not folder.is_dir():
            raise CLIError(f"-o {folder} is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
    jobs, seen = [], {}
    for name in inputs:
        src = Path(name)
        dst = (Path(out_dir) if out_dir is not None else src.parent) / (src.stem + suffix)
        key = dst.resolve()
        if key in seen:
            raise CLIError(f"{src} and {seen[key]} would both be written to {dst}")
        seen[key] = src
        jobs.append((src, dst))
    return jobs


def _check_paths(src: Path, dst: Path) -> None:
    from .utils import same_file

    if not src.exists():
        raise CLIError(f"{src} does not exist")
    if not src.is_file():
        raise CLIError(f"{src} is not a file")
    if same_file(src, dst):
        raise CLIError(f"the output {dst} is the input file; refusing to overwrite it")
    if dst.is_dir():
        raise CLIError(f"the output {dst} is a directory")
    if not dst.parent.exists() and str(dst.parent):
        raise CLIError(f"the output folder {dst.parent} does not exist")


def _batch(name: str, jobs: list[tuple[Path, Path]], code_one, quiet: bool) -> int:
    """Run ``code_one(src, dst) -> (pixels, bytes)`` on every job; a failure is reported and skipped.

    Prints one line per file, a progress bar on a terminal, and a summary; exit status 1
    if any file failed.
    """
    from tqdm.auto import tqdm

    started, done, failed, pixels, n_bytes = time.time(), 0, 0, 0, 0
    bar = tqdm(jobs, desc=f"alice {name}", unit="file", disable=None if len(jobs) > 1 else True, file=sys.stderr)
    for src, dst in bar:
        try:
            _check_paths(src, dst)
            file_pixels, file_bytes, line = code_one(src, dst)
        except _expected_errors() as error:
            failed += 1
            text = str(error)
            bar.write(f"alice {name}: error: {text if str(src) in text else f'{src}: {text}'}", file=sys.stderr)
            continue
        done, pixels, n_bytes = done + 1, pixels + file_pixels, n_bytes + file_bytes
        if not quiet:
            bar.write(f"alice {name}: {src} -> {dst}: {line}", file=sys.stdout)
    bar.close()
    if len(jobs) > 1 or failed:
        bpp = 8 * n_bytes / pixels if pixels else float("nan")
        print(f"alice {name}: {done} of {len(jobs)} files in {time.time() - started:.1f} s, {n_bytes:,} bytes "
              f"of .alice files, {bpp:.4f} bpp" + (f"; {failed} failed" if failed else ""),
              file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def _rate_of(args: argparse.Namespace, rc) -> float | None:
    """The control value of ``--lmbda`` (None: a target search, or the anchor)."""
    if args.bpp is not None or args.psnr is not None:
        return None
    lmbda = rc.anchor_lmbda if args.lmbda is None else args.lmbda
    if not (lmbda > 0 and math.isfinite(lmbda)):
        raise CLIError(f"--lmbda must be positive, got {lmbda}")
    lo, hi = rc.lmbdas[0], rc.lmbdas[-1]
    if not lo * (1 - 1e-9) <= lmbda <= hi * (1 + 1e-9):
        raise CLIError(f"--lmbda {lmbda:g} is outside the covered range {lo:g}..{hi:g} of the loaded weights")
    return rc.clamp(math.log(lmbda))


def _compress(args: argparse.Namespace) -> int:
    if sum(x is not None for x in (args.lmbda, args.bpp, args.psnr)) > 1:
        raise CLIError("give at most one of --lmbda, --bpp and --psnr")
    jobs = _jobs(args.inputs, args.output_dir, ".alice", lambda p: p.suffix.lower() == ".alice")
    rc = load_rate_control(args, args.mode)
    control = _rate_of(args, rc)
    tile = args.tile or None

    def code_one(src: Path, dst: Path) -> tuple[int, int, str]:
        from .codec import compress_to_target, encode, write_alice
        from .data import read_image

        image = read_image(src)
        started, note = time.time(), ""
        if control is None:
            result = compress_to_target(rc, image, target_bpp=args.bpp, target_psnr=args.psnr, tol=args.tol,
                                        tile=tile)
            alice = result.alice
            if result.clamped:
                note = (f" (target outside the covered range lambda {rc.lmbdas[0]:g}..{rc.lmbdas[-1]:g}: "
                        f"coded at the {result.clamped_to} end)")
            elif not result.hit:
                note = " (target missed the tolerance band; closest result kept)"
            note = f", psnr {result.achieved_psnr:.2f} dB{note}"
        else:
            alice = encode(rc, image, control, tile=tile)
        write_alice(dst, alice, input_path=src)
        return alice.height * alice.width, alice.file_bytes, (
            f"{alice.height}x{alice.width}, lambda {alice.lmbda:.5g} ({alice.mode}), {alice.payload_bytes} bytes "
            f"of bitstream, {alice.bpp:.4f} bpp{note} in {time.time() - started:.1f} s")

    return _batch("compress", jobs, code_one, args.quiet)


def _decompress(args: argparse.Namespace) -> int:
    from PIL import Image

    from .codec import read_alice

    jobs = _jobs(args.inputs, args.output_dir, f".{args.format}", lambda p: p.suffix.lower() != ".alice")
    cache: dict[str, object] = {}

    def code_one(src: Path, dst: Path) -> tuple[int, int, str]:
        fmt = Image.registered_extensions().get(dst.suffix.lower())
        if fmt is None:
            raise CLIError(f"unknown image extension {dst.suffix!r} for {dst} (use .png)")
        alice = read_alice(src, max_pixels=_max_pixels(args))  # validated before any model is loaded
        if "rc" not in cache:
            cache["rc"] = load_rate_control(args, alice.mode if alice.mode != "fixed" else "interpolate")
        from .codec import decode

        started = time.time()
        _save_image(decode(cache["rc"], alice), dst, fmt, src)
        return alice.height * alice.width, alice.file_bytes, (
            f"{alice.height}x{alice.width}, lambda {alice.lmbda:.5g} in {time.time() - started:.1f} s")

    return _batch("decompress", jobs, code_one, args.quiet)


def _save_image(image, dst: Path, fmt: str, src: Path) -> None:
    """Write a uint8 ``[3, H, W]`` tensor as an image, atomically, never over ``src``."""
    import numpy as np
    from PIL import Image

    from .utils import atomic_write

    pil = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
    atomic_write(dst, lambda tmp: pil.save(tmp, format=fmt), protect=[src])


def _max_pixels(args: argparse.Namespace) -> int | None:
    from .codec import max_image_pixels

    if args.max_pixels is None:
        return max_image_pixels()
    return args.max_pixels if args.max_pixels > 0 else None


def _info(args: argparse.Namespace) -> int:
    """Print each header; needs no torch (see ``alice_lib.codec.format``)."""
    from .codec import read_alice

    failed = 0
    for name in args.inputs:
        try:
            alice = read_alice(name, max_pixels=_max_pixels(args))
        except _expected_errors() as error:
            failed += 1
            print(f"alice info: error: {error}", file=sys.stderr)
            continue
        if len(args.inputs) > 1:
            print(f"{name}:")
        for key, value in alice.info().items():
            print(f"{key:11s} {f'{value:.6g}' if isinstance(value, float) else value}")
    return 1 if failed else 0


def _add_weights(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--model", default=None, help="anchor STF weights (default: the shipped CPU model)")
    sub.add_argument("--adapters", nargs="+", default=None, metavar="PATH",
                     help="ALICE adapter files trained on the model (default: the shipped CPU adapters; none with "
                          "--model)")
    sub.add_argument("--anchor-lmbda", type=float, default=None,
                     help="lambda of the anchor model (default: from its metadata, else 0.0483)")
    sub.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    sub.add_argument("-q", "--quiet", action="store_true", help="no line per file (errors and summary only)")
    _add_limits(sub)


def _add_limits(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--max-pixels", type=int, default=None,
                     help="refuse .alice files announcing more pixels (default 2**27 or ALICE_MAX_IMAGE_PIXELS; "
                          "0 = no limit)")


def _add_profile(sub: argparse.ArgumentParser) -> None:
    """The options ``run`` and ``plan`` share, so a plan describes exactly the run of the same arguments."""
    sub.add_argument("--profile", default="cpu", help="smoke | cpu | paper | path to a profile YAML")
    sub.add_argument("--run-dir", default=None, help="default: runs/<profile>")
    sub.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                     help="a setting (dotted: adapt.epochs=2, data.train_images=1000) or a notebook parameter "
                          "(kodak_dir=/data/kodak, train_dir=..., anchor_checkpoint=stf_0483.pth.tar)")
    sub.add_argument("--no-measure", action="store_true",
                     help="estimate time from priors instead of timing a few steps on this device")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alice", description="ALICE workbook (VCIP 2024) on STF")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the notebooks of a profile with papermill (resumes)")
    _add_profile(run)
    run.add_argument("--reports-dir", default=None, help="default: reports/<profile>")
    run.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebooks' own)")
    run.set_defaults(handler=_run)

    plan = commands.add_parser("plan", help="print the resolved experiment and its estimated time; runs nothing")
    _add_profile(plan)
    plan.add_argument("--json", action="store_true", help="one JSON object (runs, data, evaluation, estimate)")
    plan.add_argument("--requested-counts", action="store_true",
                      help="compute steps from the profile's requested data counts without looking for the data")
    plan.set_defaults(handler=_plan)
    _add_train(commands)

    comp = commands.add_parser("compress", help="code images into .alice files",
                               description="alice compress IN... -o DIR (or IN OUT.alice): one .alice file per image")
    comp.add_argument("inputs", nargs="+", metavar="IN", help="image files (PNG, JPEG, ...; EXIF orientation applied)")
    comp.add_argument("-o", "--output-dir", default=None, metavar="DIR",
                      help="folder for <name>.alice (default: beside each input)")
    rate = comp.add_mutually_exclusive_group()
    rate.add_argument("--lmbda", type=float, default=None,
                      help="rate as a lambda inside the covered range (default: the anchor's)")
    rate.add_argument("--bpp", type=float, default=None, help="target bits per pixel (within --tol)")
    rate.add_argument("--psnr", type=float, default=None, help="target PSNR in dB")
    comp.add_argument("--tol", type=float, default=0.03, help="relative bpp tolerance (default 0.03)")
    comp.add_argument("--mode", choices=("interpolate", "alpha"), default="interpolate",
                      help="how intermediate rates are made (default interpolate)")
    comp.add_argument("--tile", type=int, default=DEFAULT_TILE,
                      help=f"tile side in pixels, rounded up to the model's stride (default {DEFAULT_TILE}; "
                           f"0 = one tile)")
    _add_weights(comp)
    comp.set_defaults(handler=lambda a: _guard("compress", _compress, a))

    dec = commands.add_parser("decompress", help="decode .alice files into images",
                              description="alice decompress IN... -o DIR (or IN OUT.png)")
    dec.add_argument("inputs", nargs="+", metavar="IN", help=".alice files")
    dec.add_argument("-o", "--output-dir", default=None, metavar="DIR",
                     help="folder for <name>.<format> (default: beside each input)")
    dec.add_argument("--format", default="png", help="image format of the outputs in -o mode (default png)")
    _add_weights(dec)
    dec.set_defaults(handler=lambda a: _guard("decompress", _decompress, a))

    info = commands.add_parser("info", help="print the header of .alice files (no torch needed)")
    info.add_argument("inputs", nargs="+", metavar="IN", help=".alice files")
    _add_limits(info)
    info.set_defaults(handler=lambda a: _guard("info", _info, a))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
