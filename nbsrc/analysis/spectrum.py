"""The PCA spectrum of a set of embeddings: how many directions of the embedding space are used.

IRT (§3.2, Figures 2 and 3) shows that the contrastive loss alone collapses the embeddings onto a
few principal directions, and that the KoLeo regulariser spreads them out again. The measure is the
cumulative energy of the principal components::

    C = 1/N Σ_i (z_i − z̄)(z_i − z̄)ᵀ,   eigenvalues λ_1 ≥ λ_2 ≥ … ≥ λ_D ≥ 0
    E(k) = Σ_{d ≤ k} λ_d / Σ_{d ≤ D} λ_d

and its one-number summary, the effective dimension: the smallest k with E(k) ≥ 0.9
(:func:`effective_dim` from the embeddings, :func:`dim_at_energy` from a curve).

This module also holds the input checks (``as_embeddings``, ``as_labels``) that every analysis in
:mod:`nbsrc.analysis` uses, so that they all reject bad input with the same one-line errors.
"""

from __future__ import annotations

import numpy as np

from nbsrc.errors import ConfigError, DatasetError

# Cumulative sums of float eigenvalues may end a few ulps below a threshold they reach exactly.
_ENERGY_TOL = 1e-9


# ----------------------------------------------------------------------------- input checks
def as_embeddings(Z, name: str = "Z", min_samples: int = 2) -> np.ndarray:
    """``Z`` (numpy array or torch tensor, ``[N, D]``) as a float64 numpy array, or a one-line
    :class:`~nbsrc.errors.ConfigError` when it is not 2-D, has fewer than ``min_samples`` rows, or
    holds NaN/inf."""
    if hasattr(Z, "detach"):  # torch.Tensor, without importing torch here
        Z = Z.detach().cpu().double().numpy()
    Z = np.asarray(Z, dtype=np.float64)
    if Z.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D array [N, D] of embeddings, got shape {Z.shape}; stack them row-wise")
    if len(Z) < min_samples:
        raise ConfigError(f"{name} has {len(Z)} embedding(s) but this analysis needs at least {min_samples}; "
                          "embed more samples")
    if Z.shape[1] < 1:
        raise ConfigError(f"{name} has shape {Z.shape}: the embeddings have no dimensions")
    bad = ~np.isfinite(Z).all(axis=1)
    if bad.any():
        raise ConfigError(
            f"{name} contains NaN or inf (row {int(np.flatnonzero(bad)[0])}, {int(bad.sum())} row(s) in all); "
            "the model produced non-finite embeddings: check the weights, the input normalisation and the loss"
        )
    return Z


def as_labels(y, n: int, name: str = "y", min_per_class: int = 0) -> np.ndarray:
    """``y`` as a 1-D numpy array of ``n`` labels. With ``min_per_class`` every class must have at
    least that many samples, else a one-line :class:`~nbsrc.errors.DatasetError` naming them."""
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ConfigError(f"{name} must have shape [{n}] (one label per embedding), got shape {y.shape}")
    if min_per_class:
        classes, counts = np.unique(y, return_counts=True)
        small = classes[counts < min_per_class]
        if len(small):
            shown = ", ".join(f"{c.item()!r} ({n})"
                              for c, n in zip(small[:5], counts[counts < min_per_class][:5], strict=True))
            more = f" and {len(small) - 5} more" if len(small) > 5 else ""
            raise DatasetError(
                f"this analysis needs at least {min_per_class} samples per class, but class(es) {shown}{more} "
                f"have fewer; drop those classes or embed more samples of them"
            )
    return y


# ----------------------------------------------------------------------------- spectrum
def cumulative_energy(Z) -> np.ndarray:
    """E(k), k = 1..D: the cumulative fraction of variance explained by the first k principal
    components of the centred embeddings (IRT Figures 2 and 3)::

        C = 1/N Σ_i (z_i − z̄)(z_i − z̄)ᵀ,   λ_1 ≥ … ≥ λ_D the eigenvalues of C,
        E(k) = Σ_{d ≤ k} λ_d / Σ_d λ_d.

    ``Z`` is ``[N, D]`` (numpy or torch) and is used as given (not re-normalised; the models return
    l2-normalised embeddings). Returns a float64 array of length D, non-decreasing, ending at 1.
    The eigenvalues are the squared singular values of the centred ``Z`` divided by N (no D × D
    matrix is formed); when N ≤ D at most N − 1 of them are non-zero. The 1/N vs 1/(N−1)
    normalisation cancels in the ratio.
    """
    Z = as_embeddings(Z)
    centred = Z - Z.mean(axis=0)
    s = np.linalg.svd(centred, compute_uv=False)  # descending
    eig = np.zeros(Z.shape[1])
    eig[: len(s)] = s**2 / len(Z)
    total = eig.sum()
    if not total > 0:
        raise ConfigError(
            "the embeddings have zero variance (all rows are identical), so the PCA spectrum is undefined; "
            "check that the model is not collapsed to a constant output"
        )
    energy = np.cumsum(eig) / total
    energy[-1] = 1.0  # exactly, not 1 − ulp
    return energy


def effective_dim(Z, threshold: float = 0.9) -> int:
    """The number of principal components needed to reach ``threshold`` of the energy::

        d_eff = min { k : E(k) ≥ threshold }

    with E from :func:`cumulative_energy` (compared with a 1e-9 tolerance, so that data of rank r
    gives d_eff ≤ r for threshold 1 despite rounding). ``threshold`` must lie in (0, 1].
    """
    return dim_at_energy(cumulative_energy(Z), threshold)


def dim_at_energy(energy, threshold: float = 0.9) -> int | None:
    """min { k : E(k) ≥ threshold } for a cumulative-energy curve E (k = 1..D), with the 1e-9
    tolerance of :func:`effective_dim`; ``None`` if the curve never reaches ``threshold``."""
    if not 0 < threshold <= 1:
        raise ConfigError(f"threshold={threshold!r} is invalid: expected a fraction of the energy in (0, 1], e.g. 0.9")
    reached = np.asarray(energy, dtype=np.float64) >= threshold - _ENERGY_TOL
    return int(np.argmax(reached)) + 1 if reached.any() else None


def effective_rank(Z) -> float:
    """The effective rank of the centred embeddings (Roy & Vetterli, 2007): the exponential of the
    Shannon entropy of their normalised singular values::

        p_k = σ_k / Σ_j σ_j,   erank = exp(− Σ_k p_k log p_k),   σ the singular values of Z − z̄

    A continuous count of the directions the embeddings use: 1 when they lie on a line, D when all
    D singular values are equal. It summarises the curve of :func:`cumulative_energy` in one number
    that does not jump in whole components, so small changes of the spectrum can be compared over
    seeds (the claims of IRT Figs. 2 and 3 in :mod:`nbsrc.paper.claims`; our reading: the paper reads its
    curves by eye). Zero singular values contribute nothing (0 log 0 = 0).
    """
    Z = as_embeddings(Z)
    s = np.linalg.svd(Z - Z.mean(axis=0), compute_uv=False)
    if not s.sum() > 0:
        raise ConfigError(
            "the embeddings have zero variance (all rows are identical), so the effective rank is undefined; "
            "check that the model is not collapsed to a constant output"
        )
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))
