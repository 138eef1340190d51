"""The workbook's steps as functions, its profiles, and the papermill driver.

Each notebook is a thin section of the paper that calls one of the step
functions below; the run folder (``runs/<profile>/``) is the only state they
share. Layout of a run folder::

    data.json                       which Kodak / training folders were used, and what they are
    models/anchor.safetensors       the fixed-rate model at the anchor lambda (ALICE's frozen base)
    models/fixed-rate-<lmbda>.safetensors   published fixed-rate references, when given
    rates/<method>-<lmbda>/         training folder (last.pt, best.pt, metrics.csv) and the result:
        adapters.safetensors        method "alice" (only the adapters, with the base hash)
        model.safetensors           methods "vanilla" and "full" (whole weights)
    eval/                           results.csv, classical.csv, summary.csv, JSON, bd_rates.csv
    notebooks/                      the executed notebooks

Methods trained per target lambda: ``alice`` (LoRA adapters, everything else
frozen), ``vanilla`` (the same fc1/fc2 layers fine-tuned) and ``full`` (every
weight fine-tuned from the anchor: the CPU-scale fixed-rate reference, called
``fixed-rate`` in the results).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml
from torch.utils.data import Subset

from . import data as data_lib
from .checkpoints import deterministic_weights_, load_stf, save_stf
from .evaluate import (bd_table, evaluate_classical, evaluate_models, published_points, summarize, write_bd_table,
                       write_compressai_json)
from .lora import (LoRAConfig, count_parameters, inject_lora, load_adapters, mark_trainable, merge_lora,
                   save_adapters)
from .models.stf import STFConfig, SymmetricalTransFormer
from .train import TrainConfig, train

PACKAGE_DIR = Path(__file__).resolve().parent
PROFILE_DIR = PACKAGE_DIR / "profiles"
REPO_ROOT = PACKAGE_DIR.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = ("01_data", "02_fixed_rate", "03_adapt", "04_evaluate", "05_figures")
TRAINING_METHODS = ("alice", "vanilla", "full")
# How each trained method is labelled in results, tables and figures.
RESULT_LABEL = {"alice": "alice", "vanilla": "vanilla", "full": "fixed-rate"}


class PipelineError(RuntimeError):
    """A step of the workbook failed; the message names the notebook or file to look at."""


# ----------------------------------------------------------------------------- profiles
def load_profile(profile: str | Path | dict) -> dict:
    """A profile by name (``smoke``, ``cpu``, ``paper``), YAML path, or an already-loaded dict."""
    if isinstance(profile, dict):
        return profile
    path = Path(profile)
    if not path.suffix:
        path = PROFILE_DIR / f"{profile}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml") if p.stem != "lora_8_8")
        raise PipelineError(f"unknown profile {profile!r}: no {path} (known: {', '.join(known)})")
    spec = yaml.safe_load(path.read_text())
    for key in ("name", "model", "anchor", "targets", "adapt", "eval"):
        if key not in spec:
            raise PipelineError(f"profile {path} lacks the section {key!r}")
    return spec


def model_config(profile: dict) -> STFConfig:
    return STFConfig(**profile["model"])


def lora_config(profile: dict) -> LoRAConfig:
    spec = profile.get("lora", "lora_8_8.yaml")
    if isinstance(spec, dict):
        return LoRAConfig.from_dict(spec)
    return LoRAConfig.from_yaml(PROFILE_DIR / spec)


def default_run_dir(profile: dict) -> Path:
    return REPO_ROOT / "runs" / profile["name"]


def default_reports_dir(profile: dict) -> Path:
    return REPO_ROOT / "reports" / profile["name"]


def lmbda_tag(lmbda: float) -> str:
    return f"{float(lmbda):g}"


# ----------------------------------------------------------------------------- data
def prepare_data(profile: dict, run_dir: str | Path, kodak: str | None = None, train_folder: str | None = None,
                 allow_download: bool = True) -> dict:
    """Resolve the Kodak and training folders (01_data) and record them in ``data.json``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data_spec = profile.get("data", {})
    kodak_source = data_lib.resolve_kodak(kodak or data_spec.get("kodak"), allow_download=allow_download)
    train_source = data_lib.resolve_training(train_folder or data_spec.get("train"),
                                             source=data_spec.get("train_source", "auto"),
                                             allow_download=allow_download)
    record = {name: {"path": str(src.path), "kind": src.kind, "is_kodak": src.is_kodak, "note": src.note}
              for name, src in (("kodak", kodak_source), ("train", train_source))}
    (run_dir / "data.json").write_text(json.dumps(record, indent=2))
    return record


def data_sources(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "data.json"
    if not path.exists():
        raise PipelineError(f"{path} not found: run notebooks/01_data.ipynb for this run folder first")
    return json.loads(path.read_text())


def training_sets(profile: dict, run_dir: str | Path, crop: int) -> tuple[Subset, Subset | None]:
    """Random-crop training set and a held-out centre-crop validation set from the training folder."""
    folder = data_sources(run_dir)["train"]["path"]
    spec = profile["anchor"]["train"]
    limit = profile.get("data", {}).get("max_train_images")
    train_set = data_lib.ImageFolder(folder, crop, train=True, max_images=limit)
    n_val = min(spec.get("val_images", 0), len(train_set) // 4)
    if n_val == 0:
        return Subset(train_set, range(len(train_set))), None
    val_set = data_lib.ImageFolder(folder, spec.get("val_crop", crop), train=False, max_images=limit)
    if len(val_set) != len(train_set):  # a different crop skipped other files: validate on the train crops
        val_set = data_lib.ImageFolder(folder, crop, train=False, max_images=limit)
    split = len(train_set) - n_val
    return Subset(train_set, range(split)), Subset(val_set, range(split, len(val_set)))


# ----------------------------------------------------------------------------- fixed-rate models
def anchor_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "models" / "anchor.safetensors"


def shipped_anchor(profile: dict) -> Path | None:
    name = profile["anchor"].get("weights")
    return PACKAGE_DIR / "weights" / name if name else None


def _train_config(profile: dict, section: dict, lmbda: float) -> TrainConfig:
    return TrainConfig(lmbda=lmbda, steps=section["steps"], batch_size=section["batch_size"],
                       lr=float(section["lr"]), schedule=section.get("schedule", "cosine"),
                       metric=profile.get("metric", "mse"), seed=section.get("seed", 0))


def train_from_scratch(profile: dict, run_dir: str | Path, lmbda: float, out_path: Path,
                       progress: bool = True) -> Path:
    """Train a fixed-rate STF of the profile's size at ``lmbda`` from random weights."""
    spec = profile["anchor"]["train"]
    config = model_config(profile)
    torch.manual_seed(spec.get("seed", 0))
    model = SymmetricalTransFormer(config)
    train_set, val_set = training_sets(profile, run_dir, spec["crop"])
    folder = Path(run_dir) / "train" / f"fixed-rate-{lmbda_tag(lmbda)}"
    train(model, train_set, folder, _train_config(profile, spec, lmbda), val_data=val_set, progress=progress,
          extra_state={"model_config": config.to_dict(), "mode": "full", "lmbda": lmbda})
    return export_trained(folder, out_path)


def export_trained(folder: str | Path, out_path: str | Path) -> Path:
    """The best checkpoint of a fixed-rate training folder as a safetensors model file.

    Its ``metrics.csv`` is copied beside it (``<name>.metrics.csv``), so that a shipped
    model keeps its training log.
    """
    folder, out_path = Path(folder), Path(out_path)
    best = torch.load(folder / "best.pt", map_location="cpu", weights_only=True)
    model = SymmetricalTransFormer(STFConfig(**best["model_config"]))
    model.load_state_dict(best["model"])
    model.update(force=True)
    path = save_stf(out_path, model, {"lmbda": best["lmbda"], "trained_steps": best["step"],
                                      "best_val_loss": best["best_loss"]})
    shutil.copy2(folder / "metrics.csv", out_path.with_suffix(".metrics.csv"))
    return path


def prepare_anchor(profile: dict, run_dir: str | Path, checkpoint: str | None = None,
                   progress: bool = True) -> Path:
    """The frozen base model at the anchor lambda (02_fixed_rate), in ``models/anchor.safetensors``.

    Order: an explicit checkpoint (a published STF file or one of ours); the weights
    the profile ships; else it is trained here with the profile's anchor budget.
    Already present in the run folder: nothing is done.
    """
    out = anchor_path(run_dir)
    lmbda = profile["anchor"]["lmbda"]
    if out.exists() and checkpoint is None:
        return out
    source = Path(checkpoint) if checkpoint else shipped_anchor(profile)
    if source is not None and source.exists():
        model = load_stf(source, config=None if checkpoint else model_config(profile))
        model.update(force=True)
        return save_stf(out, model, {"lmbda": lmbda, "source": str(source)})
    if source is not None and checkpoint:
        raise PipelineError(f"anchor checkpoint {source} does not exist")
    return train_from_scratch(profile, run_dir, lmbda, out, progress=progress)


def published_references(profile: dict, run_dir: str | Path, checkpoints: dict | None) -> dict[float, Path]:
    """Load published fixed-rate STF checkpoints ``{lambda: path}`` into the run folder."""
    done = {}
    for lmbda, path in (checkpoints or {}).items():
        model = load_stf(path)
        model.update(force=True)
        out = Path(run_dir) / "models" / f"fixed-rate-{lmbda_tag(float(lmbda))}.safetensors"
        done[float(lmbda)] = save_stf(out, model, {"lmbda": float(lmbda), "source": str(path)})
    return done


def load_anchor(run_dir: str | Path) -> SymmetricalTransFormer:
    path = anchor_path(run_dir)
    if not path.exists():
        raise PipelineError(f"{path} not found: run notebooks/02_fixed_rate.ipynb for this run folder first")
    return load_stf(path)


# ----------------------------------------------------------------------------- adaptation
def rate_dir(run_dir: str | Path, method: str, lmbda: float) -> Path:
    return Path(run_dir) / "rates" / f"{method}-{lmbda_tag(lmbda)}"


def rate_artifact(run_dir: str | Path, method: str, lmbda: float) -> Path:
    name = "adapters.safetensors" if method == "alice" else "model.safetensors"
    return rate_dir(run_dir, method, lmbda) / name


def adapt(profile: dict, run_dir: str | Path, lmbda: float, method: str, progress: bool = True) -> dict:
    """Train one method at one target lambda from the anchor (03_adapt); resumes, never trains twice.

    Returns a summary with the artefact path, the parameter counts and the last metrics.
    """
    if method not in TRAINING_METHODS:
        raise PipelineError(f"unknown method {method!r}; choose one of {TRAINING_METHODS}")
    out = rate_artifact(run_dir, method, lmbda)
    model = load_anchor(run_dir)
    lora = lora_config(profile)
    if method == "alice":
        inject_lora(model, lora, generator=torch.Generator().manual_seed(profile["adapt"].get("seed", 0)))
    mark_trainable(model, {"alice": "lora", "vanilla": "vanilla", "full": "full"}[method], lora)
    counts = count_parameters(model, {"alice": "lora", "vanilla": "vanilla", "full": "full"}[method], lora)
    folder = rate_dir(run_dir, method, lmbda) / "train"
    summary = {"method": method, "lmbda": lmbda, "artifact": str(out), **counts}
    if out.exists():
        return {**summary, "status": "already trained"}
    spec = {**profile["adapt"], **profile["adapt"].get(method, {})}
    train_set, val_set = training_sets(profile, run_dir, spec["crop"])
    started = time.time()
    row = train(model, train_set, folder, _train_config(profile, spec, lmbda), val_data=val_set,
                progress=progress, extra_state={"model_config": model.config.to_dict(), "mode": method,
                                                "lmbda": lmbda})
    best = torch.load(folder / ("best.pt" if val_set is not None else "last.pt"), map_location="cpu",
                      weights_only=True)
    model.load_state_dict(best["model"])
    meta = {"lmbda": lmbda, "method": method, "anchor_lmbda": profile["anchor"]["lmbda"],
            "steps": best["step"]}
    if method == "alice":
        save_adapters(out, model, lmbda=lmbda, config=lora, extra_metadata=meta)
    else:
        model.update(force=True)
        save_stf(out, model, meta)
    return {**summary, "status": "trained", "seconds": round(time.time() - started, 1), **row}


def load_rate_model(run_dir: str | Path, method: str, lmbda: float) -> SymmetricalTransFormer:
    """A model for one (method, lambda): ``alice`` unmerged, ``malice`` merged, others plain."""
    if method in ("alice", "malice"):
        model = load_anchor(run_dir)
        load_adapters(rate_artifact(run_dir, "alice", lmbda), model)
        if method == "malice":
            merge_lora(model, strip=True)
        return model.eval()
    if method == "fixed-rate":
        published = Path(run_dir) / "models" / f"fixed-rate-{lmbda_tag(lmbda)}.safetensors"
        if published.exists():
            return load_stf(published)
        method = "full"
    path = rate_artifact(run_dir, method, lmbda)
    if not path.exists():
        raise PipelineError(f"{path} not found: run notebooks/03_adapt.ipynb with method={method}, lmbda={lmbda}")
    return load_stf(path)


# ----------------------------------------------------------------------------- evaluation
def evaluate_run(profile: dict, run_dir: str | Path, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Every model of the run and the classical codecs on the Kodak folder (04_evaluate).

    The anchor is evaluated once and is the anchor-lambda point of every learned
    curve (ALICE, vanilla and MALICE serve that rate with the unmodified base).
    Rows already in ``eval/results.csv`` are not computed again.
    """
    run_dir = Path(run_dir)
    eval_dir = run_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    images = _eval_images(profile, run_dir)
    anchor_lmbda = profile["anchor"]["lmbda"]
    results = evaluate_models({"anchor": load_anchor(run_dir)}, images, eval_dir, methods={"anchor": "anchor"},
                              lmbdas={"anchor": anchor_lmbda}, resume=True, write_json=False, progress=progress)
    for lmbda in profile["targets"]:
        for method in profile["eval"].get("methods", ["fixed-rate", "alice", "malice", "vanilla"]):
            name = f"{method}-{lmbda_tag(lmbda)}"
            results = evaluate_models({name: load_rate_model(run_dir, method, lmbda)}, images, eval_dir,
                                      methods={name: method}, lmbdas={name: lmbda}, resume=True,
                                      write_json=False, progress=progress)
    classical = evaluate_classical(images, eval_dir, profile["eval"].get("classical", ["jpeg", "webp", "avif"]),
                                   profile["eval"].get("qualities"), progress=progress)
    errors = results[results["error"].fillna("").astype(str) != ""]
    summary = summarize(pd.concat([results, classical], ignore_index=True))
    learned = sorted({m for m in summary["method"] if m != "anchor"} - {"jpeg", "webp", "avif"})
    anchor_rows = summary[summary["method"] == "anchor"]
    summary = pd.concat([summary[summary["method"] != "anchor"]]
                        + [anchor_rows.assign(method=m) for m in learned], ignore_index=True)
    summary = summary.sort_values(["method", "bpp"], kind="stable").reset_index(drop=True)
    summary.to_csv(eval_dir / "summary.csv", index=False)
    write_compressai_json(summary, eval_dir, description=f"ALICE workbook, profile {profile['name']}, "
                                                         f"real rANS bitstreams")
    bd = bd_rate_table(summary)
    write_bd_table(bd, eval_dir / "bd_rate.csv")
    return {"results": results, "classical": classical, "summary": summary, "bd": bd, "errors": errors}


def _eval_images(profile: dict, run_dir: Path) -> Path:
    """The Kodak folder, or the first ``max_images`` of it linked into the run folder."""
    folder = Path(data_sources(run_dir)["kodak"]["path"])
    limit = profile["eval"].get("max_images")
    if not limit:
        return folder
    subset = run_dir / "eval" / "images"
    subset.mkdir(parents=True, exist_ok=True)
    for path in data_lib.list_images(folder)[:limit]:
        link = subset / path.name
        if not link.exists():
            link.symlink_to(path.resolve())
    return subset


BD_PAIRS = (("alice", "fixed-rate"), ("vanilla", "fixed-rate"), ("malice", "alice"), ("fixed-rate", "jpeg"),
            ("alice", "jpeg"), ("fixed-rate", "webp"), ("fixed-rate", "avif"))


def bd_rate_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The comparisons the paper's claim rests on, in PSNR (those whose curves exist)."""
    present = set(summary["method"])
    pairs = [(m, a) for m, a in BD_PAIRS if m in present and a in present]
    return bd_table(summary, pairs, metric="psnr")


def parameter_rows(profile: dict, full_size: bool = False) -> list[dict]:
    """Trainable, stored-per-rate and stored-for-all-rates counts for each method.

    ``full_size=True`` counts for the published STF (the paper's 0.35% claim) rather
    than the profile's model; the number of rates is the profile's (anchor + targets).
    """
    model = SymmetricalTransFormer(STFConfig() if full_size else model_config(profile))
    lora = lora_config(profile)
    n_rates = len(profile["targets"]) + 1
    rows = []
    for method, mode in (("alice", "lora"), ("vanilla", "vanilla"), ("fixed-rate", "full")):
        counts = count_parameters(model, mode, lora)
        per_rate = counts["stored_per_rate"]
        all_rates = counts["total"] * n_rates if mode == "full" else counts["total"] + per_rate * (n_rates - 1)
        rows.append({"model": "published STF" if full_size else f"{profile['name']} STF", "method": method,
                     "total": counts["total"], "trainable": counts["trainable"], "stored_per_rate": per_rate,
                     "stored_all_rates": all_rates, "stored_per_rate_pct": 100 * per_rate / counts["total"]})
    return rows


def complexity_models(profile: dict) -> dict[str, SymmetricalTransFormer]:
    """STF, STF+ALICE (unmerged) and STF+MALICE for the complexity table.

    ``complexity.model: published`` uses the full-size STF with the conformance
    weights rule (timing does not depend on the values); else the profile's size.
    """
    full = profile.get("complexity", {}).get("model", "profile") == "published"
    config = STFConfig() if full else model_config(profile)
    lora = lora_config(profile)

    def build(adapters: bool, merged: bool) -> SymmetricalTransFormer:
        model = SymmetricalTransFormer(config)
        if adapters:
            inject_lora(model, lora)
        deterministic_weights_(model)  # nonzero W_b, so the adapters really compute something
        if merged:
            merge_lora(model, strip=True)
        model.eval().update(force=True)
        return model

    return {"STF": build(False, False), "STF+ALICE": build(True, False), "STF+MALICE": build(True, True)}


# ----------------------------------------------------------------------------- driver
@dataclass
class NotebookRun:
    notebook: str
    parameters: dict
    output: Path


def plan(profile: dict, run_dir: Path, reports_dir: Path, extra: dict | None = None) -> list[NotebookRun]:
    """The notebooks of a profile, in order, with their papermill parameters and output paths."""
    base = {"profile": profile["name"], "run_dir": str(run_dir), "reports_dir": str(reports_dir), **(extra or {})}
    out = run_dir / "notebooks"
    runs = [NotebookRun("01_data", base, out / "01_data.ipynb"),
            NotebookRun("02_fixed_rate", base, out / "02_fixed_rate.ipynb")]
    for lmbda in profile["targets"]:
        for method in profile["adapt"].get("methods", TRAINING_METHODS):
            runs.append(NotebookRun("03_adapt", {**base, "lmbda": lmbda, "method": method},
                                    out / f"03_adapt_{method}_{lmbda_tag(lmbda)}.ipynb"))
    runs += [NotebookRun("04_evaluate", base, out / "04_evaluate.ipynb"),
             NotebookRun("05_figures", base, out / "05_figures.ipynb")]
    return runs


def run_pipeline(profile_name: str, run_dir: str | Path | None = None, reports_dir: str | Path | None = None,
                 parameters: dict | None = None, kernel_name: str | None = None) -> Path:
    """Execute the notebooks in order with papermill; a second call resumes.

    Executed notebooks go to ``<run_dir>/notebooks``; the figures and tables of
    05_figures go to ``reports_dir`` (default ``reports/<profile>``), together with
    copies of the executed notebooks. A failing notebook stops the run with
    :class:`PipelineError` naming the executed notebook to open.
    """
    import papermill as pm
    from tqdm.auto import tqdm

    profile = load_profile(profile_name)
    run_dir = Path(run_dir or default_run_dir(profile)).resolve()
    reports_dir = Path(reports_dir or default_reports_dir(profile)).resolve()
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    steps = plan(profile, run_dir, reports_dir, parameters)
    started = time.time()
    timings = []
    for step in tqdm(steps, desc=f"ALICE workbook ({profile['name']})", unit="notebook", file=sys.stdout):
        t0 = time.time()
        try:
            pm.execute_notebook(str(NOTEBOOK_DIR / f"{step.notebook}.ipynb"), str(step.output),
                                parameters=step.parameters, cwd=str(NOTEBOOK_DIR), progress_bar=False,
                                kernel_name=kernel_name)
        except Exception as error:  # papermill's own error carries the cell's traceback
            raise PipelineError(f"{step.output} failed ({type(error).__name__}): open it to see the cell. "
                                f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}") from error
        timings.append({"notebook": step.output.name, "seconds": round(time.time() - t0, 1)})
    total = time.time() - started
    timings.append({"notebook": "total", "seconds": round(total, 1)})
    reports_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(timings).to_csv(reports_dir / "timings.csv", index=False)
    copy_dir = reports_dir / "notebooks"
    copy_dir.mkdir(parents=True, exist_ok=True)
    for step in steps:
        shutil.copy2(step.output, copy_dir / step.output.name)
    return reports_dir


__all__ = [
    "PipelineError", "load_profile", "model_config", "lora_config", "prepare_data", "data_sources",
    "prepare_anchor", "published_references", "load_anchor", "adapt", "load_rate_model", "evaluate_run",
    "bd_rate_table", "parameter_rows", "complexity_models", "plan", "run_pipeline", "published_points",
    "RESULT_LABEL", "lmbda_tag",
]


# ----------------------------------------------------------------------------- report
def anchor_training_log(profile: dict, run_dir: str | Path) -> Path | None:
    """The anchor's metrics.csv: trained in this run folder, or shipped beside its weights."""
    trained = Path(run_dir) / "train" / f"fixed-rate-{lmbda_tag(profile['anchor']['lmbda'])}" / "metrics.csv"
    if trained.exists():
        return trained
    weights = shipped_anchor(profile)
    shipped = weights.with_suffix(".metrics.csv") if weights else None
    return shipped if shipped and shipped.exists() else None


def write_report(profile: dict, run_dir: str | Path, reports_dir: str | Path) -> dict:
    """Tables and figures of a finished run into ``reports_dir`` (05_figures)."""
    from .complexity import measure_complexity
    from .data import read_image
    from .figures import plot_complexity_table, plot_parameter_bars, plot_rd_curves

    run_dir, reports_dir = Path(run_dir), Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    eval_dir = run_dir / "eval"
    if not (eval_dir / "summary.csv").exists():
        raise PipelineError(f"{eval_dir / 'summary.csv'} not found: run notebooks/04_evaluate.ipynb first")
    summary = pd.read_csv(eval_dir / "summary.csv")
    per_image = pd.concat([pd.read_csv(eval_dir / name) for name in ("results.csv", "classical.csv")
                           if (eval_dir / name).exists()], ignore_index=True)
    per_image.to_csv(reports_dir / "results.csv", index=False)
    summary.to_csv(reports_dir / "summary.csv", index=False)
    bd = bd_rate_table(summary)
    write_bd_table(bd, reports_dir / "bd_rate.csv")
    for json_file in eval_dir.glob("*.json"):
        shutil.copy2(json_file, reports_dir / json_file.name)
    plot_rd_curves(summary, reports_dir, published=profile["eval"].get("published_points", False))

    parameters = parameter_rows(profile, full_size=True) + parameter_rows(profile)
    pd.DataFrame(parameters).to_csv(reports_dir / "parameters.csv", index=False)
    plot_parameter_bars(parameter_rows(profile, full_size=True), reports_dir, stem="parameters")
    plot_parameter_bars(parameter_rows(profile), reports_dir, stem=f"parameters_{profile['name']}")

    spec = profile.get("complexity", {})
    image_path = Path(data_sources(run_dir)["kodak"]["path"]) / spec.get("image", "kodim01.png")
    if not image_path.exists():
        image_path = data_lib.list_images(image_path.parent)[0]
    complexity = measure_complexity(complexity_models(profile), read_image(image_path),
                                    repeats=spec.get("repeats", 3), out_path=reports_dir / "complexity.csv")
    plot_complexity_table(complexity, reports_dir)
    files = sorted(p for p in reports_dir.iterdir() if p.is_file())
    return {"files": files, "bd": bd, "parameters": parameters, "complexity": complexity, "summary": summary}
