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
