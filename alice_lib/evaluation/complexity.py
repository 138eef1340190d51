"""Encoder / decoder complexity of built codecs: parameters, FLOPs, wall time, peak memory.

Part of evaluation: the table ``05_figures`` draws (:func:`alice_lib.figures.plot_complexity_table`).

:func:`measure_complexity` receives already-built models (e.g. ``{"STF": plain,
"STF+ALICE": with_unmerged_adapters, "STF+MALICE": merged}``) and one image, and measures
the *encoder* (``model.compress``: analysis transform, hyperprior, entropy parameters and
rANS encoding) and the *decoder* (``model.decompress``: hyper decoding, entropy parameters,
rANS decoding and synthesis) separately. Columns (:data:`COMPLEXITY_COLUMNS`):

* ``params_total``: every parameter of the model (what a checkpoint stores).
* ``params``: parameters of the modules the part actually runs, found with forward hooks
  (each called module's own parameters, so a low-rank adapter inside a called layer is
  counted), plus the entropy models (``EntropyBottleneck`` / ``GaussianConditional``),
  whose tables both sides need although they are not called through ``forward``.
* ``flops``: floating-point operations counted by PyTorch's
  ``torch.utils.flop_counter.FlopCounterMode`` (matmul, convolution, attention kernels:
  2 FLOPs per multiply-add; element-wise ops and the rANS coder are not counted), so
  ``gmacs = flops / 2e9`` is the number papers often call "GFLOPs".
* ``time_ms``: median wall time of ``repeats`` runs after ``warmup`` runs
  (``torch.cuda.synchronize`` around each run on GPU); ``time_ms_min`` / ``time_ms_max``
  for the spread.
* ``peak_mem_mib``: on CUDA, ``torch.cuda.max_memory_allocated`` during one run minus the
  memory allocated before it (tensors only, weights excluded). On CPU, the increase of the
  process's peak resident set size over its resident size just before the run: Linux
  ``VmHWM`` after resetting it through ``/proc/self/clear_refs`` (with ``malloc_trim``
  first so that freed heap pages do not hide the allocation); where that reset is not
  possible, the maximum of RSS sampled every millisecond by a thread (psutil). It includes
  activations, allocator workspace and coder buffers; ``memory_kind`` says which method
  was used.
"""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..checkpoints import deterministic_weights_
from ..lora import inject_lora, merge_lora
from ..models.stf import STFConfig, SymmetricalTransFormer
from ..settings import Settings
from ..utils import atomic_write, model_device
from .coding import image_batch, run_decompress, synchronize

__all__ = ["COMPLEXITY_COLUMNS", "measure_complexity", "part_parameters", "count_flops", "time_runs",
           "peak_memory"]

COMPLEXITY_COLUMNS = [
    "model", "part", "device", "height", "width", "params_total", "params", "flops", "gmacs",
    "time_ms", "time_ms_min", "time_ms_max", "repeats", "peak_mem_mib", "memory_kind",
]


def _is_entropy_model(module: nn.Module) -> bool:
    try:
        from compressai.entropy_models import EntropyModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, EntropyModel)


def part_parameters(model: nn.Module, run: Callable[[], object]) -> int:
    """Parameters used by ``run()``: own parameters of every module called, plus entropy models."""
    called: set[int] = set()
    handles = [m.register_forward_pre_hook(lambda mod, _inp: called.add(id(mod))) for m in model.modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if id(module) in called or _is_entropy_model(module):
            for p in module.parameters(recurse=_is_entropy_model(module)):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
    return total


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_flops(run: Callable[[], object]) -> int:
    """FLOPs of ``run()`` as counted by ``FlopCounterMode`` (2 per multiply-add).

    PyTorch's counter knows the GPU attention kernels but not the fused CPU one that
    ``scaled_dot_product_attention`` dispatches to here (it counted 0), so that one is
    counted like the others: ``Q K^T`` and ``A V``.
    """
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
        run()
    return int(counter.get_total_flops())


def time_runs(run: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall times in ms of ``repeats`` calls of ``run()`` after ``warmup`` untimed calls."""
    with torch.no_grad():
        for _ in range(warmup):
            run()
        times = []
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            run()
            synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sampled_peak_rss(run: Callable[[], object]) -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        with torch.no_grad():
            run()
    finally:
        stop.set()
        thread.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return (peak[0] - base) / 2**20


def peak_memory(run: Callable[[], object], device: torch.device) -> tuple[float, str]:
    """Peak extra memory of one ``run()`` in MiB and how it was measured (see the module doc)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, "cuda max_memory_allocated"
    _malloc_trim()
    if _reset_peak_rss():
        before = _status_kib("VmRSS")
        if before is not None:
            with torch.no_grad():
                run()
            peak = _status_kib("VmHWM")
            if peak is not None:
                return max(peak - before, 0) / 1024, "cpu peak RSS delta (VmHWM)"
    sampled = _sampled_peak_rss(run)
    if sampled is not None:
        return sampled, "cpu peak RSS delta (sampled 1 ms)"
    return math.nan, "unavailable"


def measure_complexity(
    models: Mapping[str, nn.Module],
    image: Tensor,
    *,
    repeats: int = 5,
    warmup: int = 1,
    update: bool = True,
    flops: bool = True,
    memory: bool = True,
    out_path: str | Path | None = None,
) -> pd.DataFrame:
    """Encoder and decoder complexity of each named model on one image.

    ``image``: ``uint8 [3, H, W]`` or float ``[1, 3, H, W]`` in [0, 1] (e.g. a full-size
    Kodak image). Each model runs on the device of its parameters; with ``update`` it gets
    ``eval()`` and ``update(force=True)`` first. Returns two rows per model (``part`` =
    ``encoder`` / ``decoder``) with :data:`COMPLEXITY_COLUMNS`, also written to
    ``out_path`` as CSV when given.
    """
    rows = []
    for name, model in models.items():
        device = model_device(model)
        model.eval()
        if update:
            model.update(force=True)
        x = image_batch(image, device)
        with torch.no_grad():
            enc = model.compress(x)

        parts = {"encoder": lambda m=model, x=x: m.compress(x),
                 "decoder": lambda m=model, e=enc: run_decompress(m, e)}
        total = sum(p.numel() for p in model.parameters())
        for part, run in parts.items():
            times = time_runs(run, device, repeats=repeats, warmup=warmup)  # warm caches first
            mem, kind = peak_memory(run, device) if memory else (math.nan, "not measured")
            n_flops = count_flops(run) if flops else -1
            rows.append({
                "model": name, "part": part, "device": str(device),
                "height": int(x.shape[-2]), "width": int(x.shape[-1]),
                "params_total": total, "params": part_parameters(model, run),
                "flops": n_flops, "gmacs": n_flops / 2e9 if n_flops >= 0 else math.nan,
                "time_ms": statistics.median(times), "time_ms_min": min(times), "time_ms_max": max(times),
                "repeats": repeats, "peak_mem_mib": mem, "memory_kind": kind,
            })
    df = pd.DataFrame(rows, columns=COMPLEXITY_COLUMNS)
    if out_path is not None:
        atomic_write(out_path, lambda tmp: df.to_csv(tmp, index=False))
    return df


def complexity_models(settings: Settings) -> dict[str, SymmetricalTransFormer]:
    """STF, STF+ALICE (unmerged) and STF+MALICE for the complexity table.

    ``complexity.model: published`` uses the full-size STF with the conformance
    weights rule (timing does not depend on the values); else the profile's size.
    """
    config = STFConfig() if settings.complexity.model == "published" else settings.model.stf
    lora = settings.model.lora

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
