"""Evaluation: everything that measures codecs and the tables it writes. Figures read these tables.

Modules, each owning one thing (imports go down this list, never up; nothing here
imports :mod:`alice_lib.figures` or :mod:`alice_lib.pipeline`):

* :mod:`.metrics` -- PSNR and MS-SSIM on 8-bit RGB; the MS-SSIM of training's loss (:func:`ms_ssim_index`).
* :mod:`.tables` -- the per-image, summary, CompressAI-JSON and published-point tables:
  :func:`summarize`, :func:`write_compressai_json`, :func:`read_tables`.
* :mod:`.coding` -- learned codecs through real bitstreams (:func:`code_image`,
  :func:`evaluate_models`), with the ``padding`` option (``"reference"`` | ``"replicate"``).
* :mod:`.classical` -- JPEG / WebP / AVIF through Pillow.
* :mod:`.bd` -- RD curves (the anchor its own point; ``curves_include_anchor``) and the
  one BD table (:func:`bd_table`, ``bd_methods`` cubic and Akima).
* :mod:`.targets` -- each adapted model against the reference at its lambda: rate ratio,
  PSNR difference, rate-distortion objective (:func:`target_table`).
* :mod:`.run` -- :func:`evaluate` (one run's evaluation, every table written once) and
  :func:`publish_tables` (the report's copies).
* :mod:`.complexity` -- encoder / decoder parameters, FLOPs, time, memory.
* :mod:`.rate_control` -- measuring the codec's continuous rates and bpp targets.

File layout of an evaluation folder (``runs/<profile>/eval``) and of a report folder:
``results.csv``, ``classical.csv``, ``summary.csv``, ``<method>.json``, ``bd_rate.csv``, ``targets.csv``.
"""

from .bd import (ANCHOR_METHOD, BD_COLUMNS, BD_METHODS, CURVES_ADAPTED, CURVES_WITH_ANCHOR, DEFAULT_BD_PAIRS,
                 LEARNED_METHODS, anchor_points, bd_psnr, bd_rate, bd_table, rd_curves, write_bd_table)
from .classical import CLASSICAL_CODECS, avif_available, code_classical, evaluate_classical
from .coding import PADDINGS, Padding, code_image, crop_reference, evaluate_models, pad_reference
from .complexity import COMPLEXITY_COLUMNS, complexity_models, measure_complexity
from .metrics import image_quality, ms_ssim_index, ms_ssim_rgb, ms_ssim_to_db, msssim_window, psnr_rgb
from .run import ModelEntry, evaluate, publish_tables
from .targets import TARGET_COLUMNS, TARGETS_CSV, rd_loss, target_table, write_target_table
from .tables import (BD_CSV, RESULT_COLUMNS, STF_PUBLISHED_KODAK, STF_PUBLISHED_KODAK_MSSSIM, SUMMARY_COLUMNS,
                     SUMMARY_CSV, EvaluationTables, published_points, read_tables, summarize, write_compressai_json)

__all__ = [
    "ANCHOR_METHOD", "BD_COLUMNS", "BD_METHODS", "CURVES_ADAPTED", "CURVES_WITH_ANCHOR", "DEFAULT_BD_PAIRS",
    "LEARNED_METHODS", "anchor_points", "bd_psnr", "bd_rate", "bd_table", "rd_curves", "write_bd_table",
    "CLASSICAL_CODECS", "avif_available", "code_classical", "evaluate_classical",
    "PADDINGS", "Padding", "code_image", "crop_reference", "evaluate_models", "pad_reference",
    "COMPLEXITY_COLUMNS", "complexity_models", "measure_complexity",
    "image_quality", "ms_ssim_index", "ms_ssim_rgb", "ms_ssim_to_db", "msssim_window", "psnr_rgb",
    "ModelEntry", "evaluate", "publish_tables",
    "TARGET_COLUMNS", "TARGETS_CSV", "rd_loss", "target_table", "write_target_table",
    "BD_CSV", "RESULT_COLUMNS", "STF_PUBLISHED_KODAK", "STF_PUBLISHED_KODAK_MSSSIM", "SUMMARY_COLUMNS",
    "SUMMARY_CSV", "EvaluationTables", "published_points", "read_tables", "summarize", "write_compressai_json",
]
