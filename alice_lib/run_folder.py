"""The run folder (``runs/<profile>/``): every path in it, and where run and report folders go.

:class:`RunLayout` is the one place a path of a run folder is spelled out, so the
steps, the plan, the progress line, the notebooks and the benchmarks cannot disagree
about where a file is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT_ROOT_ENV = "ALICE_OUTPUT_ROOT"  # runs/ and reports/ go here instead of the repository (tests)
TRAINING_LOG = "metrics.csv"  # what train.py writes into a training folder, a row per validation


def lmbda_tag(lmbda: float) -> str:
    """A lambda as it appears in file names (``0.0067``)."""
    return f"{float(lmbda):g}"


@dataclass(frozen=True)
class RunLayout:
    """Every path of a run folder (``runs/<profile>/``), so no module rebuilds one::

        settings.yaml                       the resolved profile alice run gave every notebook
        data.json                           which folders were used, and the counts found
        models/anchor.safetensors           the frozen base at the anchor lambda
        models/fixed-rate-<l>.safetensors   fixed-rate references: published, shipped or trained here
        train/fixed-rate-<l>/               training folder of a model trained here from scratch (anchor, references)
        rates/<method>-<l>/                 train/ (last.pt, best.pt, metrics.csv), epoch_check.csv,
                                            adapters.safetensors (alice) or model.safetensors (others)
        eval/                               results.csv, classical.csv, summary.csv, JSON, bd_rate.csv;
                                            images/ (links to the first max_images test images)
        notebooks/                          the executed notebooks
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def settings_file(self) -> Path:
        return self.root / "settings.yaml"

    @property
    def data_json(self) -> Path:
        return self.root / "data.json"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def anchor(self) -> Path:
        return self.models_dir / "anchor.safetensors"

    def fixed_rate(self, lmbda: float) -> Path:
        return self.models_dir / f"fixed-rate-{lmbda_tag(lmbda)}.safetensors"

    def anchor_training(self, lmbda: float) -> Path:
        return self.root / "train" / f"fixed-rate-{lmbda_tag(lmbda)}"

    def anchor_log(self, lmbda: float) -> Path:
        return self.anchor_training(lmbda) / TRAINING_LOG

    def rate_dir(self, method: str, lmbda: float) -> Path:
        return self.root / "rates" / f"{method}-{lmbda_tag(lmbda)}"

    def rate_training(self, method: str, lmbda: float) -> Path:
        return self.rate_dir(method, lmbda) / "train"

    def rate_log(self, method: str, lmbda: float) -> Path:
        return self.rate_training(method, lmbda) / TRAINING_LOG

    def rate_source(self, method: str, lmbda: float) -> Path:
        """Present when the run's artefact was installed from shipped weights: where from, and their SHA-256."""
        return self.rate_dir(method, lmbda) / "shipped.json"

    def rate_artifact(self, method: str, lmbda: float) -> Path:
        """ALICE stores only its adapters; vanilla and full store whole weights."""
        name = "adapters.safetensors" if method == "alice" else "model.safetensors"
        return self.rate_dir(method, lmbda) / name

    def trained_artifacts(self, method: str) -> list[Path]:
        """The artefacts of ``method`` present in the folder, any lambda (sorted by folder name)."""
        return sorted((self.root / "rates").glob(f"{method}-*/{self.rate_artifact(method, 1.0).name}"))

    def epoch_check(self, method: str, lmbda: float) -> Path:
        return self.rate_dir(method, lmbda) / "epoch_check.csv"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def eval_images(self) -> Path:
        return self.eval_dir / "images"

    @property
    def notebooks_dir(self) -> Path:
        return self.root / "notebooks"


def output_root() -> Path:
    """Where ``runs/`` and ``reports/`` go: ``$ALICE_OUTPUT_ROOT`` (tests use a fresh one) or the repository."""
    return Path(os.environ.get(OUTPUT_ROOT_ENV) or REPO_ROOT)


def default_run_dir(name: str) -> Path:
    return output_root() / "runs" / name


def default_reports_dir(name: str) -> Path:
    return output_root() / "reports" / name


__all__ = ["RunLayout", "lmbda_tag", "output_root", "default_run_dir", "default_reports_dir", "OUTPUT_ROOT_ENV",
           "REPO_ROOT", "TRAINING_LOG"]
