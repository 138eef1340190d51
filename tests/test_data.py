"""Tests of alice_lib.data and .data_sources: odd image files, Kodak checksums and download, sources, summaries."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alice_lib import data, data_sources
from alice_lib.data import ImageFolder, dataset_summary, list_images, read_image, thumbnail_grid, to_rgb
from alice_lib.data_sources import (ChecksumError, DataSource, FallbackDataWarning, NotKodakWarning, download_kodak,
                                    resolve_kodak, resolve_training, verify_kodak)


# --------------------------------------------------------------------------- helpers

def _rng_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_bytes(h: int = 24, w: int = 32, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_rng_rgb(h, w, seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Never touch the real <repo>/data or the network unless a test asks for it."""
    monkeypatch.setenv("ALICE_OFFLINE", "1")
    monkeypatch.setattr(data_sources, "DATA_ROOT", tmp_path / "repo_data")
    monkeypatch.setattr(data_sources, "SHARED_ROOT", tmp_path / "no_shared")


@pytest.fixture
def fake_kodak(monkeypatch):
    """A two-file 'Kodak' table: (name -> bytes), patched into KODAK_SHA256."""
    files = {"kodim01.png": _png_bytes(seed=1), "kodim02.png": _png_bytes(seed=2)}
    monkeypatch.setattr(data_sources, "KODAK_SHA256", {name: _sha(blob) for name, blob in files.items()})
    return files


class _Server:
    """A static HTTP server on 127.0.0.1 in a thread, counting requests per path."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.hits = files, {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                name = self.path.rsplit("/", 1)[-1]
                outer.hits[name] = outer.hits.get(name, 0) + 1
                blob = outer.files.get(name)
                if blob is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/kodak/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------- odd image files

def _write_odd_images(folder: Path) -> dict[str, str]:
    """One file per awkward case; returns name -> case."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = _rng_rgb(48, 64)
    Image.fromarray(rgb).save(folder / "a_rgb.png")
    Image.fromarray(rgb).convert("L").save(folder / "b_gray.png")
    rgba = np.dstack([rgb, np.full((48, 64), 128, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(folder / "c_rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "d_palette.png")
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(folder / "e_palette_transparent.png", transparency=0)
    Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)).save(folder / "f_16bit.png")
    Image.fromarray(rgb).save(folder / "g_rgb.jpg", quality=90)
    Image.fromarray(_rng_rgb(16, 16)).save(folder / "h_small.png")
    (folder / "i_not_an_image.png").write_bytes(b"this is not a PNG file at all")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return {"a_rgb.png": "RGB", "b_gray.png": "L", "c_rgba.png": "RGBA", "d_palette.png": "P",
            "e_palette_transparent.png": "P", "f_16bit.png": "I;16", "g_rgb.jpg": "RGB"}


def test_odd_files_are_converted_or_skipped_with_a_warning(tmp_path):
    folder = tmp_path / "odd"
    usable = _write_odd_images(folder)
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\).*h_small.png \(16x16 < 32\).*i_not_an_image"):
        dataset = ImageFolder(folder, crop=32, train=True)
    assert sorted(p.name for p in dataset.files) == sorted(usable)
    for index in range(len(dataset)):
        patch = dataset[index]
        assert patch.shape == (3, 32, 32) and patch.dtype == torch.float32
        assert 0.0 <= patch.min() and patch.max() <= 1.0
    centre = ImageFolder(folder, crop=32, train=False, max_images=3)
    assert len(centre) == 3 and torch.equal(centre[0], centre[0])


def test_modes_as_rgb(tmp_path):
    folder = tmp_path / "odd"
    usable = _write_odd_images(folder)
    for name, mode in usable.items():
        with Image.open(folder / name) as image:
            assert image.mode == mode, name
        tensor = read_image(folder / name)
        assert tensor.shape == (3, 48, 64) and tensor.dtype == torch.uint8, name
    # 16-bit: the 8 most significant bits, not clipped at 255
    sixteen = np.asarray(Image.open(folder / "f_16bit.png"), dtype=np.int64)
    assert torch.equal(read_image(folder / "f_16bit.png")[0], torch.from_numpy(sixteen >> 8).to(torch.uint8))
    # transparency is composited onto white
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(to_rgb(clear)).min() == 255
    # float images in [0, 1] become 0..255
    assert np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 1.0, np.float32), mode="F"))).min() == 255


def test_not_an_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a readable image"):
        read_image(bad)


def test_truncated_file_is_dropped_at_load_time(tmp_path):
    folder = tmp_path / "trunc"
    folder.mkdir()
    Image.fromarray(_rng_rgb(40, 40, seed=3)).save(folder / "a_good.png")
    blob = _png_bytes(40, 40, seed=4)
    (folder / "b_truncated.png").write_bytes(blob[: len(blob) // 2])  # header reads, pixels do not
    dataset = ImageFolder(folder, crop=32, train=False)
    assert len(dataset) == 2
    with pytest.warns(UserWarning, match="b_truncated"):
        patch = dataset[1]
    assert torch.equal(patch, dataset[0])


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere", crop=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty", crop=32)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.jpg").write_bytes(b"junk")
    (junk / ".hidden.png").write_bytes(_png_bytes())
    with pytest.warns(UserWarning, match="x.jpg"), pytest.raises(ValueError, match="no usable image"):
        ImageFolder(junk, crop=8)
    assert list_images(junk) == [junk / "x.jpg"]  # hidden files ignored


def _gradient_folder(folder: Path, count: int, size: tuple[int, int] = (40, 56)) -> Path:
    """Images whose every column differs, so that a flipped crop is never a crop of the original."""
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    for i in range(count):
        array = np.zeros((h, w, 3), np.uint8)
        array[..., 0] = (np.arange(w) * 4 + i)[None, :]
        array[..., 1] = (np.arange(h) * 5)[:, None]
        Image.fromarray(array).save(folder / f"{i:03d}.png")
    return folder


def _is_unflipped_crop(patch: torch.Tensor, image: torch.Tensor) -> bool:
    c = patch.shape[-1]
    pixels = (patch * 255).round().to(torch.uint8)
    return any(torch.equal(pixels, image[:, top:top + c, left:left + c])
               for top in range(image.shape[1] - c + 1) for left in range(image.shape[2] - c + 1))


def test_flip_switch_and_seeded_crops(tmp_path):
    folder = _gradient_folder(tmp_path / "g", 2)
    image = read_image(folder / "000.png")
    plain = ImageFolder(folder, crop=32, train=True, flip=False)
    flipping = ImageFolder(folder, crop=32, train=True)
    torch.manual_seed(0)
    assert all(_is_unflipped_crop(plain[0], image) for _ in range(20))  # random crop only (the reference)
    assert not all(_is_unflipped_crop(flipping[0], image) for _ in range(20))  # default: crop and flip
    # the crop is a function of torch's generator: seeded per item by the trainer, reproducible anywhere
    torch.manual_seed(7)
    first = plain[1]
    torch.manual_seed(7)
    assert torch.equal(plain[1], first)


def test_cache_is_automatic_small_folders_cached_large_ones_streamed(tmp_path, monkeypatch):
    folder = _gradient_folder(tmp_path / "g", 3)
    assert ImageFolder(folder, crop=32).cache and not ImageFolder(folder, crop=32, cache=False).cache
    monkeypatch.setattr(data, "CACHE_MAX_IMAGES", 2)
    streamed = ImageFolder(folder, crop=32, train=False)
    assert not streamed.cache
    patches = [streamed[i] for i in range(3)]
    assert streamed._images == {}  # decoded per item, nothing kept: memory stays flat at any size
    assert ImageFolder(folder, crop=32, train=False, cache=True).cache
    cached = ImageFolder(folder, crop=32, train=False, cache=True)
    assert all(torch.equal(cached[i], patches[i]) for i in range(3)) and len(cached._images) == 3


# --------------------------------------------------------------------------- Kodak checksums and download

def test_checksum_table_matches_the_shared_file(kodak_dir):
    listing = kodak_dir.parent / "kodak.sha256"
    table = dict(reversed(line.split()) for line in listing.read_text().splitlines() if line.strip())
    assert table == data_sources.KODAK_SHA256 and len(table) == 24


def test_verify_detects_missing_and_corrupted_files(tmp_path, fake_kodak):
    folder = tmp_path / "kodak"
    assert verify_kodak(folder) == [f"folder {folder} does not exist"]
    folder.mkdir()
    for name, blob in fake_kodak.items():
        (folder / name).write_bytes(blob)
    assert verify_kodak(folder) == []
    corrupted = bytearray(fake_kodak["kodim02.png"])
    corrupted[-20] ^= 0xFF
    (folder / "kodim02.png").write_bytes(bytes(corrupted))
    (folder / "kodim01.png").unlink()
    problems = verify_kodak(folder)
    assert problems[0] == "kodim01.png: missing"
    assert problems[1].startswith("kodim02.png: SHA-256 mismatch") and len(problems) == 2


def test_real_kodak_verifies_when_shared(kodak_dir):
    assert verify_kodak(kodak_dir) == []


def test_download_kodak_from_a_local_server(tmp_path, fake_kodak):
    dest = tmp_path / "dl"
    checksums = {name: _sha(blob) for name, blob in fake_kodak.items()}
    with _Server(fake_kodak) as server:
        assert download_kodak(dest, base_url=server.url, checksums=checksums, progress=False) == dest
        assert verify_kodak(dest, checksums) == [] and server.hits == {"kodim01.png": 1, "kodim02.png": 1}
        # present with the right hash: skipped
        download_kodak(dest, base_url=server.url, checksums=checksums, progress=False)
        assert server.hits == {"kodim01.png": 1, "kodim02.png": 1}
        # present with a wrong hash: fetched again
        (dest / "kodim02.png").write_bytes(b"damaged")
        with pytest.warns(UserWarning, match="wrong SHA-256"):
            download_kodak(dest, base_url=server.url.rstrip("/"), checksums=checksums, progress=False)
        assert server.hits["kodim02.png"] == 2 and verify_kodak(dest, checksums) == []
    assert sorted(p.name for p in dest.iterdir()) == ["kodim01.png", "kodim02.png"]  # no temporary files


def test_download_kodak_hash_mismatch_and_missing_file(tmp_path, fake_kodak):
    dest = tmp_path / "dl"
    wrong = {"kodim01.png": _sha(fake_kodak["kodim01.png"]), "kodim02.png": "0" * 64}
    with _Server(fake_kodak) as server:
        with pytest.raises(ChecksumError, match="kodim02.png: SHA-256 mismatch"):
            download_kodak(dest, base_url=server.url, checksums=wrong, progress=False)
        assert sorted(p.name for p in dest.iterdir()) == ["kodim01.png"]  # bad tmp file deleted
        with pytest.raises(OSError, match="404"):
            download_kodak(dest, base_url=server.url, checksums={"kodim99.png": "0" * 64}, progress=False)
        assert sorted(p.name for p in dest.iterdir()) == ["kodim01.png"]


# --------------------------------------------------------------------------- resolving sources

def test_resolve_kodak_explicit_folder(tmp_path, fake_kodak):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_kodak(tmp_path / "missing")
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, blob in fake_kodak.items():
        (folder / name).write_bytes(blob)
    source = resolve_kodak(folder)
    assert source == DataSource(folder, "local", True, source.note) and Path(source) == folder
    (folder / "kodim01.png").write_bytes(_png_bytes(seed=9))  # same name, other pixels
    source = resolve_kodak(str(folder))
    assert source.kind == "local" and not source.is_kodak and "not verified" in source.note


def test_resolve_kodak_prefers_local_then_shared(tmp_path, monkeypatch, fake_kodak):
    shared = tmp_path / "shared"
    (shared / "data" / "kodak").mkdir(parents=True)
    for name, blob in fake_kodak.items():
        (shared / "data" / "kodak" / name).write_bytes(blob)
    monkeypatch.setattr(data_sources, "SHARED_ROOT", shared)
    source = resolve_kodak()
    assert (source.kind, source.path, source.is_kodak) == ("shared", shared / "data" / "kodak", True)
    assert not (data_sources.DATA_ROOT / "kodak").exists()  # read in place, never copied
    local = tmp_path / "repo_data" / "kodak"
    local.mkdir(parents=True)
    for name, blob in fake_kodak.items():
        (local / name).write_bytes(blob)
    assert resolve_kodak().kind == "local" and resolve_kodak().path == local


def test_resolve_kodak_downloads_when_online(tmp_path, monkeypatch, fake_kodak):
    monkeypatch.delenv("ALICE_OFFLINE")
    with _Server(fake_kodak) as server:
        source = resolve_kodak(base_url=server.url, progress=False)
    assert (source.kind, source.path, source.is_kodak) == ("download", data_sources.DATA_ROOT / "kodak", True)
    assert verify_kodak(source.path) == []


def test_offline_fallback_gives_skimage_photos_and_a_loud_warning(tmp_path):
    with pytest.warns(NotKodakWarning, match="NOT KODAK RESULTS"):
        source = resolve_kodak()
    assert (source.kind, source.is_kodak) == ("fallback", False)
    assert source.path == data_sources.DATA_ROOT / "fallback"
    files = list_images(source)
    assert [p.name for p in files] == sorted(data_sources.FALLBACK_IMAGES.values())
    for path in files:
        with Image.open(path) as image:
            assert image.mode == "RGB" and min(image.size) >= 256
    assert len(ImageFolder(source, crop=256, train=False)) == len(files)
    # cached: a second call keeps the files and still warns
    with pytest.warns(NotKodakWarning):
        again = resolve_kodak(fallback_dir=tmp_path / "cache")
    assert again.path == tmp_path / "cache" and len(list_images(again)) == len(files)


def test_network_failure_falls_back_quickly(tmp_path, monkeypatch, fake_kodak):
    monkeypatch.delenv("ALICE_OFFLINE")
    with _Server({}) as server:  # every file 404
        with pytest.warns(NotKodakWarning, match="download from .* failed"):
            source = resolve_kodak(base_url=server.url, progress=False, download_timeout=2)
    assert source.kind == "fallback"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotKodakWarning)
        assert resolve_kodak(allow_download=False).kind == "fallback"


def test_resolve_training_order(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        resolve_training(tmp_path / "missing")
    mine = tmp_path / "mine"
    mine.mkdir()
    Image.fromarray(_rng_rgb(40, 40)).save(mine / "x.png")
    assert resolve_training(mine) == DataSource(mine, "local", False, "1 training images (user folder)")

    shared = tmp_path / "shared"
    (shared / "data" / "bsds432").mkdir(parents=True)
    Image.fromarray(_rng_rgb(40, 40)).save(shared / "data" / "bsds432" / "1.jpg")
    monkeypatch.setattr(data_sources, "SHARED_ROOT", shared)
    assert resolve_training().kind == "shared"
    train = data_sources.DATA_ROOT / "train"
    train.mkdir(parents=True)
    Image.fromarray(_rng_rgb(40, 40)).save(train / "y.png")
    assert resolve_training().path == train and resolve_training().kind == "local"


def test_resolve_training_offline_fallback_and_openimages(tmp_path, monkeypatch):
    with pytest.warns(FallbackDataWarning, match="NOT TRAINED ON REAL TRAINING DATA") as caught:
        source = resolve_training()
    assert not any(isinstance(w.message, NotKodakWarning) for w in caught)
    assert source.kind == "fallback" and len(list_images(source)) == len(data_sources.FALLBACK_IMAGES)
    with pytest.raises(data_sources.MissingDataError, match=r"openimages/train/data is absent.*ALICE_OFFLINE"):
        resolve_training(source="openimages")
    with pytest.warns(UserWarning, match="OpenImages train images are missing"), pytest.warns(FallbackDataWarning):
        assert resolve_training(source="openimages", fallback=True).kind == "fallback"
    with pytest.raises(ValueError, match="unknown training source"):
        resolve_training(source="imagenet")


def test_download_openimages_without_fiftyone_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_fiftyone(name, *args, **kwargs):
        if name.startswith("fiftyone"):
            raise ImportError("No module named 'fiftyone'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fiftyone)
    with pytest.raises(ImportError, match=r"fiftyone, which is not installed: pip install -e '\.\[openimages\]'"):
        data_sources.download_openimages(tmp_path / "oi", 4)
    monkeypatch.delenv("ALICE_OFFLINE")
    # Online but without fiftyone: the error names the folder and the missing package.
    with pytest.raises(data_sources.MissingDataError, match=r"is absent; fiftyone is not installed \(pip install -e"):
        resolve_training(source="openimages")
    shared = tmp_path / "shared"
    (shared / "data" / "bsds432").mkdir(parents=True)
    Image.fromarray(_rng_rgb(40, 40)).save(shared / "data" / "bsds432" / "1.jpg")
    monkeypatch.setattr(data_sources, "SHARED_ROOT", shared)
    with pytest.warns(UserWarning, match="fiftyone is not installed"):
        assert resolve_training(source="openimages", fallback=True).kind == "shared"
    # Part of the split present: used, with a warning naming both counts.
    _gradient_folder(data_sources.openimages_dir("test"), 3)
    with pytest.warns(UserWarning, match="using 3 OpenImages test images instead of 10,000"):
        assert data_sources.resolve_openimages("test").path == data_sources.openimages_dir("test")


def test_openimages_reference_counts_and_fiftyone_call(tmp_path, monkeypatch):
    import sys
    import tomllib
    import types

    assert (data_sources.OPENIMAGES_TRAIN_IMAGES, data_sources.OPENIMAGES_TEST_IMAGES) == (300_000, 10_000)
    extras = tomllib.loads((Path(data.__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras["openimages"] == ["fiftyone"]  # an optional extra, not a core dependency
    calls = []

    def load_zoo_dataset(name, **kwargs):  # what fiftyone does: images under <dataset_dir>/<split>/data
        calls.append((name, kwargs))
        folder = _gradient_folder(Path(kwargs["dataset_dir"]) / kwargs["split"] / "data", kwargs["max_samples"])
        return types.SimpleNamespace(values=lambda field: sorted(str(p) for p in folder.iterdir()))

    zoo = types.ModuleType("fiftyone.zoo")
    zoo.load_zoo_dataset = load_zoo_dataset
    monkeypatch.setitem(sys.modules, "fiftyone", types.ModuleType("fiftyone"))
    monkeypatch.setitem(sys.modules, "fiftyone.zoo", zoo)
    monkeypatch.delenv("ALICE_OFFLINE")
    source = resolve_training(source="openimages", n_images=3)
    assert source.kind == "download" and source.path == data_sources.openimages_dir("train")
    assert "3 OpenImages" in source.note
    name, kwargs = calls[0]
    assert name == "open-images-v6" and kwargs["split"] == "train" and kwargs["max_samples"] == 3
    assert kwargs["label_types"] == ["classifications"] and kwargs["shuffle"] is False  # the reference's subset
    # Present now: found again without a download.
    assert resolve_training(source="openimages", n_images=3).kind == "local" and len(calls) == 1
    assert data_sources.resolve_openimages("test", 2).path == data_sources.openimages_dir("test")
    assert calls[-1][1]["split"] == "test"


# --------------------------------------------------------------------------- inspection

def test_dataset_summary_and_thumbnail_grid(tmp_path):
    folder = tmp_path / "odd"
    usable = _write_odd_images(folder)
    with pytest.warns(UserWarning, match="i_not_an_image"):
        table = dataset_summary(folder)
    assert list(table.columns) == ["file", "width", "height", "mode"]
    assert dict(zip(table["file"], table["mode"])) == {**usable, "h_small.png": "RGB"}
    assert table.set_index("file").loc["a_rgb.png", "width"] == 64
    with pytest.warns(UserWarning, match="i_not_an_image"):
        figure = thumbnail_grid(folder, columns=3, title="odd files")
    assert len([ax for ax in figure.axes if ax.images]) == 8 and len(figure.axes) == 9
    assert len(thumbnail_grid(folder, n=2).axes) == 2
    figure.savefig(tmp_path / "grid.png", dpi=40)
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_resolve_validation_held_out_folder_and_missing(tmp_path):
    from alice_lib.data_sources import resolve_validation

    assert resolve_validation("held_out", tmp_path) is None  # held out of the training folder: no source
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_validation("folder", tmp_path / "absent")
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    source = resolve_validation("folder", tmp_path)
    assert source.path == tmp_path and "1 validation images" in source.note
