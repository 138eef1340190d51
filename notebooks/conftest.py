"""nbval runs the notebooks on their defaults (the smoke profile): send their run folder and
reports to a fresh temporary folder, so a test run never resumes from, nor writes into,
``runs/`` and ``reports/`` of the repository (:data:`alice_lib.run_folder.OUTPUT_ROOT_ENV`)."""

from __future__ import annotations

import os
import shutil
import tempfile

from alice_lib.run_folder import OUTPUT_ROOT_ENV

_OWN_ROOT = None
if not os.environ.get(OUTPUT_ROOT_ENV):  # set before any kernel starts: kernels inherit the environment
    _OWN_ROOT = tempfile.mkdtemp(prefix="alice-nbval-")
    os.environ[OUTPUT_ROOT_ENV] = _OWN_ROOT


def pytest_unconfigure(config) -> None:
    if _OWN_ROOT is not None:
        shutil.rmtree(_OWN_ROOT, ignore_errors=True)
        os.environ.pop(OUTPUT_ROOT_ENV, None)
