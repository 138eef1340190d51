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
    """The CPU profile's six fixed-rate models: the profile's size, their lambda, the agreed storage."""
    import torch
    from safetensors import safe_open

    from alice_lib.checkpoints import load_stf, read_checkpoint
    from alice_lib.settings import PACKAGE_DIR, load_settings

    settings = load_settings("cpu")
    files = {settings.anchor.lmbda: settings.anchor.shipped_weights}
    files.update({l: settings.references.shipped_weights(l) for l in settings.targets})
    for lmbda, path in files.items():
        _, config, metadata = read_checkpoint(path)
        assert config == settings.model.stf and float(metadata["lmbda"]) == lmbda, path
        with safe_open(str(path), framework="pt") as f:
            dtype = f.get_tensor("cc_mean_transforms.0.0.weight").dtype
        assert dtype == (torch.float32 if lmbda == settings.anchor.lmbda else torch.float16), (path, dtype)
        model = load_stf(path)  # the coder tables travel in the file: no update needed to code
        assert model.entropy_bottleneck._quantized_cdf.numel() > 0
    shipped = sum(p.stat().st_size for p in (PACKAGE_DIR / "weights").iterdir() if p.is_file())
    assert shipped < 60e6, f"alice_lib/weights holds {shipped / 1e6:.1f} MB"


def test_the_staged_cpu_profile_loads_and_its_anchor_is_its_model():
    """Issue 25's CPU profile (``docs/cpu-scale/cpu-next.yaml``) stages its weights in
    ``alice_lib/weights/next/``, outside the wheel, until they replace today's: the anchor there
    is that profile's model at its lambda, in float16, trained as long as the profile's recipe says."""
    import tomllib

    import torch
    from safetensors import safe_open

    from alice_lib.checkpoints import load_stf, read_checkpoint
    from alice_lib.settings import load_settings

    settings = load_settings(REPO / "docs" / "cpu-scale" / "cpu-next.yaml")
    path = settings.anchor.shipped_weights
    assert path.parent.name == "next", path
    _, config, metadata = read_checkpoint(path)
    assert config == settings.model.stf and float(metadata["lmbda"]) == settings.anchor.lmbda
    assert int(metadata["trained_steps"]) == settings.anchor.train.steps
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("patch_embed.proj.weight").dtype == torch.float16
    assert load_stf(path).entropy_bottleneck._quantized_cdf.numel() > 0
    staged = sum(p.stat().st_size for p in path.parent.iterdir())
    assert staged < 60e6, f"{path.parent} holds {staged / 1e6:.1f} MB"
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert all("next" not in pattern for pattern in package_data["alice_lib"])  # not in the wheel twice


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
