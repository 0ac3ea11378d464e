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

Training (``cfg.data.sampler == 'group_size'``) goes through :func:`training_sampler`, which the loop
calls: :class:`GroupSizeMPerClassSampler` is the iteration-based, resumable form of the grouping
(batch ``t`` a pure function of ``(seed, t)``, fixed batch size for DDP slicing) that also keeps
``m`` samples per class together, so the pair-based losses always see positives. Since the
embedded Fashion-MNIST images are all 28 × 28, :func:`mixed_size_variant` makes a deterministic
mixed-size copy of a dataset (each image stretched to one of a few aspect ratios), on which the
two sampling schemes of Table A12 differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from nbsrc.config import ExperimentConfig
from nbsrc.data.datasets import RetrievalDataset
from nbsrc.data.samplers import MPerClassBatchSampler
from nbsrc.data.transforms import RetrievalTransform
from nbsrc.errors import ConfigError, DatasetError

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


# ----------------------------------------------------------------------------- training
class GroupSizeMPerClassSampler(Sampler):
    """Iteration-based group-size batches with ``m`` samples per class (DToP Table A12).

    Epoch ``e`` is laid out with ``numpy.random.default_rng([seed, e, 0])``: within each size group
    every class's images are shuffled and cut into chunks of ``m`` (the last chunk of a class is
    completed by repeating that class's first images); the group's chunks are shuffled and packed
    ``batch_size // m`` to a batch (the group's last batch is completed by repeating its first
    chunks); then the order of all batches is shuffled. Hence:

    * every batch holds one target size, and exactly ``batch_size`` items (DDP slices stay equal);
    * every batch holds ``m`` images of each class it contains, so pair losses have positives (a
      class with a single image in a group is paired with a second augmented view of itself);
    * every image is used at least once per epoch, and exactly once when each (size, class) count
      is a multiple of ``m`` and each group's chunk count a multiple of ``batch_size // m``.

    Batch ``t`` is batch ``t mod E`` of epoch ``t // E`` (``E = batches_per_epoch``), with the
    augmentation seeds drawn from ``default_rng([seed, t, 1])``: a pure function of ``(seed, t)``,
    so resuming at ``start`` is exact. Items are ``(index, augmentation_seed)``, as
    :class:`~nbsrc.data.samplers.MPerClassBatchSampler`.
    """

    def __init__(self, labels, sizes: Sequence[tuple[int, int]], batch_size: int, m: int, iterations: int,
                 seed: int = 0, start: int = 0):
        labels = np.asarray(labels)
        if len(labels) != len(sizes):
            raise ConfigError(f"{len(labels)} labels but {len(sizes)} image sizes; give one size per image")
        if len(labels) == 0:
            raise ConfigError("GroupSizeMPerClassSampler got no images; the training set is empty")
        if m < 1 or batch_size < m or batch_size % m:
            raise ConfigError(f"batch_size={batch_size} is not a positive multiple of m_per_class={m}")
        self.sizes = [tuple(int(v) for v in s) for s in sizes]
        self.labels = labels
        self.groups: dict[tuple[int, int], np.ndarray] = {}
        for i, s in enumerate(self.sizes):
            self.groups.setdefault(s, []).append(i)
        self.groups = {s: np.asarray(self.groups[s], dtype=np.int64) for s in sorted(self.groups)}
        self.batch_size, self.m, self.iterations, self.seed, self.start = batch_size, m, iterations, seed, start
        self.chunks_per_batch = batch_size // m
        self.batches_per_epoch = 0
        for idx in self.groups.values():
            _, counts = np.unique(labels[idx], return_counts=True)
            chunks = int(sum(-(-c // m) for c in counts))
            self.batches_per_epoch += -(-chunks // self.chunks_per_batch)
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def set_start(self, start: int) -> None:
        self.start = start

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The ``batches_per_epoch`` index batches of ``epoch`` (see the class docstring)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch, 0])
        out = []
        for idx in self.groups.values():
            lab = self.labels[idx]
            chunks = []
            for c in np.unique(lab):
                members = rng.permutation(idx[lab == c])
                members = np.resize(members, -(-len(members) // self.m) * self.m)  # repeats to fill
                chunks.extend(members.reshape(-1, self.m))
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
            n = self.chunks_per_batch
            chunks += [chunks[i % len(chunks)] for i in range((-len(chunks)) % n)]
            out.extend(np.concatenate(chunks[j : j + n]) for j in range(0, len(chunks), n))
        out = [out[i] for i in rng.permutation(len(out))]
        self._cache = (epoch, out)
        return out

    def batch(self, t: int) -> list[tuple[int, int]]:
        epoch, j = divmod(t, self.batches_per_epoch)
        idx = self.epoch_batches(epoch)[j].tolist()
        seeds = np.random.default_rng([self.seed, t, 1]).integers(0, 2**62, size=len(idx))
        return list(zip(idx, seeds.tolist(), strict=True))

    def size_of(self, batch) -> tuple[int, int]:
        """The one size of a batch (of indices or of ``(index, seed)`` pairs)."""
        first = batch[0]
        return self.sizes[int(first[0] if isinstance(first, tuple) else first)]

    def __iter__(self):
        for t in range(self.start, self.iterations):
            yield self.batch(t)

    def __len__(self) -> int:
        return max(0, self.iterations - self.start)


def image_sizes(ds: RetrievalDataset) -> list[tuple[int, int]]:
    """``(h, w)`` of every image of ``ds`` without transforming it (file headers for paths)."""
    images = ds.images
    if isinstance(images, np.ndarray) and images.dtype != object:
        h, w = (images.shape[1:3] if images.ndim == 4 and images.shape[-1] in (1, 3, 4) else images.shape[-2:])
        return [(int(h), int(w))] * len(images)
    out = []
    for item in images:
        if isinstance(item, (str, Path)):
            from nbsrc.data.images import image_size

            out.append(image_size(item))  # header only, EXIF rotation applied, size limit checked
        else:
            out.append(tuple(int(v) for v in np.shape(item)[-2:]))
    return out


def training_sampler(cfg: ExperimentConfig, train_ds: RetrievalDataset, start: int = 0):
    """``(batch_sampler, dataset, collate_fn)`` for the training loop, following ``cfg.data.sampler``.

    ``m_per_class``: :class:`~nbsrc.data.samplers.MPerClassBatchSampler` on ``train_ds`` as it is
    (square ``img_size`` crops), default collate. ``group_size`` (DToP Table A12): target sizes
    from :func:`aspect_ratio_buckets` (longer side ``img_size``, sides multiples of the patch size,
    16 when ``patch_size`` is None), :class:`GroupSizeMPerClassSampler`, the training transform
    with ``resize=False`` (flip only, so the image keeps its aspect ratio) and
    :class:`GroupResizeCollate` to the target size.
    """
    if cfg.data.sampler == "m_per_class":
        sampler = MPerClassBatchSampler(train_ds.labels, cfg.optim.batch_size, cfg.optim.m_per_class,
                                        cfg.optim.iterations, cfg.run.seed, start)
        return sampler, train_ds, None
    if cfg.data.sampler != "group_size":
        raise ConfigError(f"sampler={cfg.data.sampler!r} is invalid: expected m_per_class or group_size")
    multiple = cfg.model.patch_size or 16
    targets = aspect_ratio_buckets(image_sizes(train_ds), long_side=cfg.data.img_size, multiple=multiple)
    sampler = GroupSizeMPerClassSampler(train_ds.labels, targets, cfg.optim.batch_size, cfg.optim.m_per_class,
                                        cfg.optim.iterations, cfg.run.seed, start)
    tf = train_ds.transform
    if isinstance(tf, RetrievalTransform):
        tf = dataclasses.replace(tf, resize=False)
    ds = RetrievalDataset(train_ds.images, train_ds.labels, tf, train_ds.class_names)
    return sampler, ds, GroupResizeCollate(targets)


# ----------------------------------------------------------------------------- mixed-size data
MIXED_RATIOS = (1.0, 3 / 4, 4 / 3, 1 / 2, 2.0)  # h / w of the mixed-size variant


def mixed_size_variant(ds: RetrievalDataset, ratios: Sequence[float] = MIXED_RATIOS, long_side: int | None = None,
                       multiple: int = 7, seed: int = 0) -> RetrievalDataset:
    """A copy of ``ds`` (in-memory uint8 images of one size) whose image ``i`` is resized
    (bilinear, antialiased) to the size of ratio ``ratios[r_i]``, ``r_i`` drawn uniformly from
    ``default_rng(seed)`` by index; the longer side is ``long_side`` (default: the images' own
    longer side), sides rounded to a multiple of ``multiple`` (the patch size). The images are
    stored as an object array, so every image keeps its own size. For DToP Table A12 on data whose
    images are all one size, such as the embedded Fashion-MNIST."""
    images = ds.images
    if not isinstance(images, np.ndarray) or images.dtype == object:
        raise DatasetError("mixed_size_variant needs in-memory images of one size (a uint8 array), "
                           "e.g. the embedded fashion_mnist or digits; an image folder already has its own sizes")
    h0, w0 = image_sizes(ds)[0]
    long_side = long_side or max(h0, w0)
    targets = (aspect_ratio_buckets([(1000 * r, 1000) for r in ratios], long_side, ratios, multiple)
               if len(ratios) else [])
    if not targets:
        raise ConfigError("ratios must be a non-empty list of positive h/w ratios")
    choice = np.random.default_rng(seed).integers(0, len(targets), len(ds))
    out = np.empty(len(ds), dtype=object)
    x = torch.from_numpy(np.ascontiguousarray(images))
    channels_last = x.ndim == 4 and x.shape[-1] in (1, 3, 4)
    x = x.permute(0, 3, 1, 2) if channels_last else (x[:, None] if x.ndim == 3 else x)
    for j, (h, w) in enumerate(targets):
        sel = np.flatnonzero(choice == j)
        if len(sel) == 0:
            continue
        y = F.interpolate(x[sel].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        y = y.round().clamp(0, 255).to(torch.uint8)
        y = y[:, 0] if x.shape[1] == 1 and images.ndim == 3 else y
        for i, img in zip(sel.tolist(), y.numpy(), strict=True):
            out[i] = img
    return RetrievalDataset(out, ds.labels, ds.transform, ds.class_names)


def mixed_size_data(data, ratios: Sequence[float] = MIXED_RATIOS, long_side: int | None = None,
                    multiple: int = 7, seed: int = 0):
    """:class:`~nbsrc.data.RetrievalData` with :func:`mixed_size_variant` of every split (the
    query and gallery with other seeds than the training set)."""
    from nbsrc.data.datasets import RetrievalData

    gallery = data.gallery
    return RetrievalData(
        train=mixed_size_variant(data.train, ratios, long_side, multiple, seed),
        query=mixed_size_variant(data.query, ratios, long_side, multiple, seed + 1),
        gallery=mixed_size_variant(gallery, ratios, long_side, multiple, seed + 2) if gallery is not None else None,
    )
