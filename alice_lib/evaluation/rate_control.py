"""Measuring continuous rate control: intermediate rates against the trained curve, bpp targets hit.

Moved here from the end of ``codec.py``: the codec codes, evaluation measures. Both
functions code real ``.alice`` payloads through the codec's ``encode`` / ``decode`` /
``compress_to_target`` and score them with the metrics every other evaluation uses.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import pandas as pd
from torch import Tensor

from ..data import list_images, read_image
from .bd import bd_rate
from .coding import tqdm
from .metrics import psnr_rgb

__all__ = ["measure_intermediate", "interpolation_bd_rates", "target_hit_rate"]


def _images(image_dir: str | os.PathLike, max_images: int | None) -> list[tuple[str, Tensor]]:
    paths = list_images(image_dir)
    return [(p.name, read_image(p)) for p in (paths[:max_images] if max_images else paths)]


def _control_points(controls: Sequence[float], modes: Sequence[str], per_interval: int) -> list[tuple]:
    """(mode, kind, control): every trained control once, then ``per_interval`` inside each interval per mode."""
    points = [("trained", "trained", c) for c in controls]
    for mode in modes:
        for a, b in zip(controls[:-1], controls[1:]):
            points += [(mode, "intermediate", a + (b - a) * k / (per_interval + 1))
                       for k in range(1, per_interval + 1)]
    return points


def measure_intermediate(rate_control, image_dir: str | os.PathLike, per_interval: int = 3,
                         modes: Sequence[str] = ("interpolate", "alpha"), max_images: int | None = None,
                         progress: bool = False) -> pd.DataFrame:
    """Real-bitstream bpp and PSNR at the trained controls and ``per_interval`` points inside each interval.

    ``rate_control``: a codec ``RateControl``. One row per (mode, control, image): ``mode``,
    ``kind`` ("trained" / "intermediate"), ``control``, ``lmbda``, ``image``, ``bytes``,
    ``bpp``, ``psnr``. Trained points do not depend on the mode and are measured once.
    """
    from ..codec import decode, encode

    images = _images(image_dir, max_images)
    rows = []
    points = _control_points(list(rate_control.controls), modes, per_interval)
    for mode, kind, c in tqdm(points, desc="rate points", disable=not progress):
        rc = rate_control if mode in ("trained", rate_control.mode) else rate_control.with_mode(mode)
        for name, img in images:
            coded = encode(rc, img, c)
            rows.append({"mode": mode, "kind": kind, "control": c, "lmbda": math.exp(c), "image": name,
                         "bytes": coded.payload_bytes, "bpp": coded.bpp, "psnr": psnr_rgb(img, decode(rc, coded))})
    return pd.DataFrame(rows)


def interpolation_bd_rates(results: pd.DataFrame, method: str = "akima") -> pd.DataFrame:
    """BD-rate (%) of each mode's intermediate points against the curve through the trained points.

    Curves are per-control means over the images. Negative: the intermediate points
    need fewer bits than the trained curve at equal PSNR. Akima by default: a mode has
    few points inside a short range, where a global cubic fit is least reliable.
    """
    mean = results.groupby(["mode", "control"], as_index=False)[["bpp", "psnr"]].mean()
    trained = mean[mean["mode"] == "trained"]
    rows = []
    for mode in [m for m in mean["mode"].unique() if m != "trained"]:
        pts = mean[mean["mode"] == mode]
        value = bd_rate(trained["bpp"], trained["psnr"], pts["bpp"], pts["psnr"], method=method)
        rows.append({"mode": mode, "bd_method": method, "bd_rate_pct": value, "n_points": len(pts),
                     "n_trained": len(trained)})
    return pd.DataFrame(rows)


def target_hit_rate(rate_control, image_dir: str | os.PathLike, targets: Sequence[float], tol: float = 0.03,
                    max_images: int | None = None, progress: bool = False) -> pd.DataFrame:
    """Per (image, bpp target): achieved bpp, hit (within ``tol``), clamped, calls.

    ``df.attrs["hit_rate"]``: the fraction of hits among targets inside the covered range
    (not clamped); ``df.attrs["clamped"]`` counts the others.
    """
    from ..codec import compress_to_target

    images = _images(image_dir, max_images)
    rows = []
    jobs = [(n, img, t) for n, img in images for t in targets]
    for name, img, t in tqdm(jobs, desc="targets", disable=not progress):
        r = compress_to_target(rate_control, img, target_bpp=t, tol=tol)
        rows.append({"image": name, "target_bpp": t, "achieved_bpp": r.achieved_bpp, "psnr": r.achieved_psnr,
                     "rel_error": r.achieved_bpp / t - 1, "hit": r.hit, "clamped": r.clamped,
                     "clamped_to": r.clamped_to, "lmbda": r.lmbda, "estimate_calls": r.estimate_calls,
                     "coder_calls": r.coder_calls})
    df = pd.DataFrame(rows)
    inside = df[~df["clamped"]] if len(df) else df
    df.attrs["hit_rate"] = float(inside["hit"].mean()) if len(inside) else math.nan
    df.attrs["inside"] = int(len(inside))
    df.attrs["clamped"] = int(len(df) - len(inside))
    return df
