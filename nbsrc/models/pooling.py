"""Global descriptors from a backbone's tokens (IRT §3.1, Table 9).

Input is always a token sequence ``x`` of shape ``[B, T, C]`` whose first ``num_prefix`` tokens are
the [CLS] (and, for distilled DeiT, the distillation) token; a convnet's ``[B, C, H, W]`` map is
flattened to ``[B, H*W, C]`` with ``num_prefix = 0``.

* ``cls``:  x[:, 0]
* ``dist``: x[:, 1], the distillation token of DeiT†
* ``avg``:  mean over patch tokens
* ``max``:  max over patch tokens
* ``gem``:  generalized mean, (1/T Σ_t max(x_t, ε)^p)^(1/p), p = 3 (optionally learnable).
  Transformer tokens can be negative, so they are clamped at ε, as GeM requires.
"""

from __future__ import annotations

import torch
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
            raise ConfigError(f"pooling={kind!r} is unknown; use cls, dist, avg, max or gem")
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
