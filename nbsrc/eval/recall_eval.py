"""The Recall@K evaluation of a model on a RetrievalData; the embeddings come from
:func:`nbsrc.models.extract.extract_embeddings` (re-exported here), the one function that training and
evaluation share."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from nbsrc.data import RetrievalData
from nbsrc.eval.recall import recall_at_k
from nbsrc.models.extract import extract_embeddings

__all__ = ["evaluate", "extract_embeddings", "recall_percent"]


def evaluate(
    model: torch.nn.Module,
    data: RetrievalData,
    ks: Sequence[int] = (1, 2, 4, 8),
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
    num_workers: int = 0,
) -> dict[str, float]:
    """Recall@K of ``model`` on ``data``, in percent: ``{"R@1": 71.3, "R@2": ...}``.

    ``data.gallery is None``: every query searches the other queries (SOP, CUB); otherwise the
    queries search ``data.gallery`` (In-Shop). See :func:`~nbsrc.eval.recall.recall_at_k`: queries with
    no positive (a test class of one image) are left out of the mean; the split says so when it is
    built (:func:`nbsrc.data.splits.check_eval_split`), so its warning is not repeated here.
    """
    q, ql, _ = extract_embeddings(model, data.query, batch_size, device, num_workers, progress)
    g = gl = None
    if data.gallery is not None:
        g, gl, _ = extract_embeddings(model, data.gallery, batch_size, device, num_workers, progress)
    return recall_percent(q, ql, ks, g, gl)


def recall_percent(query, query_labels, ks: Sequence[int] = (1, 2, 4, 8), gallery=None,
                   gallery_labels=None) -> dict[str, float]:
    """Recall@K in percent (``{"R@1": 71.3, ...}``) of embeddings already computed
    (:func:`~nbsrc.eval.recall.recall_at_k`); ``gallery is None``: the queries search each other."""
    with warnings.catch_warnings():  # queries without a positive: said once, when the split was built
        warnings.filterwarnings("ignore", message="recall_at_k: .* no positive", category=UserWarning)
        recall = recall_at_k(query, query_labels, ks, gallery_emb=gallery, gallery_labels=gallery_labels)
    return {f"R@{k}": 100.0 * v for k, v in recall.items()}
