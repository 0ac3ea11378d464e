"""The metric of Revisited Oxford and Paris (Radenović et al., CVPR 2018), the particular-object
retrieval benchmark of IRT Tables 7-8 and DToP: mAP / mP@k, and chunked ranking for +1M distractors.

**Data** (:mod:`nbsrc.data.oxford_paris`). ``gnd``: per query a bounding box and the database indices
``easy``, ``hard`` and ``junk``; each query image is cropped to its box before it is embedded.

**Setups.** For query q, the positives P and the ignored ("junk") images J are::

    Easy     P = easy           J = junk ∪ hard
    Medium   P = easy ∪ hard    J = junk
    Hard     P = hard           J = junk ∪ easy

**Average precision** (the protocol's ``compute_ap``, a trapezoidal area under the PR curve).
Remove J from the ranking; let ``r_0 < r_1 < ... `` be the 0-based positions of the positives in
what remains (``r_i`` = position in the full ranking minus the number of junk images ranked
strictly before it), and ``n = |P|`` (positives that are never retrieved count in ``n``)::

    precision_0(i) = i / r_i          (1 if r_i = 0)      precision just before the i-th positive
    precision_1(i) = (i + 1) / (r_i + 1)                 precision at the i-th positive
    AP = Σ_i  (precision_0(i) + precision_1(i)) / 2 · (1 / n)

A query with ``n = 0`` is skipped (its AP is NaN and it is left out of the mean).

**Original protocol** (Oxford 5k, Paris 6k; :func:`original_map`): one setup, P = ``ok`` (the
original *good* ∪ *ok*) and J = ``junk``, with the same AP and mP@k.

**mP@k** (the protocol's precision at k). With the 1-based positions ``p_i = r_i + 1`` and
``k_q = min(k, max_i p_i)``: ``P@k = |{i : p_i ≤ k_q}| / k_q``. (The protocol divides by the rank
of the last positive when it is smaller than k, so a query with 3 positives all ranked first
gets P@10 = 1.) A query none of whose positives is retrieved (possible with a top-k ranking) gets 0.

All results are in percent. :func:`revisited_map` is vectorised over queries and ranks;
:func:`revisited_map_reference` walks each ranking in a Python loop, straight from the definitions,
and the tests check that both agree to 1e-9. An image that is both a positive and junk (which the
official files never contain) is treated as the official code does: it counts as a positive and
also shifts the positives after it.

**+1M distractors.** :func:`nbsrc.eval.stream.embed_to_memmap` streams the embeddings of a
(large) dataset to a ``.npy`` memory map (resumably); :func:`rank_chunked` ranks the database in
chunks against the queries, so the memory used is bounded by the chunk, not by the database.

The readers (ground truth, query crops, datasets) are :mod:`nbsrc.data.oxford_paris`, re-exported
here; random ground truth for tests and the benchmark is :func:`bench.revisited.random_gnd`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nbsrc.data.oxford_paris import (  # noqa: F401 (the readers, re-exported for existing imports)
    DISTRACTORS_LAYOUT,
    DISTRACTORS_URL,
    ORIGINAL_NAMES,
    REVISITED_LAYOUT,
    REVISITED_NAMES,
    REVISITED_URL,
    RevisitedData,
    RevisitedQueries,
    build_distractors,
    build_revisited,
    crop_query,
    load_original_gnd,
    load_revisited_gnd,
)
from nbsrc.errors import ConfigError

SETUPS = {  # setup -> (lists that are positives, lists that are junk)
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
DEFAULT_CHUNK = 16384


# ----------------------------------------------------------------------------- input checks
def gnd_list(gnd) -> list[dict]:
    if isinstance(gnd, dict):
        if "gnd" not in gnd:
            raise ConfigError("gnd must be the list of per-query dicts, or the loaded file's dict with a 'gnd' key")
        gnd = gnd["gnd"]
    return list(gnd)


def as_rankings(ranks_or_scores, n_queries: int) -> np.ndarray:
    """``[n_queries, k]`` int64 rankings (row q: database indices, best first).

    Integer input is taken as rankings (``k`` may be smaller than the database: a top-k list).
    Float input is taken as similarities ``[n_queries, n_db]`` and ranked by decreasing similarity,
    equal similarities by increasing index. The protocol's own code stores rankings as
    ``[n_db, n_queries]``: pass its transpose.
    """
    x = np.asarray(ranks_or_scores)
    if x.ndim != 2:
        raise ConfigError(f"rankings/scores must be 2-D [n_queries, n_db], got shape {x.shape}")
    if x.shape[0] != n_queries:
        hint = (" (the official code's [n_db, n_queries] layout: pass its transpose .T)"
                if x.shape[1] == n_queries else "")
        raise ConfigError(f"rankings/scores have {x.shape[0]} rows but gnd has {n_queries} queries{hint}")
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise ConfigError("scores contain NaN or inf; check the embeddings")
        return np.argsort(-x, axis=1, kind="stable")
    if not np.issubdtype(x.dtype, np.integer):
        raise ConfigError(f"rankings must be integers or scores floats, got dtype {x.dtype}")
    return x.astype(np.int64, copy=False)


def _as_kappas(kappas) -> tuple[int, ...]:
    kappas = tuple(int(k) for k in kappas)
    if any(k < 1 for k in kappas):
        raise ConfigError(f"kappas={kappas} must be integers >= 1")
    return kappas


def _setup_lists(gnd: list[dict], setup: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    ok_keys, junk_keys = SETUPS[setup]
    cat = lambda g, keys: np.concatenate([np.asarray(g[k], dtype=np.int64).reshape(-1) for k in keys])  # noqa: E731
    return [cat(g, ok_keys) for g in gnd], [cat(g, junk_keys) for g in gnd]


# ----------------------------------------------------------------------------- vectorised metric
def inverse_rankings(ranks: np.ndarray, n_db: int) -> np.ndarray:
    """``inv[q, x]`` = 0-based position of database image ``x`` in the ranking of query ``q``, or
    ``k`` (the ranking length) when ``x`` is not retrieved. A row listing an image twice is an error."""
    ranks = np.asarray(ranks, dtype=np.int64)
    nq, k = ranks.shape
    if k == 0:
        raise ConfigError("the rankings are empty (0 columns); rank at least one database image per query")
    if ranks.min() < 0 or ranks.max() >= n_db:
        raise ConfigError(f"rankings hold indices outside 0..{n_db - 1}; expected database indices")
    inv = np.full((nq, n_db), k, dtype=np.int32 if k < 2**31 - 1 else np.int64)
    flat = (np.arange(nq)[:, None] * n_db + ranks).ravel()
    positions = np.tile(np.arange(k, dtype=inv.dtype), nq)
    inv.ravel()[flat] = positions
    # a repeated image overwrites its first position, which then no longer reads back
    dup = np.flatnonzero((inv.ravel()[flat] != positions).reshape(nq, k).any(axis=1))
    if len(dup):
        raise ConfigError(f"the ranking of query {int(dup[0])} lists an image twice; each row must hold distinct "
                          "indices")
    return inv


def _retrieved_positions(inv: np.ndarray, k: int, lists: list[np.ndarray]) -> np.ndarray:
    """Sorted keys ``q · k + position`` of the retrieved members of ``lists[q]`` (each image once)."""
    nq, n_db = inv.shape
    rows = np.repeat(np.arange(nq), [len(x) for x in lists])
    if not len(rows):
        return np.empty(0, dtype=np.int64)
    rows, items = np.divmod(np.unique(rows * n_db + np.concatenate(lists)), n_db)
    pos = inv[rows, items]
    hit = pos < k
    return np.sort(rows[hit] * k + pos[hit])


def _ap_and_precision(inv: np.ndarray, k: int, ok: list[np.ndarray], junk: list[np.ndarray],
                      kappas: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-query AP ``[nq]`` and P@k ``[nq, len(kappas)]`` (fractions; NaN for a query without
    positives), from the inverse rankings ``inv`` of top-``k`` rankings and per-query positive / junk lists.

    Vectorised, with no loop over queries or ranks: ``inv`` gives the position ``j`` of every positive
    and junk image; a positive's rank once junk is removed is ``r = j − |{junk at positions < j}|`` (a
    sorted search), and its order ``i`` among the query's positives is its offset from the query's first
    positive. See the module docstring for AP, P@k.
    """
    nq = len(inv)
    n_ok = np.asarray([len(x) for x in ok], dtype=np.float64)
    pos_keys, junk_keys = _retrieved_positions(inv, k, ok), _retrieved_positions(inv, k, junk)
    q_pos, j_pos = np.divmod(pos_keys.astype(np.int64), k)  # positives, sorted by query then position
    junk_before = np.searchsorted(junk_keys, pos_keys) - np.searchsorted(junk_keys, q_pos * k)
    r = (j_pos - junk_before).astype(np.float64)  # 0-based rank once the junk is removed
    first = np.searchsorted(q_pos, np.arange(nq))  # index of each query's first positive
    i = np.arange(len(q_pos)) - first[q_pos]  # order of the positive within its query
    p0 = np.divide(i, r, out=np.ones_like(r), where=r > 0)
    p1 = (i + 1) / (r + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.bincount(q_pos, weights=(p0 + p1) / 2, minlength=nq) / n_ok

    last = np.zeros(nq)
    np.maximum.at(last, q_pos, r + 1)  # 1-based position of the last positive retrieved
    prec = np.zeros((nq, len(kappas)))
    for c, kappa in enumerate(kappas):
        kq = np.minimum(last, kappa)
        hits = np.bincount(q_pos, weights=(r + 1 <= kq[q_pos]), minlength=nq)
        prec[:, c] = np.divide(hits, kq, out=np.zeros(nq), where=kq > 0)
    empty = n_ok == 0
    ap[empty], prec[empty] = np.nan, np.nan
    return ap, prec


def _n_db(ranks: np.ndarray, gnd: list[dict]) -> int:
    """Database size implied by the rankings and the ground truth (largest index + 1)."""
    top = [int(ranks.max(initial=-1))] + [int(np.max(g[key], initial=-1))
                                          for g in gnd for key in ("easy", "hard", "junk")]
    return max(top) + 1


def _report(per_setup: dict, kappas, reduce: bool) -> dict:
    out = {}
    for setup, (ap, prec) in per_setup.items():
        if reduce:
            valid = ~np.isnan(ap)
            mean = (lambda x, valid=valid: float(100 * x[valid].mean())) if valid.any() else (lambda x: float("nan"))
            out[setup] = {"mAP": mean(ap), **{f"mP@{k}": mean(prec[:, c]) for c, k in enumerate(kappas)}}
        else:
            out[setup] = {"AP": 100 * ap, **{f"P@{k}": 100 * prec[:, c] for c, k in enumerate(kappas)}}
    return out


def revisited_map(ranks_or_scores, gnd, kappas: Sequence[int] = (1, 5, 10), reduce: bool = True) -> dict:
    """mAP and mP@k (percent) of the Easy, Medium and Hard setups.

    ``ranks_or_scores``: rankings ``[nq, k]`` (ints) or similarities ``[nq, n_db]`` (floats), see
    :func:`as_rankings`; ``gnd``: the list of per-query dicts (or the dict of
    :func:`load_revisited_gnd`). Returns ``{"easy": {"mAP": ..., "mP@1": ..., ...}, "medium": ...,
    "hard": ...}``, means over the queries that have positives (NaN if none has). With
    ``reduce=False`` returns per-query arrays instead: ``{"easy": {"AP": [nq], "P@1": [nq], ...}}``
    with NaN for the skipped queries.
    """
    gnd = gnd_list(gnd)
    kappas = _as_kappas(kappas)
    ranks = as_rankings(ranks_or_scores, len(gnd))
    inv = inverse_rankings(ranks, _n_db(ranks, gnd))
    per_setup = {s: _ap_and_precision(inv, ranks.shape[1], *_setup_lists(gnd, s), kappas) for s in SETUPS}
    return _report(per_setup, kappas, reduce)


def original_map(ranks_or_scores, gnd, kappas: Sequence[int] = (1, 5, 10), reduce: bool = True) -> dict:
    """mAP and mP@k (percent) of the original Oxford 5k / Paris 6k protocol: positives ``ok``, junk
    ``junk`` (the lists of :func:`load_original_gnd`), AP and P@k as in the module docstring.

    Returns ``{"mAP": ..., "mP@1": ..., ...}`` (means over the queries that have positives), or with
    ``reduce=False`` the per-query ``{"AP": [nq], "P@1": [nq], ...}``.
    """
    gnd = gnd_list(gnd)
    kappas = _as_kappas(kappas)
    ranks = as_rankings(ranks_or_scores, len(gnd))
    missing = [q for q, g in enumerate(gnd) if not {"ok", "junk"} <= set(g)]
    if missing:
        raise ConfigError(f"query {missing[0]} of gnd has no 'ok'/'junk' lists: original_map takes the original "
                          "protocol's gnd (load_original_gnd); the revisited one goes to revisited_map")
    ok = [np.asarray(g["ok"], dtype=np.int64).reshape(-1) for g in gnd]
    junk = [np.asarray(g["junk"], dtype=np.int64).reshape(-1) for g in gnd]
    n_db = max([int(ranks.max(initial=-1))] + [int(x.max(initial=-1)) for x in ok + junk]) + 1
    per = _ap_and_precision(inverse_rankings(ranks, n_db), ranks.shape[1], ok, junk, kappas)
    return _report({"all": per}, kappas, reduce)["all"]


def protocol_map(name: str, ranks_or_scores, gnd, kappas: Sequence[int] = (1, 5, 10)) -> dict:
    """The metric of dataset ``name``: :func:`original_map` for ``oxford5k`` / ``paris6k``, else
    :func:`revisited_map` (``{"easy"|"medium"|"hard": {...}}``)."""
    metric = original_map if name in ORIGINAL_NAMES else revisited_map
    return metric(ranks_or_scores, gnd, kappas)


# ----------------------------------------------------------------------------- slow reference
def _reference_query(ranking, ok, junk, kappas) -> tuple[float, list[float]]:
    """One query, straight from the protocol: walk the ranking, drop junk, then AP and P@k."""
    ok_set, junk_set = set(int(x) for x in ok), set(int(x) for x in junk)
    if len(ok) == 0:
        return float("nan"), [float("nan")] * len(kappas)
    positions, n_junk = [], 0  # positions of the positives once the junk ranked before them is removed
    for j, item in enumerate(ranking):
        if int(item) in ok_set:
            positions.append(j - n_junk)
        if int(item) in junk_set:
            n_junk += 1
    ap = 0.0
    for i, r in enumerate(positions):
        precision_0 = 1.0 if r == 0 else i / r
        precision_1 = (i + 1) / (r + 1)
        ap += (precision_0 + precision_1) / 2 * (1 / len(ok))
    prec = []
    for kappa in kappas:
        if not positions:
            prec.append(0.0)
            continue
        kq = min(max(positions) + 1, kappa)
        prec.append(sum(1 for r in positions if r + 1 <= kq) / kq)
    return ap, prec


def revisited_map_reference(ranks_or_scores, gnd, kappas: Sequence[int] = (1, 5, 10), reduce: bool = True) -> dict:
    """:func:`revisited_map` with a Python loop over queries and ranks (slow; for tests and the benchmark)."""
    gnd = gnd_list(gnd)
    kappas = _as_kappas(kappas)
    ranks = as_rankings(ranks_or_scores, len(gnd))
    per_setup = {}
    for setup in SETUPS:
        ok, junk = _setup_lists(gnd, setup)
        rows = [_reference_query(ranks[q].tolist(), ok[q], junk[q], kappas) for q in range(len(gnd))]
        ap = np.asarray([a for a, _ in rows])
        per_setup[setup] = (ap, np.asarray([p for _, p in rows]).reshape(len(gnd), len(kappas)))
    return _report(per_setup, kappas, reduce)


# ----------------------------------------------------------------------------- +1M distractors
def _top_k_columns(sim: np.ndarray, k: int) -> np.ndarray:
    """Column indices ``[nq, min(k, n)]`` of each row's ``k`` largest values, equal values by lower
    index, listed in increasing column order. A partition finds the k-th largest value v; the row keeps
    every value > v and, of those equal to v, the ones with the lowest indices."""
    nq, n = sim.shape
    if k >= n:
        return np.broadcast_to(np.arange(n), (nq, n))
    v = np.partition(sim, n - k, axis=1)[:, n - k : n - k + 1]
    above = sim > v
    equal = sim == v
    need = k - above.sum(axis=1, keepdims=True)
    keep = above | (equal & (np.cumsum(equal, axis=1) <= need))
    return np.nonzero(keep)[1].reshape(nq, k)


def rank_chunked(query_emb, db, topk: int | None = None, chunk: int = DEFAULT_CHUNK,
                 return_scores: bool = False):
    """Rank a (memory-mapped) database for each query by decreasing inner product ``<q, x>``, equal
    similarities by increasing index, reading ``chunk`` database rows at a time.

    ``db`` is any ``[n_db, D]`` array (an ``np.memmap`` / ``np.load(..., mmap_mode="r")`` of float16
    or float32); each chunk is cast to float32. ``topk=None`` returns the full ranking ``[nq, n_db]``
    (the similarity matrix ``[nq, n_db]`` is held, but never the database); ``topk=k`` keeps a
    running top-k: each chunk's own top-k (:func:`_top_k_columns`, a partition) is merged into it
    with a stable sort, so memory is
    ``O(nq · (k + chunk) + chunk · D)``. Returns ``ranks`` (int64), and the similarities in rank
    order when ``return_scores``. A database row that is not finite is an error.
    """
    q = np.ascontiguousarray(np.asarray(query_emb, dtype=np.float32))
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise ConfigError(
            f"query embeddings {q.shape} and database {db.shape} must be [nq, D] and [n_db, D] with the same D"
        )
    n_db = len(db)
    if chunk < 1:
        raise ConfigError(f"chunk={chunk} must be >= 1")
    if topk is not None and not 1 <= topk <= n_db:
        raise ConfigError(f"topk={topk} must be between 1 and the database size {n_db}, or None for the full ranking")
    if not np.isfinite(q).all():
        raise ConfigError("query embeddings contain NaN or inf; check the model")
    nq = len(q)

    def similarities(s: int) -> np.ndarray:
        block = q @ np.asarray(db[s : s + chunk], dtype=np.float32).T
        if not np.isfinite(block).all():
            raise ConfigError(f"database rows {s}..{s + block.shape[1] - 1} give non-finite similarities; "
                              "the stored embeddings contain NaN or inf (or overflow float16)")
        return block

    if topk is None:
        scores = np.empty((nq, n_db), dtype=np.float32)
        for s in range(0, n_db, chunk):
            scores[:, s : s + chunk] = similarities(s)
        ranks = np.argsort(-scores, axis=1, kind="stable")
        return (ranks, np.take_along_axis(scores, ranks, axis=1)) if return_scores else ranks
    best_s = np.empty((nq, 0), dtype=np.float32)
    best_i = np.empty((nq, 0), dtype=np.int64)
    for s in range(0, n_db, chunk):
        block = similarities(s)
        block_i = _top_k_columns(block, topk)
        cand_s = np.concatenate([best_s, np.take_along_axis(block, block_i, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, block_i + s], axis=1)
        # stable: among equal scores, the kept (lower-index) candidates stay first, then the chunk in index order
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :topk]
        best_s = np.take_along_axis(cand_s, order, axis=1)
        best_i = np.take_along_axis(cand_i, order, axis=1)
    return (best_i, best_s) if return_scores else best_i
