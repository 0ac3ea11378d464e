"""The retrieval model: a timm backbone, a pooling, an optional PCA reduction, l2 normalisation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nbsrc.errors import ConfigError
from nbsrc.models.pooling import build_pooling


class PCAReduction(nn.Module):
    """z -> normalize(W (z - μ)), with μ and the top-``dim`` principal directions W fitted on
    training embeddings (IRT ▷128): ``feature_dim`` -> ``dim``. Identity until :meth:`fit` is called."""

    def __init__(self, feature_dim: int, dim: int):
        super().__init__()
        if dim > feature_dim:
            raise ConfigError(f"dim={dim} is larger than the embedding size {feature_dim}; choose dim <= {feature_dim}")
        self.dim = dim
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("components", torch.zeros(dim, feature_dim))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, z: np.ndarray | torch.Tensor) -> PCAReduction:
        z = torch.as_tensor(np.asarray(z), dtype=torch.float64)
        if len(z) < self.dim:
            raise ConfigError(f"PCA to dim={self.dim} needs at least {self.dim} training embeddings, got {len(z)}")
        mu = z.mean(0)
        _, _, vt = torch.linalg.svd(z - mu, full_matrices=False)
        self.mean.copy_(mu.float())
        self.components.copy_(vt[: self.dim].float())
        self.fitted.fill_(True)
        return self

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            return z
        return (z - self.mean.to(z.dtype)) @ self.components.to(z.dtype).T


class RetrievalModel(nn.Module):
    """images -> l2-normalised embeddings.

    ``forward_tokens`` returns the backbone's token sequence ``[B, T, C]`` (prefix tokens first);
    ``forward_features`` returns the pooled, not yet normalised descriptor (a ``spatial`` pooling such
    as R-MAC gets the convnet's map ``[B, C, H, W]`` instead of tokens); ``forward`` the final
    embedding (pooled -> l2 -> [PCA -> l2]). ``pooling`` is a name of
    :data:`nbsrc.models.pooling.POOLINGS`. Sizes (one name each, see :mod:`nbsrc.config`):
    ``feature_dim`` of the pooled descriptor (the backbone's width), ``dim`` of the PCA, ``output_dim``
    of what ``forward`` returns.

    A convnet backbone (more than one 2-d convolution: a CNN, or a hybrid's CNN stem) runs in
    channels-last memory format, its weights and its input (``channels_last``, default: on for those):
    the same numbers up to float rounding, and faster on CPU (docs/speed.md). A ViT's
    single patch convolution is left as it is. DToP's models keep the default format.
    """

    def __init__(self, backbone: nn.Module, pooling: str, num_prefix: int, has_dist: bool,
                 dim: int | None = None, gem_p: float = 3.0, gem_learnable: bool = False,
                 head: nn.Module | None = None, channels_last: bool | None = None):
        super().__init__()
        if channels_last is None:
            channels_last = sum(isinstance(m, nn.Conv2d) for m in backbone.modules()) > 1
        self.channels_last = bool(channels_last)
        self.backbone = backbone.to(memory_format=torch.channels_last) if self.channels_last else backbone
        self.num_prefix = num_prefix
        self.pool = build_pooling(pooling, num_prefix, has_dist, gem_p, gem_learnable)
        self.head = head if head is not None else nn.Identity()
        self.feature_dim = backbone.num_features  # timm's width: a ViT's embed_dim, a convnet's channels
        self.pca = PCAReduction(self.feature_dim, dim) if dim else None

    @property
    def output_dim(self) -> int:
        """The size of the embedding :meth:`forward` returns: the PCA's ``dim`` once fitted, else ``feature_dim``."""
        return self.pca.dim if self.pca is not None and bool(self.pca.fitted) else self.feature_dim

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_features(self._input(x))
        if feats.ndim == 4:  # convnet map [B, C, H, W] -> tokens [B, HW, C]
            feats = feats.flatten(2).transpose(1, 2)
        return feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.pool, "spatial", False):  # R-MAC: regions of the convnet's map
            return self.head(self.pool(self.backbone.forward_features(self._input(x))))
        return self.head(self.pool(self.forward_tokens(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.forward_features(x), dim=-1)
        if self.pca is not None and bool(self.pca.fitted):
            z = F.normalize(self.pca(z), dim=-1)
        return z
