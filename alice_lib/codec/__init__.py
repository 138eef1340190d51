"""The ``.alice`` codec: file format, continuous rate control, tiled coding, target search.

* :mod:`.format` — the ``.alice`` file (header, tile layout, CRC, bomb checks); no torch
* :mod:`.rate` — :class:`RateControl`: any lambda between the anchor and trained ALICE adapters
* :mod:`.coding` — :func:`encode` / :func:`decode`, tile by tile with bounded memory
* :mod:`.target` — :func:`compress_to_target`: a bpp or PSNR target

The format names are imported eagerly; the others, which need torch and the model,
on first use, so that reading a header (``alice info``) never imports torch.
"""

from __future__ import annotations

import importlib

from .format import (DEFAULT_TILE, HEADER_SIZE, MAGIC, MAX_FILE_BYTES, MAX_IMAGE_PIXELS, MAX_SIDE, MODES, VERSION,
                     AliceFile, AliceFormatError, check_plausible, max_image_pixels, parse_alice, read_alice,
                     serialize_alice, tile_boxes, write_alice)

_LAZY = {
    "ANCHOR_LMBDA": "rate", "RATE_MODES": "rate", "RateControl": "rate", "adapter_hash": "rate",
    "encode": "coding", "decode": "coding", "estimate": "coding", "tile_shape": "coding", "as_uint8": "coding",
    "TargetResult": "target", "TargetSearch": "target", "compress_to_target": "target",
}

__all__ = ["DEFAULT_TILE", "HEADER_SIZE", "MAGIC", "MAX_FILE_BYTES", "MAX_IMAGE_PIXELS", "MAX_SIDE", "MODES",
           "VERSION", "AliceFile", "AliceFormatError", "check_plausible", "max_image_pixels", "parse_alice",
           "read_alice", "serialize_alice", "tile_boxes", "write_alice", *_LAZY]


def __getattr__(name: str):
    """Import the torch-side names on first use (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
