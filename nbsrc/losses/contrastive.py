"""The contrastive loss of IRT, eq. (1).

For l2-normalised embeddings z and labels y (N in the batch), with margin β::

    L = 1/N Σ_i [ Σ_{j: y_j = y_i, j ≠ i} (1 − z_iᵀ z_j)  +  Σ_{j: y_j ≠ y_i} [z_iᵀ z_j − β]_+ ]

With a reference set (a cross-batch memory) the inner sums also run over the references; a
sample is never paired with itself, nor with its own stored copy (same dataset index). The
normalisation stays 1/N, N the number of *query* (batch) embeddings.

The per-pair terms are computed by :func:`contrastive_pair_terms`; reduction is done separately, so
that the terms are easy to inspect and to test.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from nbsrc.losses.registry import register_pair_loss


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision embeddings (AMP) are lifted to float32; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def pair_mask(
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    indices: torch.Tensor | None = None,
    ref_indices: torch.Tensor | None = None,
    same_set: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``[N, M]`` masks of positive and negative pairs, excluding self-pairs.

    A pair is a self-pair when ``same_set`` and i == j, or when both carry the same dataset index.
    """
    pos = labels[:, None] == ref_labels[None, :]
    valid = torch.ones_like(pos)
    if same_set:
        valid &= ~torch.eye(len(labels), len(ref_labels), dtype=torch.bool, device=labels.device)
    if indices is not None and ref_indices is not None:
        valid &= indices[:, None] != ref_indices[None, :]
    return pos & valid, ~pos & valid


def contrastive_pair_terms(sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair loss ``[N, M]``: 1 − s on positives, [s − β]_+ on negatives, 0 elsewhere."""
    zero = sim.new_zeros(())
    return torch.where(pos, 1.0 - sim, zero) + torch.where(neg, F.relu(sim - beta), zero)


def contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_emb: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    beta: float = 0.5,
    indices: torch.Tensor | None = None,
    ref_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """IRT eq. (1) over batch × batch, plus batch × reference when ``ref_emb`` is given.

    ``embeddings`` are l2-normalised here (a no-op when they already are). ``indices`` (dataset
    indices) keep a sample from being paired with its own copy in ``ref_emb``.
    """
    z = F.normalize(upcast(embeddings), dim=-1)
    n = len(z)
    pos, neg = pair_mask(labels, labels, indices, indices, same_set=True)
    total = contrastive_pair_terms(z @ z.T, pos, neg, beta).sum()
    if ref_emb is not None and len(ref_emb):
        r = F.normalize(upcast(ref_emb), dim=-1)
        pos, neg = pair_mask(labels, ref_labels, indices, ref_indices, same_set=False)
        total = total + contrastive_pair_terms(z @ r.T, pos, neg, beta).sum()
    return total / n


@register_pair_loss("contrastive", "beta")
def _contrastive(feature_dim: int, classes, *, beta: float):
    """IRT eq. (1), margin β on negatives."""
    return partial(contrastive_loss, beta=beta)
