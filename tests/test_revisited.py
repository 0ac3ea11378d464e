"""Revisited Oxford/Paris: the mAP / mP@k protocol against a slow loop and hand-computed cases, the
ground-truth reader and query crops on a generated fixture, and chunked ranking of a memmap."""

import pickle
import re

import numpy as np
import pytest
import torch
from fixtures_benchmarks import make_original, make_revisited

from bench.revisited import random_gnd
from nbsrc.data.oxford_paris import (
    build_distractors,
    build_revisited,
    crop_query,
    load_original_gnd,
    load_revisited_gnd,
)
from nbsrc.errors import ConfigError, DatasetError
from nbsrc.eval.revisited_map import original_map, rank_chunked, revisited_map, revisited_map_reference


def q(easy=(), hard=(), junk=()):
    return {"bbx": [0, 0, 1, 1], "easy": list(easy), "hard": list(hard), "junk": list(junk)}


def ap_and_precision(ranks, ok, junk, kappas=(1, 5, 10)):
    """Per-query AP and P@k as fractions, through :func:`revisited_map`'s Medium setup, whose positives are
    ``easy ∪ hard`` (here ``ok``) and whose junk is ``junk``."""
    r = revisited_map(ranks, [q(easy=o, junk=j) for o, j in zip(ok, junk, strict=True)], kappas, reduce=False)["medium"]
    return r["AP"] / 100, np.stack([r[f"P@{k}"] for k in kappas], axis=1) / 100


def assert_same(a: dict, b: dict, tol=1e-9):
    assert a.keys() == b.keys()
    for s in a:
        assert a[s].keys() == b[s].keys()
        for m in a[s]:
            np.testing.assert_allclose(a[s][m], b[s][m], rtol=0, atol=tol, equal_nan=True)


def revisitop_compute_map(ranks, gnd, kappas=()):
    """revisitop's ``compute_map`` (python/evaluate.py), step by step: ``ranks`` is its
    ``[n_db, n_queries]`` layout, ``gnd[i]`` has ``ok`` and ``junk``. Returns ``(map, aps, pr, prs)``
    as fractions; a query without positives is NaN and left out of the means."""
    nq = len(gnd)
    aps, prs = np.zeros(nq), np.zeros((nq, len(kappas)))
    total_ap, total_pr, n_empty = 0.0, np.zeros(len(kappas)), 0
    for i in range(nq):
        ok = np.asarray(gnd[i]["ok"])
        if len(ok) == 0:
            aps[i], prs[i] = np.nan, np.nan
            n_empty += 1
            continue
        junk = np.asarray(gnd[i].get("junk", []))
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], ok)]  # sorted 0-based positions
        junk_pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], junk)]
        shift, j = 0, 0
        for p in range(len(pos)):  # each positive moves up by the junk ranked before it
            while j < len(junk_pos) and pos[p] > junk_pos[j]:
                shift, j = shift + 1, j + 1
            pos[p] -= shift
        ap = 0.0
        for n, rank in enumerate(pos):  # trapezoids of the precision-recall curve
            precision_0 = 1.0 if rank == 0 else n / rank
            precision_1 = (n + 1) / (rank + 1)
            ap += (precision_0 + precision_1) / (2 * len(ok))
        aps[i] = ap
        total_ap += ap
        pos = pos + 1
        for c, kappa in enumerate(kappas):
            kq = min(pos.max(), kappa)
            prs[i, c] = (pos <= kq).sum() / kq
        total_pr += prs[i]
    return total_ap / (nq - n_empty), aps, total_pr / (nq - n_empty), prs


def as_protocol(gnd, setup):
    """revisitop's example: the setup's positives as ``ok``, its ignored images as ``junk``."""
    ok_keys, junk_keys = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
                          "hard": (("hard",), ("junk", "easy"))}[setup]
    return [{"ok": np.concatenate([g[k] for k in ok_keys]), "junk": np.concatenate([g[k] for k in junk_keys])}
            for g in gnd]


# ----------------------------------------------------------------------------- hand-computed cases
def test_ap_hand_computed_without_junk():
    # positives at 0-based ranks 0 and 2 of 4, n = 2:
    # i=0, r=0: (1 + 1/1)/2 * 1/2 = 0.5 ; i=1, r=2: (1/2 + 2/3)/2 * 1/2 = 7/24
    ap, prec = ap_and_precision(np.array([[5, 1, 7, 3]]), [np.array([5, 7])], [np.array([], dtype=np.int64)],
                                (1, 2, 3, 10))
    assert ap[0] == pytest.approx(0.5 + 7 / 24, abs=1e-12)
    # 1-based positions {1, 3}; P@1 = 1/1, P@2 = 1/2, P@3 = 2/3, P@10: k_q = min(10, 3) -> 2/3
    np.testing.assert_allclose(prec[0], [1, 1 / 2, 2 / 3, 2 / 3], atol=1e-12)


def test_junk_before_a_positive_is_removed():
    # ranking: junk, positive, other, positive -> after removing junk: positive at 0 and 2
    ap, _ = ap_and_precision(np.array([[9, 5, 1, 7]]), [np.array([5, 7])], [np.array([9])])
    assert ap[0] == pytest.approx(0.5 + 7 / 24, abs=1e-12)
    # junk everywhere before the positives: both positives first -> AP = 1
    ap, prec = ap_and_precision(np.array([[9, 8, 5, 7, 1]]), [np.array([5, 7])], [np.array([8, 9])], (1, 5))
    assert ap[0] == pytest.approx(1.0) and prec[0].tolist() == [1.0, 1.0]


def test_unretrieved_positive_still_counts_in_n():
    # top-2 list with one of two positives at rank 0: AP = (1 + 1)/2 * 1/2
    ap, prec = ap_and_precision(np.array([[5, 1]]), [np.array([5, 7])], [np.array([], dtype=np.int64)], (1, 5))
    assert ap[0] == pytest.approx(0.5) and prec[0].tolist() == [1.0, 1.0]
    ap, prec = ap_and_precision(np.array([[1, 2]]), [np.array([5])], [np.array([], dtype=np.int64)], (1,))
    assert ap[0] == 0.0 and prec[0, 0] == 0.0


def test_setups_move_hard_and_easy_between_positives_and_junk():
    # ranking 0..5; easy = {2}, hard = {0}, junk = {1}
    gnd = [q(easy=[2], hard=[0], junk=[1])]
    r = revisited_map(np.arange(6)[None], gnd, kappas=(1,))
    # Easy: positives {2}, junk {1, 0} -> adjusted rank 0 -> AP 1
    assert r["easy"]["mAP"] == pytest.approx(100)
    # Medium: positives {2, 0}, junk {1}: ranks 0 and 1 -> AP 1
    assert r["medium"]["mAP"] == pytest.approx(100)
    # Hard: positives {0}, junk {1, 2}: rank 0 -> AP 1
    assert r["hard"]["mAP"] == pytest.approx(100)
    # reversed ranking 5..0: Easy: 2 is at 3, junk 1 and 0 come after it -> r=3, AP = (0 + 1/4)/2 = 1/8
    r = revisited_map(np.arange(6)[::-1].copy()[None], gnd, kappas=(1,))
    assert r["easy"]["mAP"] == pytest.approx(100 / 8)
    # Hard: 0 at position 5, junk 2 and 1 before it -> r = 3 -> 1/8 as well
    assert r["hard"]["mAP"] == pytest.approx(100 / 8)
    # Medium: 2 at position 3 (r=3), 0 at position 5 minus junk 1 (r=4):
    # (0 + 1/4)/2/2 + (1/4 + 2/5)/2/2 = 1/16 + 13/80
    assert r["medium"]["mAP"] == pytest.approx(100 * (1 / 16 + 13 / 80))


def test_queries_without_positives_are_skipped():
    gnd = [q(easy=[0], hard=[]), q(easy=[], hard=[1])]
    per_query = revisited_map(np.array([[0, 1, 2], [1, 0, 2]]), gnd, reduce=False)
    assert np.isnan(per_query["easy"]["AP"][1]) and np.isnan(per_query["hard"]["AP"][0])
    mean = revisited_map(np.array([[0, 1, 2], [1, 0, 2]]), gnd)
    assert mean["easy"]["mAP"] == pytest.approx(100) and mean["hard"]["mAP"] == pytest.approx(100)
    none = revisited_map(np.array([[0, 1, 2]]), [q(easy=[0])])
    assert np.isnan(none["hard"]["mAP"])


def test_scores_are_ranked_by_decreasing_similarity_ties_by_index():
    gnd = [q(easy=[1], junk=[])]
    # items 0 and 1 tie: 0 comes first, so the positive is at rank 1
    r = revisited_map(np.array([[0.5, 0.5, 0.1]]), gnd, reduce=False)
    assert r["easy"]["AP"][0] == pytest.approx(100 * (0 + 1 / 2) / 2)


# ----------------------------------------------------------------------------- against the slow loop
@pytest.mark.parametrize("seed", range(4))
def test_vectorised_equals_reference_on_random_rankings(seed):
    rng = np.random.default_rng(seed)
    n_db = 300
    gnd = random_gnd(12, n_db, rng, max_sizes=(15, 20, 25))
    ranks = np.argsort(rng.random((12, n_db)), axis=1)
    # force junk to be ranked before the positives for a few queries
    for qi in range(0, 12, 3):
        g = gnd[qi]
        first = np.concatenate([g["junk"], g["hard"], g["easy"]])
        rest = np.setdiff1d(np.arange(n_db), first)
        ranks[qi] = np.concatenate([first, rng.permutation(rest)])
    for kappas in [(1, 5, 10), (3, 100)]:
        for reduce in (True, False):
            assert_same(revisited_map(ranks, gnd, kappas, reduce), revisited_map_reference(ranks, gnd, kappas, reduce))
    # top-k lists (some positives never retrieved) and similarity input
    assert_same(revisited_map(ranks[:, :40], gnd), revisited_map_reference(ranks[:, :40], gnd))
    scores = rng.integers(0, 5, (12, n_db)).astype(np.float32)  # many ties
    assert_same(revisited_map(scores, gnd), revisited_map_reference(scores, gnd))


@pytest.mark.parametrize("seed", range(3))
def test_revisited_and_original_map_equal_revisitops_compute_map(seed):
    rng = np.random.default_rng(100 + seed)
    n_db, nq, kappas = 200, 10, (1, 5, 10)
    gnd = random_gnd(nq, n_db, rng, max_sizes=(12, 15, 20))
    gnd[3]["hard"] = np.empty(0, dtype=np.int64)  # a query the Hard setup skips
    ranks = np.argsort(rng.random((nq, n_db)), axis=1)
    for qi in (0, 4):  # junk ranked first
        first = np.concatenate([gnd[qi]["junk"], gnd[qi]["hard"]])
        ranks[qi] = np.concatenate([first, rng.permutation(np.setdiff1d(np.arange(n_db), first))])
    ours = revisited_map(ranks, gnd, kappas, reduce=False)
    for setup in ("easy", "medium", "hard"):
        m, aps, pr, prs = revisitop_compute_map(ranks.T, as_protocol(gnd, setup), kappas)
        np.testing.assert_allclose(ours[setup]["AP"], 100 * aps, atol=1e-9)
        mean = revisited_map(ranks, gnd, kappas)[setup]
        assert mean["mAP"] == pytest.approx(100 * m, abs=1e-9)
        assert [mean[f"mP@{k}"] for k in kappas] == pytest.approx(100 * pr, abs=1e-9)
    original = [{"bbx": g["bbx"], "ok": np.concatenate([g["easy"], g["hard"]]), "junk": g["junk"]} for g in gnd]
    m, aps, pr, prs = revisitop_compute_map(ranks.T, original, kappas)
    got = original_map(ranks, original, kappas)
    assert got["mAP"] == pytest.approx(100 * m, abs=1e-9)
    assert [got[f"mP@{k}"] for k in kappas] == pytest.approx(100 * pr, abs=1e-9)
    np.testing.assert_allclose(original_map(ranks, original, kappas, reduce=False)["P@5"], 100 * prs[:, 1], atol=1e-9)
    with pytest.raises(ConfigError, match="original protocol's gnd"):
        original_map(ranks, gnd)


def test_overlapping_lists_follow_the_official_semantics():
    rng = np.random.default_rng(7)
    gnd = [{"bbx": [0, 0, 1, 1], "easy": rng.choice(50, 10, replace=False), "hard": rng.choice(50, 10, replace=False),
            "junk": rng.choice(50, 10, replace=False)} for _ in range(6)]
    ranks = np.argsort(rng.random((6, 50)), axis=1)
    assert_same(revisited_map(ranks, gnd, (1, 5, 10), False), revisited_map_reference(ranks, gnd, (1, 5, 10), False))


def test_mp_at_k_uses_the_last_positive_when_it_comes_before_k():
    # 3 positives ranked first: P@10 = 3/min(10, 3) = 1
    r = revisited_map(np.arange(20)[None], [q(easy=[0, 1, 2])], kappas=(1, 5, 10))
    assert r["easy"]["mP@10"] == pytest.approx(100) and r["easy"]["mP@5"] == pytest.approx(100)
    # positives at 1-based 1 and 8: P@5 = 1/5, P@10 = 2/8
    r = revisited_map(np.arange(20)[None], [q(easy=[0, 7])], kappas=(5, 10))
    assert r["easy"]["mP@5"] == pytest.approx(20) and r["easy"]["mP@10"] == pytest.approx(25)


def test_bad_rankings_are_rejected():
    gnd = [q(easy=[0]), q(easy=[1])]
    with pytest.raises(ConfigError, match="transpose"):
        revisited_map(np.zeros((5, 2), dtype=np.int64), gnd)
    with pytest.raises(ConfigError, match="lists an image twice"):
        revisited_map(np.array([[0, 1, 1], [0, 1, 2]]), gnd)
    with pytest.raises(ConfigError, match="NaN"):
        revisited_map(np.array([[0.1, np.nan], [0.2, 0.3]]), gnd)
    with pytest.raises(ConfigError, match="outside"):
        revisited_map(np.array([[0, -1], [1, 0]]), gnd)
    with pytest.raises(ConfigError, match="empty"):
        revisited_map(np.zeros((2, 0), dtype=np.int64), gnd)
    with pytest.raises(ConfigError, match="kappas"):
        revisited_map(np.array([[0, 1], [1, 0]]), gnd, kappas=(0,))


def test_bench_cli_writes_the_speedup_and_agreement(tmp_path):
    from bench.__main__ import main as bench_main

    path = tmp_path / "R.md"
    assert bench_main(["revisited", "--queries", "10", "--db", "1000", "--rounds", "3", "--results", str(path)]) == 0
    text = path.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| ") and "x [" in line)
    speedup, lo, hi = (float(v) for v in re.match(r"\| ([\d.]+)x \[([\d.]+), ([\d.]+)\]", row).groups())
    assert 0 < lo <= speedup <= hi  # a ratio, not a timed assertion
    assert float(row.split("|")[2]) < 1e-9 and "## revisited" in text
    assert bench_main(["revisited", "--rounds", "0", "--results", str(path)]) == 2


# ----------------------------------------------------------------------------- data
def test_build_revisited_reads_gnd_and_crops_queries(tmp_path):
    root = make_revisited(tmp_path, "roxford5k", n_db=12, n_queries=3, size=(20, 16))
    data = build_revisited(root)
    assert data.name == "roxford5k" and len(data.database) == 12 and len(data.query) == 3
    for i in range(3):
        x1, y1, x2, y2 = (int(round(v)) for v in data.gnd[i]["bbx"])
        crop = data.query.raw(i)
        assert crop.shape == (3, y2 - y1, x2 - x1)
        assert torch.equal(crop, data.database.raw(i)[:, y1:y2, x1:x2])  # query i is database image i
    with open(root / "gnd_roxford5k.pkl", "rb") as f:
        raw = pickle.load(f)
    assert [g["easy"] for g in raw["gnd"]] == [g["easy"].tolist() for g in data.gnd]


def test_build_revisited_reads_the_original_oxford_and_paris_gnd(tmp_path):
    root = make_original(tmp_path, "paris6k", n_db=10, n_queries=2)
    data = build_revisited(root)  # found by its file name
    assert data.name == "paris6k" and len(data.database) == 10 and len(data.query) == 2
    with open(root / "gnd_paris6k.pkl", "rb") as f:
        raw = pickle.load(f)
    assert [g["ok"] for g in raw["gnd"]] == [g["ok"].tolist() for g in data.gnd]
    assert [g["junk"] for g in raw["gnd"]] == [g["junk"].tolist() for g in data.gnd]
    assert data.query.sizes() == [tuple(data.query.raw(i).shape[-2:]) for i in range(2)]
    with open(root / "gnd_paris6k.pkl", "wb") as f:  # a revisited entry where the original one belongs
        pickle.dump({"imlist": raw["imlist"], "qimlist": raw["qimlist"][:1], "gnd": [q(easy=[1])]}, f)
    with pytest.raises(DatasetError, match="query 0 has no 'ok'"):
        load_original_gnd(root / "gnd_paris6k.pkl")
    with pytest.raises(DatasetError, match=r"expected .*gnd_oxford5k\.pkl.*cnnimageretrieval/data/test/oxford5k"):
        build_revisited(tmp_path / "paris6k", "oxford5k")


def test_crop_query_rounds_and_clips():
    img = torch.arange(2 * 5 * 6).reshape(2, 5, 6)
    assert torch.equal(crop_query(img, [0.6, 1.2, 3.4, 4.0]), img[:, 1:4, 1:3])
    assert torch.equal(crop_query(img, [-3, -1, 100, 100]), img)
    with pytest.raises(DatasetError, match="leaves nothing"):
        crop_query(img, [4, 1, 4, 3])


def test_revisited_errors(tmp_path):
    with pytest.raises(DatasetError, match="data_root"):
        build_revisited(None)
    with pytest.raises(DatasetError, match="expected exactly one"):
        build_revisited(tmp_path)
    with pytest.raises(DatasetError, match=r"expected .*gnd_rparis6k\.pkl.*revisitop"):
        load_revisited_gnd(tmp_path / "gnd_rparis6k.pkl")
    root = make_revisited(tmp_path, "rparis6k")
    victim = root / "jpg" / "rparis6k_005.jpg"
    victim.unlink()
    with pytest.raises(DatasetError) as e:
        build_revisited(root, "rparis6k")
    assert f"expected {victim}" in str(e.value) and "\n" not in str(e.value)
    (root / "gnd_rparis6k.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="cannot read"):
        build_revisited(root, "rparis6k")
    with open(root / "gnd_rparis6k.pkl", "wb") as f:
        bad = {"bbx": [0, 0, 1, 1], "easy": [3], "hard": [], "junk": []}
        pickle.dump({"imlist": ["a"], "qimlist": ["a"], "gnd": [bad]}, f)
    with pytest.raises(DatasetError, match="out of range"):
        build_revisited(root, "rparis6k")


def test_distractor_list(tmp_path):
    from fixtures_benchmarks import write_image

    (tmp_path / "revisitop1m.txt").write_text("a/x1.jpg\nb/x2\n")
    write_image(tmp_path / "jpg" / "a" / "x1.jpg", 0)
    with pytest.raises(DatasetError, match=r"expected .*b/x2\.jpg"):
        build_distractors(tmp_path)
    write_image(tmp_path / "jpg" / "b" / "x2.jpg", 1)
    assert len(build_distractors(tmp_path)) == 2


# ----------------------------------------------------------------------------- chunked ranking of a memmap
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_rank_chunked_equals_dense_argsort(tmp_path, dtype):
    rng = np.random.default_rng(0)
    # small integers: every dot product is exact, with many ties
    db = rng.integers(-2, 3, (103, 4)).astype(np.float32)
    queries = rng.integers(-2, 3, (7, 4)).astype(np.float32)
    path = tmp_path / "db.npy"
    np.save(path, db.astype(dtype))
    mm = np.load(path, mmap_mode="r")
    assert mm.dtype == dtype and mm.shape == (103, 4)
    dense = queries @ db.T
    expected = np.argsort(-dense, axis=1, kind="stable")  # (-sim, index) order
    for chunk in (1, 10, 103, 500):
        np.testing.assert_array_equal(rank_chunked(queries, mm, chunk=chunk), expected)
        for k in (1, 5, 103):
            ranks, scores = rank_chunked(queries, mm, topk=k, chunk=chunk, return_scores=True)
            np.testing.assert_array_equal(ranks, expected[:, :k])
            np.testing.assert_array_equal(scores, np.take_along_axis(dense, expected[:, :k], axis=1))


def test_rank_chunked_errors(tmp_path):
    db = np.zeros((5, 3), np.float32)
    with pytest.raises(ConfigError, match="same D"):
        rank_chunked(np.zeros((2, 4)), db)
    with pytest.raises(ConfigError, match="topk"):
        rank_chunked(np.zeros((2, 3)), db, topk=6)
    db[3, 1] = np.nan
    with pytest.raises(ConfigError, match="rows 2..3 give non-finite"):
        rank_chunked(np.ones((2, 3)), db, topk=2, chunk=2)

