"""Position encodings for DToP (Table A9): dynamic position embedding (DPE, eq. 2), none, and the
conditional position encoding (CPE) of CPVT (Chu et al., 2021).

* **DPE** (DToP eq. 2). The learned embedding ``E_pos`` of a ViT is defined on its native patch
  grid ``h0 × w0``. For an input whose patch grid is ``h × w`` the grid part is resampled on every
  forward pass::

      E_pos(h, w) = [E_prefix ; interp(E_grid, h0 × w0 → h × w)]

  with ``interp`` bilinear (default) or bicubic (``align_corners=False``); the prefix ([CLS])
  entries are kept as they are. At the native grid the embedding is returned unchanged (the very
  same tensor), so a pretrained ViT computes exactly what it computed before.
* **none**: no position information is added (the ViT is then permutation-equivariant over
  patches).
* **CPE**: a position encoding generator (PEG) ``x ← x + DWConv3×3(x)`` applied to the patch
  tokens, folded to their ``h × w`` grid, after the first encoder block (CPVT's best position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PE_KINDS = ("dpe", "none", "cpe")
PE_INTERPOLATIONS = ("bilinear", "bicubic")


def dynamic_position_embedding(
    pos_embed: torch.Tensor,
    native_grid: tuple[int, int],
    grid: tuple[int, int],
    num_prefix: int = 1,
    mode: str = "bilinear",
) -> torch.Tensor:
    """DPE, DToP eq. (2): ``pos_embed`` [1, num_prefix + h0*w0, C] resampled to ``grid`` (h, w).

    Returns ``pos_embed`` itself when ``grid == native_grid`` (bit-exact identity); otherwise
    ``[1, num_prefix + h*w, C]``, the grid part interpolated with ``mode`` and the prefix part
    unchanged. ``num_prefix`` is the number of prefix entries *in the embedding* (0 for
    ``no_embed_class`` ViTs such as DeiT-III).
    """
    native_grid, grid = tuple(native_grid), tuple(grid)
    if grid == native_grid:
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    h0, w0 = native_grid
    c = patches.shape[-1]
    patches = patches.reshape(1, h0, w0, c).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=grid, mode=mode, align_corners=False).to(pos_embed.dtype)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], c)
    return torch.cat([prefix, patches], dim=1)


class PositionGenerator(nn.Module):
    """CPVT's PEG: patch tokens [B, h*w, C] -> tokens + DWConv3×3(tokens folded to h × w)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, c = tokens.shape
        fmap = tokens.transpose(1, 2).reshape(b, c, grid[0], grid[1])
        return tokens + self.conv(fmap).flatten(2).transpose(1, 2)
