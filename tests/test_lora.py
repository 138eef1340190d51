"""Tests of the ALICE adapters (VCIP 2024; LoRA, Hu et al., ICLR 2022): injection,
published layout and golden outputs, freezing, MALICE merge / unmerge / rate switching,
adapter files and parameter accounting."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from torch import nn

from alice_lib.adapter_files import file_sizes, load_adapters, read_adapter_metadata, save_adapters
from alice_lib.lora import (
    LoRAConfig,
    LoRALinear,
    base_weights_hash,
    config_of,
    count_parameters,
    inject_lora,
    load_lora_state_dict,
    lora_state_dict,
    mark_trainable,
    merge_lora,
    merged_state_dict,
    parameter_table,
    strip_lora,
    target_names,
    unmerge_lora,
)
from alice_lib.checkpoints import deterministic_weights_
from alice_lib.models.stf import STFConfig, SymmetricalTransFormer

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "alice_lib" / "profiles" / "lora_8_8.yaml"
PUBLISHED_PARAMS = 99_855_639
PUBLISHED_ADAPTER_PARAMS = 353_280
# Four stages of two blocks (plain and shifted windows), like the published model but ~1.5 M parameters.
TINY = STFConfig(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), num_slices=4)


# ---------------------------------------------------------------------------- helpers
def tiny_model(seed: int = 0) -> SymmetricalTransFormer:
    torch.manual_seed(seed)
    return SymmetricalTransFormer(TINY).eval()


def random_adapters(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A full set of non-zero adapter tensors (as if trained at some rate)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in lora_state_dict(model).items()}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Max abs difference within ``rel`` of the expected tensor's max abs (the README tolerance)."""
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} * {scale:.3g}"


@pytest.fixture(scope="module")
def keys(conformance_dir) -> dict:
    return json.loads((conformance_dir / "stf_keys.json").read_text())


@pytest.fixture(scope="module")
def golden(conformance_dir) -> dict:
    return torch.load(conformance_dir / "stf_golden.pt", weights_only=True)


@pytest.fixture(scope="module")
def published_lora() -> SymmetricalTransFormer:
    """The published STF with the published adapters and the deterministic weights.

    Shared by several tests: any test that merges must unmerge before returning.
    """
    model = SymmetricalTransFormer()
    inject_lora(model, LoRAConfig.from_yaml(PROFILE), torch.Generator().manual_seed(0))
    return deterministic_weights_(model).eval()


@pytest.fixture(scope="module")
def published_plain() -> SymmetricalTransFormer:
    """A plain published-size STF (default initialisation) for loading and counting."""
    return SymmetricalTransFormer().eval()


# ---------------------------------------------------------------------------- config
def test_profile_is_the_published_config(tmp_path):
    cfg = LoRAConfig.from_yaml(PROFILE)
    assert cfg == LoRAConfig()
    assert (cfg.r, cfg.alpha, cfg.attn_qkv, cfg.attn_proj) == (8, 8.0, False, False)
    assert cfg.encoder == [True] * 4 and cfg.decoder == [True] * 4

    out = tmp_path / "cfg.yaml"
    cfg.to_yaml(out)
    written = yaml.safe_load(out.read_text())
    assert list(written) == ["r", "alpha", "mlp_fc1", "mlp_fc2", "encoder", "decoder"]
    assert written["alpha"] == 8 and isinstance(written["alpha"], int)  # "alpha: 8" as published
    assert LoRAConfig.from_yaml(out) == cfg

    custom = LoRAConfig(r=4, alpha=2, attn_qkv=True, downsample_reduction=True, encoder=[False, True, True, True])
    custom.to_yaml(out)
    assert LoRAConfig.from_yaml(out) == custom
    assert LoRAConfig.from_dict(custom.to_dict()) == custom
    assert LoRAConfig.from_dict({"qkv": True}).attn_qkv is True  # short spelling accepted

    with pytest.raises(ValueError, match="unknown LoRA config keys"):
        LoRAConfig.from_dict({"rnak": 8})
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(r=0)


def test_target_names_follow_the_config():
    model = tiny_model()
    names = target_names(model, LoRAConfig())
    assert len(names) == 2 * 2 * sum(TINY.depths)  # fc1 + fc2, every block of encoder and decoder
    assert all(n.endswith(("mlp.fc1", "mlp.fc2")) for n in names)
    assert "layers.0.blocks.1.mlp.fc2" in names and "syn_layers.3.blocks.0.mlp.fc1" in names

    only = target_names(model, LoRAConfig(mlp_fc1=False, attn_qkv=True, attn_proj=True,
                                          encoder=[False, True, False, False], decoder=[False] * 4))
    assert only == [f"layers.1.blocks.{b}.{layer}" for b in range(2)
                    for layer in ("attn.qkv", "attn.proj", "mlp.fc2")]
    with pytest.raises(ValueError, match="stages"):
        target_names(model, LoRAConfig(encoder=[True, True]))

    # beyond the published layout: each stage's resampling linear (the last encoder stage has none)
    resampling = LoRAConfig(mlp_fc1=False, mlp_fc2=False, downsample_reduction=True)
    assert target_names(model, resampling) == [f"{stack}.{i}.downsample.reduction"
                                               for stack in ("layers", "syn_layers") for i in range(3)]
    both = LoRAConfig(downsample_reduction=True)
    assert config_of(inject_lora(tiny_model(), both)) == both  # read back from the adapted layers' names

    wrapper = nn.Module()  # as DistributedDataParallel wraps a model under "module."
    wrapper.module = model
    assert target_names(wrapper, LoRAConfig()) == [f"module.{n}" for n in names]


# ---------------------------------------------------------------------------- LoRALinear
def test_lora_linear_computes_the_alice_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(copy.deepcopy(base), r=3, alpha=2.5)
    assert layer.lora.W_a.shape == (6, 3) and layer.lora.W_b.shape == (3, 5)
    assert torch.count_nonzero(layer.lora.W_b) == 0
    x = torch.randn(4, 7, 6)
    assert torch.equal(layer(x), base(x))  # W_b = 0: the adapted layer starts as the frozen one

    with torch.no_grad():
        layer.lora.W_b.normal_()
    expected = base(x) + 2.5 * (x @ layer.lora.W_a @ layer.lora.W_b)  # alpha not divided by r
    torch.testing.assert_close(layer(x), expected)

    original = layer.linear.weight.detach().clone()
    layer.merge()
    layer.merge()  # a second merge must not add the update twice
    assert layer.merged
    torch.testing.assert_close(layer.linear.weight, original + 2.5 * (layer.lora.W_a @ layer.lora.W_b).T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged and torch.equal(layer.linear.weight, original)
    assert set(layer.state_dict()) == {"linear.weight", "linear.bias", "lora.W_a", "lora.W_b"}


def test_injection_init_is_seeded_and_leaves_outputs_unchanged():
    model, x = tiny_model(), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model.analysis(x)
    a = inject_lora(model, LoRAConfig(), torch.Generator().manual_seed(1))
    assert a is model
    b = inject_lora(tiny_model(), LoRAConfig(), torch.Generator().manual_seed(1))
    sd_a, sd_b = lora_state_dict(a), lora_state_dict(b)
    assert list(sd_a) == list(sd_b) and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)

    w_a = torch.cat([v.flatten() for k, v in sd_a.items() if k.endswith("W_a")])
    assert abs(w_a.std().item() - 1 / math.sqrt(8)) < 0.02  # N(0, 1/r)
    assert all(torch.count_nonzero(v) == 0 for k, v in sd_a.items() if k.endswith("W_b"))
    with torch.no_grad():
        assert torch.equal(model.analysis(x), before)
    with pytest.raises(ValueError, match="already has adapters"):
        inject_lora(model, LoRAConfig())


# ---------------------------------------------------------------------------- published layout and golden outputs
def test_state_dict_matches_published_alice_layout(keys, published_lora):
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in published_lora.state_dict().items()]
    assert ours == keys["alice_lora_state_dict"]
    adapters = lora_state_dict(published_lora)
    assert sum(v.numel() for v in adapters.values()) == PUBLISHED_ADAPTER_PARAMS
    assert len(adapters) == 2 * 48  # W_a and W_b of fc1, fc2 in 24 Swin blocks


def test_adapted_transforms_reproduce_golden_outputs(golden, published_lora):
    x = golden["input_uint8"][None].float() / 255
    model = published_lora
    with torch.no_grad():
        assert_close_rel(model.analysis(x), golden["y_lora"])
        assert_close_rel(model.synthesis(golden["y"]), golden["x_hat_from_y_lora"])
        merge_lora(model)  # MALICE: same outputs from the merged weights
        try:
            assert_close_rel(model.analysis(x), golden["y_lora"])
            assert_close_rel(model.synthesis(golden["y"]), golden["x_hat_from_y_lora"])
        finally:
            unmerge_lora(model)


def test_merged_state_dict_loads_into_plain_stf(keys, published_lora, published_plain):
    plain_sd = merged_state_dict(published_lora)
    expected = keys["stf_state_dict"]
    assert [[k, list(v.shape)] for k, v in plain_sd.items()] == [[k, s] for k, s, _ in expected]
    plain = published_plain
    plain.load_state_dict(plain_sd, strict=True)
    name = "syn_layers.0.blocks.1.mlp.fc1"
    layer = published_lora.get_submodule(name)
    torch.testing.assert_close(plain.get_submodule(name).weight,
                               layer.linear.weight + 8.0 * (layer.lora.W_a @ layer.lora.W_b).T)
    assert not layer.merged  # merged_state_dict leaves the adapted model untouched


def test_published_parameter_counts(published_lora, published_plain):
    plain = published_plain
    for model in (plain, published_lora):  # counted from the config, or from the adapters
        lora = count_parameters(model, "lora", LoRAConfig())
        assert lora["total"] == PUBLISHED_PARAMS
        assert lora["trainable"] == lora["stored_per_rate"] == PUBLISHED_ADAPTER_PARAMS
        assert abs(lora["stored_per_rate"] / lora["total"] - 0.0035) < 0.0001

    fc = sum(p.numel() for n, p in plain.named_parameters() if ".mlp.fc" in n and "blocks" in n)
    vanilla = count_parameters(plain, "vanilla")
    assert vanilla == {"total": PUBLISHED_PARAMS, "trainable": fc, "stored_per_rate": fc}
    assert count_parameters(published_lora, "vanilla")["stored_per_rate"] == fc
    full = count_parameters(published_lora, "full")
    assert full == {"total": PUBLISHED_PARAMS, "trainable": PUBLISHED_PARAMS + PUBLISHED_ADAPTER_PARAMS,
                    "stored_per_rate": PUBLISHED_PARAMS}

    table = parameter_table(plain, LoRAConfig())
    assert [row["mode"] for row in table] == ["lora", "vanilla", "full"]
    assert table[0]["stored_per_rate"] == PUBLISHED_ADAPTER_PARAMS and table[2]["stored_fraction"] == 1.0


# ---------------------------------------------------------------------------- freezing
def _requires_grad(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freezing_per_mode():
    plain = tiny_model()
    fc_names = {n for n, _ in plain.named_parameters() if ".mlp.fc" in n}
    assert set(mark_trainable(plain, "vanilla")) == _requires_grad(plain) == fc_names
    with pytest.raises(ValueError, match="inject_lora"):
        mark_trainable(plain, "lora")

    model = inject_lora(tiny_model(), LoRAConfig())
    adapters = {n for n, _ in model.named_parameters() if n.endswith(("lora.W_a", "lora.W_b"))}
    assert set(mark_trainable(model, "lora")) == _requires_grad(model) == adapters
    assert not model.entropy_bottleneck.quantiles.requires_grad  # entropy models frozen, as in ALICE

    vanilla = {n.replace(".mlp.fc1.", ".mlp.fc1.linear.").replace(".mlp.fc2.", ".mlp.fc2.linear.")
               for n in fc_names}
    assert set(mark_trainable(model, "vanilla")) == _requires_grad(model) == vanilla
    assert set(mark_trainable(model, "full")) == _requires_grad(model) == {n for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="unknown training mode"):
        mark_trainable(model, "adapters")

    # Gradients reach only the adapters in LoRA mode.
    mark_trainable(model, "lora")
    with torch.no_grad():
        load_lora_state_dict(model, random_adapters(model, 3))
    model.train()
    out = model(torch.rand(1, 3, 64, 64))
    (out["x_hat"].square().mean() + sum(l.log().sum() for l in out["likelihoods"].values()) * -1e-3).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and with_grad <= adapters


def test_ablation_also_trains_whole_top_level_modules():
    model = inject_lora(tiny_model(), LoRAConfig())
    adapters = set(mark_trainable(model, "lora"))
    groups = type(model).ENTROPY_MODEL
    entropy = {n for n, _ in model.named_parameters() if n.split(".")[0] in groups}
    assert entropy and "entropy_bottleneck.quantiles" in entropy
    assert set(mark_trainable(model, "lora", also=groups)) == _requires_grad(model) == adapters | entropy
    # The entropy groups leave the transforms (what the adapters adapt) out.
    assert not any(n.startswith(("layers.", "syn_layers.")) for n in entropy)
    with pytest.raises(ValueError, match="no top-level module"):
        mark_trainable(model, "lora", also=["hyperprior"])


# ---------------------------------------------------------------------------- MALICE and rate switching
def test_merge_unmerge_switching_does_not_drift_base_weights():
    model = deterministic_weights_(inject_lora(tiny_model(), LoRAConfig()))
    rate_a, rate_b = random_adapters(model, 1), random_adapters(model, 2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(1, 3, 64, 64)
    load_lora_state_dict(model, rate_b)
    with torch.no_grad():
        y_b = model.analysis(x)

    for _ in range(100):
        load_lora_state_dict(model, rate_a)
        merge_lora(model)
        unmerge_lora(model)
        load_lora_state_dict(model, rate_b)
        merge_lora(model)
        unmerge_lora(model)
    for k, v in model.state_dict().items():
        if ".lora." not in k:
            assert torch.equal(v, base[k]), f"{k} drifted"

    # Switching rates while merged re-merges the new adapters onto the untouched base.
    merge_lora(model)
    load_lora_state_dict(model, rate_a)
    load_lora_state_dict(model, rate_b)
    with torch.no_grad():
        assert_close_rel(model.analysis(x), y_b, 1e-5)
    unmerge_lora(model)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if ".lora." not in k)


def test_strip_gives_a_plain_stf_with_the_adapted_outputs():
    model = deterministic_weights_(inject_lora(tiny_model(), LoRAConfig()))
    load_lora_state_dict(model, random_adapters(model, 4))
    x, y_in = torch.rand(1, 3, 64, 64), torch.randn(1, TINY.latent_channels, 4, 4)
    with torch.no_grad():
        y, x_hat = model.analysis(x), model.synthesis(y_in)
    stripped = merge_lora(copy.deepcopy(model), strip=True)
    assert not any(isinstance(m, LoRALinear) for m in stripped.modules())
    plain = SymmetricalTransFormer(TINY).eval()
    plain.load_state_dict(stripped.state_dict(), strict=True)
    with torch.no_grad():
        assert_close_rel(plain.analysis(x), y)
        assert_close_rel(plain.synthesis(y_in), x_hat)
    assert list(merged_state_dict(model)) == list(plain.state_dict())
    assert list(strip_lora(copy.deepcopy(model)).state_dict()) == list(plain.state_dict())


def test_base_hash_ignores_adapters_merging_and_coder_tables():
    model = deterministic_weights_(tiny_model())
    h = base_weights_hash(model)
    assert len(h) == 16 and int(h, 16) >= 0
    inject_lora(model, LoRAConfig())
    load_lora_state_dict(model, random_adapters(model, 1))
    assert base_weights_hash(model) == h
    merge_lora(model)
    assert base_weights_hash(model) == h
    unmerge_lora(model)
    model.update(force=True)  # fills the entropy coder's tables
    assert base_weights_hash(model) == h
    with torch.no_grad():
        model.get_submodule("layers.0.blocks.0.mlp.fc1").linear.weight[0, 0] += 1e-3
    assert base_weights_hash(model) != h


# ---------------------------------------------------------------------------- adapter files
def test_adapter_file_roundtrip_and_refusal(tmp_path):
    config = LoRAConfig(r=4, alpha=2.0, attn_proj=True, decoder=[True, False, True, True])
    model = deterministic_weights_(inject_lora(tiny_model(), config))
    load_lora_state_dict(model, random_adapters(model, 5))
    path = save_adapters(tmp_path / "rate_0067.safetensors", model, lmbda=0.0067, config=config,
                         extra_metadata={"step": 300})
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(lora_state_dict(model))  # adapters only
    meta = read_adapter_metadata(path)
    assert meta["lambda"] == 0.0067 and meta["config"] == config and meta["extra"] == {"step": 300}
    assert meta["base_hash"] == base_weights_hash(model) and meta["format_version"] == 1

    # Onto a fresh copy of the same base: injected from the file's config, same outputs.
    fresh = deterministic_weights_(tiny_model(seed=1))
    assert load_adapters(path, fresh)["lambda"] == 0.0067
    loaded = lora_state_dict(fresh)
    assert all(torch.equal(loaded[k], v) for k, v in lora_state_dict(model).items())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh.analysis(x), model.analysis(x))

    # Onto a different base: refused, naming both hashes, and the model is left alone.
    other = tiny_model(seed=2)
    with pytest.raises(ValueError) as err:
        load_adapters(path, other)
    assert meta["base_hash"] in str(err.value) and base_weights_hash(other) in str(err.value)
    assert not any(isinstance(m, LoRALinear) for m in other.modules())

    # Onto a model already holding adapters of another scale: refused rather than silently wrong.
    wrong_alpha = inject_lora(deterministic_weights_(tiny_model()), LoRAConfig(**{**config.to_dict(), "alpha": 4.0}))
    with pytest.raises(ValueError, match="do not match"):
        load_adapters(path, wrong_alpha)

    with pytest.raises(ValueError, match="does not describe"):
        save_adapters(tmp_path / "bad.safetensors", model, lmbda=0.0067, config=LoRAConfig())

    checkpoint = tmp_path / "full.pth"
    torch.save(merged_state_dict(model), checkpoint)
    sizes = file_sizes(path, checkpoint)
    assert sizes["adapter_bytes"] == path.stat().st_size
    assert 0 < sizes["ratio"] < 0.2 and sizes["adapter_bytes"] < sizes["checkpoint_bytes"]
