"""Multi-scale representation (DToP §A.1, Table A11): the embedding of an image is the re-normalised
mean of its embeddings at several scales,

    f(x) = normalize( Σ_{s ∈ S} f_s(x) ),   f_s(x) = model(resize(x, s))

with ``S = {1, 1/√2, 1/2}`` by default and a bilinear resize of the whole batch to
``round(s·H) × round(s·W)`` (scale 1 is the batch itself). The scales may differ between queries
and database (:func:`evaluate_multiscale`). The model must accept any input size (DToP's dynamic
position embedding does; a plain ViT of fixed size does not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nbsrc.data import RetrievalData
from nbsrc.errors import ConfigError
from nbsrc.eval.recall import RetrievalResults, knn_search, recall_at_k
from nbsrc.eval.recall_eval import extract_embeddings

DEFAULT_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)


def _check_scales(scales) -> tuple[float, ...]:
    scales = tuple(float(s) for s in scales)
    if not scales or any(not s > 0 for s in scales):
        raise ConfigError(f"scales={scales} must be a non-empty list of positive factors, e.g. (1, 0.707, 0.5)")
    return scales


def multiscale_embed(model: nn.Module, images: torch.Tensor, scales: Sequence[float] = DEFAULT_SCALES) -> torch.Tensor:
    """``normalize(Σ_s model(resize(images, s)))`` for a batch [B, 3, H, W]."""
    h, w = images.shape[-2:]
    total = None
    for s in _check_scales(scales):
        if s == 1.0:
            x = images
        else:
            size = (max(1, round(s * h)), max(1, round(s * w)))
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        z = model(x)
        total = z if total is None else total + z
    return F.normalize(total, dim=-1)


class MultiScaleModel(nn.Module):
    """Wraps ``model`` so that ``forward`` is :func:`multiscale_embed` at ``scales``."""

    def __init__(self, model: nn.Module, scales: Sequence[float] = DEFAULT_SCALES):
        super().__init__()
        self.model, self.scales = model, _check_scales(scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return multiscale_embed(self.model, x, self.scales)

    def extra_repr(self) -> str:
        return f"scales={tuple(round(s, 4) for s in self.scales)}"


def evaluate_multiscale(
    model: nn.Module,
    data: RetrievalData,
    query_scales: Sequence[float] = DEFAULT_SCALES,
    database_scales: Sequence[float] = DEFAULT_SCALES,
    ks: Sequence[int] = (1, 2, 4, 8),
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """Recall@K in percent with queries embedded at ``query_scales`` and the database at
    ``database_scales`` (Table A11). With ``data.gallery is None`` the database is the query set
    itself, embedded a second time, and each query's own entry is excluded."""
    q_model, db_model = MultiScaleModel(model, query_scales), MultiScaleModel(model, database_scales)
    q, ql, _ = extract_embeddings(q_model, data.query, batch_size, device, progress=progress)
    if data.gallery is not None:
        g, gl, _ = extract_embeddings(db_model, data.gallery, batch_size, device, progress=progress)
        recall = recall_at_k(q, ql, ks, gallery_emb=g, gallery_labels=gl)
    elif tuple(query_scales) == tuple(database_scales):
        recall = recall_at_k(q, ql, ks)
    else:
        db, _, _ = extract_embeddings(db_model, data.query, batch_size, device, progress=progress)
        k = min(max(ks), len(q) - 1)
        if k < 1:
            raise ConfigError("query = gallery with a single image: there is nothing to retrieve; add samples")
        sims, idx = knn_search(q, db, k, exclude_self=True)
        recall = RetrievalResults(ql, ql, idx, sims, True).recall_at_k(ks)
    return {f"R@{k}": 100.0 * v for k, v in recall.items()}
