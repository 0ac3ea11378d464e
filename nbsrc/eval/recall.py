"""Retrieval metrics as pure functions on numpy arrays: exact k-NN search and Recall@K.

Similarity is the inner product ``s(q, g) = <q, g>`` (cosine similarity for the l2-normalised
embeddings that :class:`~nbsrc.models.RetrievalModel` returns). Two protocols:

- **query = gallery** (SOP, CUB-200-2011; ``gallery_emb=None``): every sample is a query and is
  searched against all the *other* samples; the query itself is removed by its index, so an exact
  duplicate of it at another index still counts as a neighbour.
- **separate gallery** (In-Shop): queries are searched against a distinct gallery set.

Ranking and ties. The neighbours of a query are ordered by decreasing similarity, and equal
similarities by increasing gallery index. faiss does not promise an order among equal distances
(its heaps happen to return tied items in reverse index order), so :func:`knn_search` sorts each
row by ``(-sim, index)`` and, when the similarity at the last place it needs equals the smallest
one faiss returned (a tie that may continue beyond the searched neighbours), searches that row
again with twice as many neighbours, up to the whole gallery. The returned top ``k`` is therefore
exactly the first ``k`` of the whole gallery sorted by ``(-sim, index)``, where "equal" means equal
float32 similarities as faiss computes them. Ties are exact when the dot products are exactly
representable (e.g. small integer coordinates, duplicated vectors); for continuous embeddings,
two similarities within float32 rounding of each other may come out in either order.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nbsrc.errors import ConfigError

# Searched per query beyond what is needed, so that most boundary ties are settled in one pass.
_EXTRA_NEIGHBOURS = 1
# Upper bound on (rows x neighbours) held at once when a row must be searched again more widely.
_WIDE_SEARCH_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------- input checks
_ADD_ROWS = 65536  # gallery rows converted to float32 and added to the index at a time


def _as_matrix(x, name: str) -> np.ndarray:
    """``x`` as a 2-D, non-empty array, not copied: a float16 memory map stays on disk."""
    x = x if isinstance(x, np.ndarray) else np.asarray(x)
    if x.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D array [N, D], got shape {x.shape}; stack the embeddings row-wise")
    if len(x) == 0:
        raise ConfigError(f"{name} is empty (shape {x.shape}); retrieval needs at least one embedding")
    return x


def _as_embeddings(x, name: str, first_row: int = 0) -> np.ndarray:
    """A float32, C-contiguous copy of rows of ``x`` (rows ``first_row...`` of ``name``), checked finite."""
    x = np.ascontiguousarray(_as_matrix(x, name), dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ConfigError(
            f"{name} contains NaN or inf (row {first_row + int(np.flatnonzero(bad)[0])}, {int(bad.sum())} row(s) "
            "in this block); the model produced non-finite embeddings: check the weights, the input normalisation "
            "and the loss"
        )
    return x


def _as_labels(labels, n: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        raise ConfigError(f"{name} must have shape [{n}] (one label per embedding), got shape {labels.shape}")
    return labels


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name}={value!r} is invalid: expected an integer >= 1")
    return int(value)


def _as_ks(ks) -> tuple[int, ...]:
    ks = (ks,) if isinstance(ks, (int, np.integer)) else tuple(ks)
    if not ks:
        raise ConfigError("ks is empty; give at least one K, e.g. ks=(1, 2, 4, 8)")
    return tuple(_check_positive_int(k, "k in ks") for k in ks)


def _query_gallery(query_emb, gallery_emb) -> tuple[np.ndarray, np.ndarray, bool]:
    query = _as_matrix(query_emb, "query_emb")
    if gallery_emb is None:
        return query, query, True
    gallery = _as_matrix(gallery_emb, "gallery_emb")
    if gallery.shape[1] != query.shape[1]:
        raise ConfigError(
            f"query embeddings have dimension {query.shape[1]} but gallery embeddings {gallery.shape[1]}; "
            "embed both with the same model"
        )
    return query, gallery, False


# ----------------------------------------------------------------------------- k-NN search
def knn_search(
    query: np.ndarray,
    gallery: np.ndarray,
    k: int,
    exclude_self: bool = False,
    chunk_size: int = 4096,
    names: tuple[str, str] = ("query", "gallery"),
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner-product neighbours of each query (faiss ``IndexFlatIP``).

    Returns ``sims`` [nq, k] float32 and ``idx`` [nq, k] int64, row ``i`` sorted by decreasing
    similarity and, for equal similarities, increasing gallery index (see the module docstring for
    what is guaranteed). With ``exclude_self`` the query set *is* the gallery: gallery item ``i`` is
    removed from the neighbours of query ``i`` (by index, not by value; duplicates stay).
    Queries are searched ``chunk_size`` at a time, so results in flight stay O(chunk_size * k);
    rows searched again for a tie are capped at 2**24 (row x neighbour) entries at once. Neither
    input is copied whole: the gallery goes into the index ``_ADD_ROWS`` rows at a time and each
    query chunk is converted on its own, so float16 memory maps cost little beyond faiss's float32
    copy of the gallery. ``names`` are what error messages call the two inputs.
    """
    import faiss

    query = _as_matrix(query, names[0])
    gallery = _as_matrix(gallery, names[1])
    if query.shape[1] != gallery.shape[1]:
        raise ConfigError(
            f"query dimension {query.shape[1]} != gallery dimension {gallery.shape[1]}; "
            "embed both with the same model"
        )
    k = _check_positive_int(k, "k")
    chunk_size = _check_positive_int(chunk_size, "chunk_size")
    nq, ng = len(query), len(gallery)
    if exclude_self and nq != ng:
        raise ConfigError(
            f"exclude_self=True needs the query set to be the gallery, but there are {nq} queries and "
            f"{ng} gallery items; pass exclude_self=False for a separate gallery"
        )
    available = ng - int(exclude_self)
    if k > available:
        what = f"{ng} items ({available} once the query itself is excluded)" if exclude_self else f"{ng} items"
        raise ConfigError(f"k={k} but the gallery has {what}; choose k <= {available}")

    index = faiss.IndexFlatIP(gallery.shape[1])
    for s in range(0, ng, _ADD_ROWS):
        index.add(_as_embeddings(gallery[s : s + _ADD_ROWS], names[1], s))
    for s in range(0, nq, _ADD_ROWS):  # the queries are checked before any search
        _as_embeddings(query[s : s + _ADD_ROWS], names[0], s)
    sims = np.empty((nq, k), dtype=np.float32)
    idx = np.empty((nq, k), dtype=np.int64)
    first_width = min(ng, k + int(exclude_self) + _EXTRA_NEIGHBOURS)
    for start in range(0, nq, chunk_size):
        rows = np.arange(start, min(start + chunk_size, nq))
        width = first_width
        while len(rows):
            todo = []
            # When searching wider, fewer rows at a time keep memory bounded.
            step = max(1, min(len(rows), _WIDE_SEARCH_ELEMENTS // width))
            for s in range(0, len(rows), step):
                r = rows[s : s + step]
                d, i = index.search(np.ascontiguousarray(query[r], dtype=np.float32), width)
                s_k, i_k, settled = _top_k_sorted(d, i, r if exclude_self else None, k, width == ng)
                sims[r[settled]], idx[r[settled]] = s_k[settled], i_k[settled]
                todo.append(r[~settled])
            rows = np.concatenate(todo)
            width = min(ng, 2 * width)
    return sims, idx


def _top_k_sorted(d, i, self_idx, k: int, whole_gallery: bool):
    """Sort faiss rows by (-sim, index), drop the query itself, keep ``k``; ``settled`` is False
    for rows where items not searched may tie with the ``k``-th kept one."""
    order = np.lexsort((i, -d), axis=-1)
    d, i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    if self_idx is not None:  # move the query's own index (at most one per row) to the end
        order = np.argsort(i == self_idx[:, None], axis=1, kind="stable")
        d, i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    d_k, i_k = d[:, :k], i[:, :k]
    # faiss returns the true top-`width` by value: anything not returned has sim <= min(d).
    settled = np.full(len(d), True) if whole_gallery else d_k[:, -1] > d.min(axis=1)
    return d_k, i_k, settled


# ----------------------------------------------------------------------------- results
@dataclass
class RetrievalResults:
    """What was retrieved for whom: row ``q`` of ``indices`` / ``sims`` holds the gallery indices
    and similarities of the top-``k`` neighbours of query ``q``, best first.

    With ``is_self_excluded`` the gallery is the query set (``gallery_labels is query_labels``) and
    query ``q`` is never among its own neighbours.
    """

    query_labels: np.ndarray  # [nq]
    gallery_labels: np.ndarray  # [ng]
    indices: np.ndarray  # [nq, k] int64 gallery indices
    sims: np.ndarray  # [nq, k] float32 inner products
    is_self_excluded: bool

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    @property
    def hits(self) -> np.ndarray:
        """[nq, k] bool: the ``j``-th neighbour of query ``q`` has the query's label."""
        return self.gallery_labels[self.indices] == self.query_labels[:, None]

    @property
    def num_positives(self) -> np.ndarray:
        """[nq] number of gallery items with the query's label (the query itself not counted)."""
        classes, counts = np.unique(self.gallery_labels, return_counts=True)
        pos = np.searchsorted(classes, self.query_labels).clip(0, len(classes) - 1)
        n = np.where(classes[pos] == self.query_labels, counts[pos], 0)
        return n - int(self.is_self_excluded)

    @property
    def has_positive(self) -> np.ndarray:
        return self.num_positives > 0

    def recall_at_k(self, ks: Sequence[int] = (1, 2, 4, 8), reduce: bool = True):
        """Recall@K from the retrieved neighbours; see :func:`recall_at_k`. A K larger than the
        gallery counts the whole gallery."""
        ks = _as_ks(ks)
        available = len(self.gallery_labels) - int(self.is_self_excluded)
        if max(ks) > self.k and self.k < available:
            raise ConfigError(
                f"Recall@{max(ks)} needs the top {max(ks)} neighbours but only {self.k} were retrieved; "
                f"call retrieve(..., k={max(ks)})"
            )
        hits, valid = self.hits, self.has_positive
        n_invalid = int((~valid).sum())
        if n_invalid:
            warnings.warn(
                f"recall_at_k: {n_invalid} of {len(valid)} queries have no positive in the gallery; "
                "they are excluded from the mean (their per-query value is NaN)",
                stacklevel=3,
            )
        first_hit = np.where(hits.any(1), hits.argmax(1), self.k)  # 0-based, self.k = none
        out = {}
        for k in ks:
            per_query = np.where(valid, (first_hit < k).astype(np.float64), np.nan)
            out[k] = (float(np.nanmean(per_query)) if valid.any() else float("nan")) if reduce else per_query
        return out

    def first_positive_rank(self) -> np.ndarray:
        """[nq] float: 1-based rank of the first neighbour with the query's label, ``inf`` if none
        is in the top ``k``, NaN if the query has no positive in the gallery at all."""
        hits = self.hits
        rank = np.where(hits.any(1), hits.argmax(1) + 1.0, np.inf)
        return np.where(self.has_positive, rank, np.nan)


def retrieve(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    gallery_emb: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    k: int = 8,
    chunk_size: int = 4096,
) -> RetrievalResults:
    """Top-``k`` neighbours of every query, with the labels needed to score them.

    ``gallery_emb is None``: query = gallery, self-match excluded. ``k`` larger than the gallery
    (minus the query itself) is capped to the gallery size.
    """
    query, gallery, self_excluded = _query_gallery(query_emb, gallery_emb)
    query_labels = _as_labels(query_labels, len(query), "query_labels")
    if (gallery_labels is None) != (gallery_emb is None):
        raise ConfigError("pass gallery_emb and gallery_labels together (or neither, for query = gallery)")
    gallery_labels = query_labels if self_excluded else _as_labels(gallery_labels, len(gallery), "gallery_labels")
    k = _check_positive_int(k, "k")
    available = len(gallery) - int(self_excluded)
    if available < 1:
        raise ConfigError("query = gallery with a single embedding: there is nothing to retrieve; add samples")
    names = ("query_emb", "query_emb" if self_excluded else "gallery_emb")
    sims, idx = knn_search(query, gallery, min(k, available), exclude_self=self_excluded, chunk_size=chunk_size,
                           names=names)
    return RetrievalResults(query_labels, gallery_labels, idx, sims, self_excluded)


# ----------------------------------------------------------------------------- metrics
def recall_at_k(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    ks: Sequence[int] = (1, 2, 4, 8),
    gallery_emb: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    reduce: bool = True,
    chunk_size: int = 4096,
) -> dict[int, float] | dict[int, np.ndarray]:
    """Recall@K in the metric-learning sense (Oh Song et al. 2016; the metric of IRT and DToP).

        R@K = 1/|Q'| * sum_{q in Q'} 1[ exists j <= K : y(g_{pi_q(j)}) = y(q) ]

    where ``pi_q`` ranks the gallery by decreasing ``<q, g>`` (ties: lower gallery index first),
    the gallery excludes ``q`` itself when ``gallery_emb is None``, and ``Q'`` holds the queries
    with at least one positive (same label) in the gallery. It is the fraction of queries with a
    correct item among their K nearest neighbours, not the IR recall (fraction of the positives
    found). Queries without a positive are left out of the mean, with a warning.

    ``reduce=True`` returns ``{K: float in [0, 1]}``; ``reduce=False`` returns ``{K: [nq] array}``
    of 1.0 (hit), 0.0 (miss) and NaN (no positive in the gallery) per query.
    """
    ks = _as_ks(ks)
    res = retrieve(query_emb, query_labels, gallery_emb, gallery_labels, max(ks), chunk_size)
    return res.recall_at_k(ks, reduce)


def first_positive_rank(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    gallery_emb: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    k_max: int = 100,
    chunk_size: int = 4096,
) -> np.ndarray:
    """[nq] 1-based rank of each query's first positive within its top ``k_max`` neighbours
    (``inf`` if not found there, NaN if the query has no positive at all); the worst queries are
    the largest values."""
    return retrieve(query_emb, query_labels, gallery_emb, gallery_labels, k_max, chunk_size).first_positive_rank()
