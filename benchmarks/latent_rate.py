"""Where a model's bits go on Kodak: the latent ``y`` against the hyper-latent ``z``, and what the
entropy model's predicted scales let the encoder reach.

Per checkpoint (a training ``last.pt``/``best.pt``, an ALICE run's checkpoint, or a weights
file; see ``checkpoint_kodak.model_from_checkpoint``), in eval mode with rounded latents:

- ``y_bpp``, ``z_bpp``: estimated rate of the latent and of the hyper-latent (``z_bpp`` about
  0 means the hyperprior carries no information: it has collapsed);
- ``z_varies``: the share of hyper-latent elements that do not round to the bottleneck's
  median. 0 means the hyper-synthesis gets the same input everywhere, in every image;
- ``at_mean``: the share of latent elements coded at their predicted mean (residual 0),
  and ``bpp_at_mean`` the bits they still cost;
- ``floor_bpp``: what ``y`` would cost if every residual were 0, given the scales the
  entropy model predicts. With a frozen entropy model this is the least an adapted encoder
  can spend without changing those scales;
- ``floor_slice0_bpp``: the part of that floor in the first slice, whose scales come from the
  hyperprior alone; when the hyperprior has collapsed they are constants of the entropy model,
  and no change of the transforms can code the first slice for less;
- ``scale_median`` and ``scale_near_bound``: the predicted scales (after the coder's lower
  bound, 0.11), and the share of them below 0.2;
- ``mean_abs_y``: the latent's magnitude (the quantisation step is 1).

    python benchmarks/latent_rate.py NAME=CHECKPOINT [NAME=CHECKPOINT ...] [--max-images 6] [--out table.csv]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd
import torch
from checkpoint_kodak import DEFAULT_KODAK, model_from_checkpoint

from alice_lib.data import list_images, read_image
from alice_lib.evaluation.coding import image_batch
from alice_lib.models.stf import SymmetricalTransFormer


@torch.no_grad()
def latent_rate(model: SymmetricalTransFormer, images: list[torch.Tensor]) -> dict:
    """The quantities of the module doc, averaged over ``images`` (per pixel or per latent element)."""
    gc = model.gaussian_conditional
    slices: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    # Each slice's (y, scale, mean) as the model's own forward computes them.
    hook = gc.register_forward_pre_hook(lambda module, args: slices.append(tuple(a.detach() for a in args[:3])))
    bottleneck = model.entropy_bottleneck
    medians = bottleneck._get_medians().detach()
    hyper: list[torch.Tensor] = []
    z_hook = bottleneck.register_forward_pre_hook(lambda module, args: hyper.append(args[0].detach()))
    totals = dict.fromkeys(("y_bits", "z_bits", "bits_at_mean", "floor_bits", "floor_slice0", "abs_y", "at_mean",
                            "near_bound"), 0.0)
    pixels, elements, scales, z_varies, z_elements = 0, 0, [], 0.0, 0
    try:
        for image in images:
            slices.clear()
            out = model(image_batch(image))
            pixels += image.shape[-1] * image.shape[-2]
            totals["z_bits"] += float(-torch.log2(out["likelihoods"]["z"].double()).sum())
            z_varies += float((torch.round(hyper[-1] - medians) != 0).sum())
            z_elements += hyper[-1].numel()
            for index, (y, scale, mean) in enumerate(slices):
                residual = torch.round(y - mean)
                bits = -torch.log2(gc.likelihood_lower_bound(gc._likelihood(residual + mean, scale, mean)))
                bounded = gc.lower_bound_scale(scale)
                at_mean = residual == 0
                totals["y_bits"] += float(bits.sum())
                totals["bits_at_mean"] += float(bits[at_mean].sum())
                floor = float(-torch.log2(torch.erf(0.5 / (bounded * math.sqrt(2)))).sum())
                totals["floor_bits"] += floor
                totals["floor_slice0"] += floor if index == 0 else 0.0
                totals["abs_y"] += float(y.abs().sum())
                totals["at_mean"] += float(at_mean.sum())
                totals["near_bound"] += float((bounded < 0.2).sum())
                elements += y.numel()
                scales.append(bounded.flatten())
    finally:
        hook.remove()
        z_hook.remove()
    return {"y_bpp": totals["y_bits"] / pixels, "z_bpp": totals["z_bits"] / pixels,
            "z_varies": z_varies / z_elements,
            "at_mean": totals["at_mean"] / elements, "bpp_at_mean": totals["bits_at_mean"] / pixels,
            "floor_bpp": totals["floor_bits"] / pixels,
            "floor_slice0_bpp": totals["floor_slice0"] / pixels, "scale_median": float(torch.cat(scales).median()),
            "scale_near_bound": totals["near_bound"] / elements, "mean_abs_y": totals["abs_y"] / elements}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="NAME=CHECKPOINT")
    parser.add_argument("--kodak", type=Path, default=DEFAULT_KODAK)
    parser.add_argument("--max-images", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, help="also write the table to this CSV")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    images = [read_image(p) for p in list_images(args.kodak)[:args.max_images]]
    rows = []
    for item in args.models:
        name, sep, path = item.partition("=")
        if not sep:
            parser.error(f"expected NAME=CHECKPOINT, got {item!r}")
        model, _ = model_from_checkpoint(Path(path))
        rows.append({"model": name, **latent_rate(model, images)})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        table.to_csv(args.out, index=False, float_format="%.5g")
        print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
