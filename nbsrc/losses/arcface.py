"""ArcFace (Deng et al., 2019), the training loss of DToP (§A.1: margin 0.15).

With l2-normalised embeddings z_i, learnable class weights w_c (normalised in the loss), angles
θ_ic = arccos(z_iᵀ w_c), margin m and scale s::

    L = −1/N Σ_i log( exp(s·φ(θ_{i,y_i})) / (exp(s·φ(θ_{i,y_i})) + Σ_{c≠y_i} exp(s·cos θ_ic)) )

    φ(θ) = cos(θ + m)              if θ ≤ π − m
    φ(θ) = cos θ − m·sin m         otherwise (keeps φ decreasing in θ, as pytorch-metric-learning)

Numerical safety: the cosine is clamped to [−1 + 1e-7, 1 − 1e-7] before arccos, whose gradient is
infinite at ±1. Labels are class rows 0..C−1 (see :class:`~nbsrc.losses.RetrievalLoss`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nbsrc.errors import ConfigError
from nbsrc.losses.registry import ProxyTerm, register_pair_loss

_COS_CLAMP = 1.0 - 1e-7


def arcface_logits(cosine: torch.Tensor, labels: torch.Tensor, margin: float, scale: float) -> torch.Tensor:
    """Scaled logits [N, C]: s·φ(θ) on each row's target class, s·cos θ elsewhere."""
    target = cosine.gather(1, labels[:, None]).clamp(-_COS_CLAMP, _COS_CLAMP)
    theta = torch.acos(target)
    phi = torch.where(theta <= math.pi - margin, torch.cos(theta + margin), target - margin * math.sin(margin))
    logits = cosine.scatter(1, labels[:, None], phi)
    return scale * logits


class ArcFaceLoss(nn.Module):
    def __init__(self, num_classes: int, feature_dim: int, margin: float = 0.15, scale: float = 30.0):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"ArcFace needs at least 2 training classes, got num_classes={num_classes}")
        if not 0.0 <= margin < math.pi / 2:
            raise ConfigError(f"arcface margin={margin} must be in [0, pi/2) radians (DToP: 0.15)")
        if scale <= 0:
            raise ConfigError(f"arcface scale={scale} must be positive (e.g. 30)")
        self.margin, self.scale = float(margin), float(scale)
        self.weight = nn.Parameter(torch.randn(num_classes, feature_dim) / feature_dim**0.5)

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None) -> torch.Tensor:
        """Mean ArcFace loss of the batch; ``ref_emb``/``ref_labels`` are accepted and ignored (the
        class weights play the role of the references)."""
        if labels.min() < 0 or labels.max() >= len(self.weight):
            raise ConfigError(
                f"ArcFace labels must be class rows 0..{len(self.weight) - 1}, got range "
                f"[{int(labels.min())}, {int(labels.max())}]; map dataset labels through RetrievalLoss"
            )
        z = F.normalize(embeddings.float(), dim=-1)
        w = F.normalize(self.weight.float(), dim=-1)
        return F.cross_entropy(arcface_logits(z @ w.T, labels, self.margin, self.scale), labels)

    def extra_repr(self) -> str:
        return f"classes={len(self.weight)}, margin={self.margin}, scale={self.scale}"


@register_pair_loss("arcface", "arcface_margin", "arcface_scale")
def _arcface(feature_dim: int, classes, *, arcface_margin: float, arcface_scale: float):
    """ArcFace (DToP), one proxy per training class, margin m and scale s."""
    return ProxyTerm(ArcFaceLoss(len(classes), feature_dim, arcface_margin, arcface_scale), classes)
