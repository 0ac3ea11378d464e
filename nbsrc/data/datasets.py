"""Datasets that return ``(image, label, index)``; the index identifies a sample in the memory bank
and in the retrieval results."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from nbsrc.data.images import load_image  # the one image reader (re-exported here for older imports)
from nbsrc.errors import DatasetError

__all__ = ["RetrievalDataset", "load_image"]


class RetrievalDataset(Dataset):
    """Images held in memory (uint8 array) or as file paths, with integer labels.

    ``dataset[i]`` returns the evaluation view; ``dataset[(i, seed)]`` draws the augmentation from a
    generator seeded with ``seed`` (what :class:`~nbsrc.data.samplers.MPerClassBatchSampler` yields).
    """

    def __init__(
        self,
        images: np.ndarray | Sequence[str | Path],
        labels: np.ndarray,
        transform: Callable | None = None,
        class_names: Sequence[str] | None = None,
    ):
        if len(images) != len(labels):
            raise DatasetError(f"{len(images)} images but {len(labels)} labels; they must match")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.labels)

    def raw(self, i: int) -> torch.Tensor:
        """The untransformed image as a uint8 tensor (for display)."""
        item = self.images[i]
        if isinstance(item, (str, Path)):
            return load_image(item)
        return torch.from_numpy(np.ascontiguousarray(item))

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        img = self.raw(i)
        if self.transform is not None:
            gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
            img = self.transform(img, gen) if _takes_generator(self.transform) else self.transform(img)
        return img, int(self.labels[i]), int(i)

    def subset(self, indices: np.ndarray, transform: Callable | None = None) -> RetrievalDataset:
        indices = np.asarray(indices)
        imgs = self.images[indices] if isinstance(self.images, np.ndarray) else [self.images[i] for i in indices]
        return RetrievalDataset(imgs, self.labels[indices], transform or self.transform, self.class_names)


@dataclass
class RetrievalData:
    """Training set, queries and gallery. ``gallery is None`` means query = gallery (self-match
    excluded), as for SOP and CUB; In-Shop has a separate gallery."""

    train: RetrievalDataset
    query: RetrievalDataset
    gallery: RetrievalDataset | None = None


def _takes_generator(transform: Callable) -> bool:
    from nbsrc.data.transforms import RetrievalTransform

    return isinstance(transform, RetrievalTransform)
