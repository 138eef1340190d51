"""Where the images come from: the Kodak test set, training photographs, validation folders.

:func:`resolve_kodak` and :func:`resolve_training` pick a folder and say what it is (a
:class:`DataSource`). Kodak: an explicit folder, ``<repo>/data/kodak``,
``../shared/data/kodak`` next to the repository (read in place), a download from r0k.us
checked against the SHA-256 table below (:func:`download_kodak`), or, offline, the colour
photographs bundled with scikit-image, with a loud :class:`NotKodakWarning`. Training: an
explicit folder, ``<repo>/data/train``, OpenImages through fiftyone when asked for (the
optional extra ``.[openimages]``; the reference's 300,000 train and 10,000 test images,
:func:`resolve_openimages`; missing OpenImages is a :class:`MissingDataError` naming what
is missing), ``../shared/data/bsds432``, or the same scikit-image fallback.
:func:`resolve_validation` finds the folder a profile's ``data.val_source`` names.
``ALICE_OFFLINE=1`` in the environment disables every download attempt.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from .data import count_images, list_images, to_rgb
from .run_folder import REPO_ROOT
from .utils import sha256_file

logger = logging.getLogger(__name__)

#: The repository's data folder.
DATA_ROOT = REPO_ROOT / "data"
#: ``../shared`` next to the repository: present on development and CI machines only.
SHARED_ROOT = REPO_ROOT.parent / "shared"

KODAK_URL = "https://r0k.us/graphics/kodak/kodak/"

#: SHA-256 of the 24 Kodak PNG files as published at :data:`KODAK_URL`.
KODAK_SHA256: dict[str, str] = {
    "kodim01.png": "a56e27cbf5f843c048b6af1d6e090760e9c92fadba88b7dee0205918a37523bd",
    "kodim02.png": "133d50ad0f2cda48fef30e251f433fa1a98ee08c0f2d07cdab9462e876ccae5d",
    "kodim03.png": "e25ca1ff2f0c0cb5fdfd5f9b0a0bb21ac4c3de3c84a67f35b09a85d3306249db",
    "kodim04.png": "1e079e4adc03524e53f1394a2a8e1c5995f0f70a5aec125b12fa3fdbe33cba37",
    "kodim05.png": "10349e963c5c813d327852f82c1795fa4148d69fedffc4c589bee458e3ac3d53",
    "kodim06.png": "363510303b715d4cbc384e1ce227e466b613a09e1b71ae985882bf8e7fbd9b18",
    "kodim07.png": "a74d606cef80e70a04fb983364f79fb954ad46665edf2a8b7355ce81adfa7998",
    "kodim08.png": "e3cfc1371a5643c7f8cdf1bd565c172abce6aa26e3f2fdce74cbf7c32364089d",
    "kodim09.png": "a0c72eb70826619305388ed9c0f8aa8f491b234155d62673cda270d7021149a2",
    "kodim10.png": "28fb615837dc8e66fc92c40158cac80b57f07d0ce77d22576aa85ac9e2787336",
    "kodim11.png": "7936814b58b5387fce2e4e2488b4ec830dadd95fa9520f358ddb30990b50f2b6",
    "kodim12.png": "d78c37c2f04f23761ed2367dd77e2db584ddd4c3950833fecf89f199a8126980",
    "kodim13.png": "bc34a3ce58dea09dce1704c997171602de90cb34d0c8503a988b77f473d39b08",
    "kodim14.png": "55a94550ff18f3246c4074fd32b77b0c74447c26b6ad274d564d999c0450ba6e",
    "kodim15.png": "d36d884e29bce92adea11de456be4e9a5815e79c112d47453a34a6f6edc84e63",
    "kodim16.png": "a89c7268ccd4718ba424a99fc4643c572cf692ca6eae887185ceb4e9f11d2e54",
    "kodim17.png": "37afcc89fbdcb76d9518e04b2fc011027e2f4cd14b3b2f83cefd721641a47c5b",
    "kodim18.png": "5deb2d91e347cbdcc0d8a595daa8877de0772c9cdbce4956a2f45a0f97648a47",
    "kodim19.png": "8f12d577f9ca36f384f82dec11ed8a4e12a27bd5a32ef117b9bcaf4fe4d0606f",
    "kodim20.png": "3b46c71e3b92a563820ba32936be8330c586c41f938efd94be938386aae4328a",
    "kodim21.png": "ac958597c82073f6bb65129c68f72b651db5b9efd82e11547d07350214bc268b",
    "kodim22.png": "37782d92a1cfb36ff586047d5c0a2fa75e042fd0b58f90f866b4ab91349c4e03",
    "kodim23.png": "2ed596d7de74cc43d23add4c116763f49d7b5a78b21444fe84caece531ee933b",
    "kodim24.png": "ac96f39dacff2ec303ddb8a7eb72d59f77af2b491144926335938338ee63473d",
}

#: Colour photographs shipped inside the scikit-image 0.26 wheel (no pooch download
#: needed), used when neither Kodak nor training images can be found or fetched.
#: ``skimage.data`` loader name -> file name written into the fallback folder.
FALLBACK_IMAGES: dict[str, str] = {
    "astronaut": "skimage_astronaut.png",                 # 512x512
    "chelsea": "skimage_chelsea.png",                     # 451x300
    "coffee": "skimage_coffee.png",                       # 600x400
    "rocket": "skimage_rocket.png",                       # 640x427
    "immunohistochemistry": "skimage_immunohistochemistry.png",  # 512x512
    "motorcycle_left": "skimage_motorcycle_left.png",     # 741x500 (left view of stereo_motorcycle)
}

OFFLINE_ENV = "ALICE_OFFLINE"

SourceKind = Literal["local", "shared", "download", "fallback"]


class FallbackDataWarning(UserWarning):
    """Issued when the workbook falls back to the scikit-image photographs instead of the requested data."""


class NotKodakWarning(FallbackDataWarning):
    """Issued when evaluation falls back to images that are not Kodak: results are not Kodak results."""


class ChecksumError(ValueError):
    """A downloaded file does not have the SHA-256 it must have."""


# --------------------------------------------------------------------------- Kodak

def verify_kodak(folder: str | Path, checksums: Mapping[str, str] | None = None) -> list[str]:
    """What is wrong with a Kodak folder: one line per missing or altered file; ``[]`` if complete.

    ``checksums`` maps file names to SHA-256 (default: :data:`KODAK_SHA256`).
    """
    checksums = KODAK_SHA256 if checksums is None else checksums
    folder = Path(folder)
    if not folder.is_dir():
        return [f"folder {folder} does not exist"]
    problems = []
    for name, expected in sorted(checksums.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        actual = sha256_file(path)
        if actual != expected.lower():
            problems.append(f"{name}: SHA-256 mismatch (expected {expected}, found {actual})")
    return problems


def _fetch(url: str, target: Path, expected: str, timeout: float) -> None:
    """Download ``url`` into a temporary file next to ``target``, check it, then rename it into place."""
    request = urllib.request.Request(url, headers={"User-Agent": "alice-workbook/0.1 (+python urllib)"})
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            while chunk := response.read(1 << 16):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != expected.lower():
            raise ChecksumError(f"{url}: SHA-256 mismatch (expected {expected}, downloaded {actual}); "
                                "the file was deleted. The server may have changed the file or sent an error page.")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def download_kodak(dest: str | Path, *, base_url: str = KODAK_URL, progress: bool = True,
                   checksums: Mapping[str, str] | None = None, timeout: float = 30.0) -> Path:
    """Download the Kodak images into ``dest`` and return ``dest``.

    Each file ``base_url + name`` for the names of ``checksums`` (default: the 24
    ``kodimNN.png`` of :data:`KODAK_SHA256`) is streamed into a temporary file,
    its SHA-256 checked, and only then renamed into place, so an interrupted or
    corrupted download never leaves a bad file behind. Files already present with
    the right hash are not downloaded again; present files with a wrong hash are
    replaced (with a warning).

    Raises :class:`ChecksumError` on a hash mismatch (the temporary file is
    deleted) and ``urllib.error.URLError`` / ``OSError`` / ``http.client.HTTPException``
    on network failures (``timeout`` seconds per connection or read).
    """
    from tqdm.auto import tqdm

    checksums = KODAK_SHA256 if checksums is None else checksums
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    fetched = 0
    with tqdm(sorted(checksums.items()), desc="Kodak", unit="file", disable=not progress) as bar:
        for name, expected in bar:
            target = dest / name
            if target.is_file():
                if sha256_file(target) == expected.lower():
                    continue
                warnings.warn(f"{target} has the wrong SHA-256; downloading it again", stacklevel=2)
            bar.set_postfix_str(name)
            _fetch(base_url + name, target, expected, timeout)
            fetched += 1
    logger.info("Kodak in %s: %d file(s) downloaded, %d already present", dest, fetched, len(checksums) - fetched)
    return dest


# --------------------------------------------------------------------------- resolution

@dataclass(frozen=True)
class DataSource:
    """A resolved image folder and what it is.

    ``kind``: ``"local"`` (an explicit folder or one under ``<repo>/data``),
    ``"shared"`` (``../shared/data``, read in place), ``"download"`` (fetched just
    now) or ``"fallback"`` (scikit-image photographs: not the requested data).
    ``is_kodak``: whether results on it are Kodak results. A ``DataSource`` is
    path-like: ``ImageFolder(source, ...)`` and ``Path(source)`` work.
    """

    path: Path
    kind: SourceKind
    is_kodak: bool
    note: str

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return f"{self.path} ({self.kind}: {self.note})"


def offline() -> bool:
    """Whether ``ALICE_OFFLINE`` is set to a true value (downloads are then never attempted)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _skimage_image(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle_left":
        # Read the bundled file directly: stereo_motorcycle() also loads the disparity map.
        from skimage.io import imread

        path = Path(skimage.data.__file__).parent / "motorcycle_left.png"
        if not path.is_file():
            raise FileNotFoundError(path)
        return imread(path)
    return getattr(skimage.data, name)()


def write_fallback_images(dest: str | Path) -> Path:
    """Write the scikit-image colour photographs of :data:`FALLBACK_IMAGES` as PNG into ``dest``.

    Files already there are kept; an image scikit-image cannot provide offline is
    skipped with a warning. Returns ``dest``; raises ``RuntimeError`` if no image
    could be written.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = 0
    for name, filename in FALLBACK_IMAGES.items():
        target = dest / filename
        if target.is_file():
            written += 1
            continue
        try:
            array = np.asarray(_skimage_image(name))
        except Exception as error:  # noqa: BLE001 - e.g. a loader that would need pooch / network
            warnings.warn(f"scikit-image image {name!r} unavailable offline: {error}", stacklevel=2)
            continue
        image = to_rgb(Image.fromarray(array))
        fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=dest)
        os.close(fd)
        try:
            image.save(tmp_name, format="PNG")
            os.replace(tmp_name, target)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
        written += 1
    if not written:
        raise RuntimeError(f"could not write any scikit-image fallback image into {dest}")
    return dest


def _fallback(what: str, consequence: str, category: type[Warning], dest: Path, reasons: list[str]) -> DataSource:
    path = write_fallback_images(dest)
    message = (f"NO {what.upper()} IMAGES FOUND ({'; '.join(reasons) or 'no source'}). FALLING BACK to the "
               f"{len(list_images(path))} colour photographs bundled with scikit-image in {path}: "
               f"{consequence}")
    warnings.warn(message, category, stacklevel=3)
    logger.warning(message)
    return DataSource(path, "fallback", False,
                      f"scikit-image photographs ({', '.join(FALLBACK_IMAGES)}): {consequence}")


def _roots(data_root: str | Path | None, shared_root: str | Path | None) -> tuple[Path, Path]:
    """The data and shared folders a resolver searches (default: the repository's and ``../shared``)."""
    return (Path(DATA_ROOT if data_root is None else data_root),
            Path(SHARED_ROOT if shared_root is None else shared_root))


def _given_folder(preferred: str | os.PathLike | None, what: str) -> Path | None:
    """The folder a user passed (None when none was); FileNotFoundError naming ``what`` when it is absent."""
    if preferred is None or str(preferred) == "":
        return None
    folder = Path(preferred).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    return folder


def _has_images(folder: Path) -> bool:
    try:
        list_images(folder)
    except (FileNotFoundError, ValueError):
        return False
    return True


def resolve_kodak(preferred: str | Path | None = None, *, allow_download: bool = True,
                  data_root: str | Path | None = None, shared_root: str | Path | None = None,
                  fallback_dir: str | Path | None = None, base_url: str = KODAK_URL,
                  download_timeout: float = 10.0, progress: bool = True) -> DataSource:
    """Find the Kodak test images; never fails silently.

    In order: ``preferred`` if given (``FileNotFoundError`` if it does not exist;
    ``is_kodak`` only if its 24 files match the checksums); ``<data_root>/kodak``
    if complete (``data_root`` defaults to ``<repo>/data``); ``<shared_root>/data/kodak``
    (``../shared`` next to the repository), read in place; a download into
    ``<data_root>/kodak`` unless ``allow_download`` is false or ``ALICE_OFFLINE`` is
    set (network errors are caught after at most ``download_timeout`` seconds per
    attempt; a checksum mismatch is raised); otherwise the scikit-image photographs
    written into ``fallback_dir`` (default ``<data_root>/fallback``) with a loud
    :class:`NotKodakWarning`.
    """
    data_root, shared_root = _roots(data_root, shared_root)
    if (folder := _given_folder(preferred, "Kodak")) is not None:
        list_images(folder)  # clear error if it holds no image
        problems = verify_kodak(folder)
        note = ("the 24 Kodak images, checksums verified" if not problems else
                f"user folder, not verified as Kodak ({len(problems)} problem(s), e.g. {problems[0]})")
        if problems:
            logger.warning("Kodak folder %s: %s", folder, note)
        return DataSource(folder, "local", not problems, note)

    reasons: list[str] = []
    local = data_root / "kodak"
    problems = verify_kodak(local)
    if not problems:
        return DataSource(local, "local", True, "the 24 Kodak images, checksums verified")
    reasons.append(f"{local}: {len(problems)} problem(s)")

    shared = shared_root / "data" / "kodak"
    if shared.is_dir():
        problems = verify_kodak(shared)
        if not problems:
            return DataSource(shared, "shared", True, "the 24 Kodak images (shared folder, read in place)")
        warnings.warn(f"{shared} is incomplete or altered: {problems[:3]}", stacklevel=2)
        reasons.append(f"{shared}: {len(problems)} problem(s)")
    else:
        reasons.append(f"{shared} absent")

    if not allow_download:
        reasons.append("download not allowed")
    elif offline():
        reasons.append(f"{OFFLINE_ENV} set")
    else:
        try:
            path = download_kodak(local, base_url=base_url, progress=progress, timeout=download_timeout)
            return DataSource(path, "download", True, f"the 24 Kodak images downloaded from {base_url}, "
                                                      "checksums verified")
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            logger.warning("Kodak download from %s failed: %s", base_url, error)
            reasons.append(f"download from {base_url} failed: {error}")

    return _fallback("Kodak", "RESULTS ARE NOT KODAK RESULTS and cannot be compared with the paper's.",
                     NotKodakWarning, Path(fallback_dir) if fallback_dir is not None else data_root / "fallback",
                     reasons)


#: The reference's OpenImages V6 subset (the STF / ALICE downloader): the first 300,000 train
#: and 10,000 test images that carry classification labels, loaded through fiftyone.
OPENIMAGES_TRAIN_IMAGES = 300_000
OPENIMAGES_TEST_IMAGES = 10_000
#: How to get fiftyone: the optional extra of this package (it is not a core dependency).
OPENIMAGES_INSTALL = "pip install -e '.[openimages]'"


class MissingDataError(FileNotFoundError):
    """Requested data is absent and cannot be fetched; the message names what is missing and how to get it."""


def openimages_dir(split: str = "train", data_root: str | Path | None = None) -> Path:
    """Where fiftyone puts the images of an OpenImages split: ``<data_root>/openimages/<split>/data``."""
    return Path(DATA_ROOT if data_root is None else data_root) / "openimages" / split / "data"


def download_openimages(dest: str | Path, n_images: int = OPENIMAGES_TRAIN_IMAGES, *, split: str = "train",
                        label_types: tuple[str, ...] = ("classifications",), shuffle: bool = False,
                        seed: int | None = None) -> Path:
    """Download ``n_images`` of OpenImages V6 ``split`` through fiftyone into ``dest``; return the image folder.

    The reference's call: ``load_zoo_dataset("open-images-v6", split, max_samples=n,
    label_types=["classifications"])``, unshuffled, i.e. the first ``n`` images with
    class labels (300,000 train, 10,000 test: :data:`OPENIMAGES_TRAIN_IMAGES`,
    :data:`OPENIMAGES_TEST_IMAGES`). Images stay where fiftyone writes them,
    ``dest/<split>/data`` (no copy: 300,000 images are ~90 GB); fiftyone resumes a
    partial download. A folder that already holds ``n_images`` returns at once.
    Raises ``ImportError`` naming :data:`OPENIMAGES_INSTALL` when fiftyone is missing.
    """
    folder = Path(dest) / split / "data"
    if count_images(folder) >= n_images:
        return folder
    try:
        import fiftyone.zoo as foz
    except ImportError as error:
        raise ImportError(f"OpenImages needs fiftyone, which is not installed: {OPENIMAGES_INSTALL} "
                          "(or pip install fiftyone); or point the workbook at a local folder of training "
                          "photographs instead") from error
    Path(dest).mkdir(parents=True, exist_ok=True)
    dataset = foz.load_zoo_dataset("open-images-v6", split=split, max_samples=n_images,
                                   label_types=list(label_types), shuffle=shuffle, seed=seed,
                                   dataset_dir=str(dest), dataset_name=f"alice-openimages-{split}-{n_images}")
    paths = dataset.values("filepath")
    return Path(paths[0]).parent if paths else folder


def resolve_openimages(split: str = "train", n_images: int | None = None, *, allow_download: bool = True,
                       data_root: str | Path | None = None) -> DataSource:
    """The OpenImages ``split`` under ``<data_root>/openimages``, downloaded through fiftyone when short.

    ``n_images`` defaults to the reference's count for the split. A folder with at
    least ``n_images`` is used as is; otherwise a download is tried. When the images
    cannot be had, :class:`MissingDataError` says what is missing: the folder (and
    how many images it holds), fiftyone (:data:`OPENIMAGES_INSTALL`), the network or
    the permission to download. A partial folder after a failed download is used
    with a warning that names both counts.
    """
    n_images = n_images or (OPENIMAGES_TRAIN_IMAGES if split == "train" else OPENIMAGES_TEST_IMAGES)
    root = Path(DATA_ROOT if data_root is None else data_root) / "openimages"
    folder = openimages_dir(split, data_root)
    found = count_images(folder)
    note = f"{{}} OpenImages V6 {split} images (requested {n_images:,})"
    if found >= n_images:
        return DataSource(folder, "local", False, note.format(f"{found:,}"))
    reasons = [f"{folder} holds {found:,} of the {n_images:,} images requested" if found else f"{folder} is absent"]
    if not allow_download or offline():
        reasons.append(f"downloads are disabled ({OFFLINE_ENV} set or allow_download=False)")
    else:
        try:
            path = download_openimages(root, n_images, split=split)
            return DataSource(path, "download", False, note.format(f"{count_images(path):,}"))
        except ImportError:
            reasons.append(f"fiftyone is not installed ({OPENIMAGES_INSTALL})")
        except Exception as error:  # noqa: BLE001 - network, fiftyone internals
            reasons.append(f"the fiftyone download failed: {error}")
    if found:
        warnings.warn(f"using {found:,} OpenImages {split} images instead of {n_images:,}: "
                      + "; ".join(reasons), stacklevel=2)
        return DataSource(folder, "local", False, note.format(f"{found:,}"))
    raise MissingDataError(f"OpenImages {split} images are missing: " + "; ".join(reasons)
                           + f". Install fiftyone ({OPENIMAGES_INSTALL}) and allow the download, put the "
                           f"images in {folder}, or pass a folder of training photographs.")


def resolve_training(preferred: str | Path | None = None, *, source: Literal["auto", "openimages"] = "auto",
                     n_images: int = OPENIMAGES_TRAIN_IMAGES, allow_download: bool = True,
                     data_root: str | Path | None = None, shared_root: str | Path | None = None,
                     fallback_dir: str | Path | None = None, fallback: bool | None = None) -> DataSource:
    """Find training photographs.

    In order: ``preferred`` if given (``FileNotFoundError`` if it does not exist);
    ``<data_root>/train`` if it holds images; with ``source="openimages"``, the
    OpenImages train split of ``n_images`` (the reference's 300,000) through
    :func:`resolve_openimages`; ``<shared_root>/data/bsds432`` read in place;
    otherwise the scikit-image photographs with a loud :class:`FallbackDataWarning`
    (the same images the Kodak fallback uses: train and test then overlap).

    ``fallback``: whether a missing OpenImages may fall back to BSDS / scikit-image
    (with a warning). Default: not for ``source="openimages"`` (a paper run must not
    train on other data unnoticed: :class:`MissingDataError` names what is missing),
    always for ``source="auto"``.
    """
    if source not in ("auto", "openimages"):
        raise ValueError(f"unknown training source {source!r} (expected 'auto' or 'openimages')")
    fallback = source == "auto" if fallback is None else fallback
    data_root, shared_root = _roots(data_root, shared_root)
    if (folder := _given_folder(preferred, "training")) is not None:
        count = len(list_images(folder))
        return DataSource(folder, "local", False, f"{count} training images (user folder)")

    reasons: list[str] = []
    local = data_root / "train"
    if _has_images(local):
        return DataSource(local, "local", False, f"{len(list_images(local))} training images")
    reasons.append(f"{local} empty or absent")

    if source == "openimages":
        try:
            return resolve_openimages("train", n_images, allow_download=allow_download, data_root=data_root)
        except MissingDataError as error:
            if not fallback:
                raise
            warnings.warn(str(error), stacklevel=2)
            reasons.append("OpenImages missing")

    shared = shared_root / "data" / "bsds432"
    if _has_images(shared):
        return DataSource(shared, "shared", False,
                          f"{len(list_images(shared))} BSDS photographs (shared folder, read in place)")
    reasons.append(f"{shared} absent")

    return _fallback("training", "MODELS ARE NOT TRAINED ON REAL TRAINING DATA (a handful of images, the same "
                     "ones the offline Kodak fallback evaluates on).", FallbackDataWarning,
                     Path(fallback_dir) if fallback_dir is not None else data_root / "fallback", reasons)


def resolve_validation(val_source: str, folder: str | os.PathLike | None = None, n_images: int | None = None,
                       allow_download: bool = True) -> DataSource | None:
    """The validation folder a profile's ``data.val_source`` names; None when it is held out of training.

    ``folder`` (a user's folder) wins; otherwise ``openimages-test`` resolves the
    OpenImages test split (``n_images`` of it) like :func:`resolve_openimages`.
    """
    if val_source == "held_out":
        return None
    if (path := _given_folder(folder, "validation")) is not None:
        return DataSource(path, "local", False, f"{count_images(path)} validation images")
    return resolve_openimages("test", n_images or None, allow_download=allow_download)
