"""DToP's enhanced locality module (ELM, eqs. 9–11) and the fusions of its input and output
(Table A13, eqs. A14–A20).

The supplement names the parts and their sources, not their sizes: "IRB: inverted residual block
[55]; ASPP: à trous spatial pyramid pooling [7]; WB: WaveBlock [63]" (Table A10), and it bounds
their size: "The additional components of DToP have only 0.3M parameters" (§A.1). The main paper's
eqs. (9)–(11) are not in ``../shared/papers/``; the supplement refers to them as "U = ELM(Y)",
fused with its input Y in (9) (§A.4), "we set Y' = Y in (9)" without the ELM (§A.2).

The patch tokens of the local branch, folded back to their ``h × w`` grid, form the map ``Y``
[B, C, h, w]. The ELM applies, in this order, each part that is switched on (Table A10)::

    U = Wave(ASPP(IRB(Y)))                                                    (eqs. 9–11)

The order is our reading. At C = 768 one dense 1×1 convolution (C → C) already has 0.59M
parameters, twice the budget, so every convolution here is depthwise or grouped (our reading, as
MobileNetV2's depthwise and ShuffleNet's grouped pointwise convolutions are; ``groups`` =
gcd(C, 32), 32 groups of 24 channels at C = 768):

* **IRB**, MobileNetV2's inverted residual block with grouped pointwise convolutions:
  ``IRB(Y) = Y + BN(W_proj · shuffle(GELU(BN(DWConv3×3(GELU(BN(W_exp · Y)))))))``, with grouped
  1×1 convolutions ``W_exp`` (C → 2C) and ``W_proj`` (2C → C) and ShuffleNet's channel shuffle
  between them, so that the projection mixes the expansion's groups. 95,232 parameters at C = 768.
* **ASPP**, à trous spatial pyramid pooling (DeepLabv3) with depthwise branches: a depthwise 1×1
  convolution, depthwise 3×3 convolutions with dilation 6, 12 and 18, and image pooling (global
  average -> depthwise 1×1 convolution -> broadcast), each keeping C channels; the five maps are
  interleaved per channel and fused by a grouped 1×1 convolution (5C → C). 122,880 parameters at
  C = 768.
* **WaveBlock** (Wang et al., 2021, "Attentive WaveBlock"): during training a random horizontal
  band of ``round(0.3 h)`` rows is kept and every other row is multiplied by 1.5; at evaluation it
  is the identity. No parameters.

Widths and hyper-parameters where the paper gives none are our choices: IRB expansion 2, 32
groups, ASPP rates (6, 12, 18), WaveBlock band 0.3 and factor 1.5, GELU activations. The whole ELM
has 218,112 parameters at C = 768 (``tests/test_dtop.py`` counts them).

Fusion of ``Y`` and ``U``, per token ``y, u ∈ R^C`` (Table A13, in the table's order):

    none, ELM off   z = y                                                     (A14)
    none, ELM on    z = u                                                     (A15)
    sum             z = y + u                                                 (A16)
    hadamard        z = y ⊙ u                                                 (A17)
    concat          z = [y; u]                                                (A18)
    fast_norm       z = (w_1 y + w_2 u) / (ε + w_1 + w_2),  w_i = ReLU(ŵ_i)   (A19)
    orthogonal      z = [y − proj_u(y); u],  proj_u(y) = ⟨y,u⟩/⟨u,u⟩ · u      (A20)

``fast_norm`` is EfficientDet's fast normalised fusion (learnable ŵ, initialised to 1, ε = 1e-4).
In ``orthogonal`` the denominator ⟨u,u⟩ is clamped at 1e-8, so ``u = 0`` gives ``[y; 0]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nbsrc.errors import ConfigError

FUSIONS = ("none", "sum", "hadamard", "concat", "fast_norm", "orthogonal")


POINTWISE_GROUPS = 32  # the ELM's grouped 1x1 convolutions: gcd(C, 32) groups (our reading)


def pointwise_groups(dim: int) -> int:
    """The number of groups of the ELM's 1×1 convolutions on ``dim`` channels: gcd(dim, 32)."""
    return math.gcd(dim, POINTWISE_GROUPS)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle on [B, C, h, w]: channel ``g·(C/groups) + i`` moves to ``i·groups + g``."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual block on a map [B, C, h, w] (stride 1, so with the skip), its 1×1
    convolutions grouped (``groups``, default gcd(C, 32)) with a channel shuffle before the projection."""

    def __init__(self, dim: int, expansion: int = 2, groups: int | None = None):
        super().__init__()
        hidden, g = dim * expansion, groups or pointwise_groups(dim)
        if dim % g:
            raise ConfigError(f"InvertedResidual: groups={g} must divide the width {dim}")
        self.groups = g
        self.expand = nn.Sequential(nn.Conv2d(dim, hidden, 1, groups=g, bias=False), nn.BatchNorm2d(hidden),
                                    nn.GELU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.GELU()
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, dim, 1, groups=g, bias=False), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(channel_shuffle(self.depthwise(self.expand(x)), self.groups))


class ASPP(nn.Module):
    """À trous spatial pyramid pooling with depthwise branches: [B, C, h, w] -> [B, C, h, w] (any h, w).

    Branches (each C channels): depthwise 1×1, depthwise 3×3 at each dilation of ``rates``, image
    pooling; fused by a grouped 1×1 convolution over the branches interleaved per channel, so that
    group ``j`` of the fusion sees every branch of its channels."""

    def __init__(self, dim: int, rates: tuple[int, ...] = (6, 12, 18), groups: int | None = None):
        super().__init__()
        g = groups or pointwise_groups(dim)
        if dim % g:
            raise ConfigError(f"ASPP: groups={g} must divide the width {dim}")

        def conv_bn(k: int, dilation: int = 1) -> nn.Sequential:
            pad = dilation * (k // 2)
            return nn.Sequential(nn.Conv2d(dim, dim, k, padding=pad, dilation=dilation, groups=dim, bias=False),
                                 nn.BatchNorm2d(dim), nn.GELU())

        self.branches = nn.ModuleList([conv_bn(1)] + [conv_bn(3, r) for r in rates])
        # No BatchNorm on the 1×1 pooled map: it would fail for a training batch of one image.
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim, 1, groups=dim), nn.GELU())
        n = len(rates) + 2
        self.fuse = nn.Sequential(nn.Conv2d(n * dim, dim, 1, groups=g, bias=False), nn.BatchNorm2d(dim), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.image_pool(x).expand(-1, -1, x.shape[2], x.shape[3]))
        return self.fuse(torch.stack(outs, dim=2).flatten(1, 2))  # [B, C·n, h, w]: channel c's n branches together


class WaveBlock(nn.Module):
    """Training: keep a random band of ``round(band * h)`` rows, multiply the other rows by
    ``factor`` (one band per batch). Evaluation: identity."""

    def __init__(self, band: float = 0.3, factor: float = 1.5):
        super().__init__()
        if not 0.0 < band <= 1.0:
            raise ConfigError(f"WaveBlock band={band} must be in (0, 1]")
        self.band, self.factor = band, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        h = x.shape[-2]
        rows = max(1, round(self.band * h))
        start = int(torch.randint(0, h - rows + 1, ()))
        mask = x.new_full((h, 1), self.factor)
        mask[start : start + rows] = 1.0
        return x * mask

    def extra_repr(self) -> str:
        return f"band={self.band}, factor={self.factor}"


class EnhancedLocality(nn.Module):
    """ELM, eqs. (9)–(11): ``U = Wave(ASPP(IRB(Y)))``; a part switched off is left out (its
    attribute is ``None``)."""

    def __init__(self, dim: int, irb: bool = True, aspp: bool = True, wave: bool = True):
        super().__init__()
        if not (irb or aspp or wave):
            raise ConfigError(
                "elm=True with elm_irb, elm_aspp and elm_wave all False leaves the ELM empty; "
                "switch one part on, or use elm=False"
            )
        self.irb = InvertedResidual(dim) if irb else None
        self.aspp = ASPP(dim) if aspp else None
        self.wave = WaveBlock() if wave else None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        u = y
        for part in (self.irb, self.aspp, self.wave):
            if part is not None:
                u = part(u)
        return u


def orthogonal_fusion(y: torch.Tensor, u: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. (A20) along the last dim: ``[y − ⟨y,u⟩/⟨u,u⟩ · u ; u]`` (⟨u,u⟩ clamped at ``eps``)."""
    coef = (y * u).sum(-1, keepdim=True) / (u * u).sum(-1, keepdim=True).clamp_min(eps)
    return torch.cat([y - coef * u, u], dim=-1)


class Fusion(nn.Module):
    """Fusion of the ELM input ``y`` and output ``u`` (tokens [..., C]), eqs. (A14)–(A20).

    ``kind='none'`` returns ``u`` when ``elm`` is on and ``y`` when it is off (``u`` is then None).
    """

    def __init__(self, kind: str = "orthogonal", elm: bool = True, eps: float = 1e-4):
        super().__init__()
        if kind not in FUSIONS:
            raise ConfigError(f"fusion={kind!r} is unknown; use one of {', '.join(FUSIONS)}")
        if not elm and kind != "none":
            raise ConfigError(
                f"fusion={kind!r} fuses the ELM's input and output, but elm=False; use fusion='none' "
                "(the local branch is then Y alone) or elm=True"
            )
        self.kind, self.elm, self.eps = kind, elm, eps
        self.weight = nn.Parameter(torch.ones(2)) if kind == "fast_norm" else None

    def out_dim(self, dim: int) -> int:
        return 2 * dim if self.kind in ("concat", "orthogonal") else dim

    def forward(self, y: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "none":
            return u if self.elm else y
        if self.kind == "sum":
            return y + u
        if self.kind == "hadamard":
            return y * u
        if self.kind == "concat":
            return torch.cat([y, u], dim=-1)
        if self.kind == "fast_norm":
            w = F.relu(self.weight)
            return (w[0] * y + w[1] * u) / (self.eps + w.sum())
        return orthogonal_fusion(y, u)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, elm={self.elm}"
