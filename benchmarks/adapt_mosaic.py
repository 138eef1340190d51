"""Adaptation on 2x2 mosaics of random crops: a trial of the image-size effect of recipe v2.

Adapters trained from a recipe v2 anchor on 256 px crops code whole Kodak images at twice
the rate per pixel that they reach on 256 px crops (``reports/cpu/recipe-v2-gpu/``). The
suspected cause is that such a crop's hyper-latent (4x4) lies entirely next to the
border. The BSDS photographs are too small for large crops, so this trial tiles four
random crops into one image twice the side: each training image then has a hyper-latent
with interior cells (8x8 for 256 px crops), at the cost of seams between the tiles.

It runs ``python -m alice_lib.train`` unchanged (every option is the CLI's), with the
training set wrapped in :class:`Mosaics`. ``--crop`` is the tile; ``--batch-size 1`` of
512 px mosaics holds the pixels of the main job's 4 crops of 256 px. Validation keeps the
CLI's centre crops::

    python benchmarks/adapt_mosaic.py --data ../shared/data/bsds432 --val-images 16 --profile cpu \\
        --mode lora --init ANCHOR.pt --lmbda 0.0018 --steps 300 --batch-size 1 --crop 256 --lr 1e-3 \\
        --schedule cosine --steps-per-epoch 50 --seed 0 --run-dir runs/adapt-trials/mosaic
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import Dataset

from alice_lib import train as train_mod


class Mosaics(Dataset):
    """Item ``i``: crop ``i`` and three random others of ``tiles``, as one 2x2 image.

    The three are drawn from torch's global generator, which the training loop seeds per
    item, so the mosaics are reproducible like the crops themselves.
    """

    def __init__(self, tiles: Dataset):
        self.tiles = tiles

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> torch.Tensor:
        others = torch.randint(len(self.tiles), (3,)).tolist()
        a, b, c, d = (self.tiles[i] for i in (index, *others))
        return torch.cat([torch.cat([a, b], dim=-1), torch.cat([c, d], dim=-1)], dim=-2)


def main(argv: list[str]) -> None:
    crops = train_mod._cli_datasets

    def mosaic_datasets(args):
        train_set, val_set = crops(args)
        return Mosaics(train_set), val_set

    train_mod._cli_datasets = mosaic_datasets  # the one change to the CLI's run
    train_mod.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
