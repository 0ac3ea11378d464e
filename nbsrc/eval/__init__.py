"""Evaluation: embeddings of a dataset, exact k-NN search and Recall@K (query = gallery, or a
separate gallery), with per-query values for worst-query plots."""

from nbsrc.eval.recall import RetrievalResults, first_positive_rank, knn_search, recall_at_k, retrieve
from nbsrc.eval.recall_eval import evaluate, extract_embeddings

__all__ = [
    "extract_embeddings", "evaluate", "knn_search", "recall_at_k", "first_positive_rank",
    "retrieve", "RetrievalResults",
]
