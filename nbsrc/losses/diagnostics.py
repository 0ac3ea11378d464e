"""Quantities measured on a loss during training (they live here, below ``train``, so the training
loop can record them without a second pass; :mod:`nbsrc.analysis` re-exports them)."""

from __future__ import annotations

import torch


def gradient_noise(grads: torch.Tensor, eps: float = 1e-12) -> float:
    """γ = ‖Cov(ĝ)‖_*, IRT §3.5 / Fig. 4.

    ĝ_i = g_i / ‖g_i‖ are the per-sample gradient directions of the contrastive loss w.r.t. the
    embeddings (rows with a zero gradient, samples with no active pair, are dropped), and
    Cov(ĝ) = 1/B Σ_i (ĝ_i − ḡ)(ĝ_i − ḡ)ᵀ the population covariance. Cov is positive
    semi-definite, so its nuclear norm equals its trace, 1 − ‖ḡ‖² for unit directions: 0 when all
    samples push the same way, close to 1 when their directions are spread out.
    """
    g = grads.detach().double().flatten(1)
    norms = g.norm(dim=1)
    g = g[norms > eps] / norms[norms > eps, None]
    if len(g) < 2:
        return float("nan")
    centred = g - g.mean(0)
    cov = centred.T @ centred / len(g)
    return float(torch.linalg.matrix_norm(cov, ord="nuc"))
