"""STF against the published implementation (``../shared/conformance``) and real entropy coding."""

from __future__ import annotations

import json

import pytest
import torch

from alice_lib.checkpoints import (CheckpointMismatchError, deterministic_weights_, infer_config, load_stf,
                                   save_stf)
from alice_lib.models.stf import STFConfig, SymmetricalTransFormer

TINY = STFConfig(embed_dim=8, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), num_slices=4)


@pytest.fixture(scope="module")
def keys(conformance_dir):
    return json.loads((conformance_dir / "stf_keys.json").read_text())


@pytest.fixture(scope="module")
def golden(conformance_dir):
    return torch.load(conformance_dir / "stf_golden.pt", weights_only=True)


@pytest.fixture(scope="module")
def published(conformance_dir):
    return deterministic_weights_(SymmetricalTransFormer()).eval()


def close_to_max(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> bool:
    return (actual - expected).abs().max().item() <= rel * expected.abs().max().item()


def mostly_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-3, share: float = 0.999) -> bool:
    return ((actual - expected).abs() <= atol).float().mean().item() >= share


def test_state_dict_keys_and_shapes_in_published_order(keys):
    model = SymmetricalTransFormer()
    ours = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert ours == [tuple(entry) for entry in map(tuple, keys["stf_state_dict"])]
    params = [(k, list(p.shape)) for k, p in model.named_parameters()]
    assert params == [tuple(entry) for entry in keys["stf_parameters"]]
    assert model.num_parameters() == 99_855_639


def test_transforms_match_golden(published, golden):
    x = golden["input_uint8"][None].float() / 255
    with torch.no_grad():
        y = published.analysis(x)
        assert close_to_max(y, golden["y"])
        assert close_to_max(published.h_a(y), golden["z"])
        assert close_to_max(published.synthesis(golden["y"]), golden["x_hat_from_y"])


def test_forward_and_coding_match_golden(published, golden):
    x = golden["input_uint8"][None].float() / 255
    with torch.no_grad():
        out = published(x)
    assert mostly_close(out["x_hat"], golden["forward_x_hat"])
    assert mostly_close(out["likelihoods"]["y"], golden["forward_likelihoods_y"])
    assert mostly_close(out["likelihoods"]["z"], golden["forward_likelihoods_z"])
    published.update(force=True)
    coded = published.compress(x)
    x_hat = published.decompress(coded["strings"], coded["shape"], coded["image_size"])["x_hat"]
    assert mostly_close(x_hat, golden["decompressed_x_hat"])
    assert torch.equal(x_hat, out["x_hat"].clamp(0, 1))  # real bitstream == eval forward, bit for bit


def test_bitstreams_equal_the_reference(published, golden, keys):
    """The rate side of conformance: the golden input codes to the reference's bytes exactly."""
    import hashlib

    published.update(force=True)
    coded = published.compress(golden["input_uint8"][None].float() / 255)
    y, z = coded["strings"][0][0], coded["strings"][1][0]
    assert {"y": len(y), "z": len(z)} == keys["reference_bitstream_bytes"]
    assert list(coded["shape"]) == keys["z_shape"]
    assert {"y": hashlib.sha256(y).hexdigest(), "z": hashlib.sha256(z).hexdigest()} == \
        keys["reference_bitstream_sha256"]


def test_widths_follow_configuration():
    published = STFConfig()
    assert published.hyper_widths == [384, 336, 288, 240, 192]
    assert published.slice_transform_widths == [224, 176, 128, 64, 32]
    assert published.total_stride == 64
    small = SymmetricalTransFormer(TINY)
    assert small.cc_mean_transforms[3][0].in_channels == 64 + 16 * 2  # support limited to num_slices // 2
    assert small.lrp_transforms[3][0].in_channels == 64 + 16 * 3
    with pytest.raises(ValueError, match="slices"):
        STFConfig(embed_dim=8, num_slices=5, num_heads=(1, 2, 2, 4))


@pytest.mark.parametrize("size", [(64, 64), (50, 77), (96, 130)])
def test_round_trip_any_size_is_bit_exact(size):
    torch.manual_seed(0)
    model = SymmetricalTransFormer(TINY).eval()
    model.update(force=True)
    x = torch.rand(1, 3, *size)
    coded = model.compress(x)
    decoded = model.decompress(coded["strings"], coded["shape"], coded["image_size"])["x_hat"]
    with torch.no_grad():
        expected = model(x)["x_hat"].clamp(0, 1)
    assert decoded.shape == x.shape
    assert torch.equal(decoded, expected)


def test_batch_codes_independent_images():
    torch.manual_seed(1)
    model = SymmetricalTransFormer(TINY).eval()
    model.update(force=True)
    x = torch.rand(2, 3, 64, 64)
    coded = model.compress(x)
    assert len(coded["strings"][0]) == len(coded["strings"][1]) == 2
    alone = model.compress(x[1:])
    assert coded["strings"][0][1] == alone["strings"][0][0]
    decoded = model.decompress(coded["strings"], coded["shape"], coded["image_size"])["x_hat"]
    with torch.no_grad():
        assert torch.equal(decoded, model(x)["x_hat"].clamp(0, 1))


def test_compress_requires_update_and_rgb():
    model = SymmetricalTransFormer(TINY).eval()
    with pytest.raises(RuntimeError, match="update"):
        model.compress(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="RGB"):
        model(torch.rand(1, 1, 64, 64))


def test_training_forward_uses_noise_for_likelihoods():
    torch.manual_seed(0)
    model = SymmetricalTransFormer(TINY)
    x = torch.rand(1, 3, 64, 64)
    model.train()
    a, b = model(x)["likelihoods"]["y"], model(x)["likelihoods"]["y"]
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x)["likelihoods"]["y"], model(x)["likelihoods"]["y"])


def test_the_hyper_synthesis_sees_the_rounded_hyper_latent_in_training_too():
    """STF's training: h_s gets the hyper-latent rounded around the bottleneck's medians (a straight-through
    gradient), the same values as in evaluation; only the likelihoods see additive noise. (The switch to
    feed it ``z`` + noise instead gained nothing and was removed: ``alice_lib/train/hyperprior.py``.)"""
    torch.manual_seed(0)
    model = SymmetricalTransFormer(TINY)
    seen = []
    model.h_mean_s.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    x = torch.rand(1, 3, 64, 64)
    medians = model.entropy_bottleneck._get_medians().detach()
    z = model.h_a(model.analysis(x)).detach()
    model.train()
    model(x)
    assert torch.equal(seen[-1] - medians, torch.round(z - medians))
    assert not hasattr(model, "hyper_quantization")
    model.eval()
    with torch.no_grad():
        model(x)
    assert torch.equal(seen[-1], seen[-2])


def test_published_layout_loads(tmp_path):
    """DataParallel prefixes, the old EntropyBottleneck names and stray keys, in a {"state_dict"} file."""
    torch.manual_seed(0)
    model = SymmetricalTransFormer(TINY)
    state = {}
    for key, value in model.state_dict().items():
        for new, old in (("matrices.", "_matrix"), ("biases.", "_bias"), ("factors.", "_factor")):
            key = key.replace(f"entropy_bottleneck.{new}", f"entropy_bottleneck.{old}")
        state[f"module.{key}"] = value
    state["module.norm3.weight"] = torch.ones(4)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "stf.pth.tar")
    with pytest.warns(UserWarning, match="norm3.weight"):
        loaded = load_stf(tmp_path / "stf.pth.tar")
    assert loaded.config == STFConfig(**{**TINY.to_dict(), "drop_path_rate": 0.2})
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        if "_quantized_cdf" not in k and "_offset" not in k and "_cdf_length" not in k and "scale_table" not in k:
            assert torch.equal(a, b), k


def test_other_architecture_is_refused_whole(tmp_path):
    other = SymmetricalTransFormer(STFConfig(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 6),
                                             num_slices=4))
    torch.save({"state_dict": other.state_dict()}, tmp_path / "other.pth")
    target = SymmetricalTransFormer(TINY)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"layers\.0\.blocks\.0\.norm1\.weight: file \(12,\)"):
        load_stf(tmp_path / "other.pth", config=TINY)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="not a readable"):
        load_stf(tmp_path / "junk.pth")


def test_own_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SymmetricalTransFormer(TINY).eval()
    model.update(force=True)
    path = save_stf(tmp_path / "m.safetensors", model, {"lmbda": 0.0483})
    loaded = load_stf(path)
    x = torch.rand(1, 3, 64, 64)
    a, b = model.compress(x), loaded.compress(x)
    assert a["strings"] == b["strings"]
    assert infer_config(model.state_dict()).embed_dim == TINY.embed_dim


def test_half_precision_storage_codes_like_the_rounded_model(tmp_path):
    """float16 files (``ship_stf``): half the bytes, and the loaded model's bitstreams equal the saving model's."""
    from safetensors import safe_open

    from alice_lib.checkpoints import read_checkpoint, ship_stf

    torch.manual_seed(0)
    model = SymmetricalTransFormer(TINY).eval()
    model.update(force=True)
    full = save_stf(tmp_path / "full.safetensors", model)
    half = ship_stf(tmp_path / "half.safetensors", model, {"lmbda": 0.0018}, dtype=torch.float16)
    assert read_checkpoint(half)[2]["storage"] == "torch.float16"
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert full.stat().st_size - half.stat().st_size == pytest.approx(float_bytes / 2, rel=0.01)
    loaded = load_stf(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    # The entropy model's constants stay float32: the likelihood bound (1e-9) would be 0 in float16,
    # and a model fine-tuned from the file would see an infinite rate.
    assert loaded.gaussian_conditional.likelihood_lower_bound.bound.item() == pytest.approx(1e-9)
    assert torch.equal(loaded.gaussian_conditional.scale_table, model.gaussian_conditional.scale_table)
    with safe_open(str(half), framework="pt") as f:  # window indexes: int64 in the model, int16 on disk
        indexes = {k: f.get_tensor(k) for k in f.keys() if k.endswith("relative_position_index")}
    assert indexes and all(v.dtype == torch.int16 for v in indexes.values())
    state = loaded.state_dict()
    assert all(state[k].dtype == torch.int64 and torch.equal(state[k], model.state_dict()[k]) for k in indexes)
    likelihoods = loaded.train()(torch.rand(1, 3, 64, 64))["likelihoods"]
    assert all(v.min() > 0 for v in likelihoods.values())
    loaded.eval()
    x = torch.rand(1, 3, 64, 64)
    a = model.compress(x)
    assert a["strings"] == loaded.compress(x)["strings"]
    assert torch.equal(model.decompress(**a)["x_hat"], loaded.decompress(**a)["x_hat"])


def test_entropy_channels_decouple_the_entropy_model_from_the_transforms(tmp_path):
    assert STFConfig().entropy_width == 384 and STFConfig().entropy_channels is None  # published: unchanged
    config = STFConfig(**{**TINY.to_dict(), "entropy_channels": 24})
    model = SymmetricalTransFormer(config)
    assert config.latent_channels == 64 and config.hyper_channels == 12
    assert model.h_a[0].in_channels == 64 and model.h_a[0].out_channels == 24
    assert model.h_mean_s[-1].out_channels == 24 and model.h_scale_s[-1].out_channels == 24
    assert model.cc_mean_transforms[3][0].in_channels == 24 + 16 * 2
    assert model.lrp_transforms[0][-1].out_channels == 16  # a slice of the 64-channel latent
    assert model.num_parameters() < SymmetricalTransFormer(TINY).num_parameters()
    with pytest.raises(ValueError, match="entropy_channels"):
        STFConfig(entropy_channels=4)
    # The width is read back from a state dict without configuration, and the model codes bit-exactly.
    assert infer_config(model.state_dict()) == config
    assert infer_config(SymmetricalTransFormer(TINY).state_dict()).entropy_channels is None
    torch.manual_seed(0)
    model.eval().update(force=True)
    x = torch.rand(1, 3, 70, 90)
    coded = model.compress(x)
    decoded = model.decompress(coded["strings"], coded["shape"], coded["image_size"])["x_hat"]
    with torch.no_grad():
        assert torch.equal(decoded, model(x)["x_hat"].clamp(0, 1))
    path = save_stf(tmp_path / "small.safetensors", model)
    assert load_stf(path).config == config
