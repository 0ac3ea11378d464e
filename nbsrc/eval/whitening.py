"""Post-processing of descriptors by supervised whitening (used by DToP at inference).

**Supervised (learned) whitening** of Radenović et al. (TPAMI 2018; cirtorch's ``whitenlearn``),
fitted on matching pairs ``(q_j, p_j)`` of training descriptors X [N, D]::

    m   = 1/|Q| Σ_j x_{q_j}                                 mean of the query side of the pairs
    Σ_w = 1/|Q| Σ_j (x_{q_j} − x_{p_j})(x_{q_j} − x_{p_j})ᵀ  within-pair ("intra-class") covariance
    W   = Σ_w^{−1/2}                                         whitens the matching-pair differences
    W Σ_x Wᵀ = V Λ Vᵀ                                       PCA of all whitened descriptors
    P   = Vᵀ W                                              rows by decreasing eigenvalue

so that ``P Σ_w Pᵀ = I`` and ``P Σ_x Pᵀ = Λ`` (diagonal, decreasing), with
``Σ_x = 1/N Σ_i (x_i − m)(x_i − m)ᵀ``: the rows of P solve the generalised eigenproblem
``Σ_x v = λ Σ_w v``. Directions in which matching images differ most are shrunk most. As in
cirtorch, the PCA step uses all descriptors ``X`` (not only the pairs).

:func:`learn_whitening` returns ``(m, P)``; :func:`apply_whitening` computes ``normalize(P[:dim] (x − m))``.
"""

from __future__ import annotations

import numpy as np

from nbsrc.errors import ConfigError


def _as_descriptors(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ConfigError(f"descriptors must be a non-empty 2-D array [N, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ConfigError("descriptors contain NaN or inf; check the model's embeddings")
    return x


def _inverse_sqrt(cov: np.ndarray, what: str, rel_tol: float = 1e-10) -> np.ndarray:
    """Symmetric ``cov^{-1/2}``; a singular ``cov`` is an error that says what to do."""
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    if vals[0] <= rel_tol * max(vals[-1], 0.0) or vals[-1] <= 0:
        raise ConfigError(
            f"the {what} covariance is singular (smallest eigenvalue {vals[0]:.3g}, largest {vals[-1]:.3g}); "
            "use more samples than dimensions, reduce the embeddings first (dim=...), or pass shrinkage > 0"
        )
    return (vecs / np.sqrt(vals)) @ vecs.T


def _sorted_eigh(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(vals)[::-1]
    return vals[order], vecs[:, order]


def _shrink(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    if shrinkage < 0:
        raise ConfigError(f"shrinkage={shrinkage} must be >= 0")
    return cov + shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))


def learn_whitening(x, qidxs, pidxs, shrinkage: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Supervised whitening ``(m [D], P [D, D])`` from matching pairs ``x[qidxs[j]] ~ x[pidxs[j]]``.

    ``shrinkage`` adds ``shrinkage · tr(Σ_w)/D · I`` to Σ_w (0: none, as cirtorch).
    """
    x = _as_descriptors(x)
    q, p = np.asarray(qidxs, dtype=np.int64), np.asarray(pidxs, dtype=np.int64)
    if q.ndim != 1 or q.shape != p.shape or len(q) == 0:
        raise ConfigError(f"qidxs and pidxs must be equal-length, non-empty 1-D index arrays, got {q.shape}, {p.shape}")
    if q.min() < 0 or p.min() < 0 or max(q.max(), p.max()) >= len(x):
        lo, hi = min(q.min(), p.min()), max(q.max(), p.max())
        raise ConfigError(f"pair indices must be in [0, {len(x)}); got range [{lo}, {hi}]")
    m = x[q].mean(axis=0)
    diff = x[q] - x[p]
    sigma_w = _shrink(diff.T @ diff / len(diff), shrinkage)
    w = _inverse_sqrt(sigma_w, "within-pair (matching differences)")
    xw = (x - m) @ w.T
    _, vecs = _sorted_eigh(xw.T @ xw / len(xw))
    return m, vecs.T @ w


def apply_whitening(x, m, p, dim: int | None = None) -> np.ndarray:
    """``normalize(P[:dim] (x − m))`` for each row of ``x`` [N, D]; float32 [N, dim]."""
    x, m, p = np.asarray(x, dtype=np.float64), np.asarray(m, dtype=np.float64), np.asarray(p, dtype=np.float64)
    dim = len(p) if dim is None else dim
    if not 1 <= dim <= len(p):
        raise ConfigError(f"dim={dim} must be in [1, {len(p)}]")
    y = (x - m) @ p[:dim].T
    return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)

