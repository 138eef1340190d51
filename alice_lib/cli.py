"""The ``alice`` command: ``alice run --profile cpu`` runs the workbook's notebooks in order."""

from __future__ import annotations

import argparse
import sys
import time


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
