"""Shared fixtures: where ``../shared`` is, and small STF configurations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CONFORMANCE = SHARED / "conformance"


def require_shared(path: Path) -> Path:
    """``path`` inside ../shared, or a skip (a failure when ALICE_REQUIRE_SHARED=1, as in CI)."""
    if path.exists():
        return path
    message = f"conformance data not found at {path} (../shared is only on development and CI machines)"
    if os.environ.get("ALICE_REQUIRE_SHARED") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    return require_shared(CONFORMANCE)


@pytest.fixture(scope="session")
def kodak_dir() -> Path:
    return require_shared(SHARED / "data" / "kodak")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: the tests use tiny models, and on a shared 2-core machine
    thread hand-offs (and oversubscription) make them several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
