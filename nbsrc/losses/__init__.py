"""Losses. Each takes ``(embeddings, labels, ref_emb=None, ref_labels=None)``, so a cross-batch
memory plugs in without special cases.

:class:`IRTLoss` is the objective of IRT: contrastive (eq. 1) + λ · KoLeo (eq. 5).
"""

from __future__ import annotations

import torch
from torch import nn

from nbsrc.losses.contrastive import contrastive_loss, contrastive_pair_terms, pair_mask
from nbsrc.losses.koleo import koleo_loss, nearest_neighbor_distance
from nbsrc.losses.memory import CrossBatchMemory
from nbsrc.losses.proxies import NormalizedSoftmaxLoss, snca_loss

__all__ = [
    "contrastive_loss", "contrastive_pair_terms", "pair_mask", "koleo_loss", "nearest_neighbor_distance",
    "CrossBatchMemory", "NormalizedSoftmaxLoss", "snca_loss", "RetrievalLoss", "build_loss",
]


class RetrievalLoss(nn.Module):
    """The metric-learning objective plus λ · KoLeo; returns a dict of its terms.

    ``loss`` is ``contrastive`` (IRT eq. 1), ``snca``, ``nsoftmax`` or ``arcface``; the key of the
    main term in the returned dict is always ``"contrastive"`` for the contrastive loss and the
    loss's own name otherwise. ``total = main + lam * koleo``.
    """

    def __init__(self, loss: str = "contrastive", beta: float = 0.5, lam: float = 0.0, temperature: float = 0.05,
                 proxy_loss: nn.Module | None = None, classes=None):
        super().__init__()
        self.loss, self.beta, self.lam, self.temperature = loss, beta, lam, temperature
        self.proxy_loss = proxy_loss  # NSoftmax / ArcFace: has learnable class weights
        # Proxy losses index their class weights 0..C-1; dataset labels are mapped through this.
        self.register_buffer("classes", torch.as_tensor(sorted(classes) if classes is not None else [], dtype=torch.long))

    def forward(self, z, labels, ref_emb=None, ref_labels=None, indices=None, ref_indices=None) -> dict:
        if self.loss == "contrastive":
            main = contrastive_loss(z, labels, ref_emb, ref_labels, self.beta, indices, ref_indices)
        elif self.loss == "snca":
            main = snca_loss(z, labels, ref_emb, ref_labels, self.temperature, indices, ref_indices)
        else:
            main = self.proxy_loss(z, torch.searchsorted(self.classes, labels))
        koleo = koleo_loss(z) if self.lam > 0 else main.new_zeros(())
        return {self.loss: main, "koleo": koleo, "total": main + self.lam * koleo}


def build_loss(cfg, embedding_dim: int, train_classes) -> RetrievalLoss:
    """The loss named by an :class:`~nbsrc.config.ExperimentConfig`."""
    proxy = None
    if cfg.loss == "nsoftmax":
        proxy = NormalizedSoftmaxLoss(len(train_classes), embedding_dim, cfg.temperature)
    elif cfg.loss == "arcface":
        from nbsrc.losses.arcface import ArcFaceLoss

        proxy = ArcFaceLoss(len(train_classes), embedding_dim, cfg.arcface_margin, cfg.arcface_scale)
    return RetrievalLoss(cfg.loss, cfg.beta, cfg.lam, cfg.temperature, proxy, train_classes)
