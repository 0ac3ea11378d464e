"""Supervised whitening (Radenović et al., cirtorch ``whitenlearn``) on synthetic data with known
answers."""

import numpy as np
import pytest
import scipy.linalg

from nbsrc.errors import ConfigError
from nbsrc.eval.whitening import apply_whitening, learn_whitening


def synthetic(seed=0, n_classes=40, per_class=5, d=6, noise_dir=0, noise_scale=5.0):
    """Class centres spread in every direction; images of a class differ by noise that is large
    along ``e_{noise_dir}`` and small elsewhere."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d)) * 3.0
    scales = np.full(d, 0.1)
    scales[noise_dir] = noise_scale
    x = np.repeat(centres, per_class, axis=0) + rng.normal(size=(n_classes * per_class, d)) * scales
    labels = np.repeat(np.arange(n_classes), per_class)
    return x, labels


def matching_pairs(labels, seed=0):
    """Each image with a class-mate paired with one other image of its class, drawn with ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    qs, ps = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        for i in members if len(members) > 1 else ():
            qs.append(i)
            ps.append(rng.choice(members[members != i]))
    return np.asarray(qs), np.asarray(ps)


def whitenlearn_reference(x, q, p):
    """cirtorch's whitenlearn, columns as descriptors, with a Cholesky factor."""
    X = x.T
    m = X[:, q].mean(axis=1, keepdims=True)
    df = X[:, q] - X[:, p]
    S = df @ df.T / df.shape[1]
    P = np.linalg.inv(np.linalg.cholesky(S))
    df = P @ (X - m)
    D = df @ df.T
    eigval, eigvec = np.linalg.eig(D)
    order = eigval.argsort()[::-1]
    return m[:, 0], eigvec[:, order].T @ P


def test_whitened_pair_differences_have_identity_covariance():
    x, labels = synthetic()
    q, p = matching_pairs(labels)
    m, P = learn_whitening(x, q, p)
    diff = x[q] - x[p]
    sigma_w = diff.T @ diff / len(diff)
    assert np.allclose(P @ sigma_w @ P.T, np.eye(6), atol=1e-8)
    assert np.allclose(m, x[q].mean(0))


def test_rows_solve_the_generalised_eigenproblem():
    x, labels = synthetic(seed=1)
    q, p = matching_pairs(labels, seed=1)
    m, P = learn_whitening(x, q, p)
    diff = x[q] - x[p]
    sigma_w = diff.T @ diff / len(diff)
    sigma_x = (x - m).T @ (x - m) / len(x)
    lam = scipy.linalg.eigh(sigma_x, sigma_w, eigvals_only=True)[::-1]
    assert np.allclose(P @ sigma_x @ P.T, np.diag(lam), atol=1e-6 * lam[0])


def test_noisy_direction_is_suppressed():
    """Matching images differ mostly along e_2: whitening puts e_2 last and shrinks it."""
    x, labels = synthetic(seed=2, n_classes=300, noise_dir=2)
    q, p = matching_pairs(labels, seed=2)
    _, P = learn_whitening(x, q, p)
    last = P[-1] / np.linalg.norm(P[-1])
    assert abs(last[2]) > 0.95
    gain = np.linalg.norm(P, axis=0)  # how much each input direction is amplified
    assert gain[2] < 0.2 * np.delete(gain, 2).min()
    # and it helps retrieval: nearest neighbour of every image is in its class more often
    def nn_accuracy(z):
        s = z @ z.T
        np.fill_diagonal(s, -np.inf)
        return (labels[s.argmax(1)] == labels).mean()
    raw = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert nn_accuracy(apply_whitening(x, *learn_whitening(x, q, p))) > nn_accuracy(raw)


def test_matches_cirtorch_recipe_up_to_row_signs():
    x, labels = synthetic(seed=3)
    q, p = matching_pairs(labels, seed=3)
    m, P = learn_whitening(x, q, p)
    m_ref, P_ref = whitenlearn_reference(x, q, p)
    assert np.allclose(m, m_ref)
    signs = np.sign((P * P_ref).sum(1))
    assert np.allclose(P, signs[:, None] * np.real(P_ref), atol=1e-6)


def test_apply_whitening_normalises_and_reduces():
    x, labels = synthetic(seed=5)
    m, P = learn_whitening(x, *matching_pairs(labels))
    z = apply_whitening(x, m, P, dim=3)
    assert z.shape == (len(x), 3) and z.dtype == np.float32
    assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-6)
    ref = (x - m) @ P[:3].T
    assert np.allclose(z, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)
    with pytest.raises(ConfigError, match="dim=7"):
        apply_whitening(x, m, P, dim=7)


def test_bad_input_is_an_error():
    x, labels = synthetic(n_classes=2, per_class=2)  # 2 pairs in 6 dimensions: singular
    q, p = matching_pairs(labels)
    with pytest.raises(ConfigError, match="singular"):
        learn_whitening(x, q, p)
    m, P = learn_whitening(x, q, p, shrinkage=0.1)
    assert np.isfinite(P).all()
    with pytest.raises(ConfigError, match="pair indices"):
        learn_whitening(x, [0], [99])
    with pytest.raises(ConfigError, match="2-D"):
        learn_whitening(x[0], [0], [1])
