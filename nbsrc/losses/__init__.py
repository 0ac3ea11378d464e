"""Losses. Each takes ``(embeddings, labels, ref_emb=None, ref_labels=None)``, so a cross-batch
memory plugs in without special cases.

Registries: :data:`PAIR_LOSSES` (batch × batch and batch × memory: contrastive, SNCA, Normalized
Softmax, ArcFace, a linear head, feature distillation; ``cfg.loss.name`` names one) and
:data:`TUPLE_LOSSES` (the forms of the contrastive loss on SfM-120k tuples; ``cfg.loss.tuple_loss``
names one). A pair loss is registered, with the hyperparameters it reads, by
:func:`register_pair_loss` in its own module (:mod:`nbsrc.losses.registry`), which this package
imports. :class:`RetrievalLoss` adds λ · KoLeo (IRT eq. 5).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from nbsrc.errors import RunDirError
from nbsrc.losses.arcface import ArcFaceLoss
from nbsrc.losses.contrastive import contrastive_loss, contrastive_pair_terms, pair_mask
from nbsrc.losses.distill import FeatureDistillation
from nbsrc.losses.koleo import koleo_loss, nearest_neighbor_distance
from nbsrc.losses.memory import CrossBatchMemory
from nbsrc.losses.proxies import LinearCrossEntropyLoss, NormalizedSoftmaxLoss, snca_loss
from nbsrc.losses.registry import (
    PAIR_LOSSES,
    ProxyTerm,
    loss_hyperparameter,
    pair_loss,
    positive,
    register_pair_loss,
)
from nbsrc.losses.tuples import TUPLE_LOSSES, tuple_contrastive_loss, tuple_loss, tuple_loss_terms

__all__ = [
    "contrastive_loss", "contrastive_pair_terms", "pair_mask", "koleo_loss", "nearest_neighbor_distance",
    "CrossBatchMemory", "FeatureDistillation",
    "NormalizedSoftmaxLoss", "LinearCrossEntropyLoss", "snca_loss", "ArcFaceLoss", "ProxyTerm",
    "RetrievalLoss", "build_loss", "pair_loss", "PAIR_LOSSES", "register_pair_loss", "loss_hyperparameter",
    "positive", "TUPLE_LOSSES", "tuple_contrastive_loss", "tuple_loss", "tuple_loss_terms",
]


class RetrievalLoss(nn.Module):
    """A metric-learning term plus λ · KoLeo (IRT eq. 5); returns a dict of its terms.

    ``term(z, labels, ref_emb, ref_labels, indices, ref_indices)`` is the main loss (built from
    :data:`PAIR_LOSSES`); its key in the returned dict is the loss's name ``loss``.
    ``total = main + lam * koleo``.
    """

    def __init__(self, loss: str, term: Callable, lam: float = 0.0):
        super().__init__()
        self.loss, self.term, self.lam = loss, term, lam  # a module term registers as a submodule

    def forward(self, z, labels, ref_emb=None, ref_labels=None, indices=None, ref_indices=None,
                targets=None) -> dict:
        extra = {} if targets is None else {"targets": targets}  # a distillation term's teacher features
        main = self.term(z, labels, ref_emb, ref_labels, indices=indices, ref_indices=ref_indices, **extra)
        koleo = koleo_loss(z) if self.lam > 0 else main.new_zeros(())
        return {self.loss: main, "koleo": koleo, "total": main + self.lam * koleo}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, also for a checkpoint written before the loss registry
        (:func:`current_criterion_state` maps its keys); a state of another loss is a one-line
        :class:`~nbsrc.errors.RunDirError` naming the keys that do not fit."""
        own = self.state_dict()
        state = current_criterion_state(state_dict, own)
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise RunDirError(
                f"the checkpoint's loss state does not fit loss {self.loss!r} (missing: "
                f"{', '.join(missing) or 'none'}; "
                f"unexpected: {', '.join(unexpected) or 'none'}): it was written for another loss or by another "
                "version of nbsrc; restart the run with --overwrite (mode='overwrite')")
        for key, value in state.items():
            if key in own and tuple(value.shape) != tuple(own[key].shape):
                raise RunDirError(
                    f"the checkpoint's loss state {key} has shape {tuple(value.shape)}, loss {self.loss!r} "
                    f"expects {tuple(own[key].shape)} (another number of training classes or embedding size); "
                    "restart the run with --overwrite (mode='overwrite')")
        return super().load_state_dict(state, strict, assign)


# The criterion's state-dict keys of older checkpoints, mapped to today's: such a checkpoint holds the sorted
# training classes as "classes" (for every loss, used only by the proxy losses) and a proxy loss's
# parameters (Normalized Softmax, ArcFace) under "proxy_loss."; today a proxy loss's ProxyTerm holds both
# ("term.classes", "term.proxy.*") and a loss without parameters (contrastive, SNCA) has no state.
LEGACY_CRITERION_PREFIXES = {"proxy_loss.": "term.proxy."}


def current_criterion_state(state: dict, current: dict) -> dict:
    """``state`` (a criterion's saved state dict) in today's keys, given ``current``, the state dict of
    the criterion it is loaded into: an old checkpoint's ``proxy_loss.*`` become ``term.proxy.*`` and its
    ``classes`` become ``term.classes``, or are dropped when the loss keeps no classes (contrastive,
    SNCA: the old buffer was unused). A state already in today's keys is returned as it is."""
    if "classes" not in state and not any(k.startswith(tuple(LEGACY_CRITERION_PREFIXES)) for k in state):
        return state
    out = {}
    for key, value in state.items():
        old = next((p for p in LEGACY_CRITERION_PREFIXES if key.startswith(p)), None)
        if old is not None:
            out[LEGACY_CRITERION_PREFIXES[old] + key[len(old):]] = value
        elif key == "classes":
            if "term.classes" in current:
                out["term.classes"] = value
        else:
            out[key] = value
    return out


def build_loss(cfg, feature_dim: int, train_classes) -> RetrievalLoss:
    """The pair loss named by ``cfg.loss.name`` (:data:`PAIR_LOSSES`) plus ``cfg.loss.lam`` · KoLeo."""
    return RetrievalLoss(cfg.loss.name, pair_loss(cfg.loss.name)(cfg, feature_dim, sorted(train_classes)), cfg.loss.lam)
