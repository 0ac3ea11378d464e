"""A toy pair loss with a hyperparameter of its own, defined only here: what adding a loss takes (this
module and tests/test_loss_registry.py). Importing it registers ``loss='toy'`` and ``toy_scale``.

The loss is the mean squared cosine similarity of the batch's negative pairs, scaled by s::

    L = s / |N| Σ_{(i, j) ∈ N} (z_iᵀ z_j)²,   N = {(i, j): y_i ≠ y_j}
"""

from __future__ import annotations

from functools import partial

import torch

from nbsrc.losses import loss_hyperparameter, positive, register_pair_loss


def toy_loss(z, labels, ref_emb=None, ref_labels=None, indices=None, ref_indices=None, *, scale: float):
    """The module docstring's L over the batch (the references are unused)."""
    negatives = labels[:, None] != labels[None, :]
    return scale * (z @ z.T)[negatives].pow(2).mean()


def toy_reference(z, labels, scale: float) -> torch.Tensor:
    """L one pair at a time."""
    terms = [(z[i] @ z[j]) ** 2 for i in range(len(z)) for j in range(len(z)) if labels[i] != labels[j]]
    return scale * sum(terms) / len(terms)


@register_pair_loss("toy", toy_scale=loss_hyperparameter(1.0, "scale s of the toy loss", paper=2.0,
                                                         check=positive))
def _toy(feature_dim, classes, *, toy_scale):
    return partial(toy_loss, scale=toy_scale)
