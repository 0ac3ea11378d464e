"""SfM-120k: the database reader on a generated fixture, and hard-negative mining against a
brute-force walk written from the protocol."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_benchmarks import make_sfm120k, sfm_cid

from nbsrc.data import RetrievalTransform
from nbsrc.data.sfm import (
    TupleDataset,
    TupleSampler,
    cid2filename,
    collate_tuples,
    load_sfm120k_db,
    mine_hard_negatives,
)
from nbsrc.errors import ConfigError, DatasetError


def walk_reference(query_emb, pool_emb, query_clusters, pool_clusters, n_neg):
    """cirtorch's walk: rank the pool by decreasing similarity (ties: lower position first) and keep
    an image when its cluster is neither the query's nor one already kept."""
    out = []
    for qi in range(len(query_emb)):
        sims = [float(np.dot(query_emb[qi].astype(np.float64), x.astype(np.float64))) for x in pool_emb]
        ranked = sorted(range(len(pool_emb)), key=lambda j: (-sims[j], j))
        taken, used = [], {int(query_clusters[qi])}
        for j in ranked:
            if int(pool_clusters[j]) not in used:
                taken.append(j)
                used.add(int(pool_clusters[j]))
            if len(taken) == n_neg:
                break
        out.append(taken)
    return np.asarray(out)


# ----------------------------------------------------------------------------- mining
@pytest.mark.parametrize("seed", range(5))
def test_mining_equals_the_walk_with_ties(seed):
    rng = np.random.default_rng(seed)
    n_q, n_pool, n_clusters = 23, 60, 12
    # small integers: exact similarities with many ties, so the tie rule is exercised
    q = rng.integers(-2, 3, (n_q, 4)).astype(np.float32)
    pool = rng.integers(-2, 3, (n_pool, 4)).astype(np.float32)
    qc = rng.integers(0, n_clusters, n_q)
    pc = rng.integers(0, n_clusters, n_pool)
    for n_neg in (1, 3, 5):
        for chunk in (1, 7, 256):
            got = mine_hard_negatives(q, pool, qc, pc, n_neg, query_chunk=chunk)
            np.testing.assert_array_equal(got, walk_reference(q, pool, qc, pc, n_neg))


def test_mining_invariants_on_continuous_embeddings():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(40, 8)).astype(np.float32)
    pool = rng.normal(size=(200, 8)).astype(np.float32)
    qc, pc = rng.integers(0, 30, 40), rng.integers(0, 30, 200)
    neg = mine_hard_negatives(q, pool, qc, pc, 5)
    sims = q @ pool.T
    for i in range(40):
        clusters = pc[neg[i]]
        assert qc[i] not in clusters  # no negative from the query's cluster
        assert len(set(clusters.tolist())) == 5  # at most one per cluster
        assert (np.diff(sims[i, neg[i]]) <= 0).all()  # hardest first
        # each negative is the most similar image of its cluster
        for j in neg[i]:
            assert sims[i, j] == sims[i, pc == pc[j]].max()
        # no cluster left out is harder than the weakest one kept
        others = ~np.isin(pc, np.append(clusters, qc[i]))
        assert not others.any() or sims[i, others].max() <= sims[i, neg[i][-1]]


def test_mining_hand_case():
    # one query of cluster 0; pool similarities 0.9 (cluster 0), 0.8 (1), 0.7 (1), 0.6 (2), 0.5 (3)
    q = np.array([[1.0, 0.0]])
    pool = np.array([[0.9, 0], [0.8, 0], [0.7, 0], [0.6, 0], [0.5, 0]])
    neg = mine_hard_negatives(q, pool, [0], [0, 1, 1, 2, 3], n_neg=3)
    assert neg.tolist() == [[1, 3, 4]]


def test_mining_errors():
    q, pool = np.ones((1, 2)), np.ones((3, 2))
    with pytest.raises(DatasetError, match="enlarge pool_size"):
        mine_hard_negatives(q, pool, [0], [0, 1, 1], n_neg=2)
    with pytest.raises(ConfigError, match="non-finite"):
        mine_hard_negatives(np.full((1, 2), np.nan), pool, [0], [0, 1, 2], n_neg=1)
    with pytest.raises(ConfigError, match="do not match"):
        mine_hard_negatives(q, pool, [0, 1], [0, 1, 2], n_neg=1)


# ----------------------------------------------------------------------------- the database
def test_load_fixture_database(tmp_path):
    root = make_sfm120k(tmp_path, n_clusters=8, per_cluster=4, n_val_clusters=3)
    train = load_sfm120k_db(root)
    assert len(train) == 32 and train.cluster.tolist() == [i // 4 for i in range(32)]
    assert len(train.qidxs) == len(train.pidxs) == 8 * 3
    assert (train.cluster[train.qidxs] == train.cluster[train.pidxs]).all()
    cid = sfm_cid(5)
    assert train.paths[5] == str(root / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid)
    assert cid2filename(cid, root / "ims") == root / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid
    val = load_sfm120k_db(root / "retrieval-SfM-120k.pkl", split="val")
    assert len(val) == 12 and not set(val.paths) & set(train.paths)
    img, label, _ = train.images(RetrievalTransform(8, train=False))[6]
    assert img.shape == (3, 8, 8) and label == 1


def test_database_errors(tmp_path):
    with pytest.raises(DatasetError, match="data_root"):
        load_sfm120k_db(None)
    with pytest.raises(DatasetError) as e:
        load_sfm120k_db(tmp_path / "absent")
    assert f"expected {tmp_path / 'absent' / 'retrieval-SfM-120k.pkl'}" in str(e.value) and "\n" not in str(e.value)
    root = make_sfm120k(tmp_path)
    with pytest.raises(DatasetError, match="no split 'test'"):
        load_sfm120k_db(root, split="test")
    train = load_sfm120k_db(root)
    victim = train.paths[3]
    Path(victim).unlink()
    with pytest.raises(DatasetError) as e:
        load_sfm120k_db(root)
    assert f"expected {victim} (1 of 32" in str(e.value) and "ims.tar.gz" in str(e.value)
    with open(root / "retrieval-SfM-120k.pkl", "wb") as f:
        pickle.dump({"train": {"cids": ["a"], "cluster": [0], "qidxs": [0]}}, f)
    with pytest.raises(DatasetError, match="no 'pidxs'"):
        load_sfm120k_db(root)
    with open(root / "retrieval-SfM-120k.pkl", "wb") as f:
        pickle.dump({"train": {"cids": ["a"], "cluster": [0], "qidxs": [0], "pidxs": [4]}}, f)
    with pytest.raises(DatasetError, match="pidxs outside"):
        load_sfm120k_db(root)


# ----------------------------------------------------------------------------- sampler and tuples
def fake_embed(n_images, dim=6, seed=0):
    table = np.random.default_rng(seed).normal(size=(n_images, dim)).astype(np.float32)
    calls = []

    def embed(idx):
        calls.append(np.asarray(idx).copy())
        return table[idx]

    return embed, table, calls


def test_sampler_tuples_follow_the_protocol_and_are_deterministic(tmp_path):
    db = load_sfm120k_db(make_sfm120k(tmp_path, n_clusters=10, per_cluster=4))
    embed, table, calls = fake_embed(len(db))
    sampler = TupleSampler(db, n_pairs=12, pool_size=25, n_neg=5, seed=3)
    tuples = sampler.epoch_tuples(0, embed)
    assert tuples.shape == (12, 7)
    pairs, pool = sampler.draw(0)
    assert len(set(pairs.tolist())) == 12 and len(set(pool.tolist())) == 25
    np.testing.assert_array_equal(tuples[:, 0], db.qidxs[pairs])
    np.testing.assert_array_equal(tuples[:, 1], db.pidxs[pairs])
    np.testing.assert_array_equal(calls[0], db.qidxs[pairs])
    np.testing.assert_array_equal(calls[1], pool)
    expected = walk_reference(table[tuples[:, 0]], table[pool], db.cluster[tuples[:, 0]], db.cluster[pool], 5)
    np.testing.assert_array_equal(tuples[:, 2:], pool[expected])
    for t in tuples:
        assert np.isin(t[2:], pool).all()
        assert db.cluster[t[0]] not in db.cluster[t[2:]]
        assert len(set(db.cluster[t[2:]].tolist())) == 5
    np.testing.assert_array_equal(TupleSampler(db, 12, 25, 5, seed=3).epoch_tuples(0, embed), tuples)
    assert not np.array_equal(sampler.draw(1)[1], pool)  # a new pool each epoch


def test_sampler_caps_sizes_and_checks_embed_fn(tmp_path):
    db = load_sfm120k_db(make_sfm120k(tmp_path, n_clusters=8, per_cluster=4))
    sampler = TupleSampler(db)  # defaults 2000 / 22000 capped to the fixture
    assert (sampler.n_pairs, sampler.pool_size) == (24, 32)
    with pytest.raises(ConfigError, match="one row per index"):
        sampler.epoch_tuples(0, lambda idx: np.zeros((1, 3)))
    with pytest.raises(ConfigError, match="n_neg"):
        TupleSampler(db, n_neg=0)


def test_tuple_dataset_gives_seeded_views_and_batches_flatten_tuple_by_tuple(tmp_path):
    db = load_sfm120k_db(make_sfm120k(tmp_path, n_clusters=8, per_cluster=4))
    embed, _, _ = fake_embed(len(db))
    tuples = TupleSampler(db, n_pairs=11, pool_size=32, seed=0).epoch_tuples(0, embed)
    ds = TupleDataset(db, RetrievalTransform(8, train=True), tuples)
    imgs, labels, idx = ds[2]
    assert imgs.shape == (7, 3, 8, 8)
    assert idx.tolist() == tuples[2].tolist() and labels.tolist() == db.cluster[tuples[2]].tolist()
    assert labels[0] == labels[1] and labels[0] not in labels[2:].tolist()
    assert torch.equal(ds[(2, 9)][0], ds[(2, 9)][0])
    imgs, labels, idx = collate_tuples([ds[(4, 3)], ds[(1, 3)]])  # a batch of 2 tuples, flattened tuple by tuple
    assert imgs.shape == (14, 3, 8, 8) and torch.equal(imgs[7:], ds[(1, 3)][0])
    assert idx.tolist() == tuples[4].tolist() + tuples[1].tolist() and labels.tolist() == db.cluster[idx].tolist()
    with pytest.raises(ConfigError, match="tuples must be"):
        ds.set_tuples(np.zeros((3, 2)))
