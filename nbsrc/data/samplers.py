"""Batch samplers for metric learning."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler

from nbsrc.errors import ConfigError


class MPerClassBatchSampler(Sampler):
    """Iteration-based batches of ``batch_size // m`` classes with ``m`` samples each.

    Batch ``t`` is a pure function of ``(seed, t)``: it is drawn from
    ``numpy.random.default_rng([seed, t])``. Resuming at iteration ``t`` is therefore exact
    (``set_start(t)``), whatever happened before. Each item is ``(index, augmentation_seed)``, which
    :class:`~nbsrc.data.datasets.RetrievalDataset` uses to draw the augmentation.

    Classes with fewer than ``m`` samples are sampled with replacement.
    """

    def __init__(self, labels, batch_size: int, m: int, iterations: int, seed: int = 0, start: int = 0):
        labels = np.asarray(labels)
        if m < 1 or batch_size % m:
            raise ConfigError(f"batch_size={batch_size} is not a multiple of m_per_class={m}")
        self.classes, inverse = np.unique(labels, return_inverse=True)
        self.n_per_batch = batch_size // m
        if self.n_per_batch > len(self.classes):
            raise ConfigError(
                f"batch_size={batch_size} with m_per_class={m} needs {self.n_per_batch} classes per "
                f"batch but the training set has {len(self.classes)}; lower batch_size or raise m_per_class"
            )
        self.by_class = [np.flatnonzero(inverse == c) for c in range(len(self.classes))]
        self.batch_size, self.m, self.iterations, self.seed, self.start = batch_size, m, iterations, seed, start

    def set_start(self, start: int) -> None:
        self.start = start

    def batch(self, t: int) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, t])
        classes = rng.choice(len(self.by_class), self.n_per_batch, replace=False)
        out = []
        for c in classes:
            pool = self.by_class[c]
            out.extend(rng.choice(pool, self.m, replace=len(pool) < self.m).tolist())
        seeds = rng.integers(0, 2**62, size=len(out))
        return list(zip(out, seeds.tolist(), strict=True))

    def __iter__(self):
        for t in range(self.start, self.iterations):
            yield self.batch(t)

    def __len__(self) -> int:
        return max(0, self.iterations - self.start)
