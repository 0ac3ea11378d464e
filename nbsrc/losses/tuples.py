"""Losses on SfM-120k tuples ``(q, p, n_1, ..., n_K)`` (IRT §4.2, the protocol of Radenović et al.).

Every tuple loss has the signature ``loss(embeddings, tuple_size, beta) -> scalar`` over a batch of
whole tuples laid out tuple by tuple (:func:`~nbsrc.data.sfm.collate_tuples`), and is named in
:data:`TUPLE_LOSSES`; the tuple task (:class:`nbsrc.train.tuples.TupleTask`) picks it by
``cfg.loss``. Adding one is a function here and a line in the registry.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from nbsrc.errors import ConfigError
from nbsrc.losses.contrastive import contrastive_pair_terms, upcast
from nbsrc.losses.koleo import koleo_loss


def tuple_contrastive_loss(embeddings: torch.Tensor, tuple_size: int, beta: float = 0.85,
                           reduce: bool = True) -> torch.Tensor:
    """IRT eq. (1) on tuples: ``1/B Σ_t [(1 − s(q_t, p_t)) + Σ_k [s(q_t, n_tk) − β]_+]``.

    ``embeddings`` is ``[B · tuple_size, D]``, tuple by tuple, each ``(q, p, n_1, ..., n_K)`` (the
    layout of :func:`~nbsrc.data.sfm.collate_tuples`); they are l2-normalised here. Only the query
    is an anchor. ``reduce=False`` returns the per-tuple losses ``ℓ_t`` ``[B]``.
    """
    if tuple_size < 3:
        raise ConfigError(f"tuple_size={tuple_size} must be >= 3 (query, positive and at least one negative)")
    if embeddings.ndim != 2 or len(embeddings) % tuple_size:
        raise ConfigError(
            f"embeddings of shape {tuple(embeddings.shape)} are not whole tuples of {tuple_size}; "
            "expected [B * tuple_size, D]"
        )
    z = F.normalize(upcast(embeddings), dim=-1).view(-1, tuple_size, embeddings.shape[-1])
    sim = torch.einsum("bd,btd->bt", z[:, 0], z[:, 1:])  # [B, 1 + K]: s(q, p), s(q, n_1), ...
    pos = torch.zeros_like(sim, dtype=torch.bool)
    pos[:, 0] = True
    per_tuple = contrastive_pair_terms(sim, pos, ~pos, beta).sum(dim=1)
    return per_tuple.mean() if reduce else per_tuple


# name -> loss(embeddings, tuple_size, beta) -> scalar; ``cfg.loss`` picks one for tuple training
TUPLE_LOSSES: dict[str, Callable[[torch.Tensor, int, float], torch.Tensor]] = {
    "contrastive": tuple_contrastive_loss,  # IRT eq. (1) on the anchor-positive and anchor-negative pairs
}


def tuple_loss(name: str) -> Callable[[torch.Tensor, int, float], torch.Tensor]:
    """The tuple loss registered as ``name``; an unknown name is a one-line error listing the others."""
    if name not in TUPLE_LOSSES:
        raise ConfigError(
            f"loss={name!r} has no tuple form for SfM-120k tuple training: set "
            f"{' or '.join(f'loss={n!r}' for n in sorted(TUPLE_LOSSES))}, or sfm_training='classes' to train on the "
            "3D models as classes"
        )
    return TUPLE_LOSSES[name]


def tuple_loss_terms(z: torch.Tensor, idx: torch.Tensor, tuple_size: int, beta: float, lam: float,
                     loss: str = "contrastive") -> dict:
    """``{loss, "koleo", "total"}`` of one batch of tuples: the tuple loss ``loss`` (margin ``beta``)
    plus λ · KoLeo (IRT eq. 5) over the batch's distinct images (an image may be a negative of
    several tuples; its copies are not its nearest neighbour)."""
    main = TUPLE_LOSSES[loss](z, tuple_size, beta)
    koleo = main.new_zeros(())
    if lam > 0:
        first = np.unique(idx.cpu().numpy(), return_index=True)[1]
        if len(first) >= 2:
            koleo = koleo_loss(z[torch.as_tensor(np.sort(first), device=z.device)])
    return {loss: main, "koleo": koleo, "total": main + lam * koleo}
