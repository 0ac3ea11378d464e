"""nbsrc.analysis against slow references written from the formulas: the PCA cumulative energy
(IRT Figs. 2-3), the gradient noise γ (IRT §3.5, Fig. 4) and the per-sample embedding gradients of
the contrastive loss (eq. 1), pair similarities (Fig. 5), per-query average precision, worst
queries and t-SNE; plus invariances, hand-computed cases and the bad-input errors."""

import itertools
import math

import numpy as np
import pytest
import torch

from nbsrc.analysis import (
    GradientNoiseMeter,
    average_precision_per_query,
    cumulative_energy,
    dim_at_energy,
    effective_dim,
    gradient_noise,
    pair_indices,
    pair_similarities,
    per_sample_embedding_grads,
    stratified_subsample,
    tsne,
    worst_queries,
)
from nbsrc.errors import ConfigError, DatasetError
from nbsrc.losses import contrastive_loss


def random_rotation(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ============================================================================= cumulative energy
def cumulative_energy_reference(Z):
    """Covariance by an explicit sum of outer products, eigenvalues by eigh, sorted descending,
    cumulative sum over the total."""
    Z = np.asarray(Z, np.float64)
    n, d = Z.shape
    mean = sum(Z[i] for i in range(n)) / n
    cov = np.zeros((d, d))
    for i in range(n):
        cov += np.outer(Z[i] - mean, Z[i] - mean)
    cov /= n
    eig = np.sort(np.clip(np.linalg.eigh(cov)[0], 0, None))[::-1]
    return np.cumsum(eig) / eig.sum()


@pytest.mark.parametrize("n, d", [(40, 6), (5, 8), (12, 1)])
def test_cumulative_energy_matches_reference(rng, n, d):
    Z = rng.normal(size=(n, d)) * rng.uniform(0.1, 3, size=d)  # anisotropic
    np.testing.assert_allclose(cumulative_energy(Z), cumulative_energy_reference(Z), atol=1e-10)
    eig = np.sort(np.linalg.eigvalsh(np.atleast_2d(np.cov(Z.T, ddof=1))))[::-1]  # 1/(N-1) cancels
    np.testing.assert_allclose(cumulative_energy(Z), np.cumsum(eig) / eig.sum(), atol=1e-10)
    assert cumulative_energy(Z).shape == (d,)


def test_cumulative_energy_hand_computed():
    # Variance 9·2/4 = 4.5 along x and 1·2/4 = 0.5 along y: E = [4.5/5, 1].
    Z = np.array([[3.0, 0], [-3, 0], [0, 1], [0, -1]])
    np.testing.assert_allclose(cumulative_energy(Z), [0.9, 1.0], atol=1e-12)
    assert effective_dim(Z, 0.9) == 1
    assert effective_dim(Z, 0.95) == 2
    assert dim_at_energy([0.5, 0.8, 0.95], 0.8) == 2 and dim_at_energy([0.5, 0.8], 0.9) is None


def test_cumulative_energy_accepts_torch_and_is_monotone_ending_at_one(rng):
    Z = rng.normal(size=(30, 5))
    e = cumulative_energy(torch.from_numpy(Z).float())
    np.testing.assert_allclose(e, cumulative_energy(Z), atol=1e-6)
    assert np.all(np.diff(e) >= -1e-12) and e[-1] == 1.0


def test_cumulative_energy_is_rotation_and_translation_invariant(rng):
    Z = rng.normal(size=(50, 7)) * np.arange(1, 8)
    moved = Z @ random_rotation(rng, 7) + rng.normal(size=7) * 10
    np.testing.assert_allclose(cumulative_energy(moved), cumulative_energy(Z), atol=1e-10)


def test_isotropic_gaussian_energy_is_about_linear(rng):
    d = 8
    e = cumulative_energy(rng.normal(size=(20000, d)))
    np.testing.assert_allclose(e, np.arange(1, d + 1) / d, atol=0.02)


@pytest.mark.parametrize("r", [1, 3, 5])
def test_rank_r_data_reaches_one_at_r(rng, r):
    Z = rng.normal(size=(60, r)) @ rng.normal(size=(r, 10)) + 4.0  # rank r after centring
    e = cumulative_energy(Z)
    np.testing.assert_allclose(e[r - 1 :], 1.0, atol=1e-9)
    assert e[r - 2] < 1 - 1e-3 if r > 1 else True
    assert effective_dim(Z, threshold=1.0) == r


def test_collapsed_embeddings_have_small_effective_dim(rng):
    # A contrastive-only collapse: most energy in 2 of 16 directions.
    Z = rng.normal(size=(500, 16)) * np.array([10, 8] + [0.5] * 14)
    assert effective_dim(Z, 0.9) == 2
    assert effective_dim(rng.normal(size=(500, 16)), 0.9) >= 12


@pytest.mark.parametrize("bad, match", [
    (np.array([[1.0, np.nan], [0, 1]]), "NaN or inf"),
    (np.ones((1, 4)), "at least 2"),
    (np.ones(4), "2-D"),
    (np.ones((6, 3)), "zero variance"),
])
def test_cumulative_energy_bad_input(bad, match):
    with pytest.raises(ConfigError, match=match):
        cumulative_energy(bad)


@pytest.mark.parametrize("threshold", [0, -0.1, 1.5])
def test_effective_dim_bad_threshold(rng, threshold):
    with pytest.raises(ConfigError, match="threshold"):
        effective_dim(rng.normal(size=(5, 3)), threshold)


# ============================================================================= gradient noise
def gradient_noise_reference(G):
    """ĝ_i = g_i/‖g_i‖ (zero rows dropped), Cov = 1/B Σ (ĝ_i − ḡ)(ĝ_i − ḡ)ᵀ, γ = Σ singular values."""
    G = np.asarray(G, np.float64)
    dirs = [g / np.linalg.norm(g) for g in G if np.linalg.norm(g) > 0]
    mean = sum(dirs) / len(dirs)
    cov = sum(np.outer(u - mean, u - mean) for u in dirs) / len(dirs)
    return float(np.linalg.svd(cov, compute_uv=False).sum())


def test_gradient_noise_matches_svd_reference_and_trace_identity(rng):
    G = rng.normal(size=(16, 6)) + np.array([2.0, 0, 0, 0, 0, 0])
    gamma = gradient_noise(torch.from_numpy(G))
    assert gamma == pytest.approx(gradient_noise_reference(G), abs=1e-10)
    dirs = G / np.linalg.norm(G, axis=1, keepdims=True)
    assert gamma == pytest.approx(1 - np.linalg.norm(dirs.mean(0)) ** 2, abs=1e-10)  # Cov PSD: ‖·‖_* = trace


def test_gradient_noise_hand_computed_cases():
    same = torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]])  # one direction: no noise
    assert gradient_noise(same) == pytest.approx(0.0, abs=1e-12)
    opposite = torch.tensor([[0.0, 3.0], [0.0, -1.0]])  # mean 0, Cov = ĝĝᵀ: γ = 1
    assert gradient_noise(opposite) == pytest.approx(1.0, abs=1e-12)
    d = 5  # an orthonormal basis: ‖ḡ‖² = 1/d, γ = 1 − 1/d
    assert gradient_noise(torch.eye(d) * 3) == pytest.approx(1 - 1 / d, abs=1e-12)


def test_gradient_noise_ignores_scale_and_zero_rows(rng):
    G = torch.from_numpy(rng.normal(size=(10, 4)))
    gamma = gradient_noise(G)
    scaled = G * torch.from_numpy(rng.uniform(0.1, 10, size=(10, 1)))
    assert gradient_noise(scaled) == pytest.approx(gamma, abs=1e-10)
    with_zeros = torch.cat([G[:4], torch.zeros(3, 4), G[4:]])
    assert gradient_noise(with_zeros) == pytest.approx(gamma, abs=1e-10)


def contrastive_grads_reference(z, y, beta):
    """∂L/∂x_i of eq. (1), L = 1/N Σ_i Σ_{j≠i} ℓ(ẑ_i, ẑ_j), ẑ = x/‖x‖, written out by hand:
    each unordered pair appears twice, so ∂L/∂ẑ_i = 2/N [Σ_{pos j} (−ẑ_j) + Σ_{neg j, s_ij > β} ẑ_j],
    then ∂L/∂x_i = (I − ẑ_i ẑ_iᵀ) ∂L/∂ẑ_i / ‖x_i‖."""
    x = np.asarray(z, np.float64)
    n = len(x)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = np.zeros_like(x)
    for i in range(n):
        dz = np.zeros(x.shape[1])
        for j in range(n):
            if j == i:
                continue
            if y[j] == y[i]:
                dz -= u[j]
            elif u[i] @ u[j] > beta:
                dz += u[j]
        dz *= 2 / n
        out[i] = (np.eye(x.shape[1]) - np.outer(u[i], u[i])) @ dz / np.linalg.norm(x[i])
    return out


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.6])
def test_per_sample_grads_match_contrastive_reference(beta):
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(10, 4, generator=g), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    grads = per_sample_embedding_grads(lambda e, lab: contrastive_loss(e, lab, beta=beta), z, y)
    assert grads.shape == z.shape and not z.requires_grad
    np.testing.assert_allclose(grads.numpy(), contrastive_grads_reference(z, y.numpy(), beta), atol=1e-5)


def test_sample_without_active_pair_has_zero_gradient_and_is_dropped():
    # Sample 4 is alone in its class and its similarity to everyone is below β: no active pair.
    z = torch.tensor([[1.0, 0.1, 0], [1.0, -0.1, 0], [0.1, 1.0, 0], [-0.1, 1.0, 0], [0, 0, 1.0]])
    y = torch.tensor([0, 0, 1, 1, 2])
    grads = per_sample_embedding_grads(lambda e, lab: contrastive_loss(e, lab, beta=0.5), z, y)
    assert torch.all(grads[4] == 0) and torch.all(grads[:4].norm(dim=1) > 0)
    assert gradient_noise(grads) == pytest.approx(gradient_noise(grads[:4]), abs=1e-12)


def test_per_sample_grads_rejects_non_scalar_loss():
    with pytest.raises(ConfigError, match="scalar"):
        per_sample_embedding_grads(lambda e, lab: e.sum(1), torch.randn(4, 3), torch.zeros(4))


def test_gradient_noise_meter_accumulates_and_skips_undefined_batches():
    meter = GradientNoiseMeter()
    a = meter.update(torch.eye(4))  # 1 − 1/4
    b = meter.update(torch.tensor([[0.0, 1.0], [0.0, -2.0]]))  # 1
    c = meter.update(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # one non-zero row: undefined
    assert (a, b) == (pytest.approx(0.75), pytest.approx(1.0)) and math.isnan(c)
    assert len(meter.values) == 3 and meter.count == 2
    assert meter.mean == pytest.approx((0.75 + 1.0) / 2)
    meter.reset()
    assert meter.values == [] and math.isnan(meter.mean)


# ============================================================================= pair similarities
def pair_similarities_reference(Z, y):
    """Double loop over i < j with cos = aᵀb / (‖a‖‖b‖)."""
    pos, neg = [], []
    for i in range(len(Z)):
        for j in range(i + 1, len(Z)):
            c = float(Z[i] @ Z[j] / (np.linalg.norm(Z[i]) * np.linalg.norm(Z[j])))
            (pos if y[i] == y[j] else neg).append(c)
    return np.array(pos), np.array(neg)


def test_pair_similarities_match_double_loop(rng):
    Z, y = rng.normal(size=(15, 5)), rng.permutation(np.repeat([7, 2, 9], 5))
    pos, neg, info = pair_similarities(Z, y)
    ref_pos, ref_neg = pair_similarities_reference(Z, y)
    np.testing.assert_allclose(np.sort(pos), np.sort(ref_pos), atol=1e-12)
    np.testing.assert_allclose(np.sort(neg), np.sort(ref_neg), atol=1e-12)
    assert info["positives_total"] == info["positives_used"] == 3 * 10
    assert info["negatives_total"] == info["negatives_used"] == 15 * 14 // 2 - 30
    assert "sample" not in info["summary"]


def test_pair_similarities_hand_computed():
    Z = np.array([[1.0, 0], [1, 1], [0, 1], [-2, 0]])
    pos, neg, _ = pair_similarities(Z, [0, 0, 1, 1])
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(np.sort(pos), [0, s], atol=1e-12)  # (0,1), (2,3)
    np.testing.assert_allclose(np.sort(neg), [-1, -s, 0, s], atol=1e-12)  # (0,3), (1,3), (0,2), (1,2)


@pytest.mark.parametrize("kind", ["pos", "neg"])
def test_capped_pairs_are_distinct_valid_and_seeded(rng, kind):
    y = rng.permutation(np.repeat(np.arange(4), 6))
    caps = dict(max_positives=7) if kind == "pos" else dict(max_negatives=11)
    pos, neg, info = pair_indices(y, **caps, seed=5)
    pairs, cap = (pos, 7) if kind == "pos" else (neg, 11)
    assert info[f"{'positives' if kind == 'pos' else 'negatives'}_used"] == cap == len(pairs)
    assert len({tuple(p) for p in pairs}) == cap and np.all(pairs[:, 0] < pairs[:, 1])
    same = y[pairs[:, 0]] == y[pairs[:, 1]]
    assert np.all(same) if kind == "pos" else not np.any(same)
    again = pair_indices(y, **caps, seed=5)
    other = pair_indices(y, **caps, seed=6)
    idx = 0 if kind == "pos" else 1
    np.testing.assert_array_equal(again[idx], pairs)
    assert not np.array_equal(other[idx], pairs)


def test_sampled_similarities_are_those_of_the_sampled_pairs(rng):
    Z, y = rng.normal(size=(20, 4)), np.repeat(np.arange(4), 5)
    pos, neg, info = pair_similarities(Z, y, max_negatives=25, max_positives=9, seed=1)
    pos_ij, neg_ij, _ = pair_indices(y, 9, 25, 1)
    U = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    np.testing.assert_allclose(neg, [U[i] @ U[j] for i, j in neg_ij], atol=1e-12)
    np.testing.assert_allclose(pos, [U[i] @ U[j] for i, j in pos_ij], atol=1e-12)
    assert (info["negatives_used"], info["negatives_total"]) == (25, 150)
    assert (info["positives_used"], info["positives_total"]) == (9, 40)
    assert "uniform sample, seed 1" in info["summary"]


def test_negative_sampling_is_uniform():
    # 3 + 2 samples: 6 negative pairs, 2 drawn per seed; each pair should appear in 1/3 of draws.
    y = np.array([0, 1, 0, 1, 0])
    counts = dict.fromkeys(((i, j) for i, j in itertools.combinations(range(5), 2) if y[i] != y[j]), 0)
    draws = 3000
    for seed in range(draws):
        for i, j in pair_indices(y, None, 2, seed)[1]:
            counts[(int(i), int(j))] += 1
    assert len(counts) == 6
    for c in counts.values():  # binomial(3000, 1/3): sd ≈ 26
        assert abs(c - draws / 3) < 130


def test_large_set_is_sampled_without_an_n_by_n_matrix(rng):
    n = 30_000  # an N × N float64 matrix would be 7 GB
    y = rng.integers(0, 10, size=n)
    pos, neg, info = pair_similarities(rng.normal(size=(n, 3)).astype(np.float32), y,
                                       max_negatives=1000, max_positives=500)
    _, counts = np.unique(y, return_counts=True)
    p_total = int((counts * (counts - 1) // 2).sum())
    assert info["positives_total"] == p_total and info["negatives_total"] == n * (n - 1) // 2 - p_total
    assert len(pos) == 500 and len(neg) == 1000 and np.all(np.abs(neg) <= 1 + 1e-12)


@pytest.mark.parametrize("Z, y, err, match", [
    (np.eye(3), [0, 0, 1], DatasetError, r"at least 2 samples per class.*1 \(1\)"),
    (np.eye(3), [0, 0, 0], DatasetError, "at least 2 classes"),
    (np.array([[np.nan, 0], [1, 0], [0, 1], [1, 1]]), [0, 0, 1, 1], ConfigError, "NaN"),
    (np.array([[0.0, 0], [1, 0], [0, 1], [1, 1]]), [0, 0, 1, 1], ConfigError, "all-zero"),
    (np.eye(4), [0, 0, 1], ConfigError, "one label per embedding"),
    (np.ones((1, 2)), [0], ConfigError, "at least 2"),
])
def test_pair_similarities_bad_input(Z, y, err, match):
    with pytest.raises(err, match=match):
        pair_similarities(Z, y)


@pytest.mark.parametrize("cap", [0, -5, 2.5, True])
def test_pair_similarities_bad_cap(cap):
    with pytest.raises(ConfigError, match="max_negatives"):
        pair_similarities(np.eye(4), [0, 0, 1, 1], max_negatives=cap)


# ============================================================================= average precision
def average_precision_reference(q, ql, g=None, gl=None):
    """AP_q = 1/P_q Σ_k P@k · rel(k) over the gallery sorted by (−<q, g>, index), self left out."""
    self_ex = g is None
    g, gl = (q, ql) if self_ex else (g, gl)
    out = []
    for i in range(len(q)):
        cand = [j for j in range(len(g)) if not (self_ex and j == i)]
        ranked = sorted(cand, key=lambda j: (-float(np.dot(q[i], g[j])), j))
        rel = [gl[j] == ql[i] for j in ranked]
        if not any(rel):
            out.append(math.nan)
            continue
        total = sum(sum(rel[: k + 1]) / (k + 1) for k in range(len(rel)) if rel[k])
        out.append(total / sum(rel))
    return np.array(out)


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("integer", [False, True])
def test_average_precision_matches_reference(rng, separate, integer):
    make = (lambda n: rng.integers(-1, 2, size=(n, 3)).astype(np.float64)) if integer \
        else (lambda n: rng.normal(size=(n, 4)))
    q, ql = make(25), rng.integers(0, 4, size=25)
    g, gl = (make(30), rng.integers(0, 5, size=30)) if separate else (None, None)
    got = average_precision_per_query(q, ql, g, gl)
    np.testing.assert_allclose(got, average_precision_reference(q, ql, g, gl), atol=1e-12)


def test_average_precision_hand_computed():
    # Ranking of the gallery for q = (1, 0): g0 (hit, s=1), g1 (miss, s=.8), g2 (hit, s=0):
    # AP = (1/1 + 2/3) / 2 = 5/6. Query 2's label 9 is absent from the gallery: NaN.
    q, g = np.array([[1.0, 0], [0, 1]]), np.array([[1.0, 0], [0.8, 0.6], [0, 1]])
    ap = average_precision_per_query(q, [0, 9], g, [0, 1, 0])
    assert ap[0] == pytest.approx(5 / 6) and math.isnan(ap[1])
    # Query = gallery: three identical points, labels [0, 1, 0]. For query 0 the others tie,
    # so index order: 1 (miss), 2 (hit) -> AP 1/2. Query 1 has no positive. Query 2: 0 (hit) -> 1.
    ap = average_precision_per_query(np.ones((3, 2)), [0, 1, 0])
    np.testing.assert_allclose(ap, [0.5, np.nan, 1.0])


def test_average_precision_bad_input():
    with pytest.raises(ConfigError, match="together"):
        average_precision_per_query(np.eye(3), [0, 1, 2], gallery_emb=np.eye(3))
    with pytest.raises(ConfigError, match="dimension"):
        average_precision_per_query(np.eye(3), [0, 1, 2], np.eye(4), [0, 1, 2, 3])
    with pytest.raises(ConfigError, match="single embedding"):
        average_precision_per_query(np.eye(1), [0])
    with pytest.raises(ConfigError, match="NaN"):
        average_precision_per_query(np.array([[np.nan, 1.0], [0, 1]]), [0, 0])


def test_worst_queries_by_ap_and_by_rank():
    ap = [0.5, math.nan, 0.1, 0.5, 1.0]
    assert worst_queries(ap, 3).tolist() == [2, 0, 3]  # ties: lower index first; NaN left out
    assert worst_queries(ap, 10).tolist() == [2, 0, 3, 4]
    ranks = [1.0, math.inf, 3.0, math.nan, math.inf]
    assert worst_queries(ranks, 3, by="rank").tolist() == [1, 4, 2]
    with pytest.raises(ConfigError, match="by="):
        worst_queries(ap, 2, by="recall")
    with pytest.raises(ConfigError, match="n="):
        worst_queries(ap, -1)


# ============================================================================= t-SNE
def test_stratified_subsample_keeps_class_shares(rng):
    y = rng.permutation(np.repeat([0, 1, 2], [30, 10, 5]))
    idx = stratified_subsample(y, 9, seed=0)
    # shares 6, 2, 1 exactly
    assert np.all(np.diff(idx) > 0) and np.bincount(y[idx]).tolist() == [6, 2, 1]
    # shares 30·10/45 = 6.67, 2.22, 1.11 -> floors 6, 2, 1 (= 9); the largest remainder (class 0) gets the 10th
    assert np.bincount(y[stratified_subsample(y, 10, seed=0)]).tolist() == [7, 2, 1]
    np.testing.assert_array_equal(stratified_subsample(y, 9, seed=0), idx)
    np.testing.assert_array_equal(stratified_subsample(y, 100), np.arange(45))


def test_tsne_is_seeded_clips_perplexity_and_separates_clusters(rng):
    centres = np.array([[10.0, 0, 0, 0], [0, 10, 0, 0], [0, 0, 10, 0]])
    y = np.repeat([0, 1, 2], 8)
    Z = centres[y] + rng.normal(size=(24, 4))
    a = tsne(Z, max_iter=500)
    b = tsne(Z, max_iter=500)
    assert a.points.shape == (24, 2) and a.indices.tolist() == list(range(24))
    assert a.perplexity == pytest.approx(23 / 3)
    np.testing.assert_array_equal(a.points, b.points)
    d = np.linalg.norm(a.points[:, None] - a.points[None], axis=-1) + np.diag([np.inf] * 24)
    assert np.all(y[d.argmin(1)] == y)  # every point's 2-D nearest neighbour is in its cluster


def test_tsne_subsample_returns_indices(rng):
    y = np.repeat([0, 1], [30, 10])
    Z = rng.normal(size=(40, 5))
    res = tsne(Z, labels=y, max_samples=12, perplexity=30, max_iter=500)
    assert res.points.shape == (12, 2) and len(res.indices) == 12
    assert np.bincount(y[res.indices]).tolist() == [9, 3]
    assert res.perplexity == pytest.approx(11 / 3)
    res = tsne(Z, max_samples=12, max_iter=500, perplexity=2)
    assert len(np.unique(res.indices)) == 12 and res.perplexity == 2


def test_tsne_max_classes_embeds_the_first_classes_and_indexes_the_whole_set(rng):
    y = np.array([5, 3, 9, 3, 5, 7, 9, 7, 3, 5] * 3)
    Z = rng.normal(size=(30, 4))
    res = tsne(Z, labels=y, max_classes=2, max_iter=500, perplexity=3)
    assert sorted(res.indices.tolist()) == np.flatnonzero(np.isin(y, [3, 5])).tolist()  # classes 3 and 5: all of them
    sub = tsne(Z, labels=y, max_classes=2, max_samples=6, max_iter=500, perplexity=1)
    assert set(y[sub.indices]) == {3, 5} and np.bincount(y[sub.indices]).tolist()[3:6] == [3, 0, 3]
    with pytest.raises(ConfigError, match="needs the labels"):
        tsne(Z, max_classes=2)
    with pytest.raises(ConfigError, match="max_classes"):
        tsne(Z, labels=y, max_classes=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(Z=np.ones((1, 3))), "at least 2"),
    (dict(Z=np.array([[np.inf, 0], [0, 1], [1, 1]])), "NaN"),
    (dict(Z=np.eye(3), perplexity=0), "perplexity"),
    (dict(Z=np.eye(3), max_samples=1), "max_samples"),
    (dict(Z=np.eye(3), labels=[0, 1]), "one label per embedding"),
])
def test_tsne_bad_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tsne(**kwargs)
