"""The rate explorer (alice_lib/explore/, notebooks/06_explore.ipynb): what each view claims, checked directly.

The shipped CPU weights code a crop of a scikit-image photograph (bundled, so no ../shared
needed); every number a view shows is recomputed here another way.
"""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from alice_lib import explore
from alice_lib.codec import decode, read_alice
from alice_lib.evaluation.classical import encode_classical
from conftest import REPO


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """A 192x256 crop of scikit-image's astronaut: both sides above MS-SSIM's 161 px."""
    import skimage.data

    return torch.from_numpy(np.ascontiguousarray(skimage.data.astronaut()[40:232, 150:406])).permute(2, 0, 1)


@pytest.fixture(scope="module")
def explorer(photo) -> explore.Explorer:
    from alice_lib.settings import load_settings

    rc = explore.load_rate_control(load_settings("cpu"))
    return explore.Explorer(explore.Picture(photo, "astronaut.png", "test"), rc, reference=None, crop_size=64)


def test_06_is_short_has_one_parameters_cell_and_is_not_in_alice_run():
    from alice_lib.driver import notebook_order
    from alice_lib.settings import load_settings

    nb = json.loads((REPO / "notebooks" / "06_explore.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert tagged == code[:1], "exactly one parameters cell, the first code cell"
    order = [run.notebook for run in notebook_order(load_settings("cpu"))]
    assert order and not any(n.startswith("06") for n in order)


# ------------------------------------------------------------------ JPEG at the same bytes
def test_largest_quality_within_is_the_largest_fitting_even_when_sizes_are_not_monotonic():
    sizes = {1: 500, 2: 520, 3: 700, 4: 690, 5: 900, 6: 880}  # 4 and 6 are smaller than their predecessors
    assert explore.largest_quality_within(sizes, 695) == (4, True)
    assert explore.largest_quality_within(sizes, 885) == (6, True)
    assert explore.largest_quality_within(sizes, 520) == (2, True)
    assert explore.largest_quality_within(sizes, 499) == (1, False)  # none fits: quality 1, said so


def test_the_jpeg_shown_is_the_largest_quality_not_larger_than_the_alice_file(explorer, photo):
    view = explorer.view(math.log(0.004))
    budget = view.alice.file_bytes
    sizes = {q: len(encode_classical(photo, "jpeg", q)) for q in range(1, 101)}  # every quality, directly
    best = max(q for q, n in sizes.items() if n <= budget)
    assert view.jpeg.fits and view.jpeg.quality == best and view.jpeg.budget == budget
    assert view.jpeg.bytes == sizes[best] <= budget
    assert view.jpeg.coded.data == encode_classical(photo, "jpeg", best)  # 4:4:4, the evaluation's options


def test_quality_one_is_shown_and_reported_when_even_it_is_larger(explorer):
    flat = torch.full((3, 192, 192), 120, dtype=torch.uint8)  # a flat image costs ALICE a few dozen bytes
    ex = explore.Explorer(explore.Picture(flat, "flat.png", "test"), explorer.rc)
    view = ex.view(math.log(0.0018))
    assert not view.jpeg.fits and view.jpeg.quality == 1
    assert view.jpeg.bytes > view.alice.file_bytes
    assert "LARGER" in view.describe() and "even quality 1" in explore.drawing._titles(view)[2]
    assert explore.JpegLadder(flat).match(10).quality == 1


# ------------------------------------------------------------------ the crop
@pytest.mark.parametrize("where", [(70, 150), (0, 0), (172, 236)])  # inside, top-left, bottom-right corner
def test_the_largest_error_crop_finds_a_planted_error(photo, where):
    torch.manual_seed(0)
    decoded = (photo.int() + torch.randint(-3, 4, photo.shape)).clamp(0, 255).to(torch.uint8)
    top, left = where
    decoded[:, top:top + 20, left:left + 20] = 255 - photo[:, top:top + 20, left:left + 20]
    box = explore.largest_error_box(photo, decoded, size=48)
    assert (box.height, box.width) == (48, 48)
    assert box.top <= top and top + 20 <= box.top + 48 and box.left <= left and left + 20 <= box.left + 48
    assert 0 <= box.top <= 192 - 48 and 0 <= box.left <= 256 - 48


def test_a_chosen_crop_stays_inside_the_image_and_keeps_its_place_across_scales():
    assert explore.box_around((0.0, 1.0), (3, 100, 200), 64) == explore.Box(0, 136, 64, 64)
    assert explore.box_around((0.5, 0.5), (3, 40, 30), 64) == explore.Box(0, 0, 40, 30)
    box = explore.box_around((0.25, 0.75), (3, 400, 800), 100)  # fractions: the same place at any scale
    assert (box.top + 50, box.left + 50) == (100, 600)


# ------------------------------------------------------------------ the RD point
def test_the_rd_point_equals_a_direct_computation(explorer, photo, tmp_path):
    from pytorch_msssim import ms_ssim

    view = explorer.view(math.log(0.01), "alpha")
    files = explorer.write_outputs(view, tmp_path)
    alice = read_alice(files["alice"])
    decoded = decode(explorer.rc, alice)
    assert torch.equal(decoded, view.decoded)
    payload = sum(len(y) + len(z) for y, z in alice.streams)
    mse = float(np.mean((photo.numpy().astype(np.float64) - decoded.numpy().astype(np.float64)) ** 2))
    msssim = float(ms_ssim(photo[None].float() / 255, decoded[None].float() / 255, data_range=1.0))
    point = view.point()
    assert point["bpp"] == pytest.approx(8 * payload / (192 * 256), rel=1e-12)
    assert point["psnr"] == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-9)
    assert point["ms_ssim"] == pytest.approx(msssim, rel=1e-6)
    assert point["ms_ssim_db"] == pytest.approx(-10 * math.log10(1 - msssim), rel=1e-5)
    record = json.loads(files["record"].read_text())
    check = explorer.check_files(files)
    assert check["jpeg_bytes"] <= check["alice_bytes"] == alice.file_bytes == files["alice"].stat().st_size
    assert check["psnr_gap_db"] == pytest.approx(record["psnr_gap_db"], abs=1e-9)
    assert files["figure"].stat().st_size > 0 and record["mode"] == "alpha"


def _tables(folder, images=("a.png", "b.png")):
    from alice_lib.evaluation import RESULT_COLUMNS

    folder.mkdir(parents=True)
    rows = [{"method": m, "model": f"{m}-{l}", "lmbda": l, "quality": math.nan, "image": im, "height": 8, "width": 8,
             "bytes": 10 * k, "bpp": 0.1 * k + (0.05 if im == "b.png" else 0), "psnr": 25 + k, "ms_ssim": 0.9,
             "ms_ssim_db": 10.0, "error": ""}
            for im in images for k, (m, l) in enumerate([("alice", 0.0018), ("alice", 0.0067), ("anchor", 0.0483)], 1)]
    pd.DataFrame(rows).reindex(columns=RESULT_COLUMNS).to_csv(folder / "results.csv", index=False)
    pd.DataFrame([{"method": "alice", "model": "x", "bpp": 9.0, "psnr": 1.0, "ms_ssim_db": 1.0}]).to_csv(
        folder / "summary.csv", index=False)
    pd.DataFrame(columns=["method"]).to_csv(folder / "bd_rate.csv", index=False)


def test_rd_curves_come_from_the_last_run_else_the_committed_reports(tmp_path, monkeypatch):
    from alice_lib.settings import load_settings

    settings = load_settings("cpu")
    monkeypatch.setattr(explore.core, "REPO_ROOT", tmp_path / "repo")
    run = tmp_path / "run"
    assert explore.rd_reference(settings, "a.png", run) is None  # no run, no reports
    _tables(tmp_path / "repo" / "reports" / "cpu")
    ref = explore.rd_reference(settings, "a.png", run)
    assert ref.origin == "reports" and ref.per_image
    _tables(run / "eval")
    ref = explore.rd_reference(settings, "b.png", run)
    assert ref.origin == "run" and ref.per_image and ref.folder == run / "eval"
    assert sorted(ref.summary["bpp"]) == pytest.approx([0.15, 0.25, 0.35])  # b.png's own rows, not the mean
    mean = explore.rd_reference(settings, "c.png", run)
    assert not mean.per_image and list(mean.summary["bpp"]) == [9.0]  # an image the tables lack: the mean


# ------------------------------------------------------------------ rates, modes, previews
def test_modes_agree_on_trained_rates_and_differ_between(explorer):
    trained, between = math.log(0.0067), math.log(0.005)
    assert explorer.view(trained, "interpolate").alice.streams == explorer.view(trained, "alpha").alice.streams
    assert explorer.view(between, "interpolate").alice.streams != explorer.view(between, "alpha").alice.streams
    assert explorer.view(between) is explorer.view(between)  # cached
    low, high = explorer.view(math.log(0.0018)), explorer.view(math.log(0.0483))
    assert low.bpp < high.bpp and low.quality["psnr"] < high.quality["psnr"]


@pytest.mark.filterwarnings("ignore:MS-SSIM needs both sides")
def test_a_preview_is_coded_downscaled_and_never_written(explorer, tmp_path):
    preview = explorer.view(math.log(0.005), scale=0.5)
    assert preview.preview and tuple(preview.original.shape) == (3, 96, 128) == tuple(preview.decoded.shape)
    assert preview.jpeg.budget == preview.alice.file_bytes
    with pytest.raises(ValueError, match="preview"):
        explorer.write_outputs(preview, tmp_path)
    path = explorer.write_alice(preview, tmp_path)  # the button: codes the full image first
    assert (read_alice(path).height, read_alice(path).width) == (192, 256)


def test_a_bpp_target_is_met_within_the_search_tolerance(explorer):
    lo, hi = explorer.view(math.log(0.0018)).bpp, explorer.view(math.log(0.0483)).bpp
    target = 0.5 * (lo + hi)
    view = explorer.view_at_bpp(target)
    assert abs(view.bpp / target - 1) <= 0.03 and "hit" in view.note
    assert "coded at the high end" in explorer.view_at_bpp(hi * 3).note


# ------------------------------------------------------------------ images
def test_open_picture_reads_your_file_and_falls_back_without_kodak(tmp_path, monkeypatch, photo):
    own = tmp_path / "mine.png"
    Image.fromarray(photo.permute(1, 2, 0).numpy()).save(own)
    picture = explore.open_picture(own)
    assert torch.equal(picture.pixels, photo) and picture.name == "mine.png"
    real = explore.core.resolve_kodak
    monkeypatch.setattr(explore.core, "resolve_kodak", lambda preferred, allow_download: real(
        preferred, allow_download=allow_download, data_root=tmp_path / "data", shared_root=tmp_path / "none"))
    with pytest.warns(Warning, match="FALLING BACK"):
        picture = explore.open_picture("kodim23.png")
    assert picture.source.startswith("NOT KODAK") and picture.name.startswith("skimage_")
    (tmp_path / "kodak").mkdir()
    Image.fromarray(photo.permute(1, 2, 0).numpy()).save(tmp_path / "kodak" / "kodim01.png")
    assert explore.open_picture("kodim01.png", tmp_path / "kodak").name == "kodim01.png"
    with pytest.raises(FileNotFoundError, match="kodim99"):
        explore.open_picture("kodim99.png", tmp_path / "kodak")


# ------------------------------------------------------------------ the widgets, without a front end
def test_debounce_makes_one_preview_per_burst_and_one_full_view_when_it_rests():
    calls = []
    debounce = explore.Debounce(lambda: calls.append("preview"), lambda: calls.append("full"), gather=0.01,
                                rest=0.05)

    async def drag():
        for _ in range(5):
            debounce.moved()
        await asyncio.sleep(0.03)
        assert calls == ["preview"]
        debounce.moved()
        await asyncio.sleep(0.2)

    asyncio.run(drag())
    assert calls in (["preview", "preview", "full"], ["preview", "full"])  # the last move's preview may be moot
    assert calls.count("full") == 1
    debounce.moved()  # no event loop: the full view at once
    assert calls[-1] == "full"


def test_moves_queued_behind_a_slow_preview_are_seen_before_the_full_view():
    """A kernel reads the messages of a drag that arrived during a preview only after it: the full view waits."""
    import time

    moves, fulls = [], []

    def slow_preview():
        time.sleep(0.08)  # longer than the rest: the rest timer has expired when it returns
        if len(moves) == 1:  # a move that queued up meanwhile, read just after
            asyncio.get_running_loop().call_later(0.01, move)

    def move():
        moves.append(1)
        debounce.moved()

    debounce = explore.Debounce(slow_preview, lambda: fulls.append(len(moves)), gather=0.03, rest=0.05)

    async def drag():
        move()
        await asyncio.sleep(0.5)

    asyncio.run(drag())
    assert fulls == [2], fulls  # the first full view came after the queued move, not before it


def test_the_panel_builds_and_reacts_without_a_front_end(explorer, tmp_path):
    first = explorer.view(math.log(0.005))
    panel = explore.ExplorerPanel(explorer, first, tmp_path)
    assert all(bytes(image.value[:4]) == b"\x89PNG" for image in (*panel.images, *panel.crops, panel.rd))
    assert "widget front end" in panel._repr_mimebundle_()["text/plain"]
    panel.slider.value = 0.012  # a move: without an event loop, coded at full size at once
    assert panel.view.lmbda == pytest.approx(0.012) and not panel.view.preview
    panel.mode.value = "alpha"
    assert panel.view.mode == "alpha" and panel.view.lmbda == pytest.approx(0.012)
    panel.crop_x.value = 0.9
    assert panel.crop.value == "chosen"
    panel._write()
    written = list(tmp_path.glob("*.alice"))
    assert len(written) == 1 and str(written[0].resolve()) in panel.saved.value
