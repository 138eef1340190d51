"""Where a model in training stands on Kodak: its RD point through real bitstreams, beside JPEG 4:4:4.

For the CPU scale's long trainings (``docs/studies/anchor-training.md``, ``docs/cpu-scale/``): each checkpoint
(``best.pt`` or ``last.pt`` of a training folder, read with ``weights_only=True``) codes
the Kodak images; JPEG 4:4:4 codes them at a sweep of qualities, and its PSNR is
interpolated (in log-rate) at the model's mean bpp. A positive ``vs_jpeg_db`` means the
model beats JPEG at its own rate. ``bpp_z_estimated`` is the hyper-latent's share of the rate
(estimated from its likelihoods): about 0 when the hyperprior carries no information.

    python benchmarks/checkpoint_kodak.py runs/cpu-training/fixed-rate-0.0483/best.pt [...] [--max-images 24] \
        [--append-to docs/cpu-scale/anchor/kodak.csv]

An adaptation run's checkpoint holds only what trained (``frozen_hash``, see
``alice_lib.train``); it is put back onto ``--anchor`` (default: the shipped CPU anchor).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open

from alice_lib.adapter_files import ADAPTER_FORMAT, load_adapters
from alice_lib.checkpoints import WEIGHT_DELTA_FORMAT, load_stf, load_weight_delta, read_checkpoint
from alice_lib.data import list_images, read_image
from alice_lib.evaluation import code_image
from alice_lib.evaluation.coding import image_batch
from alice_lib.evaluation.classical import code_classical
from alice_lib.lora import LoRAConfig, inject_lora, merge_lora
from alice_lib.models.stf import STFConfig, SymmetricalTransFormer
from alice_lib.settings import load_settings
from alice_lib.train import load_checkpoint, load_weights
from alice_lib.utils import bpp_from_likelihoods

REPO = Path(__file__).resolve().parents[1]
DEFAULT_KODAK = REPO.parent / "shared" / "data" / "kodak"
DEFAULT_ANCHOR = REPO / "alice_lib" / "weights" / "cpu_anchor.safetensors"
JPEG_QUALITIES = (3, 5, 8, 10, 15, 20, 30, 40, 50, 65, 80, 90)


def model_from_checkpoint(path: Path, anchor: Path = DEFAULT_ANCHOR) -> tuple[SymmetricalTransFormer, dict]:
    """The STF of a training checkpoint or a weights file, ready to code, and its step / lambda.

    ``anchor``: the frozen weights under a trainable-only checkpoint (an adaptation run's), and
    under a shipped adapter file (merged) or weight delta (``alice_lib/weights/cpu_alice_*``)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        file_format = header.get("format")
        if file_format in (ADAPTER_FORMAT, WEIGHT_DELTA_FORMAT):  # a shipped ALICE / vanilla / reference file
            model = load_stf(anchor, update=False)
            if file_format == ADAPTER_FORMAT:
                meta = load_adapters(path, model)
                merge_lora(model, strip=True)
                lmbda = meta["lambda"]
            else:
                model, lmbda = load_weight_delta(path, model), float(header["lmbda"])
            model.eval().update(force=True)
            return model, {"step": None, "lmbda": lmbda}
        _, _, metadata = read_checkpoint(path)
        step = metadata.get("step", metadata.get("trained_steps"))  # a snapshot's, or a shipped model's
        return load_stf(path), {"step": step, "lmbda": metadata.get("lmbda")}
    ckpt = load_checkpoint(path)
    model = load_stf(anchor) if "frozen_hash" in ckpt else SymmetricalTransFormer(STFConfig(**ckpt["model_config"]))
    if any(".lora." in key for key in ckpt["model"]):  # an ALICE run: adapters on the frozen anchor, coded merged
        # the CLI stores its LoRA settings; the pipeline's runs use their profile's (cpu: r 8, alpha 8)
        lora = LoRAConfig.from_dict(ckpt["lora_config"]) if ckpt.get("lora_config") else load_settings("cpu").model.lora
        inject_lora(model, lora)
        load_weights(model, ckpt, path, averaged=True)
        merge_lora(model, strip=True)
    else:
        load_weights(model, ckpt, path, averaged=True)
    model.eval().update(force=True)
    return model, {"step": ckpt["step"], "lmbda": ckpt.get("lmbda")}


def hyper_bpp(model: SymmetricalTransFormer, image: torch.Tensor) -> float:
    """The hyper-latent's estimated rate (eval mode, rounded): near 0 when the hyperprior has collapsed.

    Only the analysis, the hyper-analysis and the bottleneck run: the rest of a forward pass
    does not change the hyper-latent's likelihoods."""
    h, w = image.shape[-2:]
    z = model.h_a(model.analysis(model._pad(image_batch(image))))
    _, likelihoods = model.entropy_bottleneck(z)
    return float(bpp_from_likelihoods([likelihoods.double()], h * w))


def jpeg_curve(images: list[torch.Tensor]) -> pd.DataFrame:
    """Mean bpp and PSNR of JPEG 4:4:4 over the images at each quality."""
    rows = [{"quality": q, **code_classical(img, "jpeg", q)} for q in JPEG_QUALITIES for img in images]
    return pd.DataFrame(rows).groupby("quality")[["bpp", "psnr"]].mean().sort_values("bpp")


def jpeg_psnr_at(curve: pd.DataFrame, bpp: float) -> float:
    """JPEG's PSNR at ``bpp``, interpolated linearly in log-rate (NaN outside its sweep)."""
    log_rate = np.log(curve["bpp"].to_numpy())
    if not log_rate[0] <= np.log(bpp) <= log_rate[-1]:
        return float("nan")
    return float(np.interp(np.log(bpp), log_rate, curve["psnr"].to_numpy()))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--kodak", type=Path, default=DEFAULT_KODAK)
    parser.add_argument("--max-images", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--anchor", type=Path, default=DEFAULT_ANCHOR,
                        help="frozen weights under adaptation checkpoints that hold only what trained")
    parser.add_argument("--append-to", type=Path, help="also append the rows to this CSV (created if absent)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    images = [read_image(p) for p in list_images(args.kodak)[:args.max_images]]
    curve = jpeg_curve(images)
    rows = []
    for path in args.checkpoints:
        model, info = model_from_checkpoint(path, args.anchor)
        with torch.no_grad():
            coded = pd.DataFrame([code_image(model, img, estimate_bpp=False) for img in images])
            hyper = np.mean([hyper_bpp(model, img) for img in images])
        bpp, psnr = coded["bpp"].mean(), coded["psnr"].mean()
        jpeg = jpeg_psnr_at(curve, bpp)
        rows.append({"checkpoint": str(path), **info, "images": len(images), "bpp": bpp, "psnr": psnr,
                     "jpeg_psnr_at_bpp": jpeg, "vs_jpeg_db": psnr - jpeg, "bpp_z_estimated": hyper})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.append_to:
        table.to_csv(args.append_to, mode="a", header=not args.append_to.exists(), index=False)
        print(f"appended to {args.append_to}")
    return table


if __name__ == "__main__":
    main()
