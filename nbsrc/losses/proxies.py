"""Classification-style objectives compared with the contrastive loss in IRT Table 4.

* Normalized Softmax (Zhai & Wu, 2019): class proxies w_c (unit norm), temperature τ::

      L = −1/N Σ_i log( exp(z_iᵀ w_{y_i} / τ) / Σ_c exp(z_iᵀ w_c / τ) )

* Linear cross-entropy (a classifier head, as DeiT's supervised pretraining has): a linear layer W, b
  on the embedding scaled to the size of a LayerNorm output, √D · z (our reading: the head of a timm
  ViT sees the LayerNorm'd token, whose coordinates have unit variance; z here is unit-norm)::

      L = −1/N Σ_i log softmax(W √D z_i + b)_{y_i}

* Scalable Neighborhood Component Analysis (Wu et al., 2018), computed against the other batch
  samples (and the memory, when given) as neighbours::

      L = −1/N Σ_i log( Σ_{j ≠ i, y_j = y_i} exp(s_ij / τ) / Σ_{j ≠ i} exp(s_ij / τ) )

  Samples with no positive neighbour are left out of the mean.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from nbsrc.losses.contrastive import upcast
from nbsrc.losses.registry import ProxyTerm, register_pair_loss


class NormalizedSoftmaxLoss(nn.Module):
    def __init__(self, num_classes: int, feature_dim: int, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature
        self.weight = nn.Parameter(torch.randn(num_classes, feature_dim) / feature_dim**0.5)

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """``labels`` are class rows 0..C-1 (see :class:`~nbsrc.losses.RetrievalLoss`)."""
        z = F.normalize(upcast(embeddings), dim=-1)
        w = F.normalize(upcast(self.weight), dim=-1)
        return F.cross_entropy(z @ w.T / self.temperature, labels)


class LinearCrossEntropyLoss(nn.Module):
    """Cross-entropy of a linear classifier over ``num_classes`` on √D · z (module docstring); W and b
    start as ``nn.Linear``'s (uniform ±1/√D), so the first logits are near 0 and the loss near ln C."""

    def __init__(self, num_classes: int, feature_dim: int):
        super().__init__()
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """``labels`` are class rows 0..C-1 (see :class:`~nbsrc.losses.RetrievalLoss`)."""
        z = F.normalize(upcast(embeddings), dim=-1) * embeddings.shape[-1] ** 0.5
        return F.cross_entropy(F.linear(z, upcast(self.head.weight), upcast(self.head.bias)), labels)


def snca_loss(embeddings, labels, ref_emb=None, ref_labels=None, temperature: float = 0.05, indices=None,
              ref_indices=None):
    z = F.normalize(upcast(embeddings), dim=-1)
    sim, pos = z @ z.T, labels[:, None] == labels[None, :]
    valid = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    if ref_emb is not None and len(ref_emb):
        r = F.normalize(upcast(ref_emb), dim=-1)
        sim = torch.cat([sim, z @ r.T], 1)
        pos = torch.cat([pos, labels[:, None] == ref_labels[None, :]], 1)
        v = torch.ones(len(z), len(r), dtype=torch.bool, device=z.device)
        if indices is not None and ref_indices is not None:
            v = indices[:, None] != ref_indices[None, :]
        valid = torch.cat([valid, v], 1)
    logits = (sim / temperature).masked_fill(~valid, -float("inf"))
    log_all = torch.logsumexp(logits, 1)
    log_pos = torch.logsumexp(logits.masked_fill(~pos, -float("inf")), 1)
    has_pos = (pos & valid).any(1)
    return (log_all - log_pos)[has_pos].mean()


@register_pair_loss("snca", "temperature")
def _snca(feature_dim: int, classes, *, temperature: float):
    """Scalable NCA over the batch (and the memory), temperature τ."""
    return partial(snca_loss, temperature=temperature)


@register_pair_loss("nsoftmax", "temperature")
def _nsoftmax(feature_dim: int, classes, *, temperature: float):
    """Normalized Softmax, one proxy per training class, temperature τ."""
    return ProxyTerm(NormalizedSoftmaxLoss(len(classes), feature_dim, temperature), classes)


@register_pair_loss("linear_ce")
def _linear_ce(feature_dim: int, classes):
    """A linear classifier head with cross-entropy (supervised pretraining)."""
    return ProxyTerm(LinearCrossEntropyLoss(len(classes), feature_dim), classes)
