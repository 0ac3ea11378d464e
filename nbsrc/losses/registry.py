"""The pair losses by name: :data:`PAIR_LOSSES`, filled by :func:`register_pair_loss` in each loss's module.

A loss and its hyperparameters travel together: the module that defines a loss registers a builder
``fn(feature_dim, classes, **hyperparameters) -> term`` under the name ``cfg.loss.name`` gives, and
declares the hyperparameters it reads, each with its default, help and paper value. The config reads
them by name (``toy_scale=2.0``, ``--toy-scale 2``, ``cfg.value("toy_scale")``), checks them, and the
builder receives them as keyword arguments::

    @register_pair_loss("toy", toy_scale=loss_hyperparameter(1.0, "scale s of the toy loss", check=positive))
    def _toy(feature_dim, classes, *, toy_scale):
        return partial(toy_loss, scale=toy_scale)

The losses of the papers read the fields of :class:`~nbsrc.config.LossConfig` that saved runs hold
(``beta``, ``temperature``, ``arcface_margin``, ``arcface_scale``), named as positional arguments:
``@register_pair_loss("contrastive", "beta")``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nbsrc.config import LOSS_HYPERPARAMETERS, SECTIONS, LossConfig, LossHyperparameter, config_fields
from nbsrc.errors import ConfigError

# name -> builder(cfg, feature_dim, train_classes) -> term(z, labels, ref_emb, ref_labels, indices,
# ref_indices) -> scalar (a function, or a module when it has parameters); ``cfg.loss.name`` picks one.
# A builder's ``hyperparameters`` are the names it reads from the loss section.
PAIR_LOSSES: dict[str, Callable] = {}


def loss_hyperparameter(default: Any, help: str, *, paper: Any = None,
                        check: Callable[[Any], str | None] | None = None) -> LossHyperparameter:
    """A hyperparameter's declaration for :func:`register_pair_loss`: ``default``, ``help``, the
    ``paper``'s value where the default is another, and ``check(value)``: None when valid, else what
    was expected."""
    return LossHyperparameter("", default, help, paper, check)


def positive(value: Any) -> str | None:
    """A ``check`` of :func:`loss_hyperparameter`: a number > 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return None if ok else "a positive number"


def register_pair_loss(name: str, *fields: str, **hyperparameters: LossHyperparameter) -> Callable:
    """Register ``fn(feature_dim, classes, **hyperparameters) -> term`` as the pair loss ``name``.

    ``fields``: the :class:`~nbsrc.config.LossConfig` fields the loss reads (``"beta"``);
    ``hyperparameters``: those the loss declares itself (:func:`loss_hyperparameter`), held in
    ``loss.hyperparameters`` and given by name like a field. Both reach ``fn`` as keyword arguments.
    A name already registered, a field that is not the loss section's, or a hyperparameter named like a
    config field is an error at import."""
    own = {f.name for f in dataclasses.fields(LossConfig)}
    taken = {f.name for f in config_fields()} | set(SECTIONS)
    if name in PAIR_LOSSES:
        raise ConfigError(f"pair loss {name!r} is registered twice; give the new loss another name")
    for field in fields:
        if field not in own:
            raise ConfigError(f"register_pair_loss({name!r}): {field!r} is not a field of the loss section; "
                              "declare it as a keyword, name=loss_hyperparameter(default, help)")
    for key, h in hyperparameters.items():
        if key in taken:
            raise ConfigError(f"register_pair_loss({name!r}): hyperparameter {key!r} is named like a config field; "
                              "name it after the loss (e.g. 'toy_scale')")
        held = LOSS_HYPERPARAMETERS.get(key)
        if held is not None and (held.default, held.help) != (h.default, h.help):
            raise ConfigError(f"register_pair_loss({name!r}): hyperparameter {key!r} is declared by loss "
                              f"{', '.join(sorted(held.losses))} with another default or help; share its declaration")
    names = (*fields, *hyperparameters)

    def register(fn: Callable) -> Callable:
        for key, h in hyperparameters.items():
            held = LOSS_HYPERPARAMETERS.get(key)
            LOSS_HYPERPARAMETERS[key] = dataclasses.replace(
                h, name=key, losses=(held.losses if held else frozenset()) | {name})

        def build(cfg, feature_dim: int, classes):
            return fn(feature_dim, classes, **{k: cfg.loss.hyperparameter(k) for k in names})

        build.__name__, build.__doc__, build.hyperparameters = fn.__name__, fn.__doc__, names
        PAIR_LOSSES[name] = build
        return fn

    return register


def pair_loss(name: str) -> Callable:
    """The builder registered as ``name`` in :data:`PAIR_LOSSES`; an unknown name is a one-line error."""
    if name not in PAIR_LOSSES:
        raise ConfigError(f"loss={name!r} is invalid: expected one of {', '.join(sorted(PAIR_LOSSES))}")
    return PAIR_LOSSES[name]


class ProxyTerm(nn.Module):
    """A proxy loss (Normalized Softmax, ArcFace: learnable class weights indexed 0..C-1) on dataset
    labels: each label is mapped to its row in the sorted ``classes`` first; references are unused."""

    def __init__(self, proxy: nn.Module, classes):
        super().__init__()
        self.proxy = proxy
        self.register_buffer("classes", torch.as_tensor(sorted(classes), dtype=torch.long))

    def forward(self, z, labels, ref_emb=None, ref_labels=None, indices=None, ref_indices=None):
        return self.proxy(z, torch.searchsorted(self.classes, labels))
