"""Evaluation: metrics, real bitstreams, padding, classical codecs, curves, BD, tables, report, figures."""

from __future__ import annotations

import ast
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

from alice_lib import evaluation as ev
from alice_lib.data import read_image
from alice_lib.evaluation import tables as ev_tables
from alice_lib.figures import ANCHOR_STYLE, plot_complexity_table, plot_parameter_bars, plot_rd_curves
from alice_lib.models.stf import STFConfig, SymmetricalTransFormer

PACKAGE = Path(ev.__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:MS-SSIM needs both sides")
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


# ------------------------------------------------------------------ BD
BPP = [0.12, 0.2, 0.31, 0.45, 0.66, 0.9]
PSNR = [29.0, 30.4, 32.0, 33.8, 35.7, 37.6]


def _cubic_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anchor: ln(rate) an exact cubic of PSNR. Test: the same plus 0.05 + 0.01 (P - 32), on the same PSNRs.

    Hand computation of the classic BD-rate (VCEG-M33: fit ln R as a cubic of PSNR, integrate
    the difference over the common PSNR range [28, 38], average, exponentiate): the fits are
    exact, the mean difference is 0.05 + 0.01 * ((38-32)^2 - (28-32)^2) / 2 / 10 = 0.06, so
    BD-rate = 100 (e^0.06 - 1) = 6.1837 %.
    """
    p = np.array([28.0, 30.0, 32.0, 34.0, 36.0, 38.0])
    x = p - 28
    ln_anchor = math.log(0.1) + 0.25 * x - 0.002 * x**2 + 0.0003 * x**3
    ln_test = ln_anchor + 0.05 + 0.01 * (p - 32)
    return p, np.exp(ln_anchor), np.exp(ln_test)


def test_bd_cubic_matches_the_hand_computed_value():
    p, rate_anchor, rate_test = _cubic_case()
    assert ev.bd_rate(rate_anchor, p, rate_test, p, method="cubic") == pytest.approx(100 * (math.exp(0.06) - 1),
                                                                                      abs=1e-6)


def test_bd_cubic_psnr_of_a_shifted_log_linear_curve():
    """PSNR = 20 + 4 ln R, test 0.5 dB higher: BD-PSNR = 0.5 dB and BD-rate = 100 (e^(-0.5/4) - 1), exactly."""
    rate = np.array(BPP)
    psnr = 20 + 4 * np.log(rate)
    assert ev.bd_psnr(rate, psnr, rate, psnr + 0.5, method="cubic") == pytest.approx(0.5, abs=1e-9)
    assert ev.bd_rate(rate, psnr, rate, psnr + 0.5, method="cubic") == pytest.approx(
        100 * (math.exp(-0.5 / 4) - 1), abs=1e-9)


def test_bd_akima_is_close_to_cubic_on_smooth_data():
    p, rate_anchor, rate_test = _cubic_case()
    cubic = ev.bd_rate(rate_anchor, p, rate_test, p, method="cubic")
    akima = ev.bd_rate(rate_anchor, p, rate_test, p, method="akima")
    assert akima != cubic  # two methods, not one twice
    assert akima == pytest.approx(cubic, abs=0.1)


@pytest.mark.parametrize("method", ["cubic", "akima", "pchip"])
def test_bd_of_a_curve_against_itself_is_zero(method):
    assert ev.bd_rate(BPP, PSNR, BPP, PSNR, method=method) == pytest.approx(0.0, abs=1e-9)
    assert ev.bd_psnr(BPP, PSNR, BPP, PSNR, method=method) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", ["cubic", "akima", "pchip"])
def test_bd_of_rates_ten_percent_higher_is_ten_percent(method):
    worse = [1.1 * r for r in BPP]
    assert ev.bd_rate(BPP, PSNR, worse, PSNR, method=method) == pytest.approx(10.0, abs=1e-6)
    assert ev.bd_rate(worse, PSNR, BPP, PSNR, method=method) == pytest.approx(100 / 1.1 - 100, abs=1e-6)
    assert ev.bd_psnr(BPP, PSNR, worse, PSNR, method=method) < 0


def test_bd_handles_unsorted_points_and_says_why_it_is_nan():
    order = [3, 0, 5, 1, 4, 2]
    rate = ev.bd_rate(BPP, PSNR, [1.1 * BPP[i] for i in order], [PSNR[i] for i in order])
    assert rate == pytest.approx(10.0, abs=1e-6)
    with pytest.warns(UserWarning, match="cubic needs 4 points"):
        assert math.isnan(ev.bd_rate(BPP, PSNR, BPP[:3], PSNR[:3], method="cubic"))
    assert math.isfinite(ev.bd_rate(BPP, PSNR, BPP[:3], PSNR[:3], method="akima"))
    with pytest.raises(ValueError, match="BD method"):
        ev.bd_rate(BPP, PSNR, BPP, PSNR, method="linear")


# ------------------------------------------------------------------ curves: the anchor is its own point
ANCHOR_POINT = (1.3, 39.0)


def _summary(alice_factor: float = 1.1) -> pd.DataFrame:
    """Fixed-rate and ALICE at five target rates (ALICE ``alice_factor`` x the bits), the anchor, JPEG."""
    rows = [{"method": "anchor", "model": "anchor", "bpp": ANCHOR_POINT[0], "psnr": ANCHOR_POINT[1],
             "ms_ssim_db": ANCHOR_POINT[1] / 2}]
    for i, (b, p) in enumerate(zip(BPP[:5], PSNR[:5])):
        rows.append({"method": "fixed-rate", "model": f"f{i}", "bpp": b, "psnr": p, "ms_ssim_db": p / 2})
        rows.append({"method": "alice", "model": f"a{i}", "bpp": alice_factor * b, "psnr": p, "ms_ssim_db": p / 2})
        rows.append({"method": "jpeg", "model": f"j{i}", "bpp": 1.8 * b, "psnr": p - 1, "ms_ssim_db": p / 2})
    return pd.DataFrame(rows)


def test_curves_are_the_adapted_models_only_unless_asked():
    summary = _summary()
    curves = ev.rd_curves(summary)
    assert "anchor" not in curves and len(curves["alice"]) == 5 and len(curves["fixed-rate"]) == 5
    assert ANCHOR_POINT[0] not in set(curves["alice"]["bpp"])
    assert curves["alice"]["bpp"].is_monotonic_increasing
    with_anchor = ev.rd_curves(summary, curves_include_anchor=True)
    assert len(with_anchor["alice"]) == 6 and ANCHOR_POINT[0] in set(with_anchor["alice"]["bpp"])
    assert len(with_anchor["jpeg"]) == 5  # a classical codec never gets the learned anchor
    assert ev.anchor_points(summary)["bpp"].tolist() == [ANCHOR_POINT[0]]


def test_bd_table_names_its_method_and_keeps_the_anchor_variant_apart():
    table = ev.bd_table(_summary(), [("alice", "fixed-rate"), ("alice", "jpeg")])
    assert list(table.columns) == ev.BD_COLUMNS
    assert set(table["bd_method"]) == {"cubic", "akima"} and set(table["curves"]) == {"adapted"}
    main = table[(table["anchor"] == "fixed-rate")].set_index("bd_method")
    assert main.loc["cubic", "bd_rate_pct"] == pytest.approx(10.0, abs=1e-6)
    assert main.loc["akima", "bd_rate_pct"] == pytest.approx(10.0, abs=1e-6)
    assert (main["n_points"] == 5).all() and (main["n_anchor_points"] == 5).all()

    both = ev.bd_table(_summary(), [("alice", "fixed-rate")], bd_methods=["akima"], curves_include_anchor=True)
    by_curves = both.set_index("curves")
    assert by_curves.loc["adapted", "bd_rate_pct"] == pytest.approx(10.0, abs=1e-6)
    # the shared anchor point widens the overlap and pulls BD-rate towards 0: why it is kept apart
    assert 0 < by_curves.loc["with anchor", "bd_rate_pct"] < 9.0
    assert by_curves.loc["with anchor", "n_points"] == 6


def test_bd_table_default_pairs_and_nan_notes():
    table = ev.bd_table(_summary())
    assert {("alice", "fixed-rate"), ("fixed-rate", "jpeg"), ("alice", "jpeg")} == set(zip(table["method"],
                                                                                         table["anchor"]))
    few = _summary()
    few = few[~((few["method"] == "alice") & (few["bpp"] > 0.3))]  # two ALICE points left
    row = ev.bd_table(few, [("alice", "fixed-rate")]).set_index("bd_method")
    assert math.isnan(row.loc["cubic", "bd_rate_pct"]) and "4 points" in row.loc["cubic", "note"]
    assert math.isfinite(row.loc["akima", "bd_rate_pct"])
    with pytest.raises(KeyError, match="vanilla"):
        ev.bd_table(_summary(), [("vanilla", "fixed-rate")])
    with_published = pd.concat([_summary(), ev.published_points()], ignore_index=True)
    pub = ev.bd_table(with_published, [("alice", "stf-published")], bd_methods=["akima"])
    assert math.isfinite(pub.loc[0, "bd_rate_pct"])


def test_published_points_are_the_stf_table():
    df = ev.published_points()
    assert df["bpp"].tolist() == [0.124, 0.191, 0.298, 0.441, 0.651, 0.903]
    assert df["psnr"].tolist() == [29.14, 30.50, 32.15, 33.97, 35.82, 37.72]
    assert "Zou" in df["source"].iloc[0]


# ------------------------------------------------------------------ metrics
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
    with pytest.warns(UserWarning, match="MS-SSIM"):
        assert math.isnan(ev.ms_ssim_rgb(a[:, :100, :100], a[:, :100, :100]))


# ------------------------------------------------------------------ learned codec, padding
def test_evaluate_tiny_stf_bpp_is_real_bytes(tiny_model, image_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MS-SSIM is NaN under 161 px, on purpose
        df = ev.evaluate_models({"stf-a": tiny_model}, image_dir, tmp_path, methods={"stf-a": "fixed-rate"},
                                lmbdas={"stf-a": 0.0018}, progress=False)
    assert len(df) == 2 and (df["error"] == "").all() and (df["padding"] == "replicate").all()
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


def test_reference_padding_is_centred_zeros_to_128():
    x = torch.rand(1, 3, 70, 96)
    padded, pads = ev.pad_reference(x)
    assert padded.shape[-2:] == (128, 128) and pads == (16, 16, 29, 29)
    assert torch.equal(padded[..., 29:99, 16:112], x)
    assert padded[..., :29, :].abs().sum() == 0 and padded[..., :, :16].abs().sum() == 0
    assert torch.equal(ev.crop_reference(padded, pads), x)
    same, none = ev.pad_reference(torch.rand(1, 3, 128, 256))
    assert none == (0, 0, 0, 0) and same.shape[-2:] == (128, 256)


class _Recorder(torch.nn.Module):
    """Passes through to a codec and records the input size ``compress`` saw."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        return self.inner(x)

    def compress(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        return self.inner.compress(x)

    def decompress(self, *args):
        return self.inner.decompress(*args)


def test_code_image_with_reference_padding(tiny_model, image_dir):
    image = read_image(image_dir / "b.png")  # 70 x 96
    model = _Recorder(tiny_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ev.code_image(model, image, padding="reference")
        rep = ev.code_image(model, image, padding="replicate")
    assert model.seen == [(128, 128), (70, 96)]
    padded, _ = ev.pad_reference(image.float().div(255).unsqueeze(0))
    enc = tiny_model.compress(padded)
    n_bytes = sum(len(s) for group in enc["strings"] for s in group)
    assert ref["bytes"] == n_bytes and ref["bpp"] == 8 * n_bytes / (70 * 96)  # bpp on the original size
    assert ref["padding"] == "reference" and rep["padding"] == "replicate"
    assert math.isfinite(ref["psnr"]) and ref["bytes"] != rep["bytes"]
    with pytest.raises(ValueError, match="padding"):
        ev.code_image(tiny_model, image, padding="mirror")


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


def test_failure_mid_evaluation_keeps_rows_and_resume_retries(tiny_model, image_dir, tmp_path):
    def unloadable():
        raise FileNotFoundError("no weights")

    models = {"flaky": _FailsOnSecondImage(tiny_model), "broken": _BrokenUpdate(), "missing": unloadable}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = ev.evaluate_models(models, image_dir, tmp_path, estimate_bpp=False, progress=False)
    on_disk = pd.read_csv(tmp_path / "results.csv").fillna({"error": ""})
    assert len(df) == len(on_disk) == 6
    flaky = on_disk[on_disk["model"] == "flaky"]
    assert (flaky["error"] == "").sum() == 1 and flaky["error"].str.contains("simulated").sum() == 1
    assert on_disk[on_disk["model"] == "broken"]["error"].str.contains("no tables").all()
    assert on_disk[on_disk["model"] == "missing"]["error"].str.contains("no weights").all()
    summary = ev.summarize(df)
    assert summary["model"].tolist() == ["flaky"] and summary["n_images"].tolist() == [1]
    loads = []
    df2 = ev.evaluate_models({"flaky": lambda: loads.append(1) or _FailsOnSecondImage(tiny_model)}, image_dir,
                             tmp_path, estimate_bpp=False, resume=True, progress=False)
    assert loads == [1] and len(df2) == 7 and (df2[df2["model"] == "flaky"]["error"] == "").sum() == 2
    ev.evaluate_models({"flaky": lambda: loads.append(2)}, image_dir, tmp_path, resume=True, progress=False)
    assert loads == [1]  # nothing left to code: the model is not even built


def test_resume_keeps_rows_of_the_same_padding_and_recodes_another(tiny_model, image_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev.evaluate_models({"m": tiny_model}, image_dir, tmp_path, estimate_bpp=False, progress=False)
        kept = ev.evaluate_models({"m": lambda: pytest.fail("recoded")}, image_dir, tmp_path, resume=True,
                                  progress=False)
        assert len(kept) == 2 and (kept["padding"] == "replicate").all()
        with pytest.warns(UserWarning, match="another padding"):
            redone = ev.evaluate_models({"m": tiny_model}, image_dir, tmp_path, padding="reference",
                                        estimate_bpp=False, resume=True, progress=False)
    assert len(redone) == 2 and (redone["padding"] == "reference").all()


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


def test_evaluate_classical_writes_one_row_per_codec_quality_image(image_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = ev.evaluate_classical(image_dir, tmp_path, ("jpeg", "webp"), {"jpeg": [20, 80], "webp": [20, 80]},
                                   progress=False)
    assert len(df) == 8 and (df["error"] == "").all()
    assert ev.summarize(df)["model"].tolist() == ["jpeg-q20", "jpeg-q80", "webp-q20", "webp-q80"]
    with pytest.raises(ValueError, match="unknown codec"):
        ev.evaluate_classical(image_dir, tmp_path, ("jpeg2000",))


# ------------------------------------------------------------------ bad input
def test_empty_and_missing_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images"):
        ev.evaluate_classical(tmp_path, tmp_path / "out", ("jpeg",))
    with pytest.raises(FileNotFoundError):
        ev.evaluate_classical(tmp_path / "missing", tmp_path / "out", ("jpeg",))


def test_grayscale_tiny_and_broken_images(tiny_model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (17, 23, 4), dtype=np.uint8), mode="RGBA").save(folder / "tiny.png")
    (folder / "readme.txt").write_text("hello")
    (folder / "broken.png").write_bytes(b"\x89PNG garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = ev.evaluate_models({"m": tiny_model}, folder, tmp_path / "out", estimate_bpp=False, progress=False)
        cl = ev.evaluate_classical(folder, tmp_path / "out", ("jpeg",), {"jpeg": [50]}, progress=False)
    for frame in (df, cl):
        assert sorted(frame["image"]) == ["broken.png", "gray.png", "tiny.png"]
        good = frame[frame["image"] != "broken.png"]
        assert (good["error"] == "").all() and np.isfinite(good["psnr"]).all()
        assert good.set_index("image").loc["tiny.png", ["height", "width"]].tolist() == [17, 23]
        assert "broken.png" in frame.set_index("image").loc["broken.png", "error"]


# ------------------------------------------------------------------ one evaluation, its tables, the report
@pytest.fixture(scope="module")
def evaluated(tiny_model, image_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval")
    entries = [ev.ModelEntry("anchor", "anchor", 0.0483, lambda: tiny_model),
               ev.ModelEntry("alice-0.0067", "alice", 0.0067, lambda: tiny_model)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = ev.evaluate(entries, image_dir, out, classical=("jpeg",), qualities={"jpeg": [20, 40, 60, 80]},
                             bd_pairs=[("jpeg", "jpeg")], progress=False)
    return out, result


def test_evaluate_writes_every_table_once_from_the_one_function(evaluated):
    out, result = evaluated
    rows = pd.concat([result["results"], result["classical"]], ignore_index=True)
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), ev.summarize(rows), check_dtype=False)
    assert set(result["summary"]["method"]) == {"anchor", "alice", "jpeg"}
    on_disk = pd.read_csv(out / "bd_rate.csv")
    assert {"method", "anchor", "bd_method", "bd_rate_pct", "bd_psnr_db"} <= set(on_disk.columns)
    again = ev.bd_table(pd.read_csv(out / "summary.csv"), [("jpeg", "jpeg")])
    assert np.allclose(on_disk["bd_rate_pct"], again["bd_rate_pct"], atol=1e-4)
    assert np.allclose(on_disk["bd_rate_pct"], 0.0, atol=1e-4)
    doc = json.loads((out / "alice.json").read_text())
    assert set(doc) == {"name", "description", "results"}
    assert set(doc["results"]) == {"psnr-rgb", "ms-ssim-rgb", "bpp", "encoding_time", "decoding_time"}
    assert doc["results"]["bpp"] == [pytest.approx(result["results"].query("method == 'alice'")["bpp"].mean())]
    assert doc["results"]["ms-ssim-rgb"] == [None]  # 64 px images: no five-scale MS-SSIM
    jpeg = json.loads((out / "jpeg.json").read_text())
    assert jpeg["results"]["bpp"] == sorted(jpeg["results"]["bpp"]) and "subsampling" in jpeg["description"]
    assert json.loads((out / "anchor.json").read_text())["results"]["bpp"] != []


def test_target_table_compares_each_lambda_on_the_images_both_coded():
    rows = [("fixed-rate", 0.0018, "a", 0.10, 30.0, ""), ("fixed-rate", 0.0018, "b", 0.20, 30.0, ""),
            ("fixed-rate", 0.025, "a", 0.50, 33.0, ""),
            # 0.0018 after a CSV round trip and float arithmetic is still the same target.
            ("alice", 0.0018000000000000002, "a", 0.20, 32.0, ""), ("alice", 0.0018, "b", 0.40, 32.0, ""),
            ("alice", 0.0018, "c", 9.90, 10.0, ""),          # the reference never coded image c
            ("alice", 0.0018, "b", 5.00, 5.0, "boom"),       # a failed row counts for nothing
            ("alice", 0.0067, "a", 0.30, 31.0, "")]          # no reference at 0.0067
    results = pd.DataFrame(rows, columns=["method", "lmbda", "image", "bpp", "psnr", "error"])
    table = ev.target_table(results)
    assert list(table.columns) == ev.TARGET_COLUMNS
    assert len(table) == 1  # only alice at 0.0018: vanilla and malice are absent, 0.0067 has no reference
    row = table.iloc[0]
    assert (row["method"], row["reference"], row["lmbda"], row["n_images"]) == ("alice", "fixed-rate", 0.0018, 2)
    assert row["rate_ratio"] == pytest.approx(0.30 / 0.15)
    assert row["psnr_delta_db"] == pytest.approx(2.0)
    weight = 0.0018 * 255**2  # lambda * 255^2 * MSE, the MSE on [0, 1] from the PSNR
    assert row["ref_rd_loss"] == pytest.approx(0.15 + weight * 1e-3)
    assert row["rd_loss"] == pytest.approx(0.30 + weight * 10**-3.2)
    assert row["rd_loss_ratio"] == pytest.approx(row["rd_loss"] / row["ref_rd_loss"])
    assert ev.target_table(results[results["method"] != "fixed-rate"]).empty


def test_report_copies_the_tables_and_figures_read_them_without_recomputing(evaluated, tmp_path, monkeypatch):
    out, result = evaluated
    tables = ev.publish_tables(out, tmp_path / "report")
    for name in ("summary.csv", "bd_rate.csv", "targets.csv", "alice.json", "jpeg.json", "anchor.json"):
        assert (tmp_path / "report" / name).read_bytes() == (out / name).read_bytes(), name
    assert len(pd.read_csv(tmp_path / "report" / "results.csv")) == len(result["results"]) + len(result["classical"])

    def forbidden(*_args, **_kwargs):
        raise AssertionError("05_figures must read the tables 04_evaluate wrote, not recompute them")

    for module in (ev_tables, ev, "alice_lib.evaluation.run"):
        monkeypatch.setattr(module if not isinstance(module, str) else __import__(module, fromlist=["x"]),
                            "summarize", forbidden)
    monkeypatch.setattr("alice_lib.evaluation.run.bd_table", forbidden)
    monkeypatch.setattr("alice_lib.evaluation.bd.bd_value", forbidden)
    back = ev.read_tables(tmp_path / "report")  # what 05_figures does
    pd.testing.assert_frame_equal(back.bd, pd.read_csv(out / "bd_rate.csv"))
    pd.testing.assert_frame_equal(back.summary, tables.summary)
    figs = plot_rd_curves(back.summary, tmp_path / "report")
    assert all(p.stat().st_size > 1000 for _, paths in figs.values() for p in paths)
    with pytest.raises(FileNotFoundError, match="04_evaluate"):
        ev.read_tables(tmp_path / "nowhere")


def _functions_defined(name: str) -> list[str]:
    hits = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        hits += [str(path.relative_to(PACKAGE)) for node in ast.walk(tree)
                 if isinstance(node, ast.FunctionDef) and node.name == name]
    return hits


@pytest.mark.parametrize("name", ["summarize", "bd_table", "write_compressai_json", "code_image", "psnr_rgb"])
def test_each_table_has_exactly_one_function(name):
    assert _functions_defined(name) == [f"evaluation/{_HOME[name]}.py"]


_HOME = {"summarize": "tables", "bd_table": "bd", "write_compressai_json": "tables", "code_image": "coding",
         "psnr_rgb": "metrics"}


def test_evaluation_never_imports_figures_or_pipeline():
    for path in (PACKAGE / "evaluation").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                assert not any(bad in module for bad in ("figures", "pipeline")), f"{path.name}: {module}"


# ------------------------------------------------------------------ complexity and figures
def test_complexity_and_figures(tiny_model, tmp_path):
    image = torch.from_numpy(_source_image()[:64, :64].copy()).permute(2, 0, 1).contiguous()
    cx = ev.measure_complexity({"STF": tiny_model}, image, repeats=1, warmup=0, out_path=tmp_path / "cx.csv")
    assert list(cx.columns) == ev.COMPLEXITY_COLUMNS and cx["part"].tolist() == ["encoder", "decoder"]
    assert (cx["flops"] > 0).all() and (cx["time_ms"] > 0).all()
    assert (cx["params"] <= cx["params_total"]).all() and (cx["params"] > 0).all()
    assert (tmp_path / "cx.csv").exists()

    figs = plot_rd_curves(_summary(), tmp_path)
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


def test_rd_figure_draws_the_anchor_as_its_own_marker(tmp_path):
    fig, _ = plot_rd_curves(_summary(), tmp_path, published=False)["psnr"]
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    anchor = lines[ANCHOR_STYLE["label"]]  # the test summary has no lambda column
    assert anchor.get_marker() == "*" and anchor.get_linestyle() == "None"
    assert list(anchor.get_xdata()) == [ANCHOR_POINT[0]]
    assert ANCHOR_POINT[0] not in list(lines["ALICE"].get_xdata())
    fig, _ = plot_rd_curves(_summary(), tmp_path, published=False, curves_include_anchor=True)["psnr"]
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert ANCHOR_POINT[0] in list(lines["ALICE"].get_xdata())
    assert lines[ANCHOR_STYLE["label"]].get_marker() == "*"


def test_rd_figure_names_the_references_by_their_source(tmp_path):
    """The fixed-rate curve of a profile whose references are fine-tuned from the anchor says so."""
    from alice_lib.pipeline import curve_labels
    from alice_lib.settings import load_settings

    labels = curve_labels(load_settings("cpu"))
    assert labels == {"fixed-rate": "STF, fixed-rate: every weight fine-tuned from the anchor"}
    assert curve_labels(load_settings("cpu", {"references.source": "scratch"})) == {}
    fig, _ = plot_rd_curves(_summary(), tmp_path, published=False, labels=labels)["psnr"]
    legend = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert labels["fixed-rate"] in legend and "STF, fixed-rate models" not in legend and "ALICE" in legend


# ------------------------------------------------------------------ rate-control measurement (moved from the codec)
def test_interpolation_bd_rates_of_points_on_the_trained_curve():
    from alice_lib.evaluation.rate_control import interpolation_bd_rates

    trained = [{"mode": "trained", "control": c, "bpp": b, "psnr": p} for c, b, p in zip(range(6), BPP, PSNR)]
    # points exactly on the trained curve's PSNR = f(log rate) line segments at mid-rates: about 0
    mids = [{"mode": "interpolate", "control": c + 0.5, "bpp": math.sqrt(BPP[c] * BPP[c + 1]),
             "psnr": (PSNR[c] + PSNR[c + 1]) / 2} for c in range(5)]
    worse = [{**m, "mode": "alpha", "bpp": 1.2 * m["bpp"]} for m in mids]
    table = interpolation_bd_rates(pd.DataFrame(trained + mids + worse)).set_index("mode")
    assert abs(table.loc["interpolate", "bd_rate_pct"]) < 2.0
    assert table.loc["alpha", "bd_rate_pct"] == pytest.approx(table.loc["interpolate", "bd_rate_pct"] * 1.2 + 20,
                                                              abs=0.5)
    assert (table["bd_method"] == "akima").all() and (table["n_trained"] == 6).all()


def test_flop_count_includes_fused_cpu_attention():
    """scaled_dot_product_attention's fused CPU kernel counts like explicit Q K^T and A V."""
    import torch.nn.functional as F

    from alice_lib.evaluation.complexity import count_flops

    q, k, v = torch.randn(8, 3, 16, 4), torch.randn(8, 3, 16, 4), torch.randn(8, 3, 16, 4)
    mask = torch.zeros(8, 1, 16, 16)
    fused = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    explicit = count_flops(lambda: (q @ k.transpose(-2, -1) + mask).softmax(-1) @ v)
    assert fused == explicit == 2 * 2 * 8 * 3 * 16 * 16 * 4
