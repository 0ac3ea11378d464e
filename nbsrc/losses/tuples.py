"""Losses on SfM-120k tuples ``(q, p, n_1, ..., n_K)`` (IRT §4.2; Radenović et al., TPAMI 2018).

IRT §4.2: "we build our implementation on top of the public code associated with the work by
Radenović et al. (2018b). We follow the same optimization and regularization procedure ... We use
the default hyper-parameters of Radenović et al. (2018b) ... The contrastive loss margin is set to
β = 0.85." Two forms of the tuple loss are here, registered in :data:`TUPLE_LOSSES`;
``cfg.loss.tuple_loss`` picks one (adding a form is a function here and a line in the registry):

* ``"distance"`` (default; the loss of that code, cirtorch's ``contrastive_loss``), on the
  Euclidean distance ``d(a, b) = ‖a − b + ε‖`` between l2-normalised descriptors
  (ε = 1e-6 as in cirtorch, so that the gradient at d = 0 is finite)::

      ℓ_t = ½ d(q_t, p_t)²  +  Σ_k ½ max(0, β − d(q_t, n_tk))²
      L   = Σ_t ℓ_t                                     (summed over the tuples of the batch)

  For unit vectors ``d² = 2 − 2 s``: a negative counts while ``d < β``, i.e. cosine
  ``s > 1 − β²/2`` (0.639 at β = 0.85).
* ``"eq1"`` (an option): IRT eq. (1) on the same pairs, the cosine form with the margin as a
  similarity threshold, averaged over tuples::

      ℓ_t = (1 − s(q_t, p_t)) + Σ_k [s(q_t, n_tk) − β]_+ ,   L = 1/B Σ_t ℓ_t

The paper names neither form for SfM-120k in words; "distance" is our reading of "the default
hyper-parameters" of the code it builds on (docs/fidelity.md). Embeddings are
``[B · tuple_size, D]``, tuple by tuple (:func:`~nbsrc.data.sfm.collate_tuples`), and are
l2-normalised here; only the query is an anchor.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from nbsrc.errors import ConfigError
from nbsrc.losses.contrastive import contrastive_pair_terms, upcast
from nbsrc.losses.koleo import koleo_loss

CIRTORCH_EPS = 1e-6


def _tuples(embeddings: torch.Tensor, tuple_size: int) -> torch.Tensor:
    if tuple_size < 3:
        raise ConfigError(f"tuple_size={tuple_size} must be >= 3 (query, positive and at least one negative)")
    if embeddings.ndim != 2 or len(embeddings) % tuple_size:
        raise ConfigError(
            f"embeddings of shape {tuple(embeddings.shape)} are not whole tuples of {tuple_size}; "
            "expected [B * tuple_size, D]"
        )
    return F.normalize(upcast(embeddings), dim=-1).view(-1, tuple_size, embeddings.shape[-1])


def distance_contrastive_loss(embeddings: torch.Tensor, tuple_size: int, margin: float = 0.85,
                              reduce: bool = True, eps: float = CIRTORCH_EPS) -> torch.Tensor:
    """cirtorch's contrastive loss: ``Σ_t [½ d(q_t, p_t)² + Σ_k ½ max(0, margin − d(q_t, n_tk))²]``
    with ``d(a, b) = ‖a − b + eps‖`` on l2-normalised descriptors; ``reduce=False`` gives ``ℓ_t`` [B]."""
    z = _tuples(embeddings, tuple_size)
    d = (z[:, :1] - z[:, 1:] + eps).pow(2).sum(-1).sqrt()  # [B, 1 + K]: d(q, p), d(q, n_1), ...
    per_tuple = 0.5 * d[:, 0].pow(2) + 0.5 * F.relu(margin - d[:, 1:]).pow(2).sum(1)
    return per_tuple.sum() if reduce else per_tuple


def tuple_contrastive_loss(embeddings: torch.Tensor, tuple_size: int, beta: float = 0.85,
                           reduce: bool = True) -> torch.Tensor:
    """IRT eq. (1) on tuples: ``1/B Σ_t [(1 − s(q_t, p_t)) + Σ_k [s(q_t, n_tk) − β]_+]``;
    ``reduce=False`` gives ``ℓ_t`` [B]."""
    z = _tuples(embeddings, tuple_size)
    sim = torch.einsum("bd,btd->bt", z[:, 0], z[:, 1:])  # [B, 1 + K]: s(q, p), s(q, n_1), ...
    pos = torch.zeros_like(sim, dtype=torch.bool)
    pos[:, 0] = True
    per_tuple = contrastive_pair_terms(sim, pos, ~pos, beta).sum(dim=1)
    return per_tuple.mean() if reduce else per_tuple


# name -> loss(embeddings, tuple_size, margin) -> scalar; ``cfg.loss.tuple_loss`` picks one for tuple training
TUPLE_LOSSES: dict[str, Callable[[torch.Tensor, int, float], torch.Tensor]] = {
    "distance": distance_contrastive_loss,  # cirtorch's, on Euclidean distances, summed (IRT §4.2's code)
    "eq1": tuple_contrastive_loss,  # IRT eq. (1) on the anchor-positive and anchor-negative pairs, averaged
}


def tuple_loss_fn(form: str) -> Callable[[torch.Tensor, int, float], torch.Tensor]:
    """The tuple loss registered as ``form``; an unknown name is a one-line error listing the others."""
    if form not in TUPLE_LOSSES:
        raise ConfigError(f"tuple_loss={form!r} is invalid: expected one of {', '.join(TUPLE_LOSSES)} "
                          "(IRT §4.2 on cirtorch: 'distance')")
    return TUPLE_LOSSES[form]


def tuple_loss(embeddings: torch.Tensor, tuple_size: int, margin: float = 0.85, form: str = "distance",
               reduce: bool = True) -> torch.Tensor:
    """The tuple loss of ``form`` (``"distance"``: cirtorch, summed; ``"eq1"``: IRT eq. 1, averaged)."""
    return tuple_loss_fn(form)(embeddings, tuple_size, margin, reduce)


def tuple_loss_terms(z: torch.Tensor, idx: torch.Tensor, tuple_size: int, beta: float, lam: float,
                     form: str = "distance") -> dict:
    """``{"contrastive", "koleo", "total"}`` of one batch of tuples, ``total = contrastive + λ·KoLeo``
    (IRT eq. 5); KoLeo runs over the batch's distinct images (``idx``: their dataset indices; an
    image may be a negative of several tuples, and its copies are not its nearest neighbour)."""
    main = tuple_loss(z, tuple_size, beta, form)
    koleo = main.new_zeros(())
    if lam > 0:
        first = np.unique(idx.cpu().numpy(), return_index=True)[1]
        if len(first) >= 2:
            koleo = koleo_loss(z[torch.as_tensor(np.sort(first), device=z.device)])
    return {"contrastive": main, "koleo": koleo, "total": main + lam * koleo}
