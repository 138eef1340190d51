"""Continuous rate control, target coding, the ``.alice`` format and its CLI (alice_lib.codec).

A tiny random STF serves as the anchor. Its three adapter sets are built, not
trained: the last encoder stage's fc2 adapter adds ``amp * mean(h) * v`` to every
latent token (``W_a`` uniform, ``W_b`` one row ``amp * v``, ``v`` along the anchor's
mean latent) with ``amp`` growing with lambda, so the rate grows with the control
value; every other adapted layer gets a small random update so that the synthesis
changes too.
"""

from __future__ import annotations

import math
import random
import signal
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alice_lib import codec
from alice_lib.adapter_files import load_adapters, save_adapters
from alice_lib.checkpoints import save_stf
from alice_lib.cli import main
from alice_lib.codec import (HEADER_SIZE, MAGIC, AliceFormatError, RateControl, compress_to_target,
                             decode, encode, parse_alice, read_alice, serialize_alice, write_alice)
from alice_lib.data import read_image
from alice_lib.lora import LoRAConfig, inject_lora, lora_modules, merged_state_dict
from alice_lib.models.stf import STFConfig, SymmetricalTransFormer

torch.set_num_threads(1)

TINY = STFConfig(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), num_slices=4, drop_path_rate=0.0)
ANCHOR_LMBDA = 0.001
AMPS = {0.004: 1.0, 0.016: 2.0, 0.064: 4.0}


def _anchor(seed: int = 0) -> SymmetricalTransFormer:
    torch.manual_seed(seed)
    model = SymmetricalTransFormer(TINY).eval()
    model.update(force=True)
    return model


def _adapters(anchor: SymmetricalTransFormer, folder: Path) -> dict[float, Path]:
    lcfg = LoRAConfig(r=2, alpha=1.0)
    with torch.no_grad():  # the direction of the anchor's mean latent: adding it raises |y| and the rate
        y = anchor.analysis(anchor._pad(_synthetic(96, 128, seed=11).float().div(255).unsqueeze(0)))
    v = y.mean((0, 2, 3))
    v = v / v.norm() * 8
    paths = {}
    for lmbda, amp in AMPS.items():
        model = SymmetricalTransFormer(TINY)
        model.load_state_dict(anchor.state_dict())
        inject_lora(model, lcfg, generator=torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, mod in lora_modules(model).items():
                if name.startswith("layers.3") and name.endswith("fc2"):
                    mod.lora.W_a.fill_(1.0 / mod.lora.W_a.shape[0])
                    mod.lora.W_b.zero_()
                    mod.lora.W_b[0] = amp * v
                else:
                    mod.lora.W_b.copy_(torch.randn(mod.lora.W_b.shape, generator=g) * 0.01 * amp)
        paths[lmbda] = save_adapters(folder / f"adapters-{lmbda}.safetensors", model, lmbda=lmbda, config=lcfg)
    return paths


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("codec")
    anchor = _anchor()
    model_path = save_stf(folder / "anchor.safetensors", anchor, {"lmbda": ANCHOR_LMBDA})
    adapters = _adapters(anchor, folder)
    rc = RateControl(anchor, adapters, mode="interpolate", anchor_lmbda=ANCHOR_LMBDA)
    return {"folder": folder, "anchor": anchor, "model_path": model_path, "adapters": adapters, "rc": rc}


def _synthetic(h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2]) * 200 + torch.rand(3, h, w, generator=g) * 40
    return base.round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def crop(kodak_dir):
    return read_image(kodak_dir / "kodim01.png")[:, 100:196, 200:328].contiguous()  # 96x128


# ============================================================================ rate control
def test_trained_points_equal_malice_and_no_drift(tiny):
    rc, anchor = tiny["rc"], tiny["anchor"]
    assert rc.lmbdas == [ANCHOR_LMBDA, 0.004, 0.016, 0.064]
    assert rc.range == (math.log(ANCHOR_LMBDA), math.log(0.064))
    base = {k: v.clone() for k, v in anchor.state_dict().items()}
    for lmbda, path in tiny["adapters"].items():
        reference = SymmetricalTransFormer(TINY)
        reference.load_state_dict(anchor.state_dict())
        load_adapters(path, reference)
        merged = merged_state_dict(reference)
        state = rc.model_at(math.log(lmbda)).state_dict()
        for name in rc.layers:
            assert torch.equal(state[f"{name}.weight"], merged[f"{name}.weight"]), name
    # Switching around many times: the anchor's weights come back bit for bit.
    for c in np.linspace(*rc.range, 17).tolist() * 3:
        rc.model_at(c)
    state = rc.model_at(rc.anchor_control).state_dict()
    for name in rc.layers:
        assert torch.equal(state[f"{name}.weight"], base[f"{name}.weight"])
    # The caller's model was not touched.
    assert all(torch.equal(v, base[k]) for k, v in anchor.state_dict().items())


def test_interpolation_and_alpha_weights(tiny):
    rc = tiny["rc"]
    alpha = rc.with_mode("alpha")
    a, b = math.log(0.004), math.log(0.016)
    mid = (a + b) / 2
    assert rc.coefficients(mid) == pytest.approx({0.004: 0.5, 0.016: 0.5})
    layer = rc.layers[0]
    d_a, d_b = rc.sets[0.004].delta(layer), rc.sets[0.016].delta(layer)
    w = rc.model_at(mid).get_submodule(layer).weight
    torch.testing.assert_close(w, rc._base[layer] + 0.5 * d_a + 0.5 * d_b)
    # CALICE-style: one adapter set, alpha scaled; exact at the trained points.
    c1 = (rc.anchor_control + a) / 2
    assert alpha.coefficients(c1) == pytest.approx({0.004: 0.5})
    assert alpha.coefficients(a) == {0.004: 1.0} and alpha.coefficients(b) == {0.016: 1.0}
    s = (mid - rc.anchor_control) / (b - rc.anchor_control)
    assert alpha.coefficients(mid) == pytest.approx({0.016: s})
    w = alpha.model_at(mid).get_submodule(layer).weight
    torch.testing.assert_close(w, rc._base[layer] + s * d_b)
    assert rc.coefficients(rc.anchor_control) == {} and rc.identity(rc.anchor_control) == "none"
    with pytest.raises(ValueError, match="outside the covered range"):
        rc.model_at(math.log(0.5))


def test_rate_grows_with_control(tiny):
    rc = tiny["rc"]
    image = _synthetic(64, 64)
    for mode in ("interpolate", "alpha"):
        r = rc.with_mode(mode)
        bpps = [encode(r, image, c).bpp for c in np.linspace(*rc.range, 7)]
        assert all(x < y for x, y in zip(bpps, bpps[1:])), (mode, bpps)


# ============================================================================ round trips
def test_round_trip_bit_exact_on_kodak_crop(tiny, crop):
    rc = tiny["rc"]
    x = crop.float().div(255).unsqueeze(0)
    lo, hi = rc.range
    for mode, c in [("interpolate", lo), ("interpolate", math.log(0.016)), ("interpolate", 0.3 * lo + 0.7 * hi),
                    ("alpha", 0.5 * lo + 0.5 * hi)]:
        r = rc.with_mode(mode)
        f = encode(r, crop, c)
        parsed = parse_alice(serialize_alice(f))
        assert parsed.y_string == f.y_string and parsed.z_string == f.z_string and parsed.control == c
        decoded = decode(rc, parsed)  # the file's mode is honoured whatever rc's mode is
        model = r.model_at(c)
        enc = model.compress(x)
        assert enc["strings"][0][0] == f.y_string and enc["strings"][1][0] == f.z_string
        ref = model.decompress(enc["strings"], enc["shape"], enc["image_size"])["x_hat"]
        assert torch.equal(decoded, ref[0].mul(255).round().to(torch.uint8))
        assert decoded.shape == crop.shape


def test_odd_size_round_trip(tiny):
    rc = tiny["rc"]
    image = _synthetic(37, 70, seed=3)
    f = parse_alice(serialize_alice(encode(rc, image, math.log(0.01))))
    assert (f.height, f.width) == (37, 70)
    assert decode(rc, f).shape == (3, 37, 70)


def test_file_round_trip_and_atomic_write(tiny, tmp_path):
    rc = tiny["rc"]
    f = encode(rc, _synthetic(), math.log(0.008))
    path = write_alice(tmp_path / "a.alice", f)
    data = path.read_bytes()
    assert data[:8] == MAGIC and len(data) == HEADER_SIZE + 8 * len(f.streams) + f.payload_bytes + 4
    assert zlib.crc32(data[:-4]) == struct.unpack("<I", data[-4:])[0]
    g = read_alice(path)
    assert (g.base_hash, g.adapter_id, g.mode, g.control, g.height, g.width, g.z_shape) == (
        rc.base_hash[:16], rc.identity(math.log(0.008))[:16], "interpolate", math.log(0.008), 64, 64, (1, 1))
    assert g.lmbda == pytest.approx(0.008)
    assert [p.name for p in tmp_path.iterdir()] == ["a.alice"]  # no temporary left behind
    with pytest.raises(ValueError, match="refusing to overwrite the input"):
        write_alice(path, f, input_path=path)
    assert path.read_bytes() == data


def test_foreign_weights_refused(tiny, tmp_path):
    rc = tiny["rc"]
    f = encode(rc, _synthetic(), math.log(0.01))
    other = RateControl(_anchor(seed=7), anchor_lmbda=ANCHOR_LMBDA)
    with pytest.raises(AliceFormatError) as err:
        decode(other, f)
    assert rc.base_hash[:16] in str(err.value) and other.base_hash in str(err.value)
    with pytest.raises(ValueError, match=other.base_hash):
        RateControl(other.model, tiny["adapters"], anchor_lmbda=ANCHOR_LMBDA)
    # Same base, but other adapters at that rate: refused by the adapter identity.
    partial = RateControl(tiny["anchor"], {0.004: tiny["adapters"][0.004], 0.064: tiny["adapters"][0.064]},
                          anchor_lmbda=ANCHOR_LMBDA)
    with pytest.raises(AliceFormatError, match="adapters"):
        decode(partial, f)
    # Without adapters: outside the range.
    with pytest.raises(AliceFormatError, match="outside"):
        decode(RateControl(tiny["anchor"], anchor_lmbda=ANCHOR_LMBDA), f)


# ============================================================================ damaged files
@pytest.mark.parametrize("make, message", [
    (lambda d: b"", "magic"),
    (lambda d: b"PNG" + d[3:], "magic"),
    (lambda d: d[:8], "truncated"),
    (lambda d: d[:40], "truncated"),
    (lambda d: d[:-1], "truncated"),
    (lambda d: d + b"\0", "after the CRC"),
    (lambda d: d[:8] + struct.pack("<H", 3) + d[10:], "version 3"),
    (lambda d: d[:8] + bytes(len(d) - 8), "version 0"),
    (lambda d: d[:HEADER_SIZE + 8] + bytes([d[HEADER_SIZE + 8] ^ 1]) + d[HEADER_SIZE + 9:], "CRC"),  # payload
    (lambda d: d[:HEADER_SIZE] + bytes([d[HEADER_SIZE] ^ 1]) + d[HEADER_SIZE + 1:], "truncated"),  # tile index
    (lambda d: d[:-4] + b"\0\0\0\0", "CRC"),
])
def test_damaged_files_named(tiny, make, message):
    data = serialize_alice(encode(tiny["rc"], _synthetic(), math.log(0.01)))
    with pytest.raises(AliceFormatError, match=message):
        parse_alice(make(data))


def _with_crc(body: bytes) -> bytes:
    return body[:-4] + struct.pack("<I", zlib.crc32(body[:-4]))


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def test_corruption_fuzz(tiny):
    """>= 1,000 mutated files: each refused with AliceFormatError (or decoded to a valid image); none hangs."""
    rc = tiny["rc"]
    valid = [serialize_alice(encode(rc, _synthetic(64, 64, seed=s), c))
             for s, c in [(0, math.log(0.01)), (1, math.log(0.002)), (2, rc.anchor_control)]]
    other = serialize_alice(encode(rc, _synthetic(37, 70, seed=4), math.log(0.03)))
    rng = random.Random(1234)

    def mutate(data: bytes) -> tuple[str, bytes]:
        kind = rng.choice(["bitflip", "bitflips", "truncate", "append", "swap_header", "zero_header",
                           "random_bytes", "random_file", "header_field_crc_fixed", "byte_set"])
        b = bytearray(data)
        if kind == "bitflip":
            i = rng.randrange(min(len(b), HEADER_SIZE + 8) if rng.random() < 0.7 else len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif kind == "bitflips":
            for _ in range(rng.randint(2, 16)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            b = b[:rng.randrange(len(b))]
        elif kind == "append":
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif kind == "swap_header":
            b = bytearray(other[:HEADER_SIZE]) + b[HEADER_SIZE:]
        elif kind == "zero_header":
            start = rng.randrange(HEADER_SIZE)
            end = rng.randint(start + 1, HEADER_SIZE)
            b[start:end] = bytes(end - start)
        elif kind == "random_bytes":
            i = rng.randrange(len(b))
            n = rng.randint(1, 32)
            b[i:i + n] = bytes(rng.randrange(256) for _ in range(n))
        elif kind == "random_file":
            b = bytearray(rng.randrange(256) for _ in range(rng.randint(0, 200)))
            if rng.random() < 0.5:
                b[:8] = MAGIC
        elif kind == "byte_set":
            b[rng.randrange(min(len(b), HEADER_SIZE))] = rng.choice([0, 0xFF, 0x7F, 0x80])
        else:  # a header field changed and the CRC recomputed: the field checks must hold on their own
            offset, fmt = rng.choice([(10, "<H"), (28, "<B"), (29, "<B"), (30, "<H"), (32, "<d"), (40, "<I"),
                                      (44, "<I"), (48, "<I"), (52, "<I"), (56, "<I"), (64, "<I"), (68, "<I"),
                                      (12, "<Q"), (20, "<Q")])
            size = struct.calcsize(fmt)
            if fmt == "<d":
                value = rng.choice([math.nan, math.inf, -math.inf, 1e308, rng.uniform(-12, 3),
                                    rng.uniform(*rc.range)])
                b[offset:offset + size] = struct.pack(fmt, value)
            else:
                b[offset:offset + size] = bytes(rng.randrange(256) for _ in range(size))
            b = bytearray(_with_crc(bytes(b)))
        return kind, bytes(b)

    counts = {"cases": 0, "refused": 0, "decoded": 0, "identical": 0}
    kinds: dict[str, int] = {}
    old = signal.signal(signal.SIGALRM, _alarm)
    started = time.perf_counter()
    try:
        while counts["cases"] < 1200:
            base = rng.choice(valid)
            kind, data = mutate(base)
            if data == base:
                counts["identical"] += 1
                continue
            counts["cases"] += 1
            kinds[kind] = kinds.get(kind, 0) + 1
            signal.setitimer(signal.ITIMER_REAL, 5.0)
            try:
                f = parse_alice(data)
                image = decode(rc, f)
                assert image.dtype == torch.uint8 and image.shape == (3, f.height, f.width)
                counts["decoded"] += 1
            except AliceFormatError:
                counts["refused"] += 1
            except _Hang:
                pytest.fail(f"hang on a {kind} mutation")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, old)
    elapsed = time.perf_counter() - started
    print(f"corruption fuzz: {counts}, kinds {kinds}, {elapsed:.1f} s")
    assert counts["cases"] >= 1000 and counts["refused"] + counts["decoded"] == counts["cases"]
    # Only header edits with a recomputed CRC can decode (e.g. another control in the range).
    assert counts["decoded"] <= kinds.get("header_field_crc_fixed", 0)
    assert elapsed < 60


def test_header_edit_with_valid_crc_decodes_or_refuses(tiny):
    """Past the CRC the field checks stand alone: another control in the same interval decodes."""
    rc = tiny["rc"]
    data = bytearray(serialize_alice(encode(rc, _synthetic(), math.log(0.006))))
    data[32:40] = struct.pack("<d", math.log(0.008))
    image = decode(rc, parse_alice(_with_crc(bytes(data))))
    assert image.shape == (3, 64, 64)
    data[32:40] = struct.pack("<d", math.log(0.03))  # another interval: other adapters involved
    with pytest.raises(AliceFormatError, match="adapters"):
        decode(rc, parse_alice(_with_crc(bytes(data))))
    data[32:40] = struct.pack("<d", math.log(0.006))
    data[40:44] = struct.pack("<I", 200)  # height: the tiles no longer cover the image
    with pytest.raises(AliceFormatError, match="cover"):
        decode(rc, parse_alice(_with_crc(bytes(data))))


def test_read_alice_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_alice(tmp_path / "missing.alice")
    with pytest.raises(AliceFormatError, match="not a regular file"):
        read_alice(tmp_path)


# ============================================================================ target coding
def test_target_bpp_accuracy(tiny, kodak_dir):
    rc = tiny["rc"]
    images = [read_image(kodak_dir / f"kodim{i:02d}.png")[:, 200:264, 300:364].contiguous() for i in (1, 5, 13)]
    hits = total = 0
    for image in images:
        lo_bpp = encode(rc, image, rc.range[0]).bpp
        hi_bpp = encode(rc, image, rc.range[1]).bpp
        assert hi_bpp > 1.3 * lo_bpp
        for q in (0.2, 0.5, 0.8):
            target = lo_bpp * (hi_bpp / lo_bpp) ** q  # inside the covered range
            r = compress_to_target(rc, image, target_bpp=target)
            assert not r.clamped
            assert r.achieved_bpp == pytest.approx(r.alice.bpp)
            hits += r.hit
            total += 1
            assert abs(r.achieved_bpp / target - 1) < 0.10
        low = compress_to_target(rc, image, target_bpp=lo_bpp / 3)
        assert low.clamped and low.clamped_to == "low" and low.control == rc.range[0]
        high = compress_to_target(rc, image, target_bpp=hi_bpp * 3)
        assert high.clamped and high.clamped_to == "high" and high.control == rc.range[1]
    assert hits >= total - 1, f"{hits}/{total} targets within 3%"


def test_target_psnr(tiny):
    rc = tiny["rc"]
    image = _synthetic(64, 64, seed=9)
    with pytest.raises(ValueError, match="exactly one"):
        compress_to_target(rc, image)
    r = compress_to_target(rc, image, target_psnr=1000.0)
    assert r.clamped or r.hit  # a random model's PSNR may not move much: only check it ends sanely
    assert decode(rc, r.alice).shape == image.shape


# ============================================================================ command line
def _weights(tiny) -> list[str]:
    return ["--model", str(tiny["model_path"]), "--adapters", *map(str, tiny["adapters"].values())]


def test_cli_round_trip(tiny, tmp_path, capsys):
    image = _synthetic(64, 96, seed=5)
    png = tmp_path / "in.png"
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(png)
    out = tmp_path / "out.alice"
    assert main(["compress", str(png), str(out), "--lmbda", "0.01", *_weights(tiny)]) == 0
    f = read_alice(out)
    assert f.lmbda == pytest.approx(0.01) and (f.height, f.width) == (64, 96)
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "base_hash" in printed and tiny["rc"].base_hash[:16] in printed
    rec = tmp_path / "rec.png"
    assert main(["decompress", str(out), str(rec), *_weights(tiny)]) == 0
    assert torch.equal(read_image(rec), decode(tiny["rc"], f))
    # Target coding and the anchor's own rate (no --lmbda): the anchor lambda from the model's metadata.
    assert main(["compress", str(png), str(tmp_path / "t.alice"), "--bpp", str(f.bpp), *_weights(tiny)]) == 0
    assert abs(read_alice(tmp_path / "t.alice").bpp / f.bpp - 1) < 0.1
    assert main(["compress", str(png), str(tmp_path / "a.alice"), *_weights(tiny)]) == 0
    assert read_alice(tmp_path / "a.alice").lmbda == pytest.approx(ANCHOR_LMBDA)
    assert main(["compress", str(png), str(tmp_path / "m.alice"), "--model", str(tiny["model_path"])]) == 0
    assert read_alice(tmp_path / "m.alice").mode == "fixed"


def test_cli_errors(tiny, tmp_path, capsys, monkeypatch):
    image = _synthetic(64, 64)
    png = tmp_path / "in.png"
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(png)
    good = tmp_path / "good.alice"
    assert main(["compress", str(png), str(good), "--lmbda", "0.01", *_weights(tiny)]) == 0
    data = good.read_bytes()
    (tmp_path / "magic.alice").write_bytes(b"NOTALICE" + data[8:])
    (tmp_path / "trunc.alice").write_bytes(data[: len(data) // 2])
    (tmp_path / "flip.alice").write_bytes(data[:80] + bytes([data[80] ^ 4]) + data[81:])  # a payload byte
    capsys.readouterr()
    cases = [
        (["compress", str(tmp_path / "missing.png"), str(tmp_path / "x.alice")], "does not exist"),
        (["compress", str(png), str(png), *_weights(tiny)], "would both be written"),
        (["compress", str(good), str(good), *_weights(tiny)], "input"),
        (["compress", str(good), str(tmp_path / "y.alice"), *_weights(tiny)], "not a readable image"),
        (["compress", str(png), str(tmp_path / "z.alice"), "--lmbda", "5", *_weights(tiny)], "outside"),
        (["decompress", str(tmp_path / "missing.alice"), str(tmp_path / "o.png")], "does not exist"),
        (["decompress", str(tmp_path / "magic.alice"), str(tmp_path / "o.png"), *_weights(tiny)], "magic"),
        (["decompress", str(tmp_path / "trunc.alice"), str(tmp_path / "o.png"), *_weights(tiny)], "truncated"),
        (["decompress", str(tmp_path / "flip.alice"), str(tmp_path / "o.png"), *_weights(tiny)], "CRC"),
        (["decompress", str(good), str(good), *_weights(tiny)], "would both be written"),
        (["decompress", str(png), str(png), *_weights(tiny)], "input"),
        (["decompress", str(good), str(tmp_path / "o.xyz"), *_weights(tiny)], "extension"),
        (["decompress", str(good), str(tmp_path / "o.png"), "--model", str(tiny["model_path"])], "outside"),
        (["info", str(tmp_path / "trunc.alice")], "truncated"),
        (["info", str(tmp_path / "missing.alice")], "does not exist"),
    ]
    other = save_stf(tmp_path / "other.safetensors", _anchor(seed=3), {"lmbda": 0.01})
    cases.append((["decompress", str(good), str(tmp_path / "o.png"), "--model", str(other)], "base weights"))
    for argv, message in cases:
        assert main(argv) != 0, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert good.read_bytes() == data and png.exists()
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "x.alice").exists()
    # No shipped weights (before they are added): a clear message.
    monkeypatch.setattr("alice_lib.cli.WEIGHTS_DIR", tmp_path / "nowhere")
    assert main(["compress", str(png), str(tmp_path / "w.alice")]) != 0
    assert "shipped CPU model" in capsys.readouterr().err


def test_cli_discovers_shipped_weights(tiny, tmp_path, monkeypatch):
    import shutil

    from alice_lib.cli import shipped_weights

    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(tiny["model_path"], folder / "cpu_anchor.safetensors")
    for lmbda, path in tiny["adapters"].items():
        shutil.copy(path, folder / f"cpu_alice_{lmbda}.safetensors")
    (folder / "cpu_alice_notes.safetensors").write_text("ignored")
    anchor, adapters = shipped_weights(folder)
    assert anchor.name == "cpu_anchor.safetensors"
    assert [p.name for p in adapters] == [f"cpu_alice_{x}.safetensors" for x in sorted(AMPS)]
    monkeypatch.setattr("alice_lib.cli.WEIGHTS_DIR", folder)
    png = tmp_path / "in.png"
    Image.fromarray(_synthetic(64, 64).permute(1, 2, 0).numpy()).save(png)
    assert main(["compress", str(png), str(tmp_path / "s.alice"), "--lmbda", "0.016"]) == 0
    assert main(["decompress", str(tmp_path / "s.alice"), str(tmp_path / "s.png")]) == 0
    assert read_image(tmp_path / "s.png").shape == (3, 64, 64)


def test_measurement_helpers(tiny, tmp_path):
    from alice_lib.evaluation import rate_control as measure

    folder = tmp_path / "imgs"
    folder.mkdir()
    for s in range(2):
        Image.fromarray(_synthetic(64, 64, seed=s).permute(1, 2, 0).numpy()).save(folder / f"i{s}.png")
    df = measure.measure_intermediate(tiny["rc"], folder, per_interval=1)
    assert set(df["mode"]) == {"trained", "interpolate", "alpha"}
    assert len(df) == 2 * (4 + 3 + 3)
    bd = measure.interpolation_bd_rates(df)
    assert sorted(bd["mode"]) == ["alpha", "interpolate"]
    hits = measure.target_hit_rate(tiny["rc"], folder, [4.0], max_images=1)
    assert len(hits) == 1 and "hit_rate" in hits.attrs


# ============================================================================ tiles, old files, bombs
def test_tiled_round_trip_records_layout(tiny):
    rc = tiny["rc"]
    image = _synthetic(150, 200, seed=6)
    c = math.log(0.01)
    f = parse_alice(serialize_alice(encode(rc, image, c, tile=64)))
    assert f.version == 2 and f.tile == (64, 64) and f.stride == 64 and len(f.streams) == 3 * 4
    decoded = decode(rc, f)
    model = rc.model_at(c)
    for (top, left, h, w), (y, z) in zip(f.boxes, f.streams):  # each tile is an independent STF bitstream
        x = image[:, top:top + h, left:left + w].float().div(255).unsqueeze(0)
        enc = model.compress(x)
        assert enc["strings"][0][0] == y and enc["strings"][1][0] == z
        ref = model.decompress(enc["strings"], enc["shape"], enc["image_size"])["x_hat"][0]
        assert torch.equal(decoded[:, top:top + h, left:left + w], ref.mul(255).round().to(torch.uint8))
    # Tile sizes are rounded up to the stride and never exceed the padded image.
    assert encode(rc, image, c, tile=100).tile == (128, 128)
    assert encode(rc, image, c, tile=None).tile == (192, 256)


def _version1(f) -> bytes:
    """The version-1 layout (one untiled image) that earlier releases wrote."""
    body = struct.pack("<8sHH8s8sBBHdIIHHIII", MAGIC, 1, 64, bytes.fromhex(f.base_hash),
                       bytes(8) if f.adapter_id == "none" else bytes.fromhex(f.adapter_id),
                       codec.MODES.index(f.mode), 0, 0, f.control, f.height, f.width, *f.z_shape,
                       len(f.y_string), len(f.z_string), 0) + f.y_string + f.z_string
    return body + struct.pack("<I", zlib.crc32(body))


def test_version1_files_still_read(tiny):
    rc = tiny["rc"]
    image = _synthetic(70, 90, seed=8)
    f = encode(rc, image, math.log(0.02), tile=None)
    old = parse_alice(_version1(f))
    assert old.version == 1 and old.z_shape == (2, 2) and old.lmbda == pytest.approx(0.02)
    assert torch.equal(decode(rc, old), decode(rc, f))
    bad = bytearray(_version1(f))
    bad[48:50] = struct.pack("<H", 1)  # another z shape, CRC recomputed
    with pytest.raises(AliceFormatError, match="z shape"):
        decode(rc, parse_alice(_with_crc(bytes(bad))))


def _bomb(version: int, side: int = 16384, size: int = 200) -> bytes:
    """A ``size``-byte file whose header announces ``side`` x ``side`` pixels, sizes consistent, CRC valid."""
    if version == 1:
        payload = size - 68
        header = struct.pack("<8sHH8s8sBBHdIIHHIII", MAGIC, 1, 64, bytes(8), bytes(8), 0, 0, 0, -3.0, side, side,
                             side // 64, side // 64, payload - 8, 8, 0)
        body = header + bytes(payload)
    else:
        header = struct.pack("<8sHH8s8sBBHdIIIIII", MAGIC, 2, 64, bytes(8), bytes(8), 0, 0, 64, -3.0, side, side,
                             side, side, 1, 0)
        payload = size - 76
        body = header + struct.pack("<II", payload - 8, 8) + bytes(payload)
    return _with_crc(body + b"\0\0\0\0")


@pytest.mark.parametrize("version", [1, 2])
def test_bombs_refused_up_front(version, tiny, tmp_path, capsys, monkeypatch):
    data = _bomb(version)
    assert len(data) == 200
    with pytest.raises(AliceFormatError, match="pixel"):
        parse_alice(data)
    with pytest.raises(AliceFormatError, match="cannot hold|exceed"):  # also without a pixel limit
        parse_alice(data, max_pixels=None)
    path = tmp_path / "bomb.alice"
    path.write_bytes(data)
    assert main(["decompress", str(path), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "bomb" in err[0] and "1 failed" in err[1], err  # the error, the summary
    assert not list((tmp_path / "out").iterdir())
    # The limit is configurable, like Pillow's MAX_IMAGE_PIXELS.
    small = serialize_alice(encode(tiny["rc"], _synthetic(64, 64), tiny["rc"].anchor_control))
    with pytest.raises(AliceFormatError, match="limit"):
        parse_alice(small, max_pixels=1000)
    monkeypatch.setenv("ALICE_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(AliceFormatError, match="limit"):
        parse_alice(small)
    monkeypatch.setenv("ALICE_MAX_IMAGE_PIXELS", "0")
    assert parse_alice(small).height == 64


def test_bomb_cli_is_fast_and_needs_no_torch(tmp_path):
    """The 200-byte 16384x16384 file: refused, one line, exit 1, without importing torch."""
    import subprocess
    import sys

    path = tmp_path / "bomb.alice"
    path.write_bytes(_bomb(2))
    code = ("import sys\nfrom alice_lib.cli import main\nrc = main(['info', sys.argv[1]])\n"
            "assert 'torch' not in sys.modules, 'alice info imported torch'\nsys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert out.stderr.count("\n") == 1 and "exceeds the limit" in out.stderr


# ============================================================================ decoder fuzz
def _fuzz_file(tiny) -> bytes:
    return serialize_alice(encode(tiny["rc"], _synthetic(64, 128, seed=12), math.log(0.01), tile=64))  # 2 tiles


def _mutate_payload(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """Change one tile's y or z bitstream (random bytes, bit flips, truncation, extension), fix index and CRC."""
    f = parse_alice(data)
    streams = [list(s) for s in f.streams]
    tile, part = rng.randrange(len(streams)), rng.randrange(2)
    s = bytearray(streams[tile][part])
    kind = rng.choice(["random", "bitflips", "truncate", "extend", "zeros"])
    if kind == "random":
        i = rng.randrange(len(s))
        s[i:i + 16] = bytes(rng.randrange(256) for _ in range(16))
    elif kind == "bitflips":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(s))
            s[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        s = s[:rng.randint(4, max(4, len(s) - 1))]
    elif kind == "extend":
        s += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        s = bytearray(len(s))
    streams[tile][part] = bytes(s)
    f.streams = [tuple(x) for x in streams]
    return kind, serialize_alice(f)


def _decode_in_child(rc, data: bytes, timeout: float) -> str:
    """Decode in a forked child under a timeout: 'image', 'refused', or what went wrong."""
    import os

    pid = os.fork()
    if pid == 0:  # the child: exit status says what happened, never returns into pytest
        code = 1
        try:
            f = parse_alice(data)
            image = decode(rc, f)
            code = 10 if image.dtype == torch.uint8 and image.shape == (3, f.height, f.width) else 12
        except AliceFormatError:
            code = 11
        except BaseException:
            code = 13
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "hang"
        time.sleep(0.002)
    if os.WIFSIGNALED(status):
        return f"crash (signal {os.WTERMSIG(status)})"
    return {10: "image", 11: "refused", 12: "wrong size", 13: "other exception"}.get(os.WEXITSTATUS(status),
                                                                                   "failed")


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_decoder_fuzz_behind_a_valid_crc(tiny):
    """Garbage y / z bitstreams with a valid CRC reach the entropy decoder: a clean error or an image, never a crash."""
    rc = tiny["rc"]
    valid = _fuzz_file(tiny)
    rng = random.Random(99)
    outcomes: dict[str, int] = {}
    for _ in range(24):
        kind, data = _mutate_payload(valid, rng)
        outcome = _decode_in_child(rc, data, timeout=10.0)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert outcome in ("image", "refused"), (kind, outcome)
    assert _decode_in_child(rc, valid, timeout=10.0) == "image"
    print(f"decoder fuzz: {outcomes}")


# ============================================================================ orientation, batches
def _jpeg_with_orientation(path: Path, image: torch.Tensor, orientation: int) -> None:
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    exif = Image.Exif()
    exif[0x0112] = orientation
    pil.save(path, quality=95, exif=exif)


def test_exif_orientation_read_upright(tiny, tmp_path):
    stored = _synthetic(48, 80, seed=2)  # as a phone stores a portrait photo: sideways, with tag 6
    path = tmp_path / "portrait.jpg"
    _jpeg_with_orientation(path, stored, 6)
    shown = read_image(path)
    assert shown.shape == (3, 80, 48)  # displayed: rotated 90 degrees clockwise
    plain = tmp_path / "plain.jpg"
    _jpeg_with_orientation(plain, stored, 1)
    assert torch.equal(shown, torch.rot90(read_image(plain), k=-1, dims=(1, 2)))
    out = tmp_path / "out"
    assert main(["compress", str(path), "-o", str(out), "-q", *_weights(tiny)]) == 0
    assert read_alice(out / "portrait.alice").height == 80
    assert main(["decompress", str(out / "portrait.alice"), "-o", str(out), "-q", *_weights(tiny)]) == 0
    assert read_image(out / "portrait.png").shape == (3, 80, 48)


def test_cli_batch_reports_a_failure_and_goes_on(tiny, tmp_path, capsys):
    inputs = []
    for i in range(3):
        png = tmp_path / f"img{i}.png"
        Image.fromarray(_synthetic(64, 64 + 32 * i, seed=i).permute(1, 2, 0).numpy()).save(png)
        inputs.append(str(png))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    inputs.insert(1, str(tmp_path / "broken.png"))
    out = tmp_path / "coded"
    assert main(["compress", *inputs, "-o", str(out), "--lmbda", "0.01", *_weights(tiny)]) == 1
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "not a readable image" in captured.err
    assert "3 of 4 files" in captured.err and "1 failed" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["img0.alice", "img1.alice", "img2.alice"]
    decoded = tmp_path / "decoded"
    assert main(["decompress", *map(str, sorted(out.iterdir())), "-o", str(decoded), *_weights(tiny)]) == 0
    assert "3 of 3 files" in capsys.readouterr().out
    for i in range(3):
        assert torch.equal(read_image(decoded / f"img{i}.png"), decode(tiny["rc"], read_alice(out / f"img{i}.alice")))


# ============================================================================ shipped weights, PSNR target
@pytest.fixture(scope="module")
def shipped():
    """RateControl over the installed package's own weights (alice_lib/weights)."""
    from alice_lib.checkpoints import load_stf
    from alice_lib.cli import shipped_weights

    anchor_path, adapters = shipped_weights()
    return RateControl(load_stf(anchor_path), adapters, anchor_lmbda=0.0483, copy=False)


def test_shipped_weights_code_a_kodak_crop(shipped, crop):
    from alice_lib.evaluation.metrics import psnr_rgb

    assert shipped.lmbdas == [0.0018, 0.0035, 0.0067, 0.013, 0.025, 0.0483]
    results = {}
    for lmbda in (0.0018, 0.005, 0.0483):
        f = parse_alice(serialize_alice(encode(shipped, crop, math.log(lmbda))))
        results[lmbda] = (f.bpp, psnr_rgb(crop, decode(shipped, f)))
    bpps, psnrs = zip(*results.values())
    assert list(bpps) == sorted(bpps) and list(psnrs) == sorted(psnrs), results  # rate and quality grow
    assert 0.05 < bpps[0] and bpps[-1] < 4 and psnrs[0] > 18, results


def test_target_psnr_reachable(shipped, crop):
    from alice_lib.evaluation.metrics import psnr_rgb

    lo = psnr_rgb(crop, decode(shipped, encode(shipped, crop, shipped.range[0])))
    hi = psnr_rgb(crop, decode(shipped, encode(shipped, crop, shipped.range[1])))
    assert hi > lo + 0.3, (lo, hi)  # the CPU adapters move PSNR by about 0.5 dB here
    target = 0.4 * lo + 0.6 * hi
    r = compress_to_target(shipped, crop, target_psnr=target, psnr_tol=0.1)
    assert r.hit and not r.clamped and abs(r.achieved_psnr - target) <= 0.1, (lo, hi, r)
    assert r.achieved_psnr == pytest.approx(psnr_rgb(crop, decode(shipped, r.alice)))
    assert shipped.range[0] < r.control < shipped.range[1]
