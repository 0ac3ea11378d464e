"""k-NN search and Recall@K against a brute-force reference written from the definition, on
continuous data, on exact ties (small integer coordinates, duplicated vectors), on hand-computed
cases, and against pytorch-metric-learning's precision_at_1."""

import math

import faiss
import numpy as np
import pytest

from nbsrc.errors import ConfigError
from nbsrc.eval import RetrievalResults, first_positive_rank, knn_search, recall_at_k, retrieve


# ----------------------------------------------------------------------------- reference
def reference_ranking(q, g, exclude_self):
    """Each query's gallery indices sorted by (-<q, g>, index), itself left out under exclude_self.
    The full similarity matrix in float64: exact for small integer coordinates."""
    s = np.asarray(q, np.float64) @ np.asarray(g, np.float64).T
    out = []
    for i in range(len(q)):
        cand = [j for j in range(len(g)) if not (exclude_self and j == i)]
        out.append(sorted(cand, key=lambda j: (-s[i, j], j)))
    return out, s


def reference_recall(q, ql, g=None, gl=None, ks=(1, 2, 4, 8)):
    """R@K per query: 1 if one of the K first-ranked gallery items has the query's label, NaN if
    the gallery has no item with that label (the query itself excluded)."""
    self_ex = g is None
    g, gl = (q, ql) if self_ex else (g, gl)
    ranking, _ = reference_ranking(q, g, self_ex)
    out = {k: np.empty(len(q)) for k in ks}
    for i, order in enumerate(ranking):
        has_pos = any(gl[j] == ql[i] for j in order)
        for k in ks:
            out[k][i] = float(any(gl[j] == ql[i] for j in order[:k])) if has_pos else math.nan
    return out


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def integer_points(rng, n, d=3):
    """Coordinates in {-1, 0, 1}: every dot product is a small integer, so ties are exact."""
    return rng.integers(-1, 2, size=(n, d)).astype(np.float32)


# ----------------------------------------------------------------------------- knn_search
@pytest.mark.parametrize("exclude_self", [True, False])
def test_knn_search_matches_reference_on_continuous_data(rng, exclude_self):
    q = unit(rng.normal(size=(60, 8)))
    g = q if exclude_self else unit(rng.normal(size=(90, 8)))
    sims, idx = knn_search(q, g, 10, exclude_self=exclude_self)
    ranking, s = reference_ranking(q, g, exclude_self)
    assert sims.dtype == np.float32 and idx.dtype == np.int64 and idx.shape == (60, 10)
    np.testing.assert_array_equal(idx, np.array([r[:10] for r in ranking]))
    np.testing.assert_allclose(sims, np.take_along_axis(s, idx, 1), atol=1e-6)


@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("k", [1, 3, 7, 20])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_knn_search_breaks_exact_ties_by_lower_index(rng, exclude_self, k, chunk_size):
    # 3 coordinates in {-1, 0, 1} for 80 points: each row has long runs of equal similarities, so
    # k often falls inside a run and the kept items must be the lowest indices of that run.
    q = integer_points(rng, 80)
    g = q if exclude_self else integer_points(rng, 50)
    sims, idx = knn_search(q, g, k, exclude_self=exclude_self, chunk_size=chunk_size)
    ranking, s = reference_ranking(q, g, exclude_self)
    np.testing.assert_array_equal(idx, np.array([r[:k] for r in ranking]))
    np.testing.assert_array_equal(sims, np.take_along_axis(s, idx, 1))


def test_knn_search_all_identical_vectors_returns_lowest_indices():
    # faiss returns tied items in reverse order (e.g. [2, 1, 0]); the sort makes it [0, 1, 2].
    g = np.ones((100, 4), np.float32)
    _, idx = knn_search(g[:1], g, 3)
    assert idx.tolist() == [[0, 1, 2]]
    _, idx = knn_search(g[:5], g[:5], 4, exclude_self=True)
    assert idx[2].tolist() == [0, 1, 3, 4]  # query 2 drops only itself


def test_knn_search_does_not_rely_on_faiss_tie_order(rng, monkeypatch):
    """A legal exact index that keeps the HIGHEST indices among tied items (faiss promises nothing
    about ties): the widening search must still return the lowest indices."""

    class HighestIndexFirst:
        def __init__(self, d):
            self.g = np.empty((0, d), np.float32)

        def add(self, x):
            self.g = np.concatenate([self.g, x])

        def search(self, x, k):
            s = x @ self.g.T
            j = np.arange(len(self.g))
            order = np.lexsort((-np.broadcast_to(j, s.shape), -s), axis=-1)[:, :k]
            return np.take_along_axis(s, order, 1), order.astype(np.int64)

    monkeypatch.setattr(faiss, "IndexFlatIP", HighestIndexFirst)
    q = integer_points(rng, 70)
    for exclude_self, g in [(True, q), (False, integer_points(rng, 40))]:
        _, idx = knn_search(q, g, 5, exclude_self=exclude_self, chunk_size=16)
        ranking, _ = reference_ranking(q, g, exclude_self)
        np.testing.assert_array_equal(idx, np.array([r[:5] for r in ranking]))


def test_knn_search_keeps_duplicates_of_the_query():
    # Points 0, 1, 2 are the same vector: query 0's neighbours are its duplicates 1 and 2 (similarity
    # equal to its own), removed by index only for the query itself.
    x = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.float32)
    sims, idx = knn_search(x, x, 3, exclude_self=True)
    assert idx.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    assert sims.tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 0, 0]]


def test_knn_search_chunking_does_not_change_the_result(rng):
    q = unit(rng.normal(size=(53, 6)))
    g = unit(rng.normal(size=(40, 6)))
    whole = knn_search(q, g, 5, chunk_size=4096)
    for chunk in (1, 4, 52):
        part = knn_search(q, g, 5, chunk_size=chunk)
        np.testing.assert_array_equal(part[1], whole[1])
        np.testing.assert_allclose(part[0], whole[0], atol=1e-6)


# ----------------------------------------------------------------------------- recall_at_k
def test_recall_at_k_four_points_on_the_unit_circle():
    # a=(1,0), b=(cos 60°, sin 60°), c=(0,1), d=(-1,0); labels a,b -> 0 and c,d -> 1.
    # Inner products: ab=.5, ac=0, ad=-1, bc=.866, bd=-.5, cd=0. Rankings (self excluded):
    #   a: b(.5)  c(0)  d(-1)   labels 0 1 1 -> first hit at rank 1
    #   b: c(.866) a(.5) d(-.5) labels 1 0 1 -> rank 2
    #   c: b(.866) a(0) d(0)    labels 0 0 1 -> rank 3 (a and d tie at 0: lower index a first)
    #   d: c(0) b(-.5) a(-1)    labels 1 0 0 -> rank 1
    # R@1 = 2/4, R@2 = 3/4, R@4 = 4/4 (K = 4 > 3 other points: the whole gallery).
    x = np.array([[1, 0], [0.5, math.sqrt(3) / 2], [0, 1], [-1, 0]], np.float32)
    y = np.array([0, 0, 1, 1])
    assert recall_at_k(x, y, ks=(1, 2, 4)) == {1: 0.5, 2: 0.75, 4: 1.0}
    per_query = recall_at_k(x, y, ks=(1, 2), reduce=False)
    assert per_query[1].tolist() == [1, 0, 0, 1] and per_query[2].tolist() == [1, 1, 0, 1]
    assert first_positive_rank(x, y).tolist() == [1, 2, 3, 1]
    assert first_positive_rank(x, y, k_max=2).tolist() == [1, 2, math.inf, 1]


def test_recall_at_k_duplicates_of_the_query_count_as_neighbours():
    # p0 = p1 = (1,0), p2 = p3 = (0,1); labels 0 1 1 0. Rankings (self excluded, ties by index):
    #   q0: 1(1) 2(0) 3(0) labels 1 1 0 -> miss, miss, hit
    #   q1: 0(1) 2(0) 3(0) labels 0 1 0 -> miss, hit
    #   q2: 3(1) 0(0) 1(0) labels 0 0 1 -> miss, miss, hit
    #   q3: 2(1) 0(0) 1(0) labels 1 0 1 -> miss, hit
    # Excluding "everything as similar as the query" instead of its index would change q0 and q2.
    x = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
    y = np.array([0, 1, 1, 0])
    r = recall_at_k(x, y, ks=(1, 2, 3), reduce=False)
    assert r[1].tolist() == [0, 0, 0, 0]
    assert r[2].tolist() == [0, 1, 0, 1]
    assert r[3].tolist() == [1, 1, 1, 1]


def test_recall_at_k_duplicated_gallery_vectors_with_different_labels():
    # Gallery items 0 and 1 are the same vector with labels 5 and 7; item 2 is orthogonal.
    # The query (label 7) ties between 0 and 1: item 0 (label 5) comes first -> R@1 = 0, R@2 = 1.
    # The same query with label 5 hits at rank 1.
    g = np.array([[0, 1], [0, 1], [1, 0]], np.float32)
    gl = np.array([5, 7, 7])
    q = np.array([[0, 2], [0, 2]], np.float32)
    r = recall_at_k(q, np.array([7, 5]), ks=(1, 2), gallery_emb=g, gallery_labels=gl, reduce=False)
    assert r[1].tolist() == [0, 1] and r[2].tolist() == [1, 1]


@pytest.mark.parametrize("separate_gallery", [False, True])
def test_recall_at_k_matches_reference_on_continuous_data(rng, separate_gallery):
    q, ql = unit(rng.normal(size=(120, 8))), rng.integers(0, 12, 120)
    g, gl = (unit(rng.normal(size=(150, 8))), rng.integers(0, 12, 150)) if separate_gallery else (None, None)
    ks = (1, 2, 4, 8, 16)
    got = recall_at_k(q, ql, ks, gallery_emb=g, gallery_labels=gl, reduce=False)
    want = reference_recall(q, ql, g, gl, ks)
    for k in ks:
        np.testing.assert_array_equal(got[k], want[k])
    means = recall_at_k(q, ql, ks, gallery_emb=g, gallery_labels=gl)
    assert means == pytest.approx({k: np.nanmean(want[k]) for k in ks}, abs=1e-12)
    # R@K never decreases with K (consecutive pairs, hence strict=False)
    assert all(means[a] <= means[b] for a, b in zip(ks, ks[1:], strict=False))


@pytest.mark.parametrize("separate_gallery", [False, True])
def test_recall_at_k_matches_reference_with_exact_ties(rng, separate_gallery):
    q, ql = integer_points(rng, 90), rng.integers(0, 6, 90)
    if separate_gallery:  # every gallery vector twice, the copies with independent labels
        g0 = integer_points(rng, 30)
        g, gl = np.concatenate([g0, g0]), rng.integers(0, 6, 60)
    else:
        g = gl = None
    ks = (1, 2, 3, 5, 10)
    got = recall_at_k(q, ql, ks, gallery_emb=g, gallery_labels=gl, reduce=False, chunk_size=8)
    want = reference_recall(q, ql, g, gl, ks)
    for k in ks:
        np.testing.assert_array_equal(got[k], want[k])


def test_recall_at_k_queries_without_positive_are_nan_and_excluded():
    # Query = gallery, 1-D points x = 1, 2, 3, 4 with labels 0, 0, 9, 0; similarity x_i * x_j > 0,
    # so every query ranks the others by decreasing x. Label 9 occurs once: point 2 has no positive.
    #   q0: 3 2 1 -> labels 0 9 0 -> hit at 1
    #   q1: 3 2 0 -> labels 0 9 0 -> hit at 1
    #   q3: 2 1 0 -> labels 9 0 0 -> miss at 1, hit at 2
    # R@1 = mean(1, 1, 0) = 2/3 and R@2 = 1 over the 3 valid queries.
    x = np.array([[1], [2], [3], [4]], np.float32)
    y = np.array([0, 0, 9, 0])
    with pytest.warns(UserWarning, match="1 of 4 queries have no positive"):
        r = recall_at_k(x, y, ks=(1, 2), reduce=False)
    np.testing.assert_array_equal(r[1], [1, 1, np.nan, 0])
    np.testing.assert_array_equal(r[2], [1, 1, np.nan, 1])
    with pytest.warns(UserWarning, match="excluded from the mean"):
        assert recall_at_k(x, y, ks=(1, 2)) == {1: pytest.approx(2 / 3), 2: 1.0}


def test_recall_at_k_separate_gallery_query_label_absent():
    g, gl = np.eye(3, dtype=np.float32), np.array([0, 1, 2])
    q, ql = np.eye(3, dtype=np.float32)[[0, 1]], np.array([0, 5])
    with pytest.warns(UserWarning, match="1 of 2 queries"):
        r = recall_at_k(q, ql, ks=(1,), gallery_emb=g, gallery_labels=gl, reduce=False)
    np.testing.assert_array_equal(r[1], [1, np.nan])
    with pytest.warns(UserWarning):
        assert math.isnan(recall_at_k(q[1:], ql[1:], ks=(1,), gallery_emb=g, gallery_labels=gl)[1])


def test_recall_at_k_chunk_size_does_not_change_the_result(rng):
    q, ql = unit(rng.normal(size=(77, 5))), rng.integers(0, 7, 77)
    whole = recall_at_k(q, ql, (1, 4), reduce=False, chunk_size=4096)
    for chunk in (1, 10, 76):
        part = recall_at_k(q, ql, (1, 4), reduce=False, chunk_size=chunk)
        for k in (1, 4):
            np.testing.assert_array_equal(part[k], whole[k])


@pytest.mark.parametrize("separate_gallery", [False, True])
def test_recall_at_1_matches_pytorch_metric_learning(rng, separate_gallery):
    torch = pytest.importorskip("torch")
    pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    q, ql = unit(rng.normal(size=(150, 16))), np.repeat(np.arange(30), 5)
    g, gl = (unit(rng.normal(size=(120, 16))), np.repeat(np.arange(30), 4)) if separate_gallery else (None, None)
    ours = recall_at_k(q, ql, (1,), gallery_emb=g, gallery_labels=gl)[1]
    calc = pml.AccuracyCalculator(include=("precision_at_1",), k=1)
    args = (torch.from_numpy(q), torch.from_numpy(ql))
    if separate_gallery:
        args += (torch.from_numpy(g), torch.from_numpy(gl))
    theirs = calc.get_accuracy(*args)["precision_at_1"]
    assert ours == pytest.approx(theirs, abs=1e-9)


def test_recall_at_k_larger_than_the_gallery_counts_the_whole_gallery(rng):
    x, y = unit(rng.normal(size=(6, 3))), np.array([0, 0, 1, 1, 2, 2])
    assert recall_at_k(x, y, ks=(5, 100)) == {5: 1.0, 100: 1.0}


# ----------------------------------------------------------------------------- RetrievalResults
def test_retrieve_results_hold_what_was_retrieved_for_whom(rng):
    q, ql = unit(rng.normal(size=(20, 4))), rng.integers(0, 3, 20)
    res = retrieve(q, ql, k=4)
    assert isinstance(res, RetrievalResults) and res.is_self_excluded and res.k == 4
    ranking, _ = reference_ranking(q, q, True)
    np.testing.assert_array_equal(res.indices, np.array([r[:4] for r in ranking]))
    np.testing.assert_array_equal(res.hits, ql[res.indices] == ql[:, None])
    np.testing.assert_array_equal(res.num_positives, [int((ql == c).sum()) - 1 for c in ql])
    assert not (res.indices == np.arange(20)[:, None]).any()
    with pytest.raises(ConfigError, match="only 4 were retrieved"):
        res.recall_at_k((8,))


# ----------------------------------------------------------------------------- errors
def test_errors_are_config_errors_that_say_what_to_fix(rng):
    x, y = unit(rng.normal(size=(10, 4))), rng.integers(0, 2, 10)
    with pytest.raises(ConfigError, match="dimension 4 but gallery embeddings 3"):
        recall_at_k(x, y, gallery_emb=x[:, :3], gallery_labels=y)
    with pytest.raises(ConfigError, match="query dimension 4 != gallery dimension 3"):
        knn_search(x, x[:, :3], 1)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ConfigError, match="query_emb contains NaN or inf .row 3"):
        recall_at_k(bad, y)
    with pytest.raises(ConfigError, match="gallery_emb contains NaN"):
        recall_at_k(x, y, gallery_emb=bad, gallery_labels=y)
    with pytest.raises(ConfigError, match="gallery contains NaN"):
        knn_search(x, np.where(np.isnan(bad), np.inf, bad), 2)
    with pytest.raises(ConfigError, match="k=0 is invalid"):
        knn_search(x, x, 0)
    with pytest.raises(ConfigError, match="k in ks=0 is invalid"):
        recall_at_k(x, y, ks=(1, 0))
    with pytest.raises(ConfigError, match="ks is empty"):
        recall_at_k(x, y, ks=())
    with pytest.raises(ConfigError, match="k=10 but the gallery has 10 items .9 once"):
        knn_search(x, x, 10, exclude_self=True)
    with pytest.raises(ConfigError, match="exclude_self=True needs the query set to be the gallery"):
        knn_search(x, x[:5], 1, exclude_self=True)
    with pytest.raises(ConfigError, match="query_labels must have shape .10."):
        recall_at_k(x, y[:9])
    with pytest.raises(ConfigError, match="gallery_emb and gallery_labels together"):
        recall_at_k(x, y, gallery_emb=x)
    with pytest.raises(ConfigError, match="chunk_size=0 is invalid"):
        recall_at_k(x, y, chunk_size=0)
    with pytest.raises(ConfigError, match="2-D array"):
        recall_at_k(x[0], y[:1])
    with pytest.raises(ConfigError, match="single embedding"):
        recall_at_k(x[:1], y[:1])


def test_float16_memmaps_are_read_block_by_block_with_the_same_results(rng, tmp_path, monkeypatch):
    """The gallery goes into the index a block at a time and the query set is never copied whole:
    a float16 memory map gives the results of the same values in memory, and a NaN in a later block
    is reported with its row in the whole array."""
    from numpy.lib.format import open_memmap

    import nbsrc.eval.recall as recall_mod

    monkeypatch.setattr(recall_mod, "_ADD_ROWS", 7)  # many blocks on a small gallery
    g, q = unit(rng.normal(size=(50, 6))).astype(np.float16), unit(rng.normal(size=(9, 6))).astype(np.float16)
    gl, ql = rng.integers(0, 4, 50), rng.integers(0, 4, 9)
    mm = open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float16, shape=g.shape)
    mm[:] = g
    mm.flush()
    on_disk = np.load(tmp_path / "g.npy", mmap_mode="r")
    a = retrieve(q, ql, on_disk, gl, k=5)
    b = retrieve(q.astype(np.float32), ql, g.astype(np.float32), gl, k=5)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.sims, b.sims)
    c = retrieve(on_disk, gl, k=3)  # query = gallery, self excluded, also from the memory map
    d = retrieve(g.astype(np.float32), gl, k=3)
    assert np.array_equal(c.indices, d.indices)
    bad = g.astype(np.float32)
    bad[23, 2] = np.inf
    with pytest.raises(ConfigError, match=r"gallery_emb contains NaN or inf \(row 23"):
        retrieve(q, ql, bad, gl, k=2)
