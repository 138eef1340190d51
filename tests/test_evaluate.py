"""Evaluation, BD-rate, classical codecs, complexity and figures (small and CPU-fast)."""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from alice_lib import evaluate as ev
from alice_lib.data import read_image
from alice_lib.complexity import COMPLEXITY_COLUMNS, measure_complexity
from alice_lib.figures import plot_complexity_table, plot_parameter_bars, plot_rd_curves
from alice_lib.models.stf import STFConfig, SymmetricalTransFormer

KODIM01 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kodak" / "kodim01.png"


def _source_image() -> np.ndarray:
    """kodim01 when the shared data folder exists, else a synthetic textured image."""
    if KODIM01.exists():
        return np.asarray(Image.open(KODIM01).convert("RGB"))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    base = np.stack([xx, yy, (xx + yy) // 2], axis=-1).astype(float)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    src = _source_image()
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(src[100:164, 200:280]).save(folder / "a.png")   # 64 x 80
    Image.fromarray(src[30:100, 300:396]).save(folder / "b.png")    # 70 x 96
    return folder


@pytest.fixture(scope="module")
def tiny_model() -> SymmetricalTransFormer:
    torch.manual_seed(0)
    model = SymmetricalTransFormer(STFConfig(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                                             num_slices=4)).eval()
    model.update(force=True)
    return model


# ------------------------------------------------------------------ BD-rate
BPP = [0.12, 0.2, 0.31, 0.45, 0.66, 0.9]
PSNR = [29.0, 30.4, 32.0, 33.8, 35.7, 37.6]


def test_bd_rate_of_curve_against_itself_is_zero():
    assert ev.bd_rate(BPP, PSNR, BPP, PSNR) == pytest.approx(0.0, abs=1e-9)
    assert ev.bd_psnr(BPP, PSNR, BPP, PSNR) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("interp", ["akima", "pchip"])
def test_bd_rate_of_scaled_rates_is_the_factor(interp):
    worse = [1.1 * r for r in BPP]
    assert ev.bd_rate(BPP, PSNR, worse, PSNR, method=interp) == pytest.approx(10.0, abs=0.5)
    assert ev.bd_rate(worse, PSNR, BPP, PSNR, method=interp) == pytest.approx(100 / 1.1 - 100, abs=0.5)
    assert ev.bd_psnr(BPP, PSNR, worse, PSNR, method=interp) < 0


def test_bd_rate_handles_unsorted_duplicates_and_too_few_points():
    order = [3, 0, 5, 1, 4, 2]
    rate = ev.bd_rate(BPP, PSNR, [1.1 * BPP[i] for i in order], [PSNR[i] for i in order])
    assert rate == pytest.approx(10.0, abs=0.5)
    with pytest.warns(UserWarning):
        assert math.isnan(ev.bd_rate(BPP, PSNR, [0.3], [31.0]))


def test_bd_table_columns_and_csv(tmp_path):
    summary = pd.DataFrame({
        "method": ["fixed-rate"] * 6 + ["alice"] * 6,
        "model": [f"m{i}" for i in range(12)],
        "bpp": BPP + [1.1 * r for r in BPP],
        "psnr": PSNR * 2,
        "ms_ssim_db": [p / 2 for p in PSNR] * 2,
    })
    table = ev.bd_table(summary, [("alice", "fixed-rate")], metric="psnr")
    assert list(table.columns) == ev.BD_COLUMNS
    assert table.loc[0, "bd_rate_pct"] == pytest.approx(10.0, abs=0.5)
    assert table.loc[0, "metric"] == "psnr"
    auto = ev.bd_table(summary, metric="ms_ssim_db")  # default anchor: fixed-rate
    assert auto.loc[0, "anchor"] == "fixed-rate" and auto.loc[0, "metric"] == "ms_ssim_db"
    path = ev.write_bd_table(pd.concat([table, auto]), tmp_path / "bd.csv")
    back = pd.read_csv(path)
    assert {"method", "anchor", "metric", "bd_rate_pct", "bd_psnr_db"} <= set(back.columns)
    with_published = pd.concat([summary, ev.published_points()], ignore_index=True)
    pub = ev.bd_table(with_published, [("alice", "stf-published")])
    assert math.isfinite(pub.loc[0, "bd_rate_pct"])


def test_published_points_are_the_stf_table():
    df = ev.published_points()
    assert df["bpp"].tolist() == [0.124, 0.191, 0.298, 0.441, 0.651, 0.903]
    assert df["psnr"].tolist() == [29.14, 30.50, 32.15, 33.97, 35.82, 37.72]
    assert "Zou" in df["source"].iloc[0]


# ------------------------------------------------------------------ learned codec
def test_evaluate_tiny_stf_bpp_is_real_bytes(tiny_model, image_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MS-SSIM is NaN under 161 px, on purpose
        df = ev.evaluate_models({"stf-a": tiny_model}, image_dir, tmp_path, methods={"stf-a": "fixed-rate"},
                                lmbdas={"stf-a": 0.0018}, progress=False)
    assert len(df) == 2 and (df["error"] == "").all()
    assert list(pd.read_csv(tmp_path / "results.csv").columns) == ev.RESULT_COLUMNS
    for _, row in df.iterrows():
        image = read_image(image_dir / row["image"])
        assert (row["height"], row["width"]) == tuple(image.shape[1:])
        enc = tiny_model.compress(image.float().div(255).unsqueeze(0))
        n_bytes = sum(len(s) for group in enc["strings"] for s in group)
        assert row["bytes"] == n_bytes
        assert row["bpp"] == 8 * n_bytes / (row["height"] * row["width"])
        assert math.isfinite(row["psnr"]) and row["psnr"] > 0
        assert math.isfinite(row["bpp_estimated"]) and row["bpp_estimated"] > 0
        assert math.isnan(row["ms_ssim"])
        assert row["enc_time_s"] > 0 and row["dec_time_s"] > 0
    doc = json.loads((tmp_path / "fixed-rate.json").read_text())
    assert set(doc) == {"name", "description", "results"}
    assert set(doc["results"]) == {"psnr-rgb", "ms-ssim-rgb", "bpp", "encoding_time", "decoding_time"}
    assert doc["results"]["bpp"] == [pytest.approx(df["bpp"].mean())]
    assert doc["results"]["ms-ssim-rgb"] == [None]


def test_psnr_is_on_rounded_8bit():
    a = torch.zeros(3, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, 0] = 10
    assert ev.psnr_rgb(a, b) == pytest.approx(10 * math.log10(255**2 / (100 / 48)))
    assert ev.psnr_rgb(a, a) == math.inf


def test_ms_ssim_on_large_image():
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.integers(0, 256, (3, 170, 170), dtype=np.uint8))
    assert ev.ms_ssim_rgb(a, a) == pytest.approx(1.0, abs=1e-5)
    noisy = (a.int() + 20).clamp(0, 255).to(torch.uint8)
    assert 0 < ev.ms_ssim_rgb(a, noisy) < 1


class _FailsOnSecondImage(torch.nn.Module):
    """Wraps a codec; ``compress`` raises on its second call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def update(self, force=False):
        return self.inner.update(force=force)

    def forward(self, x):
        return self.inner(x)

    def compress(self, x):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("simulated failure")
        return self.inner.compress(x)

    def decompress(self, *args):
        return self.inner.decompress(*args)


class _BrokenUpdate(torch.nn.Module):
    def update(self, force=False):
        raise RuntimeError("no tables")


def test_failure_mid_evaluation_keeps_rows(tiny_model, image_dir, tmp_path):
    models = {"flaky": _FailsOnSecondImage(tiny_model), "broken": _BrokenUpdate()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = ev.evaluate_models(models, image_dir, tmp_path, estimate_bpp=False, progress=False)
    on_disk = pd.read_csv(tmp_path / "results.csv").fillna({"error": ""})
    assert len(df) == len(on_disk) == 4
    flaky = on_disk[on_disk["model"] == "flaky"]
    assert (flaky["error"] == "").sum() == 1 and flaky["error"].str.contains("simulated").sum() == 1
    assert on_disk[on_disk["model"] == "broken"]["error"].str.contains("no tables").all()
    summary = ev.summarize(df)
    assert summary["model"].tolist() == ["flaky"] and summary["n_images"].tolist() == [1]
    # resuming skips the pair already done and retries the failed one
    df2 = ev.evaluate_models({"flaky": _FailsOnSecondImage(tiny_model)}, image_dir, tmp_path,
                             estimate_bpp=False, resume=True, progress=False, write_json=False)
    assert len(df2) == 5 and (df2[df2["model"] == "flaky"]["error"] == "").sum() == 2


# ------------------------------------------------------------------ classical codecs
@pytest.mark.parametrize("codec", ["jpeg", "webp", "avif"])
def test_classical_round_trip(codec, image_dir):
    if codec == "avif" and not ev.avif_available():
        pytest.skip("Pillow without AVIF")
    image = read_image(image_dir / "b.png")
    low, high = (ev.code_classical(image, codec, q) for q in (10, 90))
    spec = ev.CLASSICAL_CODECS[codec]
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, spec["format"], quality=10, **spec["options"])
    assert low["bytes"] == len(buf.getvalue())
    for row in (low, high):
        assert (row["height"], row["width"]) == tuple(image.shape[1:])
        assert row["bpp"] == 8 * row["bytes"] / (row["height"] * row["width"])
    assert high["psnr"] > low["psnr"] and high["bytes"] > low["bytes"]


def test_evaluate_classical_writes_csv_and_json(image_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = ev.evaluate_classical(image_dir, tmp_path, ("jpeg", "webp"), {"jpeg": [20, 80], "webp": [20, 80]},
                                   progress=False)
    assert len(df) == 8 and (df["error"] == "").all()
    summary = ev.summarize(df)
    assert summary["model"].tolist() == ["jpeg-q20", "jpeg-q80", "webp-q20", "webp-q80"]
    doc = json.loads((tmp_path / "jpeg.json").read_text())
    assert doc["results"]["bpp"] == sorted(doc["results"]["bpp"]) and len(doc["results"]["bpp"]) == 2
    assert "subsampling" in doc["description"]


# ------------------------------------------------------------------ bad input
def test_empty_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        ev.find_images(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="notes.txt"), pytest.raises(ValueError, match="no images"):
        ev.evaluate_classical(tmp_path, tmp_path / "out", ("jpeg",))
    with pytest.raises(FileNotFoundError):
        ev.find_images(tmp_path / "missing")


def test_non_image_skipped_grayscale_and_tiny_images(tiny_model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (17, 23, 4), dtype=np.uint8), mode="RGBA").save(folder / "tiny.png")
    (folder / "readme.txt").write_text("hello")
    with pytest.warns(UserWarning, match="readme.txt"):
        found = ev.find_images(folder)
    assert [p.name for p in found] == ["gray.png", "tiny.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = ev.evaluate_models({"m": tiny_model}, folder, tmp_path / "out", estimate_bpp=False, progress=False)
        cl = ev.evaluate_classical(folder, tmp_path / "out", ("jpeg",), {"jpeg": [50]}, progress=False)
    for frame in (df, cl):
        assert (frame["error"] == "").all()
        assert frame.set_index("image").loc["tiny.png", ["height", "width"]].tolist() == [17, 23]
        assert np.isfinite(frame["psnr"]).all()


def test_read_image_modes(tmp_path):
    gray16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    img = read_image(tmp_path / "g16.png")
    assert img.dtype == torch.uint8 and img.shape == (3, 3, 4)
    assert img[0, 2, 3].item() == round(55000 / 65535 * 255) and torch.equal(img[0], img[2])
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (3, 5, 6)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="bad.png"):
        read_image(tmp_path / "bad.png")


# ------------------------------------------------------------------ complexity and figures
def test_complexity_and_figures(tiny_model, tmp_path):
    image = torch.from_numpy(_source_image()[:64, :64].copy()).permute(2, 0, 1).contiguous()
    cx = measure_complexity({"STF": tiny_model}, image, repeats=1, warmup=0, out_path=tmp_path / "cx.csv")
    assert list(cx.columns) == COMPLEXITY_COLUMNS and cx["part"].tolist() == ["encoder", "decoder"]
    assert (cx["flops"] > 0).all() and (cx["time_ms"] > 0).all()
    assert (cx["params"] <= cx["params_total"]).all() and (cx["params"] > 0).all()
    assert (tmp_path / "cx.csv").exists()

    summary = pd.DataFrame({"method": ["fixed-rate"] * 3 + ["jpeg"] * 3, "model": list("abcdef"),
                            "bpp": [0.2, 0.4, 0.8, 0.3, 0.6, 1.5], "psnr": [30, 32, 35, 27, 30, 34],
                            "ms_ssim_db": [12, 14, 17, 10, 12, 15]})
    figs = plot_rd_curves(summary, tmp_path)
    _, bar_paths = plot_parameter_bars([
        {"method": "fixed-rate", "trainable": 99_855_639, "stored_per_rate": 99_855_639,
         "stored_all_rates": 6 * 99_855_639},
        {"method": "alice", "trainable": 1_200_000, "stored_per_rate": 1_200_000,
         "stored_all_rates": 99_855_639 + 6 * 1_200_000},
        {"method": "malice", "trainable": 0, "stored_per_rate": 99_855_639, "stored_all_rates": 6 * 99_855_639},
    ], tmp_path)
    _, table_paths = plot_complexity_table(cx, tmp_path)
    paths = [p for _, ps in figs.values() for p in ps] + bar_paths + table_paths
    assert {p.name for p in paths} == {f"{s}.{e}" for s in ("rd_psnr", "rd_msssim", "parameters", "complexity")
                                        for e in ("png", "pdf")}
    assert all(p.stat().st_size > 1000 for p in paths)
