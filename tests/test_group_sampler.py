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
