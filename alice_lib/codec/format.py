"""The ``.alice`` file format: header, tile layout, CRC, parse and serialize.

This module imports neither torch nor the model, so that ``alice info`` starts in
a fraction of a second and so that a file is judged (damaged, foreign, a
decompression bomb) before any weight is loaded or any buffer allocated.

Version 2 (written since tiled coding; little-endian)::

    offset size  field
         0    8  magic  b"\\x89ALICE\\r\\n"
         8    2  version (u16, = 2)
        10    2  header size (u16, = 64: bytes before the tile index)
        12    8  base weights hash (8 raw bytes = 16 hex digits of lora.base_weights_hash)
        20    8  adapter identity (8 raw bytes of a SHA-256; all zero = no adapter involved)
        28    1  mode (0 fixed = anchor only, 1 interpolate, 2 alpha)
        29    1  reserved (0)
        30    2  stride (u16): the model's total stride, a power of two
        32    8  control value (f64, ln lambda)
        40    4  image height (u32, 1..65536)
        44    4  image width  (u32, 1..65536)
        48    4  tile height (u32, a multiple of the stride)
        52    4  tile width  (u32, a multiple of the stride)
        56    4  number of tiles (u32, = ceil(H / tile h) * ceil(W / tile w))
        60    4  reserved (0)
        64  8*n  tile index: per tile, row-major, u32 y length and u32 z length
         .    .  per tile: y bitstream, then z bitstream
     end-4    4  CRC-32 (zlib.crc32) of every byte before it

Tiles cover the image on a grid anchored at the top-left corner; the last row and
column of tiles may be smaller. Each tile is an independent STF bitstream of its
own pixels (padded by the model to the stride), so a decoder needs memory for one
tile plus the output image, whatever the image size. The z shape of a tile follows
from its size and the stride.

Version 1 (one untiled image, read but no longer written) has the same first 40
bytes (bytes 30..31 are zero), then u32 height, u32 width, u16 z height, u16 z
width, u32 y length, u32 z length, u32 reserved, the y and z bitstreams and the CRC.

A reader checks, in order: size bounds, magic, version, header size, the length
the header announces, the CRC, then every field, including the decompression-bomb
checks (:func:`check_plausible`). Nothing is entropy decoded before all passed.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MAGIC", "VERSION", "HEADER_SIZE", "MODES", "MAX_SIDE", "MAX_FILE_BYTES", "MAX_IMAGE_PIXELS",
    "MAX_TILE_PIXELS", "DEFAULT_TILE", "AliceFormatError", "AliceFile", "tile_boxes", "z_shape_of",
    "parse_alice", "serialize_alice", "read_alice", "write_alice", "check_plausible", "max_image_pixels",
]

MAGIC = b"\x89ALICE\r\n"
VERSION = 2
MODES = ("fixed", "interpolate", "alpha")
_HEADER_V2 = struct.Struct("<8sHH8s8sBBHdIIIIII")
_HEADER_V1 = struct.Struct("<8sHH8s8sBBHdIIHHIII")
HEADER_SIZE = _HEADER_V2.size  # 64, also version 1's
_INDEX = struct.Struct("<II")
_CRC = struct.Struct("<I")
MAX_SIDE = 1 << 16
MAX_FILE_BYTES = 1 << 30
#: Tile side the encoder uses unless told otherwise (chosen from the measured BD-rate cost, see README).
DEFAULT_TILE = 512
#: Largest tile a reader accepts: what one tile costs the decoder is bounded by this.
MAX_TILE_PIXELS = 4096 * 4096
#: Default pixel limit, like Pillow's ``Image.MAX_IMAGE_PIXELS``: set the module attribute
#: (``None`` = no limit), pass ``max_pixels=``, ``--max-pixels`` or ``ALICE_MAX_IMAGE_PIXELS``.
MAX_IMAGE_PIXELS: int | None = 1 << 27
#: Every rANS stream ends with its 4-byte final state, so a tile holds at least 8 payload bytes.
_MIN_STREAM_BYTES = 4
#: A stream costs at least ~4e-5 bit per symbol (16-bit CDFs) and STF codes >= 0.25 latent
#: symbols per pixel, so a real file holds at least one byte per 2**20 pixels.
_MAX_PIXELS_PER_BYTE = 1 << 20
_NO_ADAPTER = bytes(8)


class AliceFormatError(ValueError):
    """A ``.alice`` file is damaged, foreign, implausible, or does not fit the loaded weights."""


def max_image_pixels() -> int | None:
    """The pixel limit in force: ``ALICE_MAX_IMAGE_PIXELS`` (0 or ``none`` = off), else the module default."""
    value = os.environ.get("ALICE_MAX_IMAGE_PIXELS")
    if value is None:
        return MAX_IMAGE_PIXELS
    if value.strip().lower() in ("", "0", "none"):
        return None
    return int(value)


def tile_boxes(height: int, width: int, tile_h: int, tile_w: int) -> list[tuple[int, int, int, int]]:
    """``(top, left, h, w)`` of each tile, row-major, on a grid anchored at the top-left corner."""
    return [(top, left, min(tile_h, height - top), min(tile_w, width - left))
            for top in range(0, height, tile_h) for left in range(0, width, tile_w)]


def z_shape_of(height: int, width: int, stride: int) -> tuple[int, int]:
    """Hyper-latent shape of a ``height x width`` tile for a model of total ``stride``."""
    return -(-height // stride), -(-width // stride)


@dataclass
class AliceFile:
    """The parsed content of a ``.alice`` file: one ``(y, z)`` bitstream pair per tile."""

    base_hash: str          # 16 hex digits
    adapter_id: str         # 16 hex digits or "none"
    mode: str               # one of MODES
    control: float          # ln lambda
    height: int
    width: int
    tile: tuple[int, int]   # tile height, width in pixels
    stride: int             # the model's total stride (0: unknown, a version-1 file)
    streams: list[tuple[bytes, bytes]] = field(default_factory=list)
    version: int = VERSION
    crc: int | None = None
    v1_z_shape: tuple[int, int] | None = None   # version 1 stores the z shape instead of a stride

    @property
    def lmbda(self) -> float:
        return math.exp(self.control)

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        return tile_boxes(self.height, self.width, *self.tile)

    def z_shapes(self, stride: int | None = None) -> list[tuple[int, int]]:
        """The z shape of every tile (version 1: the stored one)."""
        if self.v1_z_shape is not None:
            return [self.v1_z_shape]
        stride = stride or self.stride
        return [z_shape_of(h, w, stride) for _, _, h, w in self.boxes]

    @property
    def y_string(self) -> bytes:
        """The y bitstream of a one-tile file."""
        return self._single()[0]

    @property
    def z_string(self) -> bytes:
        return self._single()[1]

    @property
    def z_shape(self) -> tuple[int, int]:
        return self.z_shapes()[0]

    def _single(self) -> tuple[bytes, bytes]:
        if len(self.streams) != 1:
            raise ValueError(f"the file has {len(self.streams)} tiles; use .streams")
        return self.streams[0]

    @property
    def payload_bytes(self) -> int:
        return sum(len(y) + len(z) for y, z in self.streams)

    @property
    def file_bytes(self) -> int:
        index = 0 if self.version == 1 else _INDEX.size * len(self.streams)
        return HEADER_SIZE + index + self.payload_bytes + _CRC.size

    @property
    def bpp(self) -> float:
        """Bits per pixel of the bitstreams (header, tile index and CRC excluded)."""
        return 8.0 * self.payload_bytes / (self.height * self.width)

    def info(self) -> dict:
        rows, cols = -(-self.height // self.tile[0]), -(-self.width // self.tile[1])
        return {"version": self.version, "base_hash": self.base_hash, "adapter_id": self.adapter_id,
                "mode": self.mode, "control": self.control, "lambda": self.lmbda, "height": self.height,
                "width": self.width, "tiles": f"{rows}x{cols} of {self.tile[0]}x{self.tile[1]}",
                "stride": self.stride or None,
                "y_bytes": sum(len(y) for y, _ in self.streams), "z_bytes": sum(len(z) for _, z in self.streams),
                "file_bytes": self.file_bytes, "bpp": self.bpp,
                "file_bpp": 8.0 * self.file_bytes / (self.height * self.width),
                "crc32": f"{self.crc:08x}" if self.crc is not None else None}


# ---------------------------------------------------------------------------- bounds
def check_plausible(height: int, width: int, n_tiles: int, payload: int, tile_pixels: int,
                    max_pixels: int | None) -> str | None:
    """Why a header is a decompression bomb (or impossible), or ``None``; costs nothing to ask.

    Refused: a side outside 1..65536, more pixels than ``max_pixels``, a tile larger than
    :data:`MAX_TILE_PIXELS` (version 2), and sizes the bitstreams cannot hold (fewer
    than 8 bytes per tile, or less than one byte per 2**20 pixels).
    """
    pixels = height * width
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        return f"image size {height}x{width} outside 1..{MAX_SIDE} per side"
    if max_pixels is not None and pixels > max_pixels:
        return (f"image size {height}x{width} ({pixels:,} pixels) exceeds the limit of {max_pixels:,} pixels "
                f"(a decompression bomb?); raise it with --max-pixels or ALICE_MAX_IMAGE_PIXELS")
    if tile_pixels > MAX_TILE_PIXELS:
        return f"tiles of {tile_pixels:,} pixels exceed the limit of {MAX_TILE_PIXELS:,}"
    if payload < 2 * _MIN_STREAM_BYTES * n_tiles or payload * _MAX_PIXELS_PER_BYTE < pixels:
        return (f"{payload} bytes of bitstream cannot hold a {height}x{width} image in {n_tiles} tile(s) "
                f"(a decompression bomb?)")
    return None


def _hex8(value: str, what: str) -> bytes:
    if value == "none":
        return _NO_ADAPTER
    try:
        raw = bytes.fromhex(value[:16])
    except ValueError:
        raise ValueError(f"{what} {value!r} is not hexadecimal") from None
    if len(raw) != 8:
        raise ValueError(f"{what} {value!r} needs at least 16 hex digits")
    return raw


def _valid_stride(stride: int) -> bool:
    return 1 <= stride < (1 << 16) and stride & (stride - 1) == 0


# ---------------------------------------------------------------------------- writing
def serialize_alice(f: AliceFile) -> bytes:
    """The bytes of a version-2 ``.alice`` file (every field checked against the reader's bounds)."""
    if f.mode not in MODES:
        raise ValueError(f"unknown mode {f.mode!r}")
    if not math.isfinite(f.control):
        raise ValueError("control value must be finite")
    if not _valid_stride(f.stride):
        raise ValueError(f"stride {f.stride} is not a power of two below 65536")
    th, tw = f.tile
    if th < 1 or tw < 1 or th % f.stride or tw % f.stride:
        raise ValueError(f"tile {th}x{tw} is not a multiple of the stride {f.stride}")
    if len(f.streams) != len(f.boxes):
        raise ValueError(f"{len(f.streams)} tile streams for a grid of {len(f.boxes)} tiles")
    problem = check_plausible(f.height, f.width, len(f.streams), f.payload_bytes, th * tw, None)
    if problem:
        raise ValueError(problem)
    header = _HEADER_V2.pack(MAGIC, VERSION, HEADER_SIZE, _hex8(f.base_hash, "base hash"),
                             _hex8(f.adapter_id, "adapter identity"), MODES.index(f.mode), 0, f.stride,
                             float(f.control), f.height, f.width, th, tw, len(f.streams), 0)
    index = b"".join(_INDEX.pack(len(y), len(z)) for y, z in f.streams)
    body = b"".join([header, index, *(bytes(y) + bytes(z) for y, z in f.streams)])
    if len(body) + _CRC.size > MAX_FILE_BYTES:
        raise ValueError("bitstreams too large for a .alice file")
    return body + _CRC.pack(zlib.crc32(body))


def write_alice(path: str | os.PathLike, alice: AliceFile, input_path: str | os.PathLike | None = None) -> Path:
    """Write ``alice`` atomically (fsync, unique temporary name); never over ``input_path``."""
    from ..utils import atomic_write_bytes

    return atomic_write_bytes(path, serialize_alice(alice), protect=[input_path])


# ---------------------------------------------------------------------------- reading
def _check_crc(data: bytes, fail) -> int:
    n = len(data)
    (stored,) = _CRC.unpack_from(data, n - _CRC.size)
    actual = zlib.crc32(data[: n - _CRC.size])
    if stored != actual:
        raise fail(f"CRC mismatch (stored {stored:08x}, computed {actual:08x}): the file is corrupted")
    return stored


def _check_length(expected: int, n: int, fail) -> None:
    if expected > n:
        raise fail(f"truncated: the header announces {expected} bytes, the file has {n}")
    if expected < n:
        raise fail(f"{n - expected} unexpected byte(s) after the CRC (the header announces {expected} bytes)")


def _check_common(mode: int, control: float, fail) -> None:
    if mode >= len(MODES):
        raise fail(f"unknown mode {mode}")
    if not math.isfinite(control) or abs(control) > 100:
        raise fail(f"control value {control!r} is not a finite log-lambda")


def _parse_v2(data: bytes, fail, max_pixels: int | None) -> AliceFile:
    n = len(data)
    (_, version, _, base, adapter, mode, r0, stride, control, height, width, th, tw, n_tiles,
     r1) = _HEADER_V2.unpack_from(data, 0)
    index_end = HEADER_SIZE + _INDEX.size * n_tiles
    if index_end + _CRC.size > n:
        raise fail(f"truncated: {n_tiles} tiles need an index of {index_end - HEADER_SIZE} bytes, the file has {n}")
    lengths = [_INDEX.unpack_from(data, HEADER_SIZE + _INDEX.size * i) for i in range(n_tiles)]
    payload = sum(y + z for y, z in lengths)
    _check_length(index_end + payload + _CRC.size, n, fail)
    crc = _check_crc(data, fail)
    _check_common(mode, control, fail)
    if r0 or r1:
        raise fail("reserved header fields are not zero")
    if not _valid_stride(stride):
        raise fail(f"stride {stride} is not a power of two")
    if not (stride <= th <= MAX_SIDE and stride <= tw <= MAX_SIDE) or th % stride or tw % stride:
        raise fail(f"tile {th}x{tw} is not a multiple of the stride {stride} within 1..{MAX_SIDE}")
    problem = check_plausible(height, width, n_tiles, payload, th * tw, max_pixels)
    if problem:
        raise fail(problem)
    if n_tiles != -(-height // th) * -(-width // tw):
        raise fail(f"{n_tiles} tiles do not cover a {height}x{width} image in tiles of {th}x{tw}")
    if any(y < _MIN_STREAM_BYTES or z < _MIN_STREAM_BYTES for y, z in lengths):
        raise fail("a tile bitstream is shorter than a rANS stream can be")
    streams, offset = [], index_end
    for y_len, z_len in lengths:
        streams.append((data[offset:offset + y_len], data[offset + y_len:offset + y_len + z_len]))
        offset += y_len + z_len
    return AliceFile(base_hash=base.hex(), adapter_id="none" if adapter == _NO_ADAPTER else adapter.hex(),
                     mode=MODES[mode], control=control, height=height, width=width, tile=(th, tw),
                     stride=stride, streams=streams, version=version, crc=crc)


def _parse_v1(data: bytes, fail, max_pixels: int | None) -> AliceFile:
    n = len(data)
    (_, version, _, base, adapter, mode, r0, r1, control, height, width, zh, zw, y_len, z_len,
     r2) = _HEADER_V1.unpack_from(data, 0)
    _check_length(HEADER_SIZE + y_len + z_len + _CRC.size, n, fail)
    crc = _check_crc(data, fail)
    _check_common(mode, control, fail)
    if r0 or r1 or r2:
        raise fail("reserved header fields are not zero")
    # Version 1 is one untiled image: its tile is the whole image (no tile limit, the pixel limit holds).
    problem = check_plausible(height, width, 1, y_len + z_len, 0, max_pixels)
    if problem:
        raise fail(problem)
    if not (1 <= zh <= height and 1 <= zw <= width):
        raise fail(f"z shape {zh}x{zw} does not fit a {height}x{width} image")
    if y_len < _MIN_STREAM_BYTES or z_len < _MIN_STREAM_BYTES:
        raise fail("empty bitstream")
    y = data[HEADER_SIZE:HEADER_SIZE + y_len]
    z = data[HEADER_SIZE + y_len:HEADER_SIZE + y_len + z_len]
    return AliceFile(base_hash=base.hex(), adapter_id="none" if adapter == _NO_ADAPTER else adapter.hex(),
                     mode=MODES[mode], control=control, height=height, width=width, tile=(height, width),
                     stride=0, streams=[(y, z)], version=version, crc=crc, v1_z_shape=(zh, zw))


_UNSET = object()


def parse_alice(data: bytes, name: str = "file", max_pixels: int | None | object = _UNSET) -> AliceFile:
    """Parse and validate ``.alice`` bytes (version 1 or 2); every problem raises :class:`AliceFormatError`.

    ``max_pixels``: the pixel limit (default :func:`max_image_pixels`; ``None`` = none).
    """
    def fail(msg: str) -> AliceFormatError:
        return AliceFormatError(f"{name}: {msg}")

    limit = max_image_pixels() if max_pixels is _UNSET else max_pixels
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise fail("expected bytes")
    data = bytes(data)
    n = len(data)
    if n > MAX_FILE_BYTES:
        raise fail(f"{n} bytes exceed the limit of {MAX_FILE_BYTES}")
    if n < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise fail("not an .alice file (wrong magic bytes)")
    if n < 12:
        raise fail(f"truncated: {n} bytes, a header needs {HEADER_SIZE}")
    version, header_size = struct.unpack_from("<HH", data, 8)
    if version not in (1, VERSION):
        raise fail(f"unsupported .alice version {version} (this reader knows versions 1 and {VERSION})")
    if header_size != HEADER_SIZE:
        raise fail(f"header size {header_size} != {HEADER_SIZE} for version {version}")
    if n < HEADER_SIZE + _CRC.size:
        raise fail(f"truncated: {n} bytes, a header and CRC need {HEADER_SIZE + _CRC.size}")
    return (_parse_v1 if version == 1 else _parse_v2)(data, fail, limit)


def read_alice(path: str | os.PathLike, max_pixels: int | None | object = _UNSET) -> AliceFile:
    """Read and validate a ``.alice`` file (see :func:`parse_alice`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_file():
        raise AliceFormatError(f"{path} is not a regular file")
    with open(path, "rb") as fh:
        data = fh.read(MAX_FILE_BYTES + 1)
    return parse_alice(data, str(path), max_pixels)
