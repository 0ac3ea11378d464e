"""Losses. Each takes ``(embeddings, labels, ref_emb=None, ref_labels=None)``, so a cross-batch
memory plugs in without special cases.

Registries: :data:`PAIR_LOSSES` (batch × batch and batch × memory: contrastive, SNCA, Normalized
Softmax, ArcFace; ``cfg.loss.name`` names one) and :data:`TUPLE_LOSSES` (the forms of the contrastive loss
on SfM-120k tuples; ``cfg.loss.tuple_loss`` names one). A new loss is
one function and one registry line. :class:`RetrievalLoss` adds λ · KoLeo (IRT eq. 5).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from nbsrc.errors import ConfigError
from nbsrc.losses.arcface import ArcFaceLoss
from nbsrc.losses.contrastive import contrastive_loss, contrastive_pair_terms, pair_mask
from nbsrc.losses.koleo import koleo_loss, nearest_neighbor_distance
from nbsrc.losses.memory import CrossBatchMemory
from nbsrc.losses.proxies import NormalizedSoftmaxLoss, snca_loss
from nbsrc.losses.tuples import TUPLE_LOSSES, tuple_contrastive_loss, tuple_loss, tuple_loss_terms

__all__ = [
    "contrastive_loss", "contrastive_pair_terms", "pair_mask", "koleo_loss", "nearest_neighbor_distance",
    "CrossBatchMemory", "NormalizedSoftmaxLoss", "snca_loss", "ArcFaceLoss", "ProxyTerm", "RetrievalLoss",
    "build_loss", "pair_loss", "PAIR_LOSSES", "TUPLE_LOSSES", "tuple_contrastive_loss", "tuple_loss", "tuple_loss_terms",
]


class ProxyTerm(nn.Module):
    """A proxy loss (Normalized Softmax, ArcFace: learnable class weights indexed 0..C-1) on dataset
    labels: each label is mapped to its row in the sorted ``classes`` first; references are unused."""

    def __init__(self, proxy: nn.Module, classes):
        super().__init__()
        self.proxy = proxy
        self.register_buffer("classes", torch.as_tensor(sorted(classes), dtype=torch.long))

    def forward(self, z, labels, ref_emb=None, ref_labels=None, indices=None, ref_indices=None):
        return self.proxy(z, torch.searchsorted(self.classes, labels))


def _contrastive(cfg, feature_dim: int, classes):
    return partial(contrastive_loss, beta=cfg.loss.beta)


def _snca(cfg, feature_dim: int, classes):
    return partial(snca_loss, temperature=cfg.loss.temperature)


def _nsoftmax(cfg, feature_dim: int, classes):
    return ProxyTerm(NormalizedSoftmaxLoss(len(classes), feature_dim, cfg.loss.temperature), classes)


def _arcface(cfg, feature_dim: int, classes):
    return ProxyTerm(ArcFaceLoss(len(classes), feature_dim, cfg.loss.arcface_margin, cfg.loss.arcface_scale), classes)


# name -> builder(cfg, feature_dim, train_classes) -> term(z, labels, ref_emb, ref_labels, indices,
# ref_indices) -> scalar (a function, or a module when it has parameters); ``cfg.loss.name`` picks one.
PAIR_LOSSES: dict[str, Callable] = {
    "contrastive": _contrastive,  # IRT eq. (1), margin beta on negatives
    "snca": _snca,  # Scalable NCA, temperature
    "nsoftmax": _nsoftmax,  # Normalized Softmax, class proxies, temperature
    "arcface": _arcface,  # ArcFace (DToP), margin and scale
}


class RetrievalLoss(nn.Module):
    """A metric-learning term plus λ · KoLeo (IRT eq. 5); returns a dict of its terms.

    ``term(z, labels, ref_emb, ref_labels, indices, ref_indices)`` is the main loss (built from
    :data:`PAIR_LOSSES`); its key in the returned dict is the loss's name ``loss``.
    ``total = main + lam * koleo``.
    """

    def __init__(self, loss: str, term: Callable, lam: float = 0.0):
        super().__init__()
        self.loss, self.term, self.lam = loss, term, lam  # a module term registers as a submodule

    def forward(self, z, labels, ref_emb=None, ref_labels=None, indices=None, ref_indices=None) -> dict:
        main = self.term(z, labels, ref_emb, ref_labels, indices=indices, ref_indices=ref_indices)
        koleo = koleo_loss(z) if self.lam > 0 else main.new_zeros(())
        return {self.loss: main, "koleo": koleo, "total": main + self.lam * koleo}


def pair_loss(name: str) -> Callable:
    """The builder registered as ``name`` in :data:`PAIR_LOSSES`; an unknown name is a one-line error."""
    if name not in PAIR_LOSSES:
        raise ConfigError(f"loss={name!r} is invalid: expected one of {', '.join(sorted(PAIR_LOSSES))}")
    return PAIR_LOSSES[name]


def build_loss(cfg, feature_dim: int, train_classes) -> RetrievalLoss:
    """The pair loss named by ``cfg.loss.name`` (:data:`PAIR_LOSSES`) plus ``cfg.loss.lam`` · KoLeo."""
    return RetrievalLoss(cfg.loss.name, pair_loss(cfg.loss.name)(cfg, feature_dim, sorted(train_classes)), cfg.loss.lam)
