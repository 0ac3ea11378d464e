"""PiT (Heo et al., "Rethinking spatial dimensions of vision transformers", 2021) as a DToP backbone,
for the PiT-B rows of DToP's Table A5.

DToP §A.2: "As global image representation, all models use a [CLS] (classification) token embedding,
while PiT [26] and DeiT [28] also provide a distillation token embedding. As a local image
representation, patch token embeddings can be used for all models"; Table A4 lists PiT among the
models that "can handle multi-scale input at training (required in our experiments)".

timm's PiT (``pit_b_224``, ``pit_b_distilled_224``, ...) is a pooling ViT: a convolutional stem
(14-px kernel, stride 7) whose map gets a learned position map ``[1, C0, 31, 31]`` (at 224 px), then
three stages of encoder blocks, widths 256 / 512 / 1024 for PiT-B (depths 3 / 6 / 4), each stage after
the first opening with a strided depthwise convolution that halves the token grid, and one final
LayerNorm for the last width only. timm runs it at its pretraining size only (``fixed_input_size``).

:class:`PiTTokens` presents it to :class:`~nbsrc.models.dtop.DToPModel` as a ViT of the last stage:

* ``blocks`` are the last stage's blocks, ``norm`` the final norm, ``num_features`` the last width, and
  :meth:`PiTTokens.forward_features` returns the last stage's tokens ``[B, prefix + h*w, D]`` through
  the final norm (prefix: [CLS], then DIST for a distilled PiT, timm's order), ``grid = (h, w)``.
  **Our reading:** the multi-layer features of eqs. (5)–(6) are taken within the last stage, so
  ``k <= 4`` for PiT-B, because eq. (6) mixes token maps of one grid, the final norm exists for the last
  width only, and the supplement says neither which k nor how PiT's stages were brought to N = 768.
* Through :func:`nbsrc.models.build_model` without DToP (IRT's poolings: ``cls``, ``dist``, ``avg``,
  ``max``, ``gem``), the same tokens are pooled as a ViT's are.
* **DPE** (eq. 2) resamples the stem's position map to the stem's output grid for every input
  (bilinear by default; at the native grid the map is added unchanged, so the pretrained network
  computes exactly what timm computes). ``pos_embed='none'`` adds nothing; CPE is not offered (its
  generator sits after a ViT's first block, which PiT's narrower first stage does not share).

The parameters keep timm's names (``patch_embed``, ``pos_embed``, ``cls_token``, ``transformers``,
``norm``), so a timm PiT state dict loads into it as it is.
"""

from __future__ import annotations

import torch
from timm.models.pit import PoolingVisionTransformer
from torch import nn

from nbsrc.errors import ConfigError
from nbsrc.models.position import PE_INTERPOLATIONS, dynamic_position_embedding

PIT_POSITIONS = ("dpe", "none")


class PiTTokens(nn.Module):
    """A timm PiT as the token backbone of DToP (module docstring): images [B, 3, H, W] of any size
    (at least the stem's kernel: 14 px for PiT-B, 16 for PiT-Ti) -> the last stage's normalised tokens
    [B, prefix + h*w, D]."""

    dynamic_img_size = True  # any input size, through DPE
    reg_token = None
    blocks_note = " in its last stage (PiT: the multi-layer features share one width and token grid)"

    def __init__(self, pit: PoolingVisionTransformer):
        super().__init__()
        if not isinstance(pit, PoolingVisionTransformer):
            raise ConfigError(f"PiTTokens wraps a timm PiT (pit_*), got {type(pit).__name__}")
        self.patch_embed, self.pos_embed, self.cls_token = pit.patch_embed, pit.pos_embed, pit.cls_token
        self.pos_drop, self.transformers, self.norm = pit.pos_drop, pit.transformers, pit.norm
        self.num_features = int(pit.num_features)  # the last stage's width (timm's embed_dim)
        self.num_prefix_tokens = int(pit.num_tokens)  # 1, or 2 for a distilled PiT: [CLS], DIST
        self.pretrained_cfg = dict(pit.pretrained_cfg)
        self.position, self.pe_interp = "dpe", "bilinear"
        self.grid: tuple[int, int] | None = None  # the last stage's token grid of the latest forward

    @property
    def blocks(self) -> nn.Sequential:
        """The last stage's encoder blocks (a property, so that their weights keep timm's names only)."""
        return self.transformers[-1].blocks

    @property
    def dist_token(self) -> torch.Tensor | None:
        """The distillation token's embedding (a distilled PiT), else None (as timm's ViT)."""
        return self.cls_token[:, 1:2] if self.num_prefix_tokens > 1 else None

    def set_position(self, kind: str, interp: str = "bilinear") -> None:
        """``kind`` 'dpe' (eq. 2) or 'none'; ``interp`` DPE's interpolation, 'bilinear' or 'bicubic'."""
        if kind not in PIT_POSITIONS:
            raise ConfigError(f"pos_embed={kind!r} is not offered for PiT; use one of {', '.join(PIT_POSITIONS)}")
        if interp not in PE_INTERPOLATIONS:
            raise ConfigError(f"pe_interp={interp!r} is unknown; use one of {', '.join(PE_INTERPOLATIONS)}")
        self.position, self.pe_interp = kind, interp

    def position_map(self, grid: tuple[int, int]) -> torch.Tensor:
        """DPE (eq. 2): the learned position map [1, C0, h0, w0] resampled to ``grid`` (itself at h0 × w0)."""
        c, h0, w0 = self.pos_embed.shape[1:]
        if tuple(grid) == (h0, w0):
            return self.pos_embed
        flat = self.pos_embed.flatten(2).transpose(1, 2)  # [1, h0*w0, C0], DPE's layout with no prefix entry
        flat = dynamic_position_embedding(flat, (h0, w0), tuple(grid), num_prefix=0, mode=self.pe_interp)
        return flat.transpose(1, 2).reshape(1, c, grid[0], grid[1])

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        """The stem's map [B, C0, H0, W0] with the position encoding of :meth:`set_position` (DPE or none)."""
        if self.position == "dpe":
            x = x + self.position_map(x.shape[-2:])
        return self.pos_drop(x)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """The position hook between the stem and the stages (DToP replaces it on the instance)."""
        return self.positions(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.patch_embed.patch_size
        if x.shape[-2] < kernel[0] or x.shape[-1] < kernel[1]:
            raise ConfigError(f"PiT needs images of at least {kernel[0]}x{kernel[1]} px (its stem's kernel); "
                              f"got {x.shape[-2]}x{x.shape[-1]}")
        x = self._pos_embed(self.patch_embed(x))  # [B, C0, H0, W0]
        x, prefix = self.transformers((x, self.cls_token.expand(x.shape[0], -1, -1)))
        self.grid = (int(x.shape[-2]), int(x.shape[-1]))
        return self.norm(torch.cat([prefix, x.flatten(2).transpose(1, 2)], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)
