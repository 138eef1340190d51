"""The order in which a run sees its images, independent of processes and workers.

``batch_size`` is the *global* batch. Step ``i`` of epoch ``e`` takes positions
``i*B .. (i+1)*B`` of the epoch's sequence of images (passes over the data, each a
permutation fixed by the seed, the epoch and the pass; see :class:`GlobalBatchSampler`);
under ``torchrun`` with W processes rank ``r`` takes slice ``r`` of that global batch
(``B / W`` images), so W processes see exactly the batches one process sees. Each
image's random crop is drawn from a generator seeded by (seed, epoch, position)
(:class:`SeededItems`): crops do not depend on the number of DataLoader workers or
processes, and a run resumes mid-epoch at the right batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .config import TrainConfig


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, position ...): nearby inputs give unrelated streams."""
    words = np.random.SeedSequence([v % 2**64 for v in values]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class GlobalBatchSampler:
    """Batch sampler: this process's share of the global batches of one epoch, with per-image seeds.

    An epoch's sequence of images is a series of passes over the dataset, each a
    random permutation fixed by ``(seed, epoch, pass)``; a pass yields
    ``len(dataset) // global_batch`` batches (the incomplete tail is dropped). Step
    ``i`` is the global batch ``i`` of that sequence; rank ``r`` of ``world`` takes
    its ``r``-th slice. Every item is ``(index, item_seed)``, the seed fixed by
    ``(seed, epoch, position in the epoch)`` (see :class:`SeededItems`).
    :meth:`set_epoch` chooses the epoch and the steps to yield, so that a resumed
    run starts at the right batch.
    """

    def __init__(self, size: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} not divisible by {world} processes")
        self.size, self.global_batch, self.seed, self.rank = size, global_batch, seed, rank
        self.local_batch = global_batch // world
        self.batches_per_pass = size // global_batch
        self.epoch, self.start, self.stop = 0, 0, self.batches_per_pass
        self._cached: tuple[tuple[int, int], Tensor] | None = None

    def set_epoch(self, epoch: int, start: int, stop: int) -> None:
        """Yield steps ``start .. stop - 1`` of ``epoch`` on the next iteration."""
        self.epoch, self.start, self.stop = epoch, start, stop

    def _permutation(self, epoch: int, pass_index: int) -> Tensor:
        key = (epoch, pass_index)
        if self._cached is None or self._cached[0] != key:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, pass_index, 1))
            self._cached = key, torch.randperm(self.size, generator=generator)
        return self._cached[1]

    def batch(self, epoch: int, step: int) -> list[tuple[int, int]]:
        """This rank's ``(index, item_seed)`` pairs of step ``step`` of ``epoch``."""
        pass_index, within = divmod(step, self.batches_per_pass)
        order = self._permutation(epoch, pass_index)
        first = within * self.global_batch + self.rank * self.local_batch
        position = step * self.global_batch + self.rank * self.local_batch
        return [(int(order[first + k]), mix_seed(self.seed, epoch, position + k, 2))
                for k in range(self.local_batch)]

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            yield self.batch(self.epoch, step)


class SeededItems(Dataset):
    """``dataset[index]`` drawn with torch's global generator seeded by ``item_seed``, for items ``(index, item_seed)``.

    Random crops (and flips) of :class:`alice_lib.data.ImageFolder` and
    :class:`alice_lib.data.SyntheticImages` then depend on the image's place in the epoch only,
    not on which DataLoader worker or process loads it. The caller's random state
    is restored afterwards (the main process's noise stream is untouched when
    ``num_workers=0``).
    """

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, int]) -> Tensor:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.data[index]


def auto_workers(config: TrainConfig, device: torch.device, world: int) -> int:
    """``config.num_workers``, or for ``None`` 0 on the CPU (workers would take the cores) and up to 8 on CUDA."""
    if config.num_workers is not None:
        return config.num_workers
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // world - 1))
