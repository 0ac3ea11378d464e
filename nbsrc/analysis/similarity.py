"""Similarities between embeddings: the distributions of positive and negative pair similarities
(IRT Figure 5), and per-query rankings for the retrieval grid (average precision, worst queries).

All similarities are cosine similarities, s(a, b) = aᵀb / (‖a‖ ‖b‖).
"""

from __future__ import annotations

import numpy as np

from nbsrc.analysis.spectrum import as_embeddings, as_labels
from nbsrc.errors import ConfigError, DatasetError

# Pairs whose dot products are computed at once (bounds memory to about this many × D floats).
_PAIR_CHUNK = 1 << 16
# Similarity-matrix entries held at once by average_precision_per_query.
_AP_BLOCK = 1 << 22


# ----------------------------------------------------------------------------- pairs
def _unit_rows(Z: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(Z, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ConfigError(f"{name} has {int((norms == 0).sum())} all-zero row(s): their cosine similarity is "
                          "undefined; check the model's output")
    return Z / norms


def _check_cap(value, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name}={value!r} is invalid: expected an integer >= 1, or None for no cap")
    return int(value)


def _choose_ranks(total: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """All of 0..total-1 if within ``cap``, else ``cap`` of them uniformly without replacement (sorted)."""
    if cap is None or total <= cap:
        return np.arange(total, dtype=np.int64)
    return np.sort(rng.choice(total, size=cap, replace=False)).astype(np.int64)


def _ranks_to_pairs(ranks, counts, first_partner, order) -> np.ndarray:
    """Pair number ``r`` → (i, j): sorted position ``a`` owns pairs ``cum[a-1] .. cum[a]-1``, whose
    partners are the consecutive positions ``first_partner[a], first_partner[a] + 1, …``."""
    cum = np.cumsum(counts)
    a = np.searchsorted(cum, ranks, side="right")
    b = first_partner[a] + (ranks - (cum[a] - counts[a]))
    i, j = order[a], order[b]
    return np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1)


def pair_indices(y, max_positives: int | None = 200_000, max_negatives: int | None = 200_000, seed: int = 0):
    """Index pairs ``(i, j)``, i < j, of the positive (same label) and negative (different label)
    pairs of a labelled set: all of them, or a uniform sample without replacement of
    ``max_positives`` / ``max_negatives`` of them when there are more.

    No N × N matrix is formed: with the samples sorted by label, sample ``a`` is paired with the
    later samples of its own class (positives) and with every sample after its class (negatives),
    so the pairs of each kind can be numbered 0..P-1 and a sampled number maps back to its pair.

    Returns ``(pos [P', 2] int64, neg [M', 2] int64, info)`` where ``info`` holds
    ``positives_total``, ``positives_used``, ``negatives_total``, ``negatives_used``, ``seed``.
    """
    y = np.asarray(y)
    max_positives = _check_cap(max_positives, "max_positives")
    max_negatives = _check_cap(max_negatives, "max_negatives")
    n = len(y)
    order = np.argsort(y, kind="stable")
    _, start, size = np.unique(y[order], return_index=True, return_counts=True)
    end = np.repeat(start + size, size)  # exclusive end of each sorted sample's class block
    pos_counts, neg_counts = end - np.arange(n) - 1, n - end
    rng = np.random.default_rng(seed)
    pos_ranks = _choose_ranks(int(pos_counts.sum()), max_positives, rng)
    neg_ranks = _choose_ranks(int(neg_counts.sum()), max_negatives, rng)
    pos = _ranks_to_pairs(pos_ranks, pos_counts, np.arange(n) + 1, order)
    neg = _ranks_to_pairs(neg_ranks, neg_counts, end, order)
    info = {
        "positives_total": int(pos_counts.sum()), "positives_used": len(pos),
        "negatives_total": int(neg_counts.sum()), "negatives_used": len(neg), "seed": seed,
    }
    return pos, neg, info


def _pair_dots(U: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    out = np.empty(len(pairs))
    for s in range(0, len(pairs), _PAIR_CHUNK):
        p = pairs[s : s + _PAIR_CHUNK]
        out[s : s + len(p)] = np.einsum("nd,nd->n", U[p[:, 0]], U[p[:, 1]])
    return out


def pair_similarities(Z, y, max_negatives: int | None = 200_000, seed: int = 0, max_positives: int | None = 200_000):
    """Cosine similarities of the positive and negative pairs of a labelled set (IRT Figure 5)::

        pos = { ẑ_iᵀ ẑ_j : i < j, y_i = y_j },   neg = { ẑ_iᵀ ẑ_j : i < j, y_i ≠ y_j },   ẑ = z / ‖z‖

    ``Z`` ``[N, D]`` is l2-normalised here (a no-op for the models' outputs). When there are more
    than ``max_negatives`` negative pairs (or ``max_positives`` positive pairs) a uniform sample of
    that many, without replacement and with a fixed ``seed``, is used instead, and ``info`` says so:
    see :func:`pair_indices` for ``info``'s keys; ``info["summary"]`` is a sentence for captions.
    ``None`` means no cap. Every class needs at least 2 samples, and there must be 2 classes.

    Returns ``(pos, neg, info)``, float64 arrays in the order of :func:`pair_indices`.
    """
    Z = as_embeddings(Z)
    y = as_labels(y, len(Z), min_per_class=2)
    if len(np.unique(y)) < 2:
        raise DatasetError("pair similarities need at least 2 classes (there are no negative pairs with one); "
                           "embed samples from more classes")
    pos_ij, neg_ij, info = pair_indices(y, max_positives, max_negatives, seed)
    U = _unit_rows(Z, "Z")
    info["summary"] = (
        f"{info['positives_used']:,} of {info['positives_total']:,} positive and "
        f"{info['negatives_used']:,} of {info['negatives_total']:,} negative pairs"
        + (f" (uniform sample, seed {seed})" if info["positives_used"] < info["positives_total"]
           or info["negatives_used"] < info["negatives_total"] else "")
    )
    return _pair_dots(U, pos_ij), _pair_dots(U, neg_ij), info


def separation_auc(pos, neg) -> float:
    """How well the similarities separate positive from negative pairs: the probability that a
    positive pair is more similar than a negative one, ties counting one half (the area under the
    ROC curve; Mann–Whitney U / (n_pos · n_neg))::

        AUC = 1/(|P| |N|) Σ_{p ∈ P} Σ_{n ∈ N} ( [s_p > s_n] + ½ [s_p = s_n] )

    1 when every positive is above every negative, ½ when the two histograms of IRT Fig. 5 coincide.
    Computed from ranks in O((|P| + |N|) log(|P| + |N|)); both sets must be non-empty."""
    from scipy.stats import rankdata

    pos, neg = np.asarray(pos, dtype=np.float64).ravel(), np.asarray(neg, dtype=np.float64).ravel()
    if not len(pos) or not len(neg):
        raise DatasetError(f"separation_auc needs positive and negative pairs; got {len(pos)} positive and "
                           f"{len(neg)} negative similarities")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise DatasetError("separation_auc got NaN or infinite similarities; check the embeddings")
    ranks = rankdata(np.concatenate([pos, neg]))  # average ranks for ties
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


# ----------------------------------------------------------------------------- per-query rankings
def average_precision_per_query(query_emb, query_labels, gallery_emb=None, gallery_labels=None) -> np.ndarray:
    """``[nq]`` average precision of each query over the full ranking of the gallery::

        AP_q = 1/P_q Σ_{k=1}^{n} P@k(q) · rel_q(k),   P@k(q) = 1/k Σ_{j ≤ k} rel_q(j)

    where rel_q(k) = 1 if the k-th ranked gallery item has the query's label and P_q is the number of
    such items. The ranking is by decreasing inner product, equal values by increasing gallery index
    (as in :mod:`nbsrc.eval`); with ``gallery_emb=None`` the query set is the gallery and each query
    is left out of its own ranking (by index). Queries with no positive get NaN. The similarity
    matrix is computed a block of rows at a time (about 4M entries).
    """
    Q = as_embeddings(query_emb, "query_emb", min_samples=1)
    ql = as_labels(query_labels, len(Q), "query_labels")
    if (gallery_emb is None) != (gallery_labels is None):
        raise ConfigError("pass gallery_emb and gallery_labels together (or neither, for query = gallery)")
    self_excluded = gallery_emb is None
    if self_excluded:
        if len(Q) < 2:
            raise ConfigError("query = gallery with a single embedding: there is nothing to rank; add samples")
        G, gl = Q, ql
    else:
        G = as_embeddings(gallery_emb, "gallery_emb", min_samples=1)
        gl = as_labels(gallery_labels, len(G), "gallery_labels")
        if G.shape[1] != Q.shape[1]:
            raise ConfigError(f"query embeddings have dimension {Q.shape[1]} but gallery embeddings {G.shape[1]}; "
                              "embed both with the same model")
    ap = np.empty(len(Q))
    step = max(1, _AP_BLOCK // len(G))
    for s in range(0, len(Q), step):
        rows = np.arange(s, min(s + step, len(Q)))
        sim = Q[rows] @ G.T
        if self_excluded:
            sim[np.arange(len(rows)), rows] = -np.inf  # sorts last; dropped below
        order = np.argsort(-sim, axis=1, kind="stable")  # stable: ties by increasing gallery index
        rel = gl[order] == ql[rows, None]
        if self_excluded:
            rel = rel[:, :-1]
        hits = np.cumsum(rel, axis=1)
        precision = hits / np.arange(1, rel.shape[1] + 1)
        n_pos = hits[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            ap[rows] = np.where(n_pos > 0, (precision * rel).sum(axis=1) / n_pos, np.nan)
    return ap


def worst_queries(per_query, n: int, by: str = "ap") -> np.ndarray:
    """Indices of the ``n`` worst queries, worst first.

    ``by="ap"``: ``per_query`` is average precision (:func:`average_precision_per_query`); lowest
    is worst. ``by="rank"``: ``per_query`` is the 1-based rank of the first positive
    (:func:`nbsrc.eval.first_positive_rank`, ``inf`` when not in the top k); largest is worst.
    NaN (queries without any positive) are left out; equal values keep the lower query index first.
    """
    if by not in ("ap", "rank"):
        raise ConfigError(f"by={by!r} is invalid: expected 'ap' (lowest AP worst) or 'rank' (largest rank worst)")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"n={n!r} is invalid: expected the number of queries to return, an integer >= 0")
    v = np.asarray(per_query, dtype=np.float64)
    if v.ndim != 1:
        raise ConfigError(f"per_query must be a 1-D array with one value per query, got shape {v.shape}")
    idx = np.flatnonzero(~np.isnan(v))
    key = v[idx] if by == "ap" else -v[idx]
    return idx[np.argsort(key, kind="stable")][:n].astype(np.int64)


# ----------------------------------------------------------------------------- Revisited pairs (IRT Fig. 5)
def revisited_pair_similarities(query_emb, database_emb, gnd, setup: str = "medium",
                                max_negatives: int | None = 200_000, seed: int = 0):
    """Cosine similarities of the query-database pairs of a Revisited dataset, as IRT Fig. 5 draws
    them ("extracted from the RParis (M) dataset")::

        pos = { q̂ᵀx̂ : x ∈ P_q },   neg = { q̂ᵀx̂ : x ∉ P_q ∪ J_q },   over all queries q

    with the positives ``P_q`` and junk ``J_q`` of ``setup`` (``"medium"``: P = easy ∪ hard,
    J = junk; :data:`nbsrc.eval.revisited_map.SETUPS`). Junk pairs are in neither set. More than
    ``max_negatives`` negatives: a uniform sample of that many (without replacement, ``seed``).
    Returns ``(pos, neg, info)`` as :func:`pair_similarities`.
    """
    from nbsrc.eval.revisited_map import SETUPS, gnd_list

    if setup not in SETUPS:
        raise ConfigError(f"setup={setup!r} is invalid: expected one of {', '.join(SETUPS)}")
    cap = _check_cap(max_negatives, "max_negatives")
    Q, X = _unit_rows(as_embeddings(query_emb), "query_emb"), _unit_rows(as_embeddings(database_emb), "database_emb")
    gnd = gnd_list(gnd)
    if len(gnd) != len(Q):
        raise DatasetError(f"{len(Q)} query embeddings but {len(gnd)} ground-truth entries; embed every query once")
    ok_keys, junk_keys = SETUPS[setup]
    sims = Q.astype(np.float64) @ X.astype(np.float64).T
    is_pos = np.zeros(sims.shape, dtype=bool)
    is_junk = np.zeros(sims.shape, dtype=bool)
    for i, g in enumerate(gnd):
        for keys, mask in ((ok_keys, is_pos), (junk_keys, is_junk)):
            idx = np.concatenate([np.asarray(g[k], dtype=np.int64).reshape(-1) for k in keys])
            mask[i, idx] = True
    pos = sims[is_pos]
    neg_all = sims[~is_pos & ~is_junk]
    keep = _choose_ranks(len(neg_all), cap, np.random.default_rng(seed))
    neg = neg_all[np.sort(keep)]
    info = {"positives_total": len(pos), "positives_used": len(pos), "negatives_total": len(neg_all),
            "negatives_used": len(neg), "setup": setup}
    info["summary"] = (f"{len(pos):,} positive and {len(neg):,} of {len(neg_all):,} negative query-database pairs "
                       f"({setup} setup)" + (f", uniform sample (seed {seed})" if len(neg) < len(neg_all) else ""))
    return pos, neg, info


def run_pair_similarities(embeddings: dict, gnd=None, name: str = "rparis6k", setup: str = "medium",
                          max_negatives: int | None = 200_000, seed: int = 0):
    """The pairs notebook 05 draws for a run's saved ``embeddings`` (``RunResult.embeddings()``):
    the Revisited form of IRT Fig. 5 (:func:`revisited_pair_similarities` on ``<name>_query`` /
    ``<name>_database``, ``setup``; Revisited Paris Medium by default) when the run holds that
    dataset's embeddings, otherwise the class-label pairs of its query set (:func:`pair_similarities`).
    ``gnd``: the dataset's ground truth (``load_revisited_gnd``), needed for the Revisited form."""
    if f"{name}_query" in embeddings:
        if gnd is None:
            raise ConfigError(f"the run holds {name} embeddings: pass gnd=load_revisited_gnd(<folder>/gnd_{name}.pkl) "
                              f"(notebook 05: rparis_root=<folder>)")
        return revisited_pair_similarities(embeddings[f"{name}_query"], embeddings[f"{name}_database"], gnd, setup,
                                           max_negatives, seed)
    return pair_similarities(embeddings["query"], embeddings["query_labels"], max_negatives=max_negatives, seed=seed)
