"""2-D maps of the embedding space: t-SNE (van der Maaten & Hinton 2008), as in DToP Figure A6.

t-SNE places points y_i in 2-D so that the neighbour distributions match::

    p_{j|i} ∝ exp(−‖z_i − z_j‖² / 2σ_i²)  (σ_i set by the perplexity),  p_ij = (p_{j|i} + p_{i|j}) / 2N
    q_ij ∝ (1 + ‖y_i − y_j‖²)^−1,          minimise KL(P ‖ Q)

computed here by scikit-learn (Barnes-Hut), with a fixed seed and PCA initialisation, so the same
embeddings give the same picture.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from nbsrc.analysis.spectrum import as_embeddings, as_labels
from nbsrc.errors import ConfigError


class TSNEResult(NamedTuple):
    """``points`` [n, 2] are the t-SNE coordinates of the samples ``indices`` [n] (row ``k`` of
    ``points`` is sample ``indices[k]`` of the input; all of ``0..N-1`` without subsampling), and
    ``perplexity`` is the one actually used (after clipping)."""

    points: np.ndarray
    indices: np.ndarray
    perplexity: float


def stratified_subsample(labels, max_samples: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``max_samples`` samples, drawn without replacement with a fixed seed, each
    class keeping its share of the set: n_c · max_samples / N rounded by largest remainder (so the
    counts add up to ``max_samples``). All indices when ``max_samples >= N``."""
    labels = np.asarray(labels)
    n = len(labels)
    if max_samples >= n:
        return np.arange(n)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    share = counts * max_samples / n
    take = np.floor(share).astype(int)
    remainder_order = np.argsort(-(share - take), kind="stable")
    take[remainder_order[: max_samples - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(inverse == c), size=k, replace=False) for c, k in enumerate(take) if k]
    return np.sort(np.concatenate(picked))


def tsne(Z, labels=None, seed: int = 0, perplexity: float = 30.0, max_samples: int | None = None,
         max_iter: int = 1000, max_classes: int | None = None) -> TSNEResult:
    """t-SNE of the embeddings ``Z`` [N, D] (scikit-learn ``TSNE(init="pca", random_state=seed)``).

    ``perplexity`` is clipped to (n − 1) / 3 for small sets (n the number of points embedded; it
    must be below n). With ``max_samples`` only that many samples are embedded: a fixed-seed
    subsample, stratified by ``labels`` when they are given (see :func:`stratified_subsample`),
    uniform otherwise. Returns a :class:`TSNEResult` ``(points, indices, perplexity)``; index the
    labels with ``indices`` to colour the points. ``max_classes`` (needs ``labels``): only the samples
    of the first ``max_classes`` classes (in label order) are embedded, so that a set of hundreds of
    classes gives a plot whose colours can be told apart (DToP Fig. A6 shows a few classes).
    """
    Z = as_embeddings(Z)
    if labels is not None:
        labels = as_labels(labels, len(Z), "labels")
    if not perplexity > 0:
        raise ConfigError(f"perplexity={perplexity!r} is invalid: expected a positive number (typically 5 to 50)")
    keep = np.arange(len(Z))
    if max_classes is not None:
        if isinstance(max_classes, bool) or not isinstance(max_classes, (int, np.integer)) or max_classes < 1:
            raise ConfigError(f"max_classes={max_classes!r} is invalid: expected a positive integer, or None for all")
        if labels is None:
            raise ConfigError("max_classes needs the labels: pass labels=... or max_classes=None")
        keep = np.flatnonzero(np.isin(labels, np.unique(labels)[: int(max_classes)]))
        Z, labels = Z[keep], labels[keep]
    if max_samples is not None:
        if isinstance(max_samples, bool) or not isinstance(max_samples, (int, np.integer)) or max_samples < 2:
            raise ConfigError(f"max_samples={max_samples!r} is invalid: expected an integer >= 2, or None for all")
        if labels is not None:
            indices = stratified_subsample(labels, int(max_samples), seed)
        else:
            rng = np.random.default_rng(seed)
            indices = np.sort(rng.choice(len(Z), size=min(int(max_samples), len(Z)), replace=False))
    else:
        indices = np.arange(len(Z))
    from sklearn.manifold import TSNE

    X = Z[indices]
    used = float(min(perplexity, (len(X) - 1) / 3))
    init = "pca" if X.shape[1] >= 2 else "random"  # a 2-D PCA needs 2 input dimensions
    points = TSNE(n_components=2, perplexity=used, init=init, random_state=seed, max_iter=max_iter).fit_transform(X)
    return TSNEResult(points.astype(np.float64), keep[indices].astype(np.int64), used)
