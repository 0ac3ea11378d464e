"""The KoLeo differential-entropy regularizer, IRT eq. (5) (Sablayrolles et al., 2019).

    L_KoLeo = −1/N Σ_i log(ρ_i + ε),   ρ_i = min_{j ≠ i} ‖z_i − z_j‖

over the l2-normalised embeddings of the batch. It pushes every sample away from its nearest
neighbour, spreading the embeddings uniformly. ε = 1e-8 keeps duplicates finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nbsrc.losses.contrastive import upcast


def nearest_neighbor_distance(z: torch.Tensor) -> torch.Tensor:
    """ρ_i = min_{j≠i} ‖z_i − z_j‖ for each row of ``z`` (``[N, D]`` -> ``[N]``)."""
    # Index the nearest neighbour by inner product (exact for unit vectors), then take a direct
    # difference norm: its gradient stays finite, unlike sqrt(2 − 2 s) near s = 1.
    with torch.no_grad():
        sim = z @ z.T
        sim.fill_diagonal_(-float("inf"))
        nn_idx = sim.argmax(dim=1)
    return (z - z[nn_idx]).norm(dim=1)


def koleo_loss(embeddings: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """IRT eq. (5). Needs at least 2 embeddings."""
    if len(embeddings) < 2:
        raise ValueError("koleo_loss needs at least 2 embeddings in the batch")
    z = F.normalize(upcast(embeddings), dim=-1)
    return -torch.log(nearest_neighbor_distance(z) + eps).mean()
