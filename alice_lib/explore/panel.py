"""The explorer's widgets: :class:`ExplorerPanel` (``ipywidgets``, a thin layer over :class:`~.core.Explorer`)
and :class:`Debounce`, which turns a burst of slider moves into one preview and one full view."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from .core import Box, Explorer, View
from .drawing import RdPicture, _titles, image_png

__all__ = ["Debounce", "ExplorerPanel"]


# ----------------------------------------------------------------------------- the widgets
def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Debounce:
    """A burst of slider moves becomes one preview (of the latest value) and, once it rests, one full view.

    Why: a kernel handles widget messages one at a time; coding every value a drag passes
    through would queue seconds of work behind the slider. ``gather`` seconds collect the
    messages already queued; ``rest`` seconds without a move count as a release. Moves that
    queued up behind a running preview are only seen after it, so a rest is confirmed by
    ``gather`` more seconds without a move before the full view is made. Without a running
    event loop (a script, a test without one) the full view is made at once.
    """

    def __init__(self, preview: Callable[[], None], full: Callable[[], None], *, gather: float = 0.1,
                 rest: float = 0.6):
        self.preview, self.full, self.gather, self.rest = preview, full, gather, rest
        self._preview = self._full = None

    def moved(self) -> None:
        loop = _running_loop()
        if loop is None:
            self.full()
            return
        if self._preview is None:
            self._preview = loop.call_later(self.gather, self._run_preview)
        self._arm(loop, self.rest, self._settle)

    def _arm(self, loop: asyncio.AbstractEventLoop, delay: float, callback: Callable[[], None]) -> None:
        if self._full is not None:
            self._full.cancel()
        self._full = loop.call_later(delay, callback)

    def _run_preview(self) -> None:
        self._preview = None
        self.preview()

    def _settle(self) -> None:
        """Rested as far as seen: let moves queued behind a preview arrive (they re-arm the rest) first."""
        self._arm(_running_loop(), self.gather, self._run_full)

    def _run_full(self) -> None:
        self._full = None
        if self._preview is not None:  # a move arrived after the last preview: its preview is moot now
            self._preview.cancel()
            self._preview = None
        self.full()



class ExplorerPanel:
    """The controls and the pictures: a lambda slider, a target-bpp box, the mode, the crop, a write button.

    Built on :class:`Explorer`; ``ipywidgets`` is imported here only. Without a widget
    front end (papermill, nbval) the panel is built and displayed as inert text, and
    nothing in it runs.
    """

    def __init__(self, explorer: Explorer, view: View, out_dir: str | Path):
        import ipywidgets as w

        self.ex, self.view, self.out_dir = explorer, view, Path(out_dir)
        lo, hi = math.log10(explorer.lmbdas[0]), math.log10(explorer.lmbdas[-1])
        self.step = (hi - lo) / 1000  # fine enough that a value set here reads back unchanged (5 digits)
        self.slider = w.FloatLogSlider(value=view.lmbda, base=10, min=lo, max=hi, step=self.step,
                                       description="lambda", readout_format=".4f", continuous_update=True,
                                       layout=w.Layout(width="520px"))
        self.mode = w.ToggleButtons(options=["interpolate", "alpha"], value=view.mode, description="mode")
        self.target = w.BoundedFloatText(value=round(view.bpp, 3), min=0.01, max=8.0, step=0.01,
                                         description="target bpp", layout=w.Layout(width="180px"))
        self.go = w.Button(description="code at target bpp")
        self.crop = w.ToggleButtons(options=["largest error", "chosen"], value="largest error", description="crop")
        self.crop_y = w.FloatSlider(value=0.5, min=0, max=1, step=0.01, description="crop y", continuous_update=False)
        self.crop_x = w.FloatSlider(value=0.5, min=0, max=1, step=0.01, description="crop x", continuous_update=False)
        self.save = w.Button(description="write .alice", icon="save")
        self.saved, self.status = w.HTML(), w.HTML()
        self.captions = [w.HTML(layout=w.Layout(height="4em")) for _ in range(3)]  # the pictures stay aligned
        self.images = [w.Image(format="png", layout=w.Layout(width="100%")) for _ in range(3)]
        self.crops = [w.Image(format="png") for _ in range(3)]
        self.rd = w.Image(format="png", layout=w.Layout(width="760px"))  # its own size, not stretched
        knots = ", ".join(f"{x:g}" for x in explorer.lmbdas)
        column = w.Layout(width="33%")
        self.widget = w.VBox([
            w.HBox([self.slider, w.HTML(f"&nbsp;trained: {knots} (anchor {explorer.rc.anchor_lmbda:g})")]),
            w.HBox([self.mode, self.target, self.go]),
            w.HBox([self.crop, self.crop_y, self.crop_x]),
            w.HBox([self.save, self.saved]), self.status,
            w.HBox([w.VBox([c, i], layout=column) for c, i in zip(self.captions, self.images)]),
            w.HBox(self.crops), self.rd])
        self.debounce = Debounce(self._preview, self._full)
        self.rd_picture = RdPicture(explorer.reference)
        self._originals: dict[tuple, bytes] = {}
        self._wire()
        self.show(view)

    def _repr_mimebundle_(self, **kwargs) -> dict:
        """The widgets for a front end; for anything else a sentence instead of the widgets' long repr."""
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = (f"Explorer controls for {self.ex.picture.name} (a lambda slider, a target-bpp box, "
                                f"the mode, the crop, a write button): they need a widget front end such as "
                                f"JupyterLab. Shown now: {self.view.describe()}")
        return bundle

    def _wire(self) -> None:
        self.slider.observe(lambda _: self._moved(), names="value")
        self.mode.observe(lambda _: self.show(self.ex.view(self.view.control, self.mode.value)), names="value")
        self.target.observe(lambda _: self._to_target(), names="value")
        self.go.on_click(lambda _: self._to_target())
        self.crop.observe(lambda _: self.show(self.view), names="value")
        for s in (self.crop_x, self.crop_y):
            s.observe(lambda _: self._chosen(), names="value")
        self.save.on_click(lambda _: self._write())

    def _control(self) -> float:
        return math.log(self.slider.value)

    def _moved(self) -> None:
        if abs(self._control() - self.view.control) < 0.5 * self.step * math.log(10):
            return  # the front end snapped a value set here to its step: not a move
        self.debounce.moved()

    def _preview(self) -> None:
        self.show(self.ex.view(self._control(), self.mode.value, self.ex.preview_scale))

    def _full(self) -> None:
        self.show(self.ex.view(self._control(), self.mode.value))

    def _to_target(self) -> None:
        self.status.value = f"searching for {self.target.value:g} bpp ..."
        view = self.ex.view_at_bpp(self.target.value, self.mode.value)
        self.view = view
        self.slider.value = view.lmbda
        self.show(view)

    def _chosen(self) -> None:
        self.crop.value = "chosen"
        self.show(self.view)

    def _centre(self) -> tuple[float, float] | None:
        return (self.crop_y.value, self.crop_x.value) if self.crop.value == "chosen" else None

    def show(self, view: View) -> None:
        """Put ``view`` into the pictures and say what it cost."""
        self.view = view
        start = time.perf_counter()
        box = self.ex.box(view, self._centre())
        zoom = max(1, round(256 / box.height))
        pictures = (view.original, view.decoded, view.jpeg.coded.reconstruction)
        for caption, image, crop, picture, title in zip(self.captions, self.images, self.crops, pictures,
                                                        _titles(view)):
            caption.value = "<br>".join(title.split("\n"))
            image.value = self._png(picture, box) if picture is view.original else image_png(picture, box)
            crop.value = image_png(box.cut(picture), zoom=zoom)
        self.rd.value = self.rd_picture.png(view)
        seconds = {**view.seconds, "display": time.perf_counter() - start}
        kind = f"preview at {view.scale:g} of the size" if view.preview else "full image"
        self.status.value = (f"<b>{kind}</b>: {view.describe()}<br>seconds (when first made): "
                             + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items())
                             + (f"<br>{view.note}" if view.note else "")
                             + "<br><small>bytes: whole files; ALICE's bpp: its bitstreams, as the RD curves "
                               "count learned codecs (JPEG's: the whole file, as its curve)</small>")

    def _png(self, original: Tensor, box: Box) -> bytes:
        """The original's picture, made once per scale and crop (it changes with nothing else)."""
        key = (tuple(original.shape), box)
        if key not in self._originals:
            self._originals = {key: image_png(original, box)}
        return self._originals[key]

    def _write(self) -> None:
        path = self.ex.write_alice(self.view, self.out_dir)
        self.saved.value = f"wrote <code>{path.resolve()}</code> ({path.stat().st_size:,} bytes)"
