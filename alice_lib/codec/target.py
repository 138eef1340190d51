"""Coding at a target size or quality: the search over the control value.

Bits per pixel and PSNR both grow with lambda, so the control that meets a target
is found by a bracketing secant search on the eval forward's entropy estimate (one
forward pass per step), confirmed and corrected with the real rANS coder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .coding import as_uint8, decode, encode, estimate
from .format import DEFAULT_TILE, AliceFile
from .rate import RateControl

__all__ = ["TargetResult", "TargetSearch", "compress_to_target"]


@dataclass
class TargetResult:
    """What :func:`compress_to_target` found."""

    alice: AliceFile
    control: float
    achieved_bpp: float
    achieved_psnr: float
    target: float
    target_kind: str          # "bpp" or "psnr"
    hit: bool                 # within the tolerance band
    clamped: bool             # the target lies outside the covered range: coded at the nearest end
    clamped_to: str | None = None   # "low" / "high"
    estimate_calls: int = 0
    coder_calls: int = 0

    @property
    def lmbda(self) -> float:
        return math.exp(self.control)


def _psnr(a: Tensor, b: Tensor) -> float:
    """PSNR (dB, peak 255) of two uint8 images, as ``evaluation.metrics.psnr_rgb`` defines it.

    Computed here from :func:`alice_lib.utils.psnr_from_mse` because the codec sits below
    evaluation in the import order (evaluation imports the codec, not the reverse).
    """
    from ..utils import psnr_from_mse

    return psnr_from_mse((a.double() - b.double()).pow(2).mean().item(), peak=255.0)


def solve(fn: Callable[[float], float], target: float, lo: float, hi: float, f_lo: float, f_hi: float,
          tol: float, max_iter: int = 30) -> float:
    """A control with ``|fn(control) - target| <= tol`` for increasing ``fn``, ``f_lo <= target <= f_hi``.

    Illinois regula falsi: a bracketing secant that never leaves the bracket and does
    not stall on one side (the rate is close to linear in log-lambda, so it converges fast).
    """
    a, b, ga, gb = lo, hi, f_lo - target, f_hi - target
    side, c = 0, 0.5 * (lo + hi)
    for _ in range(max_iter):
        c = b - gb * (b - a) / (gb - ga) if gb != ga else 0.5 * (a + b)
        if not a < c < b:
            c = 0.5 * (a + b)
        gc = fn(c) - target
        if abs(gc) <= tol or b - a < 1e-7:
            return c
        if gc > 0:
            b, gb = c, gc
            if side == -1:
                ga /= 2
            side = -1
        else:
            a, ga = c, gc
            if side == 1:
                gb /= 2
            side = 1
    return c


class TargetSearch:
    """One image, one target: the estimate and real-coder evaluations it has paid for, cached.

    ``kind`` "bpp" works on log-bpp (about linear in log-lambda), "psnr" on dB.
    """

    def __init__(self, rate_control: RateControl, image: Tensor, kind: str, target: float, tol: float = 0.03,
                 psnr_tol: float = 0.1, tile: int | None = DEFAULT_TILE):
        if kind not in ("bpp", "psnr"):
            raise ValueError(f"unknown target kind {kind!r}")
        if not math.isfinite(target) or (kind == "bpp" and target <= 0):
            raise ValueError(f"invalid {kind} target {target!r}")
        self.rc, self.u8, self.kind, self.target = rate_control, as_uint8(image), kind, float(target)
        self.tol, self.psnr_tol, self.tile = tol, psnr_tol, tile
        self.pixels = self.u8.shape[-2] * self.u8.shape[-1]
        self._est: dict[float, float] = {}
        self._real: dict[float, list] = {}  # control -> [file, real bpp, PSNR of its decode or None]

    # ------------------------------------------------------------------ evaluations
    def est(self, c: float) -> float:
        """The estimate at ``c`` in search units (log-bpp or PSNR)."""
        if c not in self._est:
            bits, rec = estimate(self.rc.model_at(c), self.u8, self.tile)
            self._est[c] = math.log(bits / self.pixels) if self.kind == "bpp" else _psnr(self.u8, rec)
        return self._est[c]

    def real(self, c: float) -> list:
        if c not in self._real:
            f = encode(self.rc, self.u8, c, tile=self.tile)
            self._real[c] = [f, f.bpp, None]
        return self._real[c]

    def psnr_of(self, c: float) -> float:
        entry = self.real(c)
        if entry[2] is None:
            entry[2] = _psnr(self.u8, decode(self.rc, entry[0]))
        return entry[2]

    def value(self, c: float) -> float:
        return self.real(c)[1] if self.kind == "bpp" else self.psnr_of(c)

    def within(self, v: float) -> bool:
        if self.kind == "bpp":
            return abs(v / self.target - 1) <= self.tol
        return abs(v - self.target) <= self.psnr_tol

    def error(self, v: float) -> float:
        return abs(math.log(v / self.target)) if self.kind == "bpp" else abs(v - self.target)

    def units(self, v: float) -> float:
        """A real value in search units."""
        return math.log(v) if self.kind == "bpp" else v

    # ------------------------------------------------------------------ the search
    def search_estimate(self, goal: float) -> float:
        """Control whose estimate meets ``goal`` (search units), clamped to the covered range."""
        lo, hi = self.rc.range
        if lo == hi:
            return lo
        f_lo, f_hi = self.est(lo), self.est(hi)
        if goal <= f_lo:
            return lo
        if goal >= f_hi:
            return hi
        # On the log scale a relative tolerance tol/4 is an absolute one.
        return solve(self.est, goal, lo, hi, f_lo, f_hi, self.tol / 4 if self.kind == "bpp" else self.psnr_tol / 4)

    def corrected(self, max_corrections: int) -> None:
        """Search on the estimate, shifting its goal by the observed real-minus-estimate gap."""
        goal = self.units(self.target)
        c = self.search_estimate(goal)
        tried = []
        for _ in range(max_corrections + 1):
            tried.append(c)
            v = self.value(c)
            if self.within(v):
                return
            c_next = self.search_estimate(goal - (self.units(v) - self.est(c)))
            if c_next in tried:
                return
            c = c_next

    def bisect_real(self, steps: int = 6) -> None:
        """Bracket the target on the real coder (the ends if needed) and bisect a few times."""
        lo, hi = self.rc.range
        if not any(self.value(k) > self.target for k in list(self._real)):
            self.value(hi)
        if not any(self.value(k) < self.target for k in list(self._real)):
            self.value(lo)
        below = [k for k in self._real if self.value(k) < self.target]
        above = [k for k in self._real if self.value(k) > self.target]
        if not (below and above and max(below) < min(above)):
            return
        a, b = max(below), min(above)
        for _ in range(steps):
            mid = 0.5 * (a + b)
            v = self.value(mid)
            if self.within(v):
                return
            a, b = (mid, b) if v < self.target else (a, mid)

    def best(self) -> float:
        return min(self._real, key=lambda k: self.error(self.value(k)))

    def run(self, max_corrections: int = 4) -> TargetResult:
        lo, hi = self.rc.range
        self.corrected(max_corrections)
        if not self.within(self.value(self.best())) and lo < hi:
            self.bisect_real()
        best = self.best()
        f, bpp = self._real[best][:2]
        psnr = self.psnr_of(best)
        v = bpp if self.kind == "bpp" else psnr
        hit = self.within(v)
        clamped_to = None
        if not hit and lo < hi:
            if best == hi and v < self.target:
                clamped_to = "high"
            elif best == lo and v > self.target:
                clamped_to = "low"
        elif not hit:
            clamped_to = "high" if v < self.target else "low"
        return TargetResult(alice=f, control=best, achieved_bpp=bpp, achieved_psnr=psnr, target=self.target,
                            target_kind=self.kind, hit=hit, clamped=clamped_to is not None, clamped_to=clamped_to,
                            estimate_calls=len(self._est), coder_calls=len(self._real))


def compress_to_target(rate_control: RateControl, image: Tensor, target_bpp: float | None = None,
                       target_psnr: float | None = None, tol: float = 0.03, psnr_tol: float = 0.1,
                       max_corrections: int = 4, tile: int | None = DEFAULT_TILE) -> TargetResult:
    """Code ``image`` at the control value that meets a bpp or PSNR target (:class:`TargetSearch`).

    1. Search on the eval-mode forward's entropy estimate (one forward pass per step).
    2. Confirm with the real rANS coder; when the real value misses the band
       (bpp: ``target * (1 +- tol)``, PSNR: ``+- psnr_tol`` dB), shift the estimate's
       goal by the observed gap and search again, up to ``max_corrections`` times, then
       bisect a few times on the real coder; the closest result is kept.
    3. A target outside what the covered range reaches is coded at the nearest end
       (``clamped=True``, ``clamped_to`` "low" or "high"), never extrapolated.

    The bpp counted is the bitstreams' (header, tile index and CRC excluded).
    """
    if (target_bpp is None) == (target_psnr is None):
        raise ValueError("give exactly one of target_bpp and target_psnr")
    kind = "bpp" if target_bpp is not None else "psnr"
    target = float(target_bpp if kind == "bpp" else target_psnr)
    search = TargetSearch(rate_control, image, kind, target, tol=tol, psnr_tol=psnr_tol, tile=tile)
    return search.run(max_corrections)
