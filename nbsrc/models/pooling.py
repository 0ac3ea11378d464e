"""Global descriptors from a backbone's tokens (IRT §3.1, Tables 7 and 9), and the pooling registry.

Input is a token sequence ``x`` of shape ``[B, T, C]`` whose first ``num_prefix`` tokens are the
[CLS] (and, for distilled DeiT, the distillation) token; a convnet's ``[B, C, H, W]`` map is
flattened to ``[B, H*W, C]`` with ``num_prefix = 0``. A pooling with ``spatial = True`` (R-MAC)
takes the convnet's map ``[B, C, H, W]`` itself, since its regions need the grid.

* ``cls``:  x[:, 0]
* ``dist``: x[:, 1], the distillation token of DeiT†
* ``avg``:  mean over patch tokens
* ``max``:  max over patch tokens
* ``gem``:  generalized mean, (1/T Σ_t max(x_t, ε)^p)^(1/p), p = 3 (optionally learnable).
  Transformer tokens can be negative, so they are clamped at ε = 1e-6 (our reading), as GeM requires.
* ``rmac``: regional maximum activations of convolutions (Tolias et al. 2016; IRT Table 7's "R-MAC"
  rows of R50 and R101), :class:`RMAC`.

:data:`POOLINGS` maps each name to its builder; ``cfg.model.pooling`` and ``build_model(pooling=...)`` pick
one, so a new pooling is one function and one line there.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nbsrc.errors import ConfigError


class TokenPooling(nn.Module):
    def __init__(self, kind: str, num_prefix: int, has_dist: bool = False, p: float = 3.0,
                 learnable_p: bool = False, eps: float = 1e-6):
        super().__init__()
        if kind in ("cls", "dist") and num_prefix == 0:
            raise ConfigError(
                f"pooling={kind!r} needs a transformer with a [CLS] token; this backbone has none, "
                "use pooling='avg', 'max' or 'gem'"
            )
        if kind == "dist" and not has_dist:
            raise ConfigError(
                "pooling='dist' needs a distilled DeiT (e.g. deit_small_distilled_patch16_224); "
                "use pooling='cls' for this backbone"
            )
        if kind not in ("cls", "dist", "avg", "max", "gem"):
            raise ConfigError(f"pooling={kind!r} is unknown to TokenPooling; use cls, dist, avg, max or gem")
        self.kind, self.num_prefix, self.eps = kind, num_prefix, eps
        p_tensor = torch.tensor(float(p))
        if kind == "gem" and learnable_p:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "cls":
            return x[:, 0]
        if self.kind == "dist":
            return x[:, 1]
        patches = x[:, self.num_prefix:]
        if self.kind == "avg":
            return patches.mean(1)
        if self.kind == "max":
            return patches.amax(1)
        p = self.p.to(patches.dtype)
        return patches.clamp(min=self.eps).pow(p).mean(1).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, num_prefix={self.num_prefix}"


def rmac_regions(height: int, width: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int]]:
    """The square regions ``(top, left, side)`` of R-MAC on an ``height × width`` map.

    Tolias et al. (2016), §3: "We sample square regions at L different scales. At the largest scale
    (l = 1), the region size is determined to be as large as possible, i.e., its height and width are
    both equal to min(W, H). The regions are sampled uniformly such that the overlap between
    consecutive regions is as close as possible to 40%. ... we uniformly sample l × (l + m − 1)
    regions at each scale l, where m is the number of regions at scale 1."

    Our reading is the grid of cirtorch (``cirtorch.layers.functional.rmac``, the code IRT §4.2 built on),
    derived here from that text: with ``w = min(H, W)``, the number of extra regions ``m − 1`` along the
    long side is the ``s − 1`` (s = 2..7 regions) whose overlap ``1 − b/w``, ``b = (max(H, W) − w)/(s − 1)``,
    is closest to 40 % (0 for a square map). At scale ``l`` the side is ``⌊2w/(l + 1)⌋``; along a
    dimension of length ``D`` with ``n`` regions the step is ``(D − side)/(n − 1)`` and the starts are
    ``⌊c + i·step⌋ − c`` with ``c = ⌊side/2 − 1⌋``, computed in float32 as cirtorch does (so that its
    roundings, which move a region by one cell on a few map sizes, are the same here).
    """
    if height < 1 or width < 1 or levels < 1:
        raise ConfigError(f"R-MAC needs a non-empty map and levels >= 1, got {height}x{width}, levels={levels}")
    w = min(height, width)
    extra_h = extra_w = 0
    if height != width:  # in float32 as cirtorch, whose rounding breaks the exact ties (e.g. 3 × 11)
        steps = torch.arange(2, 8, dtype=torch.float32)
        b = (max(height, width) - w) / (steps - 1)
        extra = int(torch.argmin(((w ** 2 - w * b) / w ** 2 - overlap).abs())) + 1
        extra_h, extra_w = (extra, 0) if height > width else (0, extra)
    regions = []
    for level in range(1, levels + 1):
        side = math.floor(2 * w / (level + 1))
        if side == 0:
            continue
        half = math.floor(side / 2 - 1)

        def starts(length: int, n: int, side: int = side, half: int = half) -> list[int]:
            step = 0.0 if n == 1 else (length - side) / (n - 1)
            return [int(v) - half for v in (half + torch.arange(n, dtype=torch.float32) * step).floor()]  # float32

        regions += [(top, left, side) for top in starts(height, level + extra_h)
                    for left in starts(width, level + extra_w)]
    return regions


class RMAC(nn.Module):
    """R-MAC of a convnet map ``[B, C, H, W]`` -> ``[B, C]``.

    Tolias et al. (2016), eq. (1)–(2): f_R = [max_{p∈R} x_{p,c}]_c per region R (MAC of the region);
    "the regional feature vectors are l2-normalized ... then sum-aggregated ... and finally
    l2-normalized": R-MAC = Σ_R f_R / ‖f_R‖, followed by the model's l2.

    Our reading, as cirtorch (``--pool rmac``, the code IRT §4.2 built on): the regions of
    :func:`rmac_regions` with ``levels = 3``, plus the whole map's MAC as one more term; no
    per-region PCA-whitening (Tolias's optional step, which cirtorch leaves out). The sum is returned
    unnormalised; :class:`~nbsrc.models.RetrievalModel` l2-normalises it as every descriptor.
    """

    spatial = True  # takes the map [B, C, H, W], not tokens

    def __init__(self, levels: int = 3, eps: float = 1e-6):
        super().__init__()
        self.levels, self.eps = levels, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ConfigError(f"R-MAC pools a convnet map [B, C, H, W]; got a tensor of shape {tuple(x.shape)}")
        out = F.normalize(x.amax((2, 3)), dim=1, eps=self.eps)
        for top, left, side in rmac_regions(x.shape[2], x.shape[3], self.levels):
            region = x[:, :, top:top + side, left:left + side].amax((2, 3))
            out = out + F.normalize(region, dim=1, eps=self.eps)
        return out

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


def _token(kind: str) -> Callable[..., nn.Module]:
    def build(num_prefix: int, has_dist: bool, p: float, learnable_p: bool) -> nn.Module:
        return TokenPooling(kind, num_prefix, has_dist, p, learnable_p)
    return build


def _rmac(num_prefix: int, has_dist: bool, p: float, learnable_p: bool) -> nn.Module:
    if num_prefix:
        raise ConfigError("pooling='rmac' pools a convnet's spatial map (IRT Table 7: R50, R101); this backbone is "
                          "a transformer, use pooling='cls', 'avg', 'max' or 'gem'")
    return RMAC()


# name -> builder(num_prefix, has_dist, p, learnable_p) -> module; the module maps tokens [B, T, C]
# (or, when it has ``spatial = True``, a convnet map [B, C, H, W]) to descriptors [B, C].
POOLINGS: dict[str, Callable[..., nn.Module]] = {
    "cls": _token("cls"),  # the [CLS] token (IRT §3.2)
    "dist": _token("dist"),  # DeiT†'s distillation token
    "avg": _token("avg"),  # mean of the patch tokens (Table 9)
    "max": _token("max"),  # max of the patch tokens (Table 9)
    "gem": _token("gem"),  # GeM, p = 3 (Table 9, §4.2)
    "rmac": _rmac,  # R-MAC of a convnet map (Table 7)
}


def build_pooling(name: str, num_prefix: int, has_dist: bool = False, p: float = 3.0,
                  learnable_p: bool = False) -> nn.Module:
    """The pooling registered as ``name`` in :data:`POOLINGS`; an unknown name is a one-line error."""
    if name not in POOLINGS:
        raise ConfigError(f"pooling={name!r} is invalid: expected one of {', '.join(POOLINGS)} "
                          "(nbsrc.models.pooling.POOLINGS)")
    return POOLINGS[name](num_prefix, has_dist, p, learnable_p)
