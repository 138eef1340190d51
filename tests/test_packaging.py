"""environment.yml (conda, cannot run here) must pin what pyproject.toml pins."""

from __future__ import annotations

import re
import tomllib

import yaml

from conftest import REPO


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pinned = {r for r in pip_section if not r.startswith("-")}
    assert pinned == wanted, f"only in environment.yml: {pinned - wanted}; only in pyproject: {wanted - pinned}"


def test_required_pins():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for pin in ("torch==2.14.1", "torchvision==0.29.1", "compressai==1.2.8", "numpy<2"):
        assert pin in deps
    assert {_name(d) for d in deps} >= {"papermill", "pytorch-msssim", "matplotlib", "pandas", "pillow"}


def test_shipped_cpu_models_load_and_fit_the_size_budget():
    """The CPU profile's shipped set (issue 25): the anchor, in float16, is the profile's model at its
    lambda, trained as long as its recipe says; every adaptation run (ALICE's adapters, vanilla's and
    the references' weight deltas) loads onto that anchor and nothing else, at its lambda, with a log of
    the profile's budget beside it; all of it under the agreed 60 MB, and in the wheel."""
    import pandas as pd
    import torch
    from safetensors import safe_open

    from alice_lib.adapter_files import load_adapters
    from alice_lib.checkpoints import load_stf, load_weight_delta, read_checkpoint
    from alice_lib.settings import PACKAGE_DIR, load_settings

    settings = load_settings("cpu")
    path = settings.anchor.shipped_weights
    _, config, metadata = read_checkpoint(path)
    assert config == settings.model.stf and float(metadata["lmbda"]) == settings.anchor.lmbda
    assert int(metadata["trained_steps"]) == settings.anchor.train.steps
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("patch_embed.proj.weight").dtype == torch.float16
    anchor = load_stf(path)  # the coder tables travel in the file: no update needed to code
    assert anchor.entropy_bottleneck._quantized_cdf.numel() > 0
    for method in settings.adaptation.methods:
        steps = settings.adaptation.training(method).steps
        for lmbda in settings.targets:
            run = settings.adaptation.shipped_weights(method, lmbda)
            if method == "alice":
                assert float(load_adapters(run, load_stf(path))["lambda"]) == lmbda, run
            else:
                assert load_weight_delta(run, anchor).config == settings.model.stf, run
                with safe_open(str(run), framework="pt") as f:
                    assert float(f.metadata()["lmbda"]) == lmbda, run
            assert pd.read_csv(run.with_suffix(".metrics.csv"))["step"].max() == steps, run
    shipped = sum(p.stat().st_size for p in (PACKAGE_DIR / "weights").iterdir() if p.is_file())
    assert shipped < 60e6, f"alice_lib/weights holds {shipped / 1e6:.1f} MB"
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"weights/*.safetensors", "weights/*.csv"} <= set(package_data["alice_lib"])


def test_no_large_file_is_tracked_outside_weights_and_snapshots():
    """Optimiser state, full checkpoints and notebooks with embedded images stay out of git (issue 26).

    Only the shipped weights (``alice_lib/weights/``) and the weights-only snapshots of a long
    training in progress (``snapshots/``) may exceed 2 MB; executed notebooks stay under 200 KB.
    """
    import subprocess

    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    files = [name for name in listed.decode().split("\0") if name and (REPO / name).is_file()]
    assert files, "git ls-files listed nothing"
    too_large = [(name, (REPO / name).stat().st_size) for name in files
                 if not name.startswith(("alice_lib/weights/", "snapshots/"))
                 and (REPO / name).stat().st_size > 2 * 2**20]
    assert not too_large, f"tracked files over 2 MB: {too_large}"
    notebooks = [(name, (REPO / name).stat().st_size) for name in files if name.endswith(".ipynb")
                 and (REPO / name).stat().st_size > 200 * 1024]
    assert not notebooks, f"notebooks over 200 KB (strip embedded images and widget state): {notebooks}"
