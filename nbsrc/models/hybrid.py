"""``effnet_lite0_vit``: the ImageNet-pretrained EfficientNet-Lite0 stem and first five stages of timm's
``tf_efficientnet_lite0`` (stride 16, 112 channels) feeding a ViT-Ti encoder through timm's
``HybridEmbed`` with 1×1 patches. ``weights='efficientnet_lite0'`` loads the CNN part's real weights
offline; the encoder starts random. One of nbsrc's own backbones (:data:`nbsrc.models.backbones.OWN_BACKBONES`),
for the plain model and for DToP alike.
"""

from __future__ import annotations

from functools import partial

import timm
from timm.layers import HybridEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from nbsrc.errors import ConfigError
from nbsrc.models.weights import load_efficientnet_lite0

EFFNET_LITE0_VIT = "effnet_lite0_vit"
EFFNET_LITE0_STAGES = 5  # conv_stem + blocks[:5] of tf_efficientnet_lite0: stride 16, 112 channels


def create_effnet_lite0_vit(
    img_size: int | None = None,
    weights: str = "none",
    encoder: str = "vit_tiny_patch16_224",
    patch_size: int | None = None,
    **vit_kwargs,
) -> VisionTransformer:
    """EfficientNet-Lite0 (stem + first five stages, stride 16) -> timm ``HybridEmbed`` (1×1
    patches) -> the ViT encoder of timm's ``encoder`` (random init). ``weights='efficientnet_lite0'``
    loads the ImageNet weights of the CNN part; 'none' leaves everything random. The patches are
    the 1×1 cells of the CNN's map, so ``patch_size`` must be None (or 1)."""
    if patch_size not in (None, 1):
        raise ConfigError(
            f"backbone={EFFNET_LITE0_VIT!r} takes the CNN's stride-16 map as 1x1 patches; use patch_size=None"
        )
    if weights not in ("none", "efficientnet_lite0"):
        raise ConfigError(
            f"backbone={EFFNET_LITE0_VIT!r} takes weights='efficientnet_lite0' (the CNN stem's ImageNet "
            f"weights) or 'none', not {weights!r}"
        )
    cnn = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    if weights == "efficientnet_lite0":
        load_efficientnet_lite0(cnn)
    stem = nn.Sequential(cnn.conv_stem, cnn.bn1, *cnn.blocks[:EFFNET_LITE0_STAGES])
    kwargs = dict(num_classes=0, patch_size=1, embed_layer=partial(HybridEmbed, backbone=stem), **vit_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    net = timm.create_model(encoder, pretrained=False, **kwargs)
    net.pretrained_cfg = {**net.pretrained_cfg, "mean": cnn.pretrained_cfg["mean"], "std": cnn.pretrained_cfg["std"]}
    return net
