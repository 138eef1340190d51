"""One evaluation of a run, end to end, and its report tables: what ``04_evaluate`` and ``05_figures`` call.

:func:`evaluate` takes the list of models to code (the pipeline only says *which*), codes
them and the classical codecs on one image folder, and writes every table once into the
evaluation folder: ``results.csv``, ``classical.csv``, ``summary.csv``, one CompressAI
``<method>.json`` per method, ``bd_rate.csv`` and ``targets.csv``. :func:`publish_tables` copies those files
into a report folder unchanged, and :func:`~alice_lib.evaluation.tables.read_tables`
reads them back: nothing downstream recomputes a summary or a BD value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from torch import nn

from ..utils import atomic_copy, atomic_write
from .bd import bd_table, write_bd_table
from .classical import classical_descriptions, evaluate_classical
from .coding import Padding, evaluate_models
from .targets import TARGETS_CSV, target_table, write_target_table
from .tables import (BD_CSV, RESULTS_CSV, SUMMARY_CSV, EvaluationTables, read_tables, summarize,
                     write_compressai_json, write_summary)

__all__ = ["ModelEntry", "evaluate", "publish_tables"]


@dataclass(frozen=True)
class ModelEntry:
    """One learned model to evaluate: its row name, method label, lambda, and how to build it.

    ``load`` is called only if some image of the model is still to code, so a resumed
    evaluation builds nothing it does not need.
    """

    name: str
    method: str
    lmbda: float
    load: Callable[[], nn.Module]


def evaluate(
    models: Sequence[ModelEntry],
    image_dir: str | Path,
    out_dir: str | Path,
    *,
    classical: Sequence[str] = ("jpeg", "webp", "avif"),
    qualities: Mapping[str, Iterable[int]] | None = None,
    padding: Padding = "replicate",
    bd_methods: Sequence[str] = ("cubic", "akima"),
    curves_include_anchor: bool = False,
    bd_pairs: Sequence[tuple[str, str]] | None = None,
    description: str = "real rANS bitstreams",
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Code ``models`` and the ``classical`` codecs on ``image_dir`` and write every table into ``out_dir``.

    Learned rows resume (pairs already in ``results.csv`` are not coded again); the
    summary holds only the listed models and codecs. Returns ``{"results", "classical",
    "summary", "bd", "targets", "errors"}`` (``targets``: :func:`~.targets.target_table`; ``errors``:
    the rows that failed, learned and classical).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = []
    results = pd.DataFrame()
    if models:
        results = evaluate_models({m.name: m.load for m in models}, image_dir, out_dir,
                                  methods={m.name: m.method for m in models},
                                  lmbdas={m.name: m.lmbda for m in models}, padding=padding, resume=True,
                                  progress=progress)
        results = results[results["model"].isin([m.name for m in models])].reset_index(drop=True)
        frames.append(results)
    classical_rows = pd.DataFrame()
    if classical:
        classical_rows = evaluate_classical(image_dir, out_dir, classical, qualities, progress=progress)
        frames.append(classical_rows)
    if not frames:
        raise ValueError("nothing to evaluate: no models and no classical codecs")
    rows = pd.concat(frames, ignore_index=True)
    summary = summarize(rows)
    write_summary(summary, out_dir / SUMMARY_CSV)
    codecs = [c for c in classical if c in set(summary["method"])]
    write_compressai_json(summary, out_dir, description={**dict.fromkeys(summary["method"], description),
                                                         **classical_descriptions(codecs)})
    bd = bd_table(summary, bd_pairs, bd_methods=bd_methods, curves_include_anchor=curves_include_anchor)
    write_bd_table(bd, out_dir / BD_CSV)
    targets = target_table(rows)
    write_target_table(targets, out_dir / TARGETS_CSV)
    errors = rows[rows["error"].fillna("").astype(str) != ""]
    return {"results": results, "classical": classical_rows, "summary": summary, "bd": bd, "targets": targets,
            "errors": errors}


def publish_tables(eval_dir: str | Path, reports_dir: str | Path) -> EvaluationTables:
    """Copy an evaluation's tables into a report folder, unchanged, and return them as read back.

    ``results.csv`` of the report holds the learned and classical rows together; the
    summary, the BD table and the JSON files are byte-for-byte copies.
    """
    eval_dir, reports_dir = Path(eval_dir), Path(reports_dir)
    tables = read_tables(eval_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(reports_dir / RESULTS_CSV, lambda tmp: tables.results.to_csv(tmp, index=False))
    for name in (SUMMARY_CSV, BD_CSV, TARGETS_CSV):
        if name == TARGETS_CSV and not (eval_dir / name).exists():
            continue  # an evaluation folder written before the table existed
        atomic_copy(eval_dir / name, reports_dir / name)
    for json_file in sorted(eval_dir.glob("*.json")):
        atomic_copy(json_file, reports_dir / json_file.name)
    return tables

