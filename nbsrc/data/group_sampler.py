"""Group-size sampling (Yokoo et al., 2020; DToP Table A12): every batch holds images of one size,
so images keep (roughly) their own aspect ratio instead of being squashed to one square size.

1. :func:`aspect_ratio_buckets` assigns each image a target size ``(h, w)``: the ratio ``h / w``
   nearest (in log scale) to the image's own among ``ratios``, with the longer side ``long_side``,
   both sides rounded to a multiple of ``multiple`` (the patch size, or the hybrid stem's stride).
2. :class:`GroupSizeBatchSampler` groups the indices by target size and cuts each group into
   batches; epoch ``e`` shuffles within groups and then the batch order with
   ``numpy.random.default_rng([seed, e])``. Every image is used exactly once per epoch.
3. :class:`GroupResizeCollate` resizes each image of a batch to its target size and stacks them
   (use it with a transform that keeps the input size, ``RetrievalTransform(..., resize=False)``).

The fixed-size alternative of Table A12 is the ordinary square resize and crop of
:class:`~nbsrc.data.transforms.RetrievalTransform`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from nbsrc.errors import ConfigError

DEFAULT_RATIOS = (1 / 2, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 2.0)  # h / w


def aspect_ratio_buckets(
    sizes: Sequence[tuple[int, int]],
    long_side: int = 384,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    multiple: int = 16,
) -> list[tuple[int, int]]:
    """Target size ``(h, w)`` of each image ``(h, w)``: the nearest ratio's size with the longer
    side ``long_side`` (sides rounded to a multiple of ``multiple``, at least ``multiple``)."""
    if long_side < multiple:
        raise ConfigError(f"long_side={long_side} is smaller than multiple={multiple}")
    ratios = np.asarray(ratios, dtype=np.float64)
    if ratios.ndim != 1 or len(ratios) == 0 or (ratios <= 0).any():
        raise ConfigError(f"ratios={ratios.tolist()} must be a non-empty list of positive h/w ratios")

    def snap(v: float) -> int:
        return max(multiple, int(round(v / multiple)) * multiple)

    targets = {}
    for r in ratios.tolist():
        targets[r] = (snap(long_side), snap(long_side / r)) if r >= 1 else (snap(long_side * r), snap(long_side))
    out = []
    for h, w in sizes:
        if h < 1 or w < 1:
            raise ConfigError(f"image size ({h}, {w}) is invalid: both sides must be >= 1")
        r = ratios[np.argmin(np.abs(np.log(ratios) - np.log(h / w)))]
        out.append(targets[float(r)])
    return out


class GroupSizeBatchSampler(Sampler):
    """Batches of indices whose ``sizes[i]`` (target sizes, e.g. from :func:`aspect_ratio_buckets`)
    are all equal.

    Each group is cut into batches of ``batch_size``; its last, smaller batch is kept unless
    ``drop_last``. With ``shuffle`` the order within groups and the order of batches change with
    :meth:`set_epoch`; without it, indices keep their order and groups come in order of size.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, seed: int = 0,
                 drop_last: bool = False, shuffle: bool = True):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} is invalid: expected an integer >= 1")
        if len(sizes) == 0:
            raise ConfigError("GroupSizeBatchSampler got no image sizes; the dataset is empty")
        self.sizes = [tuple(int(v) for v in s) for s in sizes]
        self.groups: dict[tuple[int, int], np.ndarray] = {}
        for size in sorted(set(self.sizes)):
            self.groups[size] = np.array([i for i, s in enumerate(self.sizes) if s == size], dtype=np.int64)
        self.batch_size, self.seed, self.drop_last, self.shuffle = batch_size, seed, drop_last, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        out = []
        for idx in self.groups.values():
            idx = rng.permutation(idx) if self.shuffle else idx
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    out.append(batch.tolist())
        if self.shuffle:
            out = [out[i] for i in rng.permutation(len(out))]
        return out

    def size_of(self, batch: Sequence[int]) -> tuple[int, int]:
        """The one size shared by the images of ``batch``."""
        return self.sizes[batch[0]]

    def __iter__(self):
        yield from self.batches()

    def __len__(self) -> int:
        n = 0
        for idx in self.groups.values():
            n += len(idx) // self.batch_size if self.drop_last else -(-len(idx) // self.batch_size)
        return n


class GroupResizeCollate:
    """Collate ``(image, label, index)`` items into one batch, each image bilinearly resized to
    ``target_sizes[index]``; all items of a batch must share that size (a group-size batch)."""

    def __init__(self, target_sizes: Sequence[tuple[int, int]]):
        self.target_sizes = [tuple(int(v) for v in s) for s in target_sizes]

    def __call__(self, items):
        sizes = {self.target_sizes[int(i)] for _, _, i in items}
        if len(sizes) != 1:
            raise ConfigError(
                f"a batch mixes target sizes {sorted(sizes)}; use GroupSizeBatchSampler with the same target sizes"
            )
        (h, w), = sizes
        images = [F.interpolate(img[None].float(), size=(h, w), mode="bilinear", align_corners=False,
                                antialias=True)[0] for img, _, _ in items]
        labels = torch.as_tensor([int(y) for _, y, _ in items])
        indices = torch.as_tensor([int(i) for _, _, i in items])
        return torch.stack(images), labels, indices
