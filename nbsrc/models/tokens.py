"""The token backbone that DToP (:class:`~nbsrc.models.dtop.DToPModel`) takes: a network that turns images
into tokens ``[B, prefix + h*w, D]`` and says what they are.

A token backbone has timm's ViT attributes ``blocks`` (the encoder blocks whose outputs DToP collects),
``norm``, ``num_features`` (D), ``cls_token``, ``dist_token`` (or None), ``pos_embed``,
``num_prefix_tokens`` ([CLS], DIST, registers), ``dynamic_img_size`` and ``forward_features``, and:

* ``grid``: the token grid ``(h, w)`` of its latest forward;
* ``set_position(kind, interp)``: the position encoding it adds (eq. 2: ``dpe``, ``none``, or whatever
  else it offers), a one-line error for one it does not offer;
* ``positions(x)``: its embedded input with that position encoding, and ``_pos_embed(x)``, the hook its
  forward calls for it (DToP replaces the hook on the instance with its own, which calls ``positions``).

:class:`~nbsrc.models.pit.PiTTokens` is one. timm's ``VisionTransformer`` becomes one in place through
:func:`vit_tokens`, which keeps its parameters and their names, so timm's state dicts load as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from nbsrc.errors import ConfigError
from nbsrc.models.position import PE_INTERPOLATIONS, PE_KINDS, dynamic_position_embedding


def set_position(vit: VisionTransformer, kind: str, interp: str = "bilinear") -> None:
    """A ViT's ``set_position``: ``kind`` one of ``PE_KINDS`` ('cpe' adds nothing here: its generator
    runs after the first block, :class:`~nbsrc.models.position.PositionGenerator`)."""
    if kind not in PE_KINDS:
        raise ConfigError(f"pos_embed={kind!r} is unknown; use one of {', '.join(PE_KINDS)}")
    if interp not in PE_INTERPOLATIONS:
        raise ConfigError(f"pe_interp={interp!r} is unknown; use one of {', '.join(PE_INTERPOLATIONS)}")
    if kind == "dpe" and vit.pos_embed is None:
        raise ConfigError("pos_embed='dpe' needs a ViT with a learned position embedding; use 'none' or 'cpe'")
    vit.position, vit.pe_interp = kind, interp


def positions(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """A ViT's ``positions`` (in place of ``VisionTransformer._pos_embed``): x [B, h, w, D] (timm's
    dynamic-size patch embedding) -> tokens [B, prefix + h*w, D] with the position encoding of
    :func:`set_position`; DPE (eq. 2) resamples the embedding's grid part to (h, w) and keeps its prefix
    entries. Records ``vit.grid = (h, w)``."""
    b, h, w, d = x.shape
    vit.grid = (h, w)
    x = x.reshape(b, h * w, d)
    prefix = [vit.cls_token.expand(b, -1, -1)]
    if getattr(vit, "dist_token", None) is not None:  # distilled DeiT: [CLS], DIST, patches (timm's order)
        prefix.append(vit.dist_token.expand(b, -1, -1))
    if vit.reg_token is not None:
        prefix.append(vit.reg_token.expand(b, -1, -1))
    if vit.position != "dpe":
        return vit.pos_drop(torch.cat(prefix + [x], dim=1))
    n_pos_prefix = 0 if vit.no_embed_class else int(vit.num_prefix_tokens)
    pos = dynamic_position_embedding(vit.pos_embed, vit.patch_embed.grid_size, (h, w), n_pos_prefix, vit.pe_interp)
    if vit.no_embed_class:
        x = torch.cat(prefix + [x + pos], dim=1)
    else:
        x = torch.cat(prefix + [x], dim=1) + pos
    return vit.pos_drop(x)


class BoundToViT:
    """``fn`` with ``vit`` as its first argument: a method of one ViT instance that a deepcopy or a pickle
    carries with the ViT (a ``types.MethodType`` in the instance's dict cannot be unpickled)."""

    def __init__(self, fn: Callable, vit: VisionTransformer):
        self.fn, self.vit = fn, vit

    def __call__(self, *args, **kwargs):
        return self.fn(self.vit, *args, **kwargs)


def vit_tokens(vit: VisionTransformer) -> VisionTransformer:
    """timm's ``vit`` as a token backbone, in place (module docstring): DPE, bilinear, until
    ``set_position`` changes it; its methods are bound to ``vit``, so a copy carries its own."""
    vit.position, vit.pe_interp, vit.grid = "dpe", "bilinear", None
    vit.set_position = BoundToViT(set_position, vit)
    vit.positions = BoundToViT(positions, vit)
    vit._pos_embed = vit.positions
    return vit


def token_backbone(net: nn.Module) -> nn.Module:
    """``net`` as a token backbone: itself when it is one, timm's ViT through :func:`vit_tokens`, else a
    one-line error."""
    if callable(getattr(net, "positions", None)) and callable(getattr(net, "set_position", None)):
        return net
    if isinstance(net, VisionTransformer):
        return vit_tokens(net)
    raise ConfigError(
        f"DToP needs a timm VisionTransformer (vit_*, deit_*, hybrid vit_*_r*) or PiT (pit_*), "
        f"got {type(net).__name__}"
    )
