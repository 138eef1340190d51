"""Tests of the training loop (issue 3, items 6 and 8): the rate-distortion loss, the parameter
split, seeded and resumable runs (bit-exact), non-finite losses, atomic checkpoints, the CSV,
DistributedDataParallel with gloo, a real ALICE adaptation check on a tiny model; and (issue 26)
``alice train``, the configuration built from the settings, and runs of the code before the split
of ``train.py`` resuming."""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import os
import socket
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from pytorch_msssim import ms_ssim
from torch.utils.data import Dataset, Subset

from alice_lib import cli
from alice_lib import train as train_mod
from alice_lib.data import SyntheticImages
from alice_lib.evaluation.metrics import msssim_window
from alice_lib.models.stf import STFConfig, SymmetricalTransFormer
from alice_lib.run_folder import RunLayout
from alice_lib.settings import load_settings
from alice_lib.train import (
    CHECKPOINT_FORMAT,
    NonFiniteLossError,
    RateDistortionLoss,
    TrainConfig,
    load_checkpoint,
    load_weights,
    split_parameters,
    train,
    validate,
)
from alice_lib.train import config as config_mod
from alice_lib.train import optim
from alice_lib.train.state import append_csv, read_csv, truncate_csv
from alice_lib.utils import atomic_save, state_dict_hash

REPO = Path(__file__).resolve().parents[1]
BSDS = REPO.parent / "shared" / "data" / "bsds432"
TINY = STFConfig(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), num_slices=4)
# The keys every single-process checkpoint has had since the first version (the CPU anchor
# resumes from such a file): a new version may add keys only when it runs distributed / on GPUs.
V1_KEYS = {"format", "model", "optimizer", "aux_optimizer", "scheduler", "rng", "train_config", "step", "epoch",
           "best_loss"}


def tiny_model(seed: int = 0, **overrides) -> SymmetricalTransFormer:
    torch.manual_seed(seed)
    return SymmetricalTransFormer(STFConfig(**{**TINY.to_dict(), **overrides}) if overrides else TINY)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


TINY_SETTINGS = {"model.embed_dim": 8, "model.depths": "[1,1,1,1]", "model.num_heads": "[1,2,2,4]",
                 "model.num_slices": 4}


def alice_train(train_dir: Path, *options: str, settings: dict | None = None) -> int:
    """``alice train`` on the smoke profile with the tiny model, one thread, on the CPU; ``settings`` as ``-p``."""
    argv = ["train", "--profile", "smoke", "--train-dir", str(train_dir), "--threads", "1", "--device", "cpu",
            "--no-progress", *options]
    for key, value in {**TINY_SETTINGS, **(settings or {})}.items():
        argv += ["-p", f"{key}={value}"]
    return cli.main(argv)


@pytest.fixture(scope="module")
def images() -> SyntheticImages:
    return SyntheticImages(4, 64, seed=1)


# ---------------------------------------------------------------------------- configuration
def test_config_validation():
    TrainConfig(lmbda=0.01, steps=1)
    for bad in ({"optimizer": "rmsprop"}, {"schedule": "step"}, {"metric": "psnr"}, {"steps": 0},
                {"batch_size": 0}, {"lr": 0.0}, {"clip_max_norm": -1.0}, {"steps_per_epoch": 0},
                {"plateau_factor": 1.5}, {"schedule_unit": "batch"}, {"precision": "fp16"},
                {"checkpoint_every": 0}, {"num_workers": -1}, {"hyper_lr_scale": 0.0}):
        with pytest.raises(ValueError):
            TrainConfig(**{"lmbda": 0.01, "steps": 1, **bad})
    config = TrainConfig(lmbda=0.01, steps=10, batch_size=16)
    assert (config.schedule_unit, config.precision, config.tf32, config.checkpoint_every) == ("step", "fp32", False,
                                                                                               None)
    assert [config.per_process_batch(w) for w in (1, 2, 4, 8)] == [16, 8, 4, 2]  # batch_size is the global batch
    with pytest.raises(ValueError, match="global batch and must be divisible by the number of processes"):
        config.per_process_batch(3)
    assert config.epochs(4) == 3 and config.epochs(5) == 2 and config.epochs(10) == 1


# ---------------------------------------------------------------------------- loss
def _fake_output(target: torch.Tensor, offset: float) -> dict:
    n = target.shape[0]
    return {"x_hat": target + offset,
            "likelihoods": {"y": torch.full((n, 4, 2, 2), 0.5), "z": torch.full((n, 2, 1, 1), 0.25)}}


def test_rd_loss_matches_hand_computation():
    target = torch.rand(2, 3, 16, 16) * 0.5
    out = RateDistortionLoss(0.0483)(_fake_output(target, 0.1), target)
    # y: 2*4*2*2 = 32 symbols of 1 bit; z: 2*2 = 4 symbols of 2 bits; 40 bits over 2*16*16 pixels.
    bpp = 40 / 512
    mse = 0.01
    assert out["bpp"].item() == pytest.approx(bpp, rel=1e-6)
    assert out["bpp_z"].item() == pytest.approx(8 / 512, rel=1e-6)
    assert out["mse"].item() == pytest.approx(mse, rel=1e-4)
    assert out["loss"].item() == pytest.approx(0.0483 * 255**2 * mse + bpp, rel=1e-4)


def test_msssim_loss_variant():
    assert [msssim_window(s) for s in (256, 161, 160, 128, 64, 33)] == [11, 11, 9, 7, 3, 3]
    with pytest.raises(ValueError, match="33 px"):
        msssim_window(32)
    torch.manual_seed(0)
    target = torch.rand(2, 3, 256, 256)
    noisy = (target + 0.05 * torch.randn_like(target)).clamp(0, 1)
    out = {"x_hat": noisy, "likelihoods": {"y": torch.full((2, 1, 4, 4), 0.5)}}
    result = RateDistortionLoss(8.0, metric="ms-ssim")(out, target)
    reference = ms_ssim(noisy, target, data_range=1.0)  # the standard 11-tap, 5-scale MS-SSIM
    assert result["ms_ssim"].item() == pytest.approx(reference.item(), rel=1e-6)
    bpp = 32 / (2 * 256 * 256)
    assert result["loss"].item() == pytest.approx(8.0 * (1 - reference.item()) + bpp, rel=1e-5)
    # 64 px training crops work (3-tap window) and a perfect reconstruction costs only the rate.
    small = target[..., :64, :64]
    perfect = RateDistortionLoss(8.0, metric="ms-ssim")(
        {"x_hat": small.clone(), "likelihoods": {"y": torch.full((2, 1, 4, 4), 0.5)}}, small)
    assert perfect["loss"].item() == pytest.approx(32 / (2 * 64 * 64), abs=1e-5)


# ---------------------------------------------------------------------------- parameter split
def test_parameter_split_quantiles_go_to_aux_optimizer():
    model = tiny_model()
    main, aux = split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in aux] == ["entropy_bottleneck.quantiles"]
    assert all(not names[id(p)].endswith("quantiles") for p in main)
    assert len(main) + len(aux) == len(list(model.parameters()))
    # Frozen parameters are left out; nothing trainable is a clear error.
    model.entropy_bottleneck.quantiles.requires_grad_(False)
    model.patch_embed.requires_grad_(False)
    main, aux = split_parameters(model)
    assert aux == [] and all(p.requires_grad for p in main)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        split_parameters(model)


# ---------------------------------------------------------------------------- runs
class Interrupt(RuntimeError):
    pass


def _stop_after(epochs: int):
    def callback(row: dict) -> None:
        if row["epoch"] >= epochs:
            raise Interrupt(f"simulated kill after epoch {row['epoch']}")
    return callback


def test_same_seed_same_weights(tmp_path, images):
    config = TrainConfig(lmbda=0.0483, steps=3, batch_size=2, lr=1e-3, seed=3)
    results = []
    for name in ("a", "b"):
        model = tiny_model(0)
        train(model, images, tmp_path / name, config, progress=False)
        results.append(weights(model))
    assert_same_weights(results[0], results[1])
    other = tiny_model(0)
    train(other, images, tmp_path / "c", TrainConfig(lmbda=0.0483, steps=3, batch_size=2, lr=1e-3, seed=4),
          progress=False)
    assert not torch.equal(weights(other)["patch_embed.proj.weight"], results[0]["patch_embed.proj.weight"])


@pytest.mark.parametrize("variant", [
    dict(optimizer="adam", schedule="cosine", steps_per_epoch=3),  # 3 > 2 batches per pass: the loader goes round
    dict(optimizer="sgd", schedule="plateau", plateau_patience=0, lr=1e-2),
])
def test_resume_after_interruption_is_bit_exact(tmp_path, images, variant):
    config = TrainConfig(lmbda=0.0483, steps=6, batch_size=2, seed=5, **{"lr": 1e-3, **variant})
    val = SyntheticImages(2, 64, train=False, seed=9) if variant["schedule"] == "plateau" else None
    extra = {"mode": "full", "model_config": TINY.to_dict()}

    straight = tiny_model(0)
    row = train(straight, images, tmp_path / "straight", config, val_data=val, extra_state=extra, progress=False)
    assert row["step"] == 6

    interrupted = tiny_model(0)
    with pytest.raises(Interrupt):
        train(interrupted, images, tmp_path / "resumed", config, val_data=val, extra_state=extra,
              progress=False, on_epoch_end=_stop_after(1))
    ckpt = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert ckpt["step"] == (config.steps_per_epoch or 2) and ckpt["epoch"] == 1
    assert set(ckpt) == V1_KEYS | set(extra)  # the first version's layout: old runs still resume
    # A new process would rebuild the model from scratch: different initial weights must not matter.
    resumed = tiny_model(123)
    row_resumed = train(resumed, images, tmp_path / "resumed", config, val_data=val, extra_state=extra,
                        progress=False)
    assert_same_weights(weights(straight), weights(resumed))
    assert row_resumed["train_loss"] == row["train_loss"] and row_resumed["lr"] == row["lr"]
    if val is not None:  # the plateau schedule followed the validation loss
        plateau = load_checkpoint(tmp_path / "resumed" / "last.pt")["scheduler"]
        val_losses = [float(r["val_loss"]) for r in read_csv(tmp_path / "resumed" / "metrics.csv")[1]]
        assert plateau["best"] == pytest.approx(min(val_losses), rel=1e-12)
        best = load_checkpoint(tmp_path / "resumed" / "best.pt")
        assert best["best_loss"] == pytest.approx(min(val_losses), rel=1e-12)
    for folder in ("straight", "resumed"):
        header, rows = read_csv(tmp_path / folder / "metrics.csv")
        assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
        assert int(rows[-1]["step"]) == 6
        assert (tmp_path / folder / "best.pt").exists()
    rows_resumed, rows_straight = (read_csv(tmp_path / name / "metrics.csv")[1] for name in ("resumed", "straight"))
    assert len(rows_resumed) == len(rows_straight)
    # A finished run resumed again trains nothing and reports its last row.
    again = tiny_model(7)
    assert train(again, images, tmp_path / "straight", config, val_data=val, progress=False)["step"] == 6
    assert_same_weights(weights(again), weights(straight))


class PoisonAfter(Dataset):
    """Wraps a dataset; returns NaN images once ``poisoned`` is set."""

    def __init__(self, data: Dataset):
        self.data, self.poisoned = data, False

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        item = self.data[index]
        return torch.full_like(item, float("nan")) if self.poisoned else item


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, images):
    data = PoisonAfter(images)
    model = tiny_model(0)

    def poison(row):
        data.poisoned = True

    config = TrainConfig(lmbda=0.0483, steps=6, batch_size=2, lr=1e-3)
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* at step 3.*last good checkpoint"):
        train(model, data, tmp_path, config, progress=False, on_epoch_end=poison)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 2 and ckpt["epoch"] == 1
    assert_same_weights(weights(model), ckpt["model"])  # no update was applied with the bad loss
    assert not (tmp_path / "last.pt.tmp").exists()
    # Once the data is fixed the run resumes from the good checkpoint.
    data.poisoned = False
    assert train(tiny_model(1), data, tmp_path, config, progress=False)["step"] == 6


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, images, monkeypatch):
    config = TrainConfig(lmbda=0.0483, steps=4, batch_size=2, lr=1e-3)
    with pytest.raises(Interrupt):
        train(tiny_model(0), images, tmp_path, config, progress=False, on_epoch_end=_stop_after(1))
    last = tmp_path / "last.pt"
    before = last.read_bytes()
    real_save = torch.save

    def crashing_save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        with open(path, "r+b") as f:  # a kill half-way through the write
            f.truncate(os.path.getsize(path) // 2)
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated crash"):
        train(tiny_model(0), images, tmp_path, config, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert last.read_bytes() == before
    assert load_checkpoint(last)["step"] == 2
    assert not (tmp_path / "last.pt.tmp").exists()
    # The partially written temporary file of a hard kill (no cleanup) does not matter either.
    (tmp_path / "last.pt.tmp").write_bytes(b"\x80garbage")
    assert train(tiny_model(0), images, tmp_path, config, progress=False)["step"] == 4
    assert load_checkpoint(last)["step"] == 4


def test_atomic_save_and_format_check(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, "a": torch.ones(2)}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))
    torch.save({"weights": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")


def test_csv_union_header_and_truncation(tmp_path):
    path = tmp_path / "m.csv"
    append_csv(path, {"epoch": 1, "step": 2, "loss": 3.0})
    append_csv(path, {"epoch": 2, "step": 4, "loss": 2.0, "val_loss": 1.0})
    append_csv(path, {"epoch": 3, "step": 6, "loss": 1.0})
    header, rows = read_csv(path)
    assert header == ["epoch", "step", "loss", "val_loss"]
    assert [r["val_loss"] for r in rows] == ["", "1.0", ""]
    truncate_csv(path, 2)
    assert [r["epoch"] for r in read_csv(path)[1]] == ["1", "2"]


def test_progress_bar_metrics_and_extra_state(tmp_path, images, capsys):
    config = TrainConfig(lmbda=0.0483, steps=2, batch_size=2, lr=1e-3)
    with pytest.raises(ValueError, match="checkpoint's own keys"):
        train(tiny_model(0), images, tmp_path, config, extra_state={"step": 1})
    row = train(tiny_model(0), images, tmp_path, config, val_data=SyntheticImages(2, 64, train=False),
                extra_state={"mode": "full"}, progress=True)
    assert "train λ=0.0483" in capsys.readouterr().err
    assert {"train_loss", "train_bpp", "train_psnr", "val_loss", "val_bpp", "val_psnr", "lr"} <= set(row)
    assert 0 < row["val_bpp_z"] < row["val_bpp"]  # the hyper-latent's share of the rate
    assert load_checkpoint(tmp_path / "best.pt")["mode"] == "full"
    with pytest.raises(ValueError, match="smaller than one batch"):
        train(tiny_model(0), SyntheticImages(1, 64), tmp_path / "small", config, progress=False)


# ---------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, run_dir: str, out_dir: str, steps: int = 3,
                stop_after: int | None = None, tag: str = "", kill_at: int | None = None, **settings) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_model(seed=100 + rank)  # different on purpose: DDP starts every rank from rank 0's weights
        config = TrainConfig(lmbda=0.0483, steps=steps, batch_size=4, lr=1e-3, seed=2, **settings)  # 2 per rank
        data = SyntheticImages(8, 64, seed=1)
        try:
            row = train(model, KillAt(data, kill_at) if kill_at else data, run_dir, config, progress=False,
                        on_epoch_end=_stop_after(stop_after) if stop_after else None)
        except Interrupt:
            return
        Path(out_dir, f"hash{tag}_{rank}.txt").write_text(
            f"{state_dict_hash(model)} {row['step']} {row['train_loss']}")
    finally:
        dist.destroy_process_group()


def _launch(*args, **kwargs) -> None:
    import torch.multiprocessing as mp

    # fork: the children inherit the imported modules (a spawned interpreter spends ~10 s importing compressai).
    worker = functools.partial(_ddp_worker, **kwargs) if kwargs else _ddp_worker
    mp.start_processes(worker, args=(2, _free_port(), *args), nprocs=2, join=True, start_method="fork")


def test_ddp_gloo_two_processes_end_with_identical_weights(tmp_path):
    run_dir = tmp_path / "run"
    _launch(str(run_dir), str(tmp_path))
    first, second = ((tmp_path / f"hash_{r}.txt").read_text().split() for r in range(2))
    assert first == second  # same weights, step and (all-reduced) training loss on both ranks
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng_per_rank"]) == 2 and ckpt["step"] == 3
    assert not torch.equal(ckpt["rng_per_rank"][0]["cpu"], ckpt["rng_per_rank"][1]["cpu"])
    saved = SymmetricalTransFormer(TINY)
    saved.load_state_dict(ckpt["model"])
    assert state_dict_hash(saved) == first[0]
    # 8 images, a global batch of 4 (2 per rank): 2 steps per epoch; rank 0 alone wrote one row per epoch.
    assert [r["epoch"] for r in read_csv(run_dir / "metrics.csv")[1]] == ["1", "2"]
    # Interrupted after one epoch and resumed by both ranks (each restores its own random state):
    # the same weights as the uninterrupted run.
    _launch(str(tmp_path / "resumed"), str(tmp_path), 3, 1, "_resumed")
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 2
    _launch(str(tmp_path / "resumed"), str(tmp_path), 3, None, "_resumed")
    for r in range(2):
        assert (tmp_path / f"hash_resumed_{r}.txt").read_text().split() == first


def test_ddp_resume_within_an_epoch(tmp_path):
    """Two processes killed mid-epoch resume at the next global batch, with each rank's noise stream and sums."""
    settings = dict(steps_per_epoch=3, checkpoint_every=1)
    _launch(str(tmp_path / "straight"), str(tmp_path), 4, None, "_straight", **settings)
    # each rank loads 2 images per step: item 5 belongs to step 3, after the step-2 checkpoint
    _launch(str(tmp_path / "resumed"), str(tmp_path), 4, None, "_killed", kill_at=5, **settings)
    ckpt = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert (ckpt["step"], ckpt["epoch"], ckpt["in_epoch"]["batches"]) == (2, 0, 2)
    assert len(ckpt["in_epoch"]["sums_per_rank"]) == 2
    _launch(str(tmp_path / "resumed"), str(tmp_path), 4, None, "_resumed", **settings)
    for r in range(2):
        straight = (tmp_path / f"hash_straight_{r}.txt").read_text().split()
        assert (tmp_path / f"hash_resumed_{r}.txt").read_text().split() == straight


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun not installed")
def test_torchrun_cli_two_processes(tmp_path):
    run_dir = tmp_path / "run"
    settings = {**TINY_SETTINGS, "anchor.train.crop": 64, "anchor.train.batch_size": 4, "anchor.train.steps": 2,
                "anchor.train.lr": 1e-3}
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
               "-m", "alice_lib.cli", "train", "--profile", "smoke", "--synthetic", "8", "--lmbda", "0.0483",
               "--train-dir", str(run_dir), "--backend", "gloo", "--device", "cpu", "--threads", "1", "--no-progress",
               "--hash-file", str(tmp_path / "hash_{rank}.txt"),
               *[arg for key, value in settings.items() for arg in ("-p", f"{key}={value}")]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    hashes = [(tmp_path / f"hash_{r}.txt").read_text().strip() for r in range(2)]
    assert hashes[0] == hashes[1]
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["mode"] == "full" and ckpt["world_size"] == 2 and ckpt["step"] == 2


def test_cli_help(capsys):
    """``alice train --help`` lists the methods and every setting -p overrides, from the settings' fields."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "methods (--method): alice, vanilla, full" in text
    for key in ("anchor.train.KEY", "adapt.METHOD.KEY", "data.KEY", "model.KEY", "hyper_lr_scale=1.0",
                "hyper_init_gain=1.0", "average_decay=0.0", "validate_every=null", "also_train=[]", "val_images=0",
                "entropy_channels=null", "metric=mse|ms-ssim"):
        assert key in text, key
    assert "hyper_quantization" not in text and "hyper_rate_warmup" not in text


# ---------------------------------------------------------------------------- adapters
def test_vanilla_and_lora_modes_train_only_their_parameters(tmp_path, images):
    lora = pytest.importorskip("alice_lib.lora")
    config = TrainConfig(lmbda=0.0067, steps=2, batch_size=2, lr=1e-3)
    for mode in ("vanilla", "lora"):
        model = tiny_model(0)
        if mode == "lora":
            lora.inject_lora(model, lora.LoRAConfig(), generator=torch.Generator().manual_seed(0))
        trainable = set(lora.mark_trainable(model, mode))
        before = weights(model)
        train(model, images, tmp_path / mode, config, progress=False, extra_state={"mode": mode})
        after = weights(model)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and changed <= trainable, sorted(changed - trainable)[:3]
        if mode == "lora":  # W_b starts at zero, so only it moves at the first step; then both do
            assert all(".lora.W_" in k for k in changed)
        else:
            assert all(k.endswith(("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"))
                       for k in changed)
        assert not load_checkpoint(tmp_path / mode / "last.pt")["aux_optimizer"]  # quantiles frozen


def _adapted_tiny(frozen_seed: int, lora_seed: int) -> SymmetricalTransFormer:
    from alice_lib.lora import LoRAConfig, inject_lora, mark_trainable
    model = tiny_model(frozen_seed)
    inject_lora(model, LoRAConfig(), generator=torch.Generator().manual_seed(lora_seed))
    mark_trainable(model, "lora")
    return model


def test_trainable_only_checkpoints_resume_onto_the_same_frozen_weights_only(tmp_path, images):
    config = TrainConfig(lmbda=0.0067, steps=4, batch_size=2, lr=1e-3, seed=2, checkpoint_frozen=False)
    straight = _adapted_tiny(0, 0)
    train(straight, images, tmp_path / "straight", config, progress=False)
    with pytest.raises(Interrupt):
        train(_adapted_tiny(0, 0), images, tmp_path / "resumed", config, progress=False,
              on_epoch_end=_stop_after(1))
    path = tmp_path / "resumed" / "last.pt"
    ckpt = load_checkpoint(path)
    trainable = {name for name, p in straight.named_parameters() if p.requires_grad}
    assert set(ckpt["model"]) == trainable and ckpt["step"] == 2
    assert len(trainable) < len(straight.state_dict()) and ckpt["frozen_hash"]
    before = path.read_bytes()
    # Other frozen weights (another anchor) are refused before any step, and the checkpoint is kept.
    with pytest.raises(ValueError, match="not the ones that run was trained on"):
        train(_adapted_tiny(1, 0), images, tmp_path / "resumed", config, progress=False)
    assert path.read_bytes() == before
    # The same frozen weights (adapters initialised differently: they come from the file) resume bit for bit.
    resumed = _adapted_tiny(0, 5)
    assert train(resumed, images, tmp_path / "resumed", config, progress=False)["step"] == 4
    assert_same_weights(weights(straight), weights(resumed))
    whole = tiny_model(0)
    with pytest.raises(ValueError, match="does not have"):  # a model without the adapters
        load_weights(whole, load_checkpoint(path), path)


def _adaptation_data():
    if BSDS.is_dir():
        from alice_lib.data import ImageFolder

        train_set = Subset(ImageFolder(BSDS, 64, train=True, max_images=16), range(12))
        val_set = Subset(ImageFolder(BSDS, 64, train=False, max_images=16), range(12, 16))
        return train_set, val_set
    return SyntheticImages(12, 64, seed=3), SyntheticImages(4, 64, train=False, seed=4)


def test_lora_adaptation_to_a_lower_rate_lowers_rate_and_loss(tmp_path):
    """Adapters trained at a lower lambda lower the target loss, and code at a lower rate than the same
    adapters trained at the anchor's lambda (the control: a 150-step anchor is far from converged, so any
    further training also lowers the distortion, and the rate alone may go either way against the anchor)."""
    lora = pytest.importorskip("alice_lib.lora")
    train_set, val_set = _adaptation_data()
    anchor = tiny_model(0, drop_path_rate=0.0)
    train(anchor, train_set, tmp_path / "anchor", TrainConfig(lmbda=0.0483, steps=150, batch_size=2, lr=1e-3),
          progress=False)
    target = RateDistortionLoss(0.0067)
    before = validate(anchor, val_set, target)
    adapted = {}
    for lmbda in (0.0067, 0.0483):
        model = tiny_model(0, drop_path_rate=0.0)
        model.load_state_dict(anchor.state_dict())
        lora.inject_lora(model, lora.LoRAConfig(), generator=torch.Generator().manual_seed(0))
        lora.mark_trainable(model, "lora")
        train(model, train_set, tmp_path / f"adapted-{lmbda}", TrainConfig(lmbda=lmbda, steps=100, batch_size=2,
                                                                          lr=1e-3), progress=False)
        adapted[lmbda] = validate(model, val_set, target)
    after, control = adapted[0.0067], adapted[0.0483]
    assert after["loss"] < before["loss"], (before, after)
    assert after["bpp"] < control["bpp"], (after, control)


# ---------------------------------------------------------------------------- 2 processes = 1 process
def _value_noise(self, inputs, mode, means=None, _original=None):
    """CompressAI's quantize with the training noise made a function of the latent value.

    The uniform noise of STF training is drawn per rank, so two processes cannot
    reproduce one process's draws for the same images. For the equivalence test the
    noise is ``0.45 * sin(7 x)``: bounded like the real one, smooth (so a last-bit
    difference between vectorised and scalar code stays a last-bit difference), and
    the same for a sample whichever process holds it.
    """
    if mode == "noise":
        return inputs + 0.45 * torch.sin(7 * inputs)
    return _original(self, inputs, mode, means)


def _equivalence_run(rank: int, world: int, port: int, run_dir: str, out_dir: str) -> None:
    """One run of the equivalence test: 8 images, global batch 4, 3 steps (2 epochs), full mode with aux."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_model(seed=0, drop_path_rate=0.0)  # no stochastic depth: the noise is the only randomness
        config = TrainConfig(lmbda=0.0483, steps=3, batch_size=4, lr=1e-3, seed=4, steps_per_epoch=2)
        row = train(model, SyntheticImages(8, 64, seed=1), run_dir, config, progress=False)
        if rank == 0:
            torch.save({"weights": weights(model), "row": row}, Path(out_dir, f"world{world}.pt"))
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, monkeypatch):
    """Rank r takes slice r of each global batch and the crops are seeded by their place in the epoch, so
    2 processes x 2 images see the 1-process batches of 4; DDP averages the two half-batch gradients.
    Tolerance: every weight within 2e-5 of the 1-process run (float32 summation order, amplified by Adam),
    while the 3 steps moved the weights by at least 50 times that."""
    import compressai.entropy_models as em
    import torch.multiprocessing as mp

    original = em.EntropyModel.quantize
    monkeypatch.setattr(em.EntropyModel, "quantize",
                        lambda self, inputs, mode, means=None: _value_noise(self, inputs, mode, means, original))
    start = weights(tiny_model(seed=0, drop_path_rate=0.0))
    threads = torch.get_num_threads()
    try:
        _equivalence_run(0, 1, 0, str(tmp_path / "one"), str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    mp.start_processes(_equivalence_run, args=(2, _free_port(), str(tmp_path / "two"), str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    one, two = (torch.load(tmp_path / f"world{w}.pt", weights_only=True) for w in (1, 2))
    assert one["weights"].keys() == two["weights"].keys()
    keys = [k for k in start if start[k].is_floating_point() and start[k].numel()]
    diff = max((one["weights"][k] - two["weights"][k]).abs().max().item() for k in keys)
    moved = max((one["weights"][k] - start[k]).abs().max().item() for k in keys)
    print(f"max |2 processes - 1 process| = {diff:.3g}, max update = {moved:.3g}")
    assert diff <= 2e-5 and moved >= 50 * 2e-5, (diff, moved)
    assert one["row"]["step"] == two["row"]["step"] == 3 and one["row"]["epoch"] == two["row"]["epoch"] == 2
    assert two["row"]["train_loss"] == pytest.approx(one["row"]["train_loss"], rel=1e-4)


# ---------------------------------------------------------------------------- data order, mid-epoch resume, schedule
def test_global_batches_do_not_depend_on_the_number_of_processes():
    from alice_lib.train import GlobalBatchSampler

    one = GlobalBatchSampler(10, 4, seed=3)
    halves = [GlobalBatchSampler(10, 4, seed=3, rank=r, world=2) for r in range(2)]
    for epoch in range(2):
        for step in range(5):  # 2 batches per pass: steps 2.. go round again with a new permutation
            assert one.batch(epoch, step) == halves[0].batch(epoch, step) + halves[1].batch(epoch, step)
    first_pass = [i for step in range(2) for i, _ in one.batch(0, step)]
    assert len(set(first_pass)) == 8  # no image twice within a pass
    assert one.batch(0, 0) != one.batch(1, 0) and one.batch(0, 0) != one.batch(0, 2)
    one.set_epoch(1, 3, 5)
    assert list(one) == [one.batch(1, 3), one.batch(1, 4)] and len(one) == 2


class KillAt(Dataset):
    """Wraps a dataset; raises :class:`Interrupt` at the ``at``-th item fetched (a kill mid-epoch)."""

    def __init__(self, data: Dataset, at: int):
        self.data, self.at, self.fetched = data, at, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        self.fetched += 1
        if self.fetched == self.at:
            raise Interrupt(f"simulated kill at item {self.at}")
        return self.data[index]


def test_resume_within_an_epoch_is_bit_exact(tmp_path, images):
    # 4 images, batch 2: 2 batches per pass; 3 steps per epoch (the third goes round); a checkpoint every 2 steps.
    config = TrainConfig(lmbda=0.0483, steps=6, batch_size=2, lr=1e-3, seed=5, steps_per_epoch=3,
                         checkpoint_every=2, num_workers=0)
    straight = tiny_model(0)
    row = train(straight, images, tmp_path / "straight", config, progress=False)

    with pytest.raises(Interrupt):  # killed while loading step 5 (items 9-10), after the step-4 checkpoint
        train(tiny_model(0), KillAt(images, 9), tmp_path / "resumed", config, progress=False)
    ckpt = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert (ckpt["step"], ckpt["epoch"], ckpt["in_epoch"]["batches"]) == (4, 1, 1)
    assert len(read_csv(tmp_path / "resumed" / "metrics.csv")[1]) == 1
    # Resumed by a new process with other initial weights and 2 DataLoader workers: crops are seeded per
    # image, not per worker, so the result is the uninterrupted run's, bit for bit.
    resumed = tiny_model(123)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # num_workers does not change results: no warning
        row_resumed = train(resumed, images, tmp_path / "resumed", replace(config, num_workers=2), progress=False)
    assert_same_weights(weights(straight), weights(resumed))
    assert row_resumed["train_loss"] == row["train_loss"] and row_resumed["step"] == 6
    assert read_csv(tmp_path / "resumed" / "metrics.csv")[1][0]["train_loss"] == \
        read_csv(tmp_path / "straight" / "metrics.csv")[1][0]["train_loss"]
    assert "in_epoch" not in load_checkpoint(tmp_path / "resumed" / "last.pt")  # epoch-end files: first layout


def test_a_first_version_checkpoint_still_resumes(tmp_path, images):
    """A last.pt of the first layout (no in_epoch; train_config without the newer fields) resumes silently."""
    config = TrainConfig(lmbda=0.0483, steps=4, batch_size=2, lr=1e-3, seed=1)
    straight = tiny_model(0)
    train(straight, images, tmp_path / "straight", config, progress=False)
    with pytest.raises(Interrupt):
        train(tiny_model(0), images, tmp_path / "old", config, progress=False, on_epoch_end=_stop_after(1))
    path = tmp_path / "old" / "last.pt"
    ckpt = load_checkpoint(path)
    for key in ("schedule_unit", "checkpoint_every", "precision", "tf32"):
        del ckpt["train_config"][key]
    ckpt["train_config"]["num_workers"] = 0
    assert set(ckpt) == V1_KEYS
    torch.save(ckpt, path)
    resumed = tiny_model(9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert train(resumed, images, tmp_path / "old", config, progress=False)["step"] == 4
    assert_same_weights(weights(straight), weights(resumed))


def test_epoch_schedule_unit_steps_the_cosine_once_per_epoch(tmp_path, images):
    # 2 steps per epoch: 5 steps are 3 epochs (the last one short), so T_max = 3 epochs.
    steps = 5
    config = TrainConfig(lmbda=0.0483, steps=steps, batch_size=2, lr=1e-3, steps_per_epoch=2, schedule_unit="epoch")
    seen: list[float] = []
    train(tiny_model(0), images, tmp_path, config, progress=False,
          on_epoch_end=lambda row: seen.append(load_checkpoint(tmp_path / "last.pt")["optimizer"]["param_groups"]
                                               [0]["lr"]))
    cosine = [1e-3 * (1 + math.cos(math.pi * k / 3)) / 2 for k in range(4)]
    assert seen == pytest.approx(cosine[1:], abs=1e-12)  # the lr after k epochs is cosine(k / T)
    rows = read_csv(tmp_path / "metrics.csv")[1]
    assert [float(r["lr"]) for r in rows] == pytest.approx(cosine[:3], abs=1e-12)  # the lr each epoch ran at
    assert load_checkpoint(tmp_path / "last.pt")["scheduler"]["T_max"] == 3
    per_step = TrainConfig(lmbda=0.0483, steps=steps, batch_size=2, lr=1e-3, steps_per_epoch=2)
    train(tiny_model(0), images, tmp_path / "per_step", per_step, progress=False)
    assert load_checkpoint(tmp_path / "per_step" / "last.pt")["scheduler"]["T_max"] == steps


def test_bf16_autocast_runs_a_step_on_cpu(tmp_path, images):
    model = tiny_model(0)
    before = weights(model)
    row = train(model, images, tmp_path, TrainConfig(lmbda=0.0483, steps=1, batch_size=2, lr=1e-3, precision="bf16",
                                                     tf32=True), progress=False)
    assert math.isfinite(row["train_loss"]) and row["step"] == 1
    assert all(v.dtype == before[k].dtype for k, v in weights(model).items())  # the weights stay float32
    assert not torch.equal(weights(model)["patch_embed.proj.weight"], before["patch_embed.proj.weight"])


def test_cli_new_flags(tmp_path):
    """The schedule's settings reach the saved configuration (an epoch schedule: 2 epochs of 4 // 2 steps)."""
    schedule = {"crop": 64, "batch_size": 2, "epochs": 2, "steps": "null", "lr": 1e-3, "schedule_unit": "epoch",
                "checkpoint_every": 1, "precision": "fp32", "flip": "false"}
    assert alice_train(tmp_path, "--synthetic", "4", "--lmbda", "0.0483",
                       settings={f"anchor.train.{k}": v for k, v in schedule.items()}) == 0
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert (ckpt["step"], ckpt["epoch"], ckpt["lmbda"]) == (4, 2, 0.0483)
    saved = ckpt["train_config"]
    assert (saved["schedule_unit"], saved["checkpoint_every"], saved["steps_per_epoch"]) == ("epoch", 1, 2)
    assert "hyper_quantization" not in saved and "hyper_rate_warmup" not in saved  # the removed trial switches


def test_cli_also_train_unfreezes_the_entropy_model_for_ablations(tmp_path, capsys):
    common = ["--synthetic", "2", "--lmbda", "0.0018"]
    schedule = {"crop": 64, "batch_size": 1, "steps": 2, "lr": 1e-2}
    assert alice_train(tmp_path / "base", *common, settings={f"anchor.train.{k}": v for k, v in schedule.items()}) == 0
    base = load_checkpoint(tmp_path / "base" / "last.pt")["model"]
    adapt = {f"adapt.alice.{k}": v for k, v in {**schedule, "also_train": "[entropy]"}.items()}
    assert alice_train(tmp_path / "ablation", *common, "--method", "alice", "--init",
                       str(tmp_path / "base" / "last.pt"), settings=adapt) == 0
    ckpt = load_checkpoint(tmp_path / "ablation" / "last.pt")
    assert ckpt["also_train"] == list(SymmetricalTransFormer.ENTROPY_MODEL) and ckpt["mode"] == "alice"
    after = ckpt["model"]
    # An adapted layer keeps its frozen weights under `.linear.`; the adapters themselves are new.
    moved = {k for k, v in after.items()
             if k.replace(".linear.", ".") in base and not torch.equal(base[k.replace(".linear.", ".")], v)}
    assert any(k.startswith("h_scale_s.") for k in moved)  # the entropy model trained
    assert not any(k.startswith(("layers.", "syn_layers.")) for k in moved)  # the transforms only through adapters
    full = {f"adapt.full.{k}": v for k, v in {**schedule, "also_train": "[entropy]"}.items()}
    assert alice_train(tmp_path / "full", *common, "--method", "full", "--init", "random", settings=full) == 1
    assert "full trains every weight already" in capsys.readouterr().err


def test_cli_hyper_init_gain_scales_only_a_fresh_hyper_analysis(tmp_path):
    from alice_lib.settings import TrainingSettings
    from alice_lib.train import start_model

    def schedule(gain: float) -> TrainingSettings:
        return TrainingSettings(lr=1e-3, batch_size=2, crop=64, steps=1, hyper_init_gain=gain)

    plain, scaled = start_model(TINY, schedule(1.0)), start_model(TINY, schedule(300))
    assert torch.equal(scaled.h_a[-1].weight, 300 * plain.h_a[-1].weight)
    assert torch.equal(scaled.h_a[0].weight, plain.h_a[0].weight)
    torch.save({"model": plain.state_dict()}, tmp_path / "init.pt")
    loaded = start_model(TINY, schedule(300), init=tmp_path / "init.pt")
    assert torch.equal(loaded.h_a[-1].weight, plain.h_a[-1].weight)  # given weights are never rescaled


def test_hyper_lr_scale_gives_the_hyperprior_path_its_own_rate():
    model = tiny_model(0)
    main, aux = split_parameters(model)
    config = TrainConfig(lmbda=0.0483, steps=4, lr=1e-3, hyper_lr_scale=0.125)
    optimizer, _ = optim.optimizers(config, model, main, aux)
    rest, hyper = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].split(".")[0] for p in hyper["params"]} == {"h_a", "h_mean_s", "h_scale_s",
                                                                     "entropy_bottleneck"}
    assert not any(names[id(p)].split(".")[0] in SymmetricalTransFormer.HYPERPRIOR for p in rest["params"])
    assert (rest["lr"], hyper["lr"]) == (1e-3, 1e-3 * 0.125)
    scheduler = optim.scheduler(config, optimizer, steps_per_epoch=4)
    optimizer.step(), scheduler.step()
    assert hyper["lr"] == pytest.approx(rest["lr"] * 0.125)  # the schedule scales both groups alike
    one, _ = optim.optimizers(replace(config, hyper_lr_scale=1.0), model, main, aux)
    assert len(one.param_groups) == 1
    for name, p in model.named_parameters():  # an adapter-only run has no hyperprior path to scale
        p.requires_grad_(name.split(".")[0] not in SymmetricalTransFormer.HYPERPRIOR)
    main, aux = split_parameters(model)
    with pytest.raises(ValueError, match="no trainable parameter is in the hyperprior path"):
        optim.optimizers(config, model, main, aux)


def test_a_profile_schedule_carries_the_hyperprior_recipe():
    from alice_lib.settings import SettingsError, TrainingSettings

    schedule = TrainingSettings(lr=8e-4, batch_size=4, crop=64, steps=10, hyper_init_gain=300, hyper_lr_scale=0.125)
    assert TrainConfig.from_schedule(schedule, 0.0483, "mse", 20).hyper_lr_scale == 0.125
    plain = TrainingSettings(lr=8e-4, batch_size=4, crop=64, steps=10)
    assert TrainConfig.from_schedule(plain, 0.0483, "mse", 20).hyper_lr_scale == 1.0
    for name in ("hyper_init_gain", "hyper_lr_scale"):
        with pytest.raises(SettingsError, match=name):
            TrainingSettings(lr=8e-4, batch_size=4, crop=64, steps=10, **{name: 0})


def test_amplify_hyper_latent_scales_the_last_hyper_analysis_layer_only():
    plain, scaled = tiny_model(0), tiny_model(0)
    train_mod.amplify_hyper_latent(scaled, 300)
    assert torch.equal(scaled.h_a[-1].weight, 300 * plain.h_a[-1].weight)
    assert torch.equal(scaled.h_a[-1].bias, 300 * plain.h_a[-1].bias)
    assert torch.equal(scaled.h_a[0].weight, plain.h_a[0].weight)
    train_mod.amplify_hyper_latent(plain, 1.0)
    assert torch.equal(plain.h_a[-1].weight, tiny_model(0).h_a[-1].weight)
    with pytest.raises(ValueError, match="positive"):
        train_mod.amplify_hyper_latent(plain, -1.0)


def test_mosaics_tile_the_item_and_random_crops_reproducibly():
    from alice_lib.data import Mosaics

    tiles = [torch.full((3, 4, 4), float(i)) for i in range(5)]
    mosaics = Mosaics(tiles, 2)
    torch.manual_seed(0)
    first = mosaics[2]
    assert len(mosaics) == 5 and first.shape == (3, 8, 8)
    assert torch.equal(first[:, :4, :4], tiles[2])  # the item itself, top left
    torch.manual_seed(0)
    assert torch.equal(mosaics[2], first)  # the others come from the (seeded) global generator
    assert Mosaics(tiles, 3)[0].shape == (3, 12, 12)
    with pytest.raises(ValueError, match="positive integer"):
        Mosaics(tiles, 0)


def test_cli_mosaic_tiles_the_training_crops_and_keeps_validation_plain(tmp_path):
    from argparse import Namespace

    from PIL import Image

    from alice_lib.settings import load_settings
    from alice_lib.train import command

    for i in range(8):
        Image.new("RGB", (40, 40), (i * 30, 0, 0)).save(tmp_path / f"{i}.png")
    settings = load_settings("smoke", {"data.train_dir": str(tmp_path), "data.val_crop": 16, "data.val_images": 2,
                                       "anchor.train.crop": 16, "anchor.train.mosaic": 2})
    train_set, val_set = command._datasets(Namespace(synthetic=None), settings, settings.anchor.train)
    assert len(train_set) == 6 and train_set[0].shape == (3, 32, 32)
    assert len(val_set) == 2 and val_set[0].shape == (3, 16, 16)


# ---------------------------------------------------------------------------- CPU-scale recipe (issue 25)
def test_weight_average_resumes_bit_exact_is_validated_and_is_what_loads(tmp_path, images):
    config = TrainConfig(lmbda=0.0483, steps=6, batch_size=2, lr=1e-3, seed=5, steps_per_epoch=3,
                         average_decay=0.9)
    val = SyntheticImages(2, 64, train=False, seed=9)
    straight = tiny_model(0)
    row = train(straight, images, tmp_path / "straight", config, val_data=val, progress=False)
    interrupted = tiny_model(0)
    with pytest.raises(Interrupt):
        train(interrupted, images, tmp_path / "resumed", config, val_data=val, progress=False,
              on_epoch_end=_stop_after(1))
    resumed = tiny_model(99)
    train(resumed, images, tmp_path / "resumed", config, val_data=val, progress=False)
    assert_same_weights(weights(straight), weights(resumed))
    last = {name: load_checkpoint(tmp_path / name / "last.pt") for name in ("straight", "resumed")}
    assert last["straight"]["average"]["updates"] == 6
    assert_same_weights(last["straight"]["average"]["weights"], last["resumed"]["average"]["weights"])

    # The average differs from the last step's weights, and load_weights(averaged=True) loads it.
    averaged = tiny_model(1)
    load_weights(averaged, last["straight"], averaged=True)
    live = weights(straight)
    avg = last["straight"]["average"]["weights"]
    assert not torch.equal(avg["patch_embed.proj.weight"], live["patch_embed.proj.weight"])
    assert torch.equal(weights(averaged)["patch_embed.proj.weight"], avg["patch_embed.proj.weight"])
    assert torch.equal(weights(averaged)["entropy_bottleneck.quantiles"], live["entropy_bottleneck.quantiles"])
    # Validation judged the average (and left the live weights in the model).
    expected = validate(averaged, val, RateDistortionLoss(0.0483))["loss"]
    assert row["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert row["val_loss"] != pytest.approx(validate(straight, val, RateDistortionLoss(0.0483))["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="average_decay"):
        TrainConfig(lmbda=0.01, steps=1, average_decay=1.0)


def test_hyper_latent_bits_and_precision_are_logged(tmp_path, images):
    val = SyntheticImages(2, 64, train=False, seed=9)
    model = tiny_model(0)
    train(model, images, tmp_path, TrainConfig(lmbda=0.0483, steps=2, batch_size=2, steps_per_epoch=2),
          val_data=val, progress=False)
    header, rows = read_csv(tmp_path / "metrics.csv")
    assert {"train_bpp_z", "train_z_bits", "val_bpp_z", "val_z_bits", "precision"} <= set(header)
    assert rows[0]["precision"] == "fp32"
    # z bits per image are bpp_z times the pixels of one 64 px crop
    assert float(rows[0]["val_z_bits"]) == pytest.approx(float(rows[0]["val_bpp_z"]) * 64 * 64, rel=1e-6)
    model.eval()
    with torch.no_grad():
        z_likelihoods = model(torch.stack([val[i] for i in range(len(val))]))["likelihoods"]["z"]
    bits = -torch.log2(z_likelihoods).sum().item() / len(val)
    assert float(rows[0]["val_z_bits"]) == pytest.approx(bits, rel=1e-4)


def test_auto_precision_is_bf16_only_with_bf16_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(config_mod, "fast_bf16", lambda device: True)
    assert config_mod.resolved_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(config_mod, "fast_bf16", lambda device: False)
    assert config_mod.resolved_precision("auto", cpu) == "fp32"
    assert config_mod.resolved_precision("bf16", cpu) == "bf16"  # asked for explicitly: obeyed
    assert TrainConfig(lmbda=0.01, steps=1, precision="auto").precision == "auto"


# ---------------------------------------------------------------------------- one configuration, one command (issue 26)
PRE_SPLIT = REPO / "tests" / "fixtures" / "pre_split_run"


def test_a_checkpoint_of_the_code_before_the_split_resumes_with_alice_train(tmp_path):
    """The fixture's mid-epoch last.pt (written by train.py before it became a package, with the pilot's
    recipe: two parameter groups, an average, the removed switches at their neutral values in train_config)
    resumes through today's command line silently and ends where that code's own resume ended."""
    import json
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pt", "metrics.csv"):
        shutil.copy(PRE_SPLIT / name, run / name)
    before = load_checkpoint(run / "last.pt")
    assert (before["step"], before["in_epoch"]["batches"], before["train_config"]["hyper_quantization"]) == (4, 1, "ste")
    model = {"embed_dim": 2, "depths": "[1,1]", "num_heads": "[1,1]", "window_size": 2, "mlp_ratio": 1.0,
             "num_slices": 2, "entropy_channels": 8, "drop_path_rate": 0.0}
    schedule = {"batch_size": 2, "crop": 32, "steps": 6, "validate_every": 3, "checkpoint_every": 2,
                "average_decay": 0.9, "hyper_init_gain": 300, "hyper_lr_scale": 0.125, "lr": 1e-3,
                "schedule": "constant", "seed": 5, "precision": "fp32", "also_train": "[entropy_bottleneck]"}
    settings = {**{f"model.{k}": v for k, v in model.items()}, "data.val_images": 2, "data.val_crop": 32,
                **{f"adapt.vanilla.{k}": v for k, v in schedule.items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # neither a changed configuration nor a removed switch
        assert alice_train(run, "--synthetic", "4", "--method", "vanilla", "--lmbda", "0.0483", "--init", "random",
                           settings=settings) == 0
    after, expected = load_checkpoint(run / "last.pt"), json.loads((PRE_SPLIT / "expected.json").read_text())
    assert (after["step"], after["epoch"]) == (expected["step"], expected["epoch"])
    # Summed in float64: equal on the fixture's machine, within rounding on another CPU. The rounding is
    # relative to the weights' size, not to their sum, which may cancel (fc2's: -0.032 of an absolute 1.6
    # moved by 1.7e-6 on an AMD EPYC); one Adam step more or less moves each weight by about lr = 1e-3.
    for group, weights in (("weights", after["model"]), ("average", after["average"]["weights"])):
        for key, total in expected[group].items():
            tensor = weights[key].double()
            assert abs(tensor.sum().item() - total) <= 1e-5 * tensor.abs().sum().item() + 1e-6, (group, key)
    rows = read_csv(run / "metrics.csv")[1]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[-1]["train_loss"]) == pytest.approx(expected["row"]["train_loss"], rel=1e-5)


def _benchmark(name: str):
    """A script of ``benchmarks/`` (not a package) imported as a module."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_the_pilots_command_builds_the_pilots_configuration(monkeypatch, tmp_path):
    """benchmarks/cpu_scale_pilot.py's `alice train` yields the configuration its runs started with under
    the old command line (their last.pt's train_config, less the removed switches), the same model and the
    same checkpoint record: the runs resume after the split."""
    train_command = _benchmark("cpu_scale_pilot").train_command
    from alice_lib.train import command

    seen = {}
    monkeypatch.setattr(command, "_datasets", lambda args, settings, schedule: ([None] * 416, None))
    monkeypatch.setattr(command, "train", lambda model, data, folder, config, **kw: seen.update(
        model=model, folder=folder, config=config, **kw) or {})
    argv = train_command("e32-d1111-w8", tmp_path / "e32", Path("photos"), threads=1)
    assert argv[1:5] == ["-m", "alice_lib.cli", "train", "--profile"]
    assert cli.main(argv[3:]) == 0
    pilot = {"lmbda": 0.0483, "steps": 1000000, "batch_size": 4, "lr": 0.0005, "aux_lr": 0.001, "optimizer": "adam",
             "schedule": "constant", "schedule_unit": "step", "clip_max_norm": 1.0, "metric": "mse", "seed": 0,
             "num_workers": None, "steps_per_epoch": 200, "checkpoint_every": 50, "checkpoint_frozen": True,
             "precision": "fp32", "tf32": False, "momentum": 0.9, "weight_decay": 0.0, "plateau_factor": 0.5,
             "plateau_patience": 4, "ddp_find_unused_parameters": False, "hyper_lr_scale": 0.125,
             "average_decay": 0.999}
    assert seen["config"] == TrainConfig(**pilot) and seen["folder"] == str(tmp_path / "e32")
    model_config = {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [2, 4, 8, 16], "window_size": 8,
                    "mlp_ratio": 4.0, "num_slices": 4, "patch_size": 2, "qkv_bias": True, "drop_path_rate": 0.0,
                    "entropy_channels": 48}
    assert seen["extra_state"] == {"model_config": model_config, "mode": "full", "lmbda": 0.0483}
    assert seen["model"].config.to_dict() == model_config
    torch.manual_seed(0)
    fresh = SymmetricalTransFormer(STFConfig(**model_config))
    assert torch.equal(seen["model"].h_a[-1].weight, 300 * fresh.h_a[-1].weight)  # recipe v2's start


def test_the_budget_measurement_stops_at_the_first_doubling_that_names_n(monkeypatch, tmp_path):
    """benchmarks/fine_tune_budget.py: N is the first validated step whose double gains under 1 %, and
    training stops at the first doubling after which the rule names one."""
    fine_tune_budget = _benchmark("fine_tune_budget")
    assert fine_tune_budget.budget([100, 200, 400, 800], [10.0, 8.0, 7.95, 7.0]) == 200
    assert fine_tune_budget.budget([100, 200, 400], [10.0, 8.0, 7.0]) is None
    assert fine_tune_budget.stages(100, 6400) == [200, 400, 800, 1600, 3200, 6400]
    assert fine_tune_budget.stages(100, 1000) == [200, 400, 800, 1000]

    objective = {100: 10.0, 200: 8.0, 300: 7.5, 400: 7.45, 500: 7.44, 600: 7.43, 700: 7.42, 800: 7.41, 900: 7.4}
    stopped_at = []

    def fake_training(argv, **kwargs):  # appends the validations up to the stage's steps, as a resumed run does
        steps = int(next(a for a in argv if a.startswith("adapt.full.steps=")).split("=")[1])
        stopped_at.append(steps)
        rows = [{"step": s, "val_loss": v} for s, v in objective.items() if s <= steps]
        pd.DataFrame(rows).to_csv(tmp_path / "metrics.csv", index=False)
        return 0

    monkeypatch.setattr(fine_tune_budget.subprocess, "call", fake_training)
    namespace = argparse.Namespace(root=tmp_path, init=Path("anchor.safetensors"), data=Path("photos"), steps=6400,
                                   every=100, lr=5e-4, average_decay=0.99, threads=1, tolerance=0.01, method="full",
                                   set={})
    assert fine_tune_budget.train(namespace) == 0
    assert stopped_at == [200, 400, 800]  # after 800 steps N = 300 qualifies (7.43 > 0.99 * 7.5); 400 does too
    alice = fine_tune_budget.train_command(argparse.Namespace(**{**vars(namespace), "method": "alice"}), 400)
    assert ["--method", "alice"] == alice[alice.index("--method"):alice.index("--method") + 2]
    assert "adapt.alice.steps=400" in alice and not any(a.startswith("adapt.full.") for a in alice)
    probe = fine_tune_budget.train_command(argparse.Namespace(**{**vars(namespace), "method": "alice",
                                                                 "set": {"lora.r": "32"}}), 400)
    assert "lora.r=32" in probe and "adapt.alice.steps=400" in probe  # a probe's setting beside the schedule
    with pytest.raises(SystemExit):
        fine_tune_budget.main(["train", "--init", "anchor.safetensors", "-p", "lora.r"])  # not KEY=VALUE
    gap = fine_tune_budget.gap_table(pd.DataFrame({"step": [100, 200, 300], "val_loss": [1.1, 0.9, 0.8]}),
                                     pd.DataFrame({"step": [100, 200], "val_loss": [1.0, 0.9]}))
    assert gap["step"].tolist() == [100, 200] and gap["gap_pct"].tolist() == pytest.approx([10.0, 0.0])


def test_the_kodak_probes_read_the_shipped_runs_onto_the_anchor():
    """benchmarks/checkpoint_kodak.py (and latent_rate.py through it) takes a shipped adapter file merged
    onto the anchor, and a shipped weight delta as the weights it rebuilds, each at its lambda."""
    from safetensors.torch import load_file

    from alice_lib.checkpoints import load_stf
    from alice_lib.lora import lora_delta

    checkpoint_kodak = _benchmark("checkpoint_kodak")
    weights = REPO / "alice_lib" / "weights"
    anchor = load_stf(weights / "cpu_anchor.safetensors").state_dict()
    alice, info = checkpoint_kodak.model_from_checkpoint(weights / "cpu_alice_0.0018.safetensors")
    assert info["lmbda"] == 0.0018 and not any(".lora." in key for key in alice.state_dict())
    factors = load_file(str(weights / "cpu_alice_0.0018.safetensors"))
    layer = "layers.3.blocks.0.mlp.fc2"
    expected = anchor[f"{layer}.weight"] + lora_delta(factors[f"{layer}.lora.W_a"].float(),
                                                      factors[f"{layer}.lora.W_b"].float(), 8.0)
    assert torch.allclose(alice.state_dict()[f"{layer}.weight"], expected, atol=1e-6)
    assert torch.equal(alice.state_dict()["h_a.0.weight"], anchor["h_a.0.weight"])  # ALICE: entropy model frozen
    reference, info = checkpoint_kodak.model_from_checkpoint(weights / "cpu_full_0.0018.safetensors")
    assert info["lmbda"] == 0.0018
    assert not torch.equal(reference.state_dict()["h_a.0.weight"], anchor["h_a.0.weight"])  # every weight tuned


def test_the_cpu_chain_reads_n_back_and_stages_only_the_runs_it_trained(tmp_path):
    """benchmarks/cpu_next_chain.py: the budget's committed table names the same N as the rule on the log,
    and a run installed from a shipped file is not shipped again."""
    cpu_next_chain = _benchmark("cpu_next_chain")
    assert cpu_next_chain.committed_budget(tmp_path) is None
    pd.DataFrame({"N": [100, 200, 400], "obj_N": [10.0, 8.0, 7.95], "obj_2N": [8.0, 7.95, 7.0]}).to_csv(
        tmp_path / "budget.csv", index=False)  # as fine_tune_budget.py report writes it
    assert cpu_next_chain.committed_budget(tmp_path) == 200
    settings = load_settings("cpu")
    layout = RunLayout(tmp_path / "run")
    for method, lmbda in [("alice", 0.0018), ("full", 0.025)]:
        layout.rate_artifact(method, lmbda).parent.mkdir(parents=True, exist_ok=True)
        layout.rate_artifact(method, lmbda).write_bytes(b"trained")
    layout.rate_source("full", 0.025).write_text("{}")  # installed from its shipped file
    assert cpu_next_chain.trained_here(settings, tmp_path / "run") == [("alice", 0.0018)]


def test_the_progressive_report_compares_each_rate_at_both_budgets():
    """benchmarks/progressive_start.py: the independent run's objective at the progressive run's
    last step, and the first step at which the progressive run reaches the independent's final."""
    progressive_start = _benchmark("progressive_start")
    independent = pd.DataFrame({"step": [100, 200, 300, 400], "val_loss": [2.0, 1.8, 1.7, 1.6]})
    logs = {0.013: (independent, pd.DataFrame({"step": [50, 100, 150, 200], "val_loss": [1.9, 1.7, 1.6, 1.55]})),
            0.0067: (independent, pd.DataFrame({"step": [50, 100, 150], "val_loss": [2.5, 2.2, 2.1]}))}
    table = progressive_start.compare(logs).set_index("lmbda")
    assert table.loc[0.013, ["independent_steps", "progressive_steps"]].tolist() == [400, 200]
    assert table.loc[0.013, "independent_at_progressive_steps"] == 1.8
    assert table.loc[0.013, "progressive_steps_to_independent_final"] == 150
    assert pd.isna(table.loc[0.0067, "independent_at_progressive_steps"])  # never validated at step 150
    assert pd.isna(table.loc[0.0067, "progressive_steps_to_independent_final"])  # never reached 1.6


def test_a_checkpoint_that_used_a_removed_switch_says_so_when_it_resumes(tmp_path, images):
    config = TrainConfig(lmbda=0.0483, steps=4, batch_size=2, lr=1e-3)
    with pytest.raises(Interrupt):
        train(tiny_model(0), images, tmp_path, config, progress=False, on_epoch_end=_stop_after(1))
    ckpt = load_checkpoint(tmp_path / "last.pt")
    ckpt["train_config"].update(hyper_quantization="noise", hyper_rate_warmup=0)
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.warns(UserWarning, match=r"trained with \{'hyper_quantization': 'noise'\}, switches that no longer"):
        assert train(tiny_model(0), images, tmp_path, config, progress=False)["step"] == 4


def test_alice_train_refuses_what_it_cannot_run(tmp_path, capsys):
    """Clear one-line errors before anything trains: a method without its lambda or its anchor, a notebook
    parameter, an unknown setting, a switch that no longer exists."""
    cases = {("--method", "alice"): "needs the --lmbda",
             ("--method", "alice", "--lmbda", "0.0067"): "profile smoke ships none: give --init",
             ("--method", "lora", "--lmbda", "0.0067", "--init", "random"): "method: 'lora' is not one of",
             ("-p", "kodak_dir=/data"): "parameters of `alice run`'s notebooks",
             ("-p", "anchor.train.hyper_quantization=noise"): "unknown keys ['hyper_quantization']",
             ("-p", "anchor.train.hyper_rate_warmup=100"): "unknown keys ['hyper_rate_warmup']"}
    for options, message in cases.items():
        assert alice_train(tmp_path, "--synthetic", "4", *options) == 1, options
        assert message in capsys.readouterr().err, options
    assert not (tmp_path / "last.pt").exists()


def test_hold_cosine_holds_then_anneals_and_a_constant_run_resumes_into_it(tmp_path, images):
    # 10 steps, the last 4 annealed: lr after k steps is lr * (1 + cos(pi * max(k - 6, 0) / 4)) / 2.
    held = TrainConfig(lmbda=0.0483, steps=10, batch_size=2, lr=1e-3, steps_per_epoch=1, schedule="hold-cosine",
                       decay_fraction=0.4)
    seen: list[float] = []
    straight = tiny_model(3)
    train(straight, images, tmp_path / "straight", held, progress=False,
          on_epoch_end=lambda row: seen.append(
              load_checkpoint(tmp_path / "straight" / "last.pt")["optimizer"]["param_groups"][0]["lr"]))
    expected = [1e-3 * (1 + math.cos(math.pi * max(k - 6, 0) / 4)) / 2 for k in range(1, 11)]
    assert seen == pytest.approx(expected, abs=1e-12)
    assert seen[5] == pytest.approx(1e-3) and seen[-1] == pytest.approx(0.0, abs=1e-12)
    # A run held at a constant rate for 4 steps, resumed as hold-cosine, ends where the straight run ended.
    constant = TrainConfig(lmbda=0.0483, steps=4, batch_size=2, lr=1e-3, steps_per_epoch=1, schedule="constant")
    resumed = tiny_model(3)
    train(resumed, images, tmp_path / "resumed", constant, progress=False)
    with pytest.warns(UserWarning, match="changed configuration"):
        train(resumed, images, tmp_path / "resumed", held, progress=False)
    assert_same_weights(weights(straight), weights(resumed))
    with pytest.raises(ValueError, match="hold-cosine"):
        TrainConfig(lmbda=0.0483, steps=10, schedule="hold-cosine", schedule_unit="epoch")
