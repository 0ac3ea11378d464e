"""Group-size sampling (DToP Table A12): one size per batch, every image once per epoch."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from nbsrc.data.group_sampler import GroupResizeCollate, GroupSizeBatchSampler, aspect_ratio_buckets
from nbsrc.errors import ConfigError


def mixed_sizes(n=53, seed=0):
    rng = np.random.default_rng(seed)
    choices = [(32, 32), (32, 48), (48, 32), (16, 64)]
    return [choices[i] for i in rng.integers(0, len(choices), n)]


@pytest.mark.parametrize("batch_size", [1, 4, 7, 100])
@pytest.mark.parametrize("drop_last", [False, True])
def test_no_batch_mixes_sizes_and_every_image_once(batch_size, drop_last):
    sizes = mixed_sizes()
    sampler = GroupSizeBatchSampler(sizes, batch_size, seed=3, drop_last=drop_last)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        for b in batches:
            assert len({sizes[i] for i in b}) == 1 and 1 <= len(b) <= batch_size
            assert sampler.size_of(b) == sizes[b[0]]
        used = [i for b in batches for i in b]
        assert len(used) == len(set(used))  # never twice
        if drop_last:
            assert all(len(b) == batch_size for b in batches)
            expected = sum(len(g) // batch_size * batch_size for g in sampler.groups.values())
            assert len(used) == expected
        else:
            assert sorted(used) == list(range(len(sizes)))  # exactly once


def test_epochs_reshuffle_deterministically():
    sizes = mixed_sizes()
    a, b = GroupSizeBatchSampler(sizes, 4, seed=1), GroupSizeBatchSampler(sizes, 4, seed=1)
    first = list(a)
    assert first == list(b)  # same seed and epoch: same batches
    a.set_epoch(1)
    assert list(a) != first
    assert sorted(i for x in list(a) for i in x) == sorted(i for x in first for i in x)


def test_without_shuffle_groups_keep_index_order():
    sizes = [(2, 2), (4, 4), (2, 2), (4, 4), (2, 2)]
    batches = list(GroupSizeBatchSampler(sizes, 2, shuffle=False))
    assert batches == [[0, 2], [4], [1, 3]]


def test_aspect_ratio_buckets_hand_cases():
    sizes = [(100, 200), (300, 300), (400, 300), (90, 170), (1000, 10)]
    got = aspect_ratio_buckets(sizes, long_side=384, multiple=16)
    # h/w = 0.5 -> 1/2; 1 -> 1; 1.33 -> 4/3; 0.53 -> 1/2; 100 -> 2
    assert got == [(192, 384), (384, 384), (384, 288), (192, 384), (384, 192)]
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in got)
    with pytest.raises(ConfigError, match="ratios"):
        aspect_ratio_buckets(sizes, ratios=[])
    with pytest.raises(ConfigError, match="image size"):
        aspect_ratio_buckets([(0, 5)])


def test_collate_resizes_to_the_group_size_in_a_dataloader():
    raw = [torch.rand(3, 20 + i, 30 - i) for i in range(10)]
    targets = aspect_ratio_buckets([im.shape[1:] for im in raw], long_side=32, multiple=8)
    items = [(im, i % 3, i) for i, im in enumerate(raw)]
    loader = DataLoader(items, batch_sampler=GroupSizeBatchSampler(targets, 3, seed=0),
                        collate_fn=GroupResizeCollate(targets))
    seen = []
    for x, y, idx in loader:
        assert x.shape[0] == len(y) == len(idx)
        assert tuple(x.shape[2:]) == targets[int(idx[0])]
        seen += idx.tolist()
    assert sorted(seen) == list(range(10))
    with pytest.raises(ConfigError, match="mixes target sizes"):
        GroupResizeCollate([(8, 8), (16, 8)])([(raw[0], 0, 0), (raw[1], 0, 1)])


def test_bad_arguments():
    with pytest.raises(ConfigError, match="batch_size"):
        GroupSizeBatchSampler([(2, 2)], 0)
    with pytest.raises(ConfigError, match="empty"):
        GroupSizeBatchSampler([], 2)


# ----------------------------------------------------------------------------- training sampler
from collections import Counter  # noqa: E402

from nbsrc.config import ExperimentConfig  # noqa: E402
from nbsrc.data import RetrievalDataset, RetrievalTransform  # noqa: E402
from nbsrc.data.group_sampler import (  # noqa: E402
    MIXED_RATIOS,
    GroupSizeMPerClassSampler,
    image_sizes,
    mixed_size_data,
    mixed_size_variant,
    training_sampler,
)
from nbsrc.data.samplers import MPerClassBatchSampler  # noqa: E402
from nbsrc.errors import DatasetError  # noqa: E402


def labelled_sizes(n=90, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, n), mixed_sizes(n, seed)


@pytest.mark.parametrize("batch_size,m", [(8, 2), (12, 4), (6, 3)])
def test_training_batches_one_size_m_per_class_every_image_each_epoch(batch_size, m):
    labels, sizes = labelled_sizes()
    s = GroupSizeMPerClassSampler(labels, sizes, batch_size, m, iterations=10**6, seed=2)
    for epoch in range(2):
        batches = [s.batch(t) for t in range(epoch * s.batches_per_epoch, (epoch + 1) * s.batches_per_epoch)]
        for b in batches:
            idx = [i for i, _ in b]
            assert len(b) == batch_size  # fixed size: DDP slices stay equal
            assert len({sizes[i] for i in idx}) == 1 and s.size_of(b) == sizes[idx[0]]
            assert all(c % m == 0 for c in Counter(labels[idx].tolist()).values())  # m per class: positives
        used = Counter(i for b in batches for i, _ in b)
        assert set(used) == set(range(len(labels)))  # every image at least once per epoch
        # repeats only complete a class chunk or a group's last batch
        bound = sum(len(np.unique(labels[g])) for g in s.groups.values()) * (m - 1) + len(s.groups) * batch_size
        assert sum(used.values()) - len(labels) <= bound


def test_training_batches_use_every_image_exactly_once_when_counts_divide():
    # 2 sizes x 3 classes x 4 images, m = 2, batch 6 (3 chunks): 6 chunks per group, no repeats
    sizes = [(8, 8)] * 12 + [(8, 16)] * 12
    labels = np.tile(np.repeat([0, 1, 2], 4), 2)
    s = GroupSizeMPerClassSampler(labels, sizes, 6, 2, iterations=100, seed=0)
    assert s.batches_per_epoch == 4
    used = sorted(i for t in range(4) for i, _ in s.batch(t))
    assert used == list(range(24))


def test_training_batches_resume_exactly_and_depend_only_on_seed_and_t():
    labels, sizes = labelled_sizes()
    full = list(GroupSizeMPerClassSampler(labels, sizes, 8, 2, iterations=40, seed=5))
    resumed = list(GroupSizeMPerClassSampler(labels, sizes, 8, 2, iterations=40, seed=5, start=23))
    assert resumed == full[23:] and len(full) == 40
    fresh = GroupSizeMPerClassSampler(labels, sizes, 8, 2, iterations=40, seed=5)
    assert fresh.batch(31) == full[31] and fresh.batch(2) == full[2]  # any call order
    other = list(GroupSizeMPerClassSampler(labels, sizes, 8, 2, iterations=40, seed=6))
    assert other != full
    assert full[: fresh.batches_per_epoch] != full[fresh.batches_per_epoch : 2 * fresh.batches_per_epoch]  # reshuffled
    assert len({seed for b in full for _, seed in b}) > len(labels)  # fresh augmentation seeds per use


def test_rank_slices_of_a_group_batch_keep_its_size():
    from nbsrc.train.distributed import DistInfo, RankSlice

    labels, sizes = labelled_sizes()
    s = GroupSizeMPerClassSampler(labels, sizes, 8, 2, iterations=6, seed=1)
    ranks = [list(RankSlice(s, DistInfo(rank=r, world_size=2))) for r in range(2)]
    for t, glob in enumerate(s):
        assert ranks[0][t] + ranks[1][t] == glob
        assert all(len({sizes[i] for i, _ in part[t]}) == 1 for part in ranks)


def test_training_sampler_bad_input():
    labels, sizes = labelled_sizes()
    with pytest.raises(ConfigError, match="multiple of m_per_class"):
        GroupSizeMPerClassSampler(labels, sizes, 7, 2, 5)
    with pytest.raises(ConfigError, match="one size per image"):
        GroupSizeMPerClassSampler(labels[:-1], sizes, 8, 2, 5)
    with pytest.raises(ConfigError, match="empty"):
        GroupSizeMPerClassSampler([], [], 8, 2, 5)


def fake_dataset(n=40, side=28, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
    return RetrievalDataset(images, np.arange(n) % 4, RetrievalTransform(side, train=True))


def test_mixed_size_variant_is_deterministic_by_index_and_keeps_the_images():
    ds = fake_dataset()
    a, b = mixed_size_variant(ds, seed=3), mixed_size_variant(ds, seed=3)
    want = {(28, 28), (21, 28), (28, 21), (14, 28), (28, 14)}  # MIXED_RATIOS at long side 28, multiple 7
    sizes = image_sizes(a)
    assert set(sizes) <= want and len(set(sizes)) > 1 and sizes == image_sizes(b)
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images, strict=True))
    assert image_sizes(mixed_size_variant(ds, seed=4)) != sizes
    for i, s in enumerate(sizes):
        assert a.images[i].dtype == np.uint8 and a.labels[i] == ds.labels[i]
        if s == (28, 28):  # a resize to the same size changes nothing
            assert np.array_equal(a.images[i], ds.images[i])
    const = RetrievalDataset(np.full((6, 28, 28), 77, np.uint8), np.zeros(6))
    assert all((im == 77).all() for im in mixed_size_variant(const, MIXED_RATIOS).images)
    assert tuple(a[(0, 1)][0].shape) == (3, 28, 28)  # the usual transform still squares it (fixed size)


def test_mixed_size_data_and_bad_input(tmp_path):
    from nbsrc.data import RetrievalData

    ds = fake_dataset()
    data = mixed_size_data(RetrievalData(train=ds, query=fake_dataset(12, seed=1)))
    assert len(data.train) == 40 and len(data.query) == 12 and data.gallery is None
    with pytest.raises(DatasetError, match="one size"):
        mixed_size_variant(data.train)  # already mixed
    with pytest.raises(ConfigError, match="ratios"):
        mixed_size_variant(ds, ratios=())


def test_image_sizes_reads_file_headers(tmp_path):
    from PIL import Image

    paths = []
    for i, (h, w) in enumerate([(10, 20), (30, 15)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (w, h)).save(paths[-1])
    assert image_sizes(RetrievalDataset(paths, np.array([0, 1]))) == [(10, 20), (30, 15)]
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(DatasetError, match="bad.png"):
        image_sizes(RetrievalDataset([str(tmp_path / "bad.png")], np.array([0])))


def test_training_sampler_follows_cfg_sampler():
    ds = mixed_size_variant(fake_dataset(), seed=0)
    cfg = ExperimentConfig(batch_size=8, m_per_class=2, iterations=5, img_size=28, patch_size=7)
    sampler, same, collate = training_sampler(cfg, ds)
    assert isinstance(sampler, MPerClassBatchSampler) and same is ds and collate is None
    sampler, gds, collate = training_sampler(cfg.replace(sampler="group_size"), ds, start=2)
    assert isinstance(sampler, GroupSizeMPerClassSampler) and len(sampler) == 3
    assert gds.transform.resize is False and ds.transform.resize is True  # the caller's dataset is untouched
    loader = DataLoader(gds, batch_sampler=sampler, collate_fn=collate)
    for t, (x, _, idx) in zip(range(2, 5), loader, strict=True):
        assert tuple(x.shape) == (8, 3, *sampler.size_of(sampler.batch(t)))
        assert idx.tolist() == [i for i, _ in sampler.batch(t)]
