"""``alice run``: the notebooks in order, executed with papermill, with progress and an ETA.

The driver owns the order (:func:`notebook_order`): 01_data, 02_fixed_rate, 03_adapt once
per (target lambda, method), 04_evaluate, 05_figures; :func:`alice_lib.planning.make_plan`
only estimates each of them. :func:`run_pipeline` loads the profile once, writes the
resolved settings into the run folder (``settings.yaml``) and passes that file to every
notebook as its ``profile``: each notebook builds equal settings once from it. Executed
notebooks stay whole in ``<run>/notebooks``; their copies in ``reports/<profile>/notebooks``
are written by :func:`publish_notebook`, without the images the report holds as files and
without widget state.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
from jupyter_client.manager import AsyncKernelManager

from .pipeline import PipelineError, load_profile
from .planning import NOTEBOOK_OVERHEAD, ExperimentPlan, WorkItem, format_seconds, make_plan
from .run_folder import REPO_ROOT, RunLayout, default_reports_dir, default_run_dir, lmbda_tag
from .settings import Settings, SettingsError, save_settings, split_parameters
from .utils import atomic_write, atomic_write_bytes

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
# Outputs a published notebook drops when the report holds the same bytes as a file.
IMAGE_TYPES = ("image/png", "image/jpeg", "image/svg+xml", "application/pdf")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


# ----------------------------------------------------------------------------- the order
@dataclass(frozen=True)
class NotebookRun:
    """One execution of a notebook: which one, and its own parameters (an adaptation's method and lambda)."""

    notebook: str
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def output_name(self) -> str:
        """The executed notebook's file name, e.g. ``03_adapt_alice_0.0067.ipynb``."""
        if "method" in self.parameters:
            return f"{self.notebook}_{self.parameters['method']}_{lmbda_tag(self.parameters['lmbda'])}.ipynb"
        return f"{self.notebook}.ipynb"


def notebook_order(settings: Settings) -> list[NotebookRun]:
    """What ``alice run`` executes, in order: the data, the fixed-rate models, one adaptation per
    (target lambda, method), outwards from the anchor where each starts from its neighbour, the
    evaluation, the figures."""
    adaptations = [NotebookRun("03_adapt", {"lmbda": lmbda, "method": method})
                   for lmbda in settings.adaptation_order() for method in settings.adaptation.methods]
    return [NotebookRun("01_data"), NotebookRun("02_fixed_rate"), *adaptations, NotebookRun("04_evaluate"),
            NotebookRun("05_figures")]


# ----------------------------------------------------------------------------- running
class _LocalKernelManager(AsyncKernelManager):
    """A kernel on this machine over IPC sockets rather than TCP.

    ipykernel warns, in every notebook, that a TCP kernel without CurveZMQ keys sends
    code in plain text; a local kernel needs no network port at all, so IPC is the
    right transport (and the warning's condition no longer holds).
    """

    def __init__(self, **kwargs):
        super().__init__(transport="ipc", **kwargs)


def run_pipeline(profile: str | Path, run_dir: str | Path | None = None, reports_dir: str | Path | None = None,
                 parameters: dict | None = None, kernel_name: str | None = None, progress: bool = True,
                 measure: bool = True) -> Path:
    """Execute the notebooks in order with papermill; a second call resumes.

    ``parameters``: ``-p`` pairs: dotted settings overrides (``adapt.epochs=2``) and
    notebook parameters (``kodak_dir``, ``anchor_checkpoint``). The settings are loaded
    here, once, and written to ``<run_dir>/settings.yaml``, the ``profile`` every notebook
    is given. Progress is shown in units of work (training steps, images coded) with an
    ETA from the same estimate as ``alice plan`` (:class:`Progress`). Executed notebooks
    go to ``<run_dir>/notebooks``; the figures and tables of 05_figures go to
    ``reports_dir`` (default ``reports/<profile>``), with copies of the executed
    notebooks (:func:`publish_notebook`). A failing notebook stops the run with
    :class:`~alice_lib.pipeline.PipelineError` naming the executed notebook to open.
    """
    import papermill as pm

    try:
        overrides, notebook_parameters = split_parameters(parameters)
    except SettingsError as error:
        raise PipelineError(str(error)) from error
    settings, notebook_parameters = load_profile(profile, overrides), resolve_paths(notebook_parameters)
    layout = RunLayout(Path(run_dir or default_run_dir(settings.name)).resolve())
    reports_dir = Path(reports_dir or default_reports_dir(settings.name)).resolve()
    layout.notebooks_dir.mkdir(parents=True, exist_ok=True)
    common = {"profile": str(save_settings(settings, layout.settings_file)), "overrides": {},
              "run_dir": str(layout.root), "reports_dir": str(reports_dir),
              **{k: v for k, v in notebook_parameters.items() if k not in ("lmbda", "method")}}
    if progress and measure:
        print(f"alice run: timing a few training steps of the {settings.name} model for the estimate", flush=True)
    runs = notebook_order(settings)
    plan = make_plan(settings, runs, notebook_parameters, run_dir=layout.root, measure=measure)
    bar = Progress(plan, stream=sys.stdout, enabled=progress)
    started, timings = time.time(), []
    try:
        for index, run in enumerate(runs):
            bar.start(index)
            output = layout.notebooks_dir / run.output_name
            seconds = _execute(pm, run.notebook, {**common, **run.parameters}, output, kernel_name, bar)
            bar.finish(index, seconds)
            timings.append({"notebook": output.name, "seconds": round(seconds, 1)})
    finally:
        bar.close()
    timings.append({"notebook": "total", "seconds": round(time.time() - started, 1)})
    reports_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(reports_dir / "timings.csv", pd.DataFrame(timings).to_csv(index=False).encode())
    for run in runs:
        publish_notebook(layout.notebooks_dir / run.output_name, reports_dir / "notebooks" / run.output_name)
    return reports_dir


def resolve_paths(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Notebook parameters with relative paths that exist from here made absolute.

    The notebooks run in ``notebooks/``, so ``-p anchor_checkpoint=snapshots/x.safetensors``
    given from the repository would otherwise name a file that is not there. Other values
    (and paths that do not exist, which the notebook then reports) pass unchanged;
    ``reference_checkpoints`` is resolved value by value.
    """
    def resolved(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: resolved(item) for key, item in value.items()}
        if isinstance(value, (str, Path)) and not Path(value).is_absolute() and Path(value).exists():
            return str(Path(value).resolve())
        return value

    return {key: resolved(value) for key, value in parameters.items()}


def _execute(pm, notebook: str, parameters: Mapping, output: Path, kernel_name: str | None, bar: Progress) -> float:
    """Run one notebook in a worker thread while the progress line refreshes; its wall time in seconds."""
    path = NOTEBOOK_DIR / f"{notebook}.ipynb"
    declared = pm.inspect_notebook(str(path))  # only what its parameters cell declares: no "unknown parameter"
    parameters = {key: value for key, value in parameters.items() if key in declared}
    outcome: dict = {}

    def work() -> None:
        try:
            pm.execute_notebook(str(path), str(output), parameters=parameters,
                                cwd=str(NOTEBOOK_DIR), progress_bar=False, kernel_name=kernel_name,
                                kernel_manager_class=_LocalKernelManager)
        except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread
            outcome["error"] = error

    t0 = time.time()
    worker = threading.Thread(target=work, name=f"papermill {output.name}", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(timeout=2.0)
        bar.refresh()
    error = outcome.get("error")
    if error is not None:  # papermill's own error carries the cell's traceback
        last = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise PipelineError(f"{output} failed ({type(error).__name__}): open it to see the cell. {last}") \
            from error
    return time.time() - t0


# ----------------------------------------------------------------------------- progress
class Progress:
    """``alice run``'s one-line progress: work done in steps and images, and an ETA from the plan.

    Remaining time = the notebooks left times their start-up overhead (as long as
    01_data actually took) plus their planned work scaled by how the finished work
    compared with its plan (observed / planned), so an estimate measured on a busy
    machine corrects itself after the first real work. Within an item, progress is
    read from the file it grows: ``metrics.csv`` rows for training, interpolated in time
    and never past the item's end, and ``results.csv`` rows for evaluation, counted, with
    the item's remaining time taken from the pace at which they came. A training
    resumed at step k of n is judged against (n - k) / n of its plan: the steps before k
    were in its files when it started, and counting them would make every later
    estimate too short.
    """

    def __init__(self, plan: ExperimentPlan, stream=None, enabled: bool = True):
        from tqdm.auto import tqdm

        self.plan = plan
        self.overhead = NOTEBOOK_OVERHEAD
        self.finished: list[tuple[float, float]] = []  # (planned work seconds of what ran, seconds taken)
        self.index, self.item_started, self.started = 0, time.time(), time.time()
        self.bar = tqdm(total=max(1, round(sum(i.seconds for i in plan.work))), file=stream, disable=not enabled,
                        bar_format="{percentage:3.0f}%|{bar:24}| {desc}", mininterval=1.0, dynamic_ncols=True,
                        desc=f"{len(plan.work)} notebooks, about {format_seconds(sum(i.seconds for i in plan.work))}")
        self._baseline = 0

    def start(self, index: int) -> None:
        self.index, self.item_started = index, time.time()
        self._baseline = self._file_units(self.plan.work[index])
        self.refresh()

    def finish(self, index: int, seconds: float) -> None:
        item = self.plan.work[index]
        if not self.finished:  # the first notebook does almost nothing but start: that is the overhead
            self.overhead = max(1.0, seconds - item.work_seconds)
        self.finished.append((self._planned_here(item), seconds))
        self.refresh(done=True)

    def _planned_here(self, item: WorkItem) -> float:
        """The planned work seconds of the part of ``item`` that ran since :meth:`start` (a resumed training's rest)."""
        if item.unit != "step" or self._baseline <= 0 or item.units <= 0:
            return item.work_seconds
        return item.work_seconds * max(0, item.units - self._baseline) / item.units

    def _file_units(self, item: WorkItem) -> int:
        """Units already visible in the item's files: the last training step of each, or result rows."""
        return sum(self._units_in(path, item.unit) for path in item.watch)

    @staticmethod
    def _units_in(path: Path, unit: str) -> int:
        try:
            lines = path.read_text().strip().splitlines()
        except OSError:
            return 0
        if unit == "step" and len(lines) > 1:
            header = lines[0].split(",")
            return int(float(lines[-1].split(",")[header.index("step")])) if "step" in header else 0
        return max(0, len(lines) - 1)

    def _ratio(self) -> float:
        """Observed over planned seconds of the finished work (1 until there is enough to judge)."""
        planned = sum(p for p, _ in self.finished)
        actual = sum(max(0.0, s - self.overhead) for _, s in self.finished)
        return actual / planned if planned > 5 else 1.0

    def _expected(self, item: WorkItem, ratio: float) -> float:
        return self.overhead + item.work_seconds * ratio

    def refresh(self, done: bool = False) -> None:
        item = self.plan.work[self.index]
        ratio = self._ratio()
        elapsed = time.time() - self.item_started
        item_left = 0.0
        if done:
            fraction = 1.0
        else:
            seen = (self._file_units(item) - (self._baseline if item.unit == "image" else 0)) / max(1, item.units)
            if item.unit == "image" and seen > 0:
                # Results arrive image by image: count them, and go on at the pace they came.
                fraction = min(0.99, seen)
                item_left = elapsed * (1 - fraction) / fraction
            else:  # training logs arrive once per epoch: interpolate in time between them
                expected = self._expected(item, ratio)
                fraction = min(0.99, max(seen, elapsed / max(1e-6, expected)))
                item_left = expected * (1 - fraction)
        remaining = sum(self._expected(i, ratio) for i in self.plan.work[self.index + 1:]) + item_left
        self.bar.n = min(self.bar.total, round(sum(i.seconds for i in self.plan.work[:self.index])
                                               + item.seconds * fraction))
        units = f" {round(fraction * item.units):,}/{item.units:,} {item.unit}s" if item.unit != "task" else ""
        self.bar.set_description_str(f"{self.index + 1}/{len(self.plan.work)} {item.notebook} {item.label}{units} | "
                                     f"{format_seconds(time.time() - self.started)} elapsed, "
                                     f"ETA {format_seconds(remaining)}", refresh=True)

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------- the report's copies
def publish_notebook(source: str | Path, target: str | Path, report_dir: str | Path | None = None) -> Path:
    """Write the executed notebook ``source`` to ``target`` as the report keeps it (:func:`strip_notebook`).

    ``report_dir``: the folder whose image files the notebook's figures duplicate (default:
    the folder above ``target``'s, ``reports/<profile>/`` for ``reports/<profile>/notebooks/``).
    ``target`` may be ``source``: committed notebooks are cleaned in place.
    """
    target = Path(target)
    folder = Path(report_dir) if report_dir is not None else target.parent.parent
    notebook = strip_notebook(nbformat.read(str(source), as_version=4), report_files(folder))
    return atomic_write(target, lambda tmp: nbformat.write(notebook, str(tmp)))


def report_files(folder: str | Path) -> dict[str, str]:
    """SHA-256 of each figure file in ``folder`` (PNG, JPEG, SVG, PDF) -> its name."""
    suffixes = {".png", ".jpg", ".jpeg", ".svg", ".pdf"}
    return {hashlib.sha256(path.read_bytes()).hexdigest(): path.name
            for path in sorted(Path(folder).glob("*")) if path.suffix.lower() in suffixes and path.is_file()}


def strip_notebook(notebook: nbformat.NotebookNode, figures: Mapping[str, str]) -> nbformat.NotebookNode:
    """``notebook`` without widget state and without the images that are files beside it; text outputs stay.

    ``figures``: SHA-256 of a file's bytes -> its name (:func:`report_files`). An image
    output with those bytes becomes a line naming the file. Widget views (progress bars)
    are dropped whole, with ``metadata.widgets``, their saved state: without it their text
    form shows the bar's first state (0 %), not its last.
    """
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [out for out in (_strip_output(out, figures) for out in cell.outputs) if out is not None]
    return notebook


def _strip_output(output: nbformat.NotebookNode, figures: Mapping[str, str]) -> nbformat.NotebookNode | None:
    """One output without duplicated images; None for a widget view."""
    data = output.get("data")
    if data is None:  # a stream or an error: text
        return output
    if WIDGET_VIEW in data:
        return None
    images = [mime for mime in IMAGE_TYPES if mime in data]
    duplicated = [figures[digest] for mime in images if (digest := _image_sha256(data[mime], mime)) in figures]
    if duplicated:  # the figure's other formats go too: the report holds it
        for mime in images:
            del data[mime]
            output.get("metadata", {}).pop(mime, None)
        data["text/plain"] = f"[figure: {duplicated[0]}, a file of the report]"
    return output


def _image_sha256(value: str | list[str], mime: str) -> str:
    """SHA-256 of an output's image bytes (base64 in the notebook, except SVG, which is text)."""
    text = "".join(value) if isinstance(value, list) else value
    raw = text.encode() if mime == "image/svg+xml" else base64.b64decode(text)
    return hashlib.sha256(raw).hexdigest()


__all__ = ["NotebookRun", "notebook_order", "run_pipeline", "Progress", "publish_notebook", "report_files",
           "strip_notebook", "NOTEBOOK_DIR"]
