"""Revisited evaluation the DToP way (nbsrc.eval.particular): multi-scale on both sides and
supervised whitening learned from SfM-120k's matching pairs, on the generated fixtures, each
against the computation written out by hand; and the SfM-120k run that uses them."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures_benchmarks import make_revisited, make_sfm120k
from torch import nn

from nbsrc.config import ExperimentConfig
from nbsrc.data.sfm import load_sfm120k_db
from nbsrc.data.transforms import particular_object_transform
from nbsrc.errors import ConfigError
from nbsrc.eval import extract_embeddings
from nbsrc.eval.particular import DEFAULT_SCALES, embed_at_scales, evaluate_revisited_data, learn_sfm_whitening
from nbsrc.eval.revisited_map import build_revisited, revisited_map
from nbsrc.eval.whitening import apply_whitening, learn_whitening

pytestmark = pytest.mark.xdist_group("particular_eval")  # its tests share module-scoped fixtures: one worker


class AnySize(nn.Module):
    """A tiny model that takes any input size (as DToP's DPE does): conv, mean pool, l2."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        return F.normalize(self.conv(x).relu().mean((2, 3)) + 0.1 * x.mean((2, 3)).repeat(1, 2), dim=-1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("particular")
    return {"sfm": make_sfm120k(base / "sfm", n_clusters=10, per_cluster=6), "rev": make_revisited(base / "rev")}


TF = particular_object_transform(16)


def test_single_scale_without_whitening_is_the_plain_evaluation(data):
    model = AnySize().eval()
    rev = build_revisited(data["rev"], "roxford5k", TF)
    res, emb = evaluate_revisited_data(model, rev)
    q, _, _ = extract_embeddings(model, rev.query, progress=False)
    x, _, _ = extract_embeddings(model, rev.database, progress=False)
    np.testing.assert_array_equal(emb["query"], q)
    assert res == revisited_map(q.astype(np.float64) @ x.astype(np.float64).T, rev.gnd)


def test_multiscale_is_the_renormalised_sum_over_scales(data):
    model = AnySize().eval()
    rev = build_revisited(data["rev"], "roxford5k", TF)
    got = embed_at_scales(model, rev.database, DEFAULT_SCALES)
    with torch.no_grad():
        for i in (0, 5):
            img = rev.database[i][0][None]
            total = sum(model(img if s == 1 else F.interpolate(img, size=(round(16 * s), round(16 * s)),
                                                                  mode="bilinear", align_corners=False))
                        for s in DEFAULT_SCALES)
            np.testing.assert_allclose(got[i], F.normalize(total, dim=-1)[0].numpy(), atol=1e-6)
    res_ms, _ = evaluate_revisited_data(model, rev, DEFAULT_SCALES)
    res_q1, emb = evaluate_revisited_data(model, rev, DEFAULT_SCALES, query_scales=(1.0,))  # Table A11's rows
    np.testing.assert_allclose(emb["database"], got)
    np.testing.assert_allclose(emb["query"], embed_at_scales(model, rev.query))
    assert set(res_ms) == set(res_q1) == {"easy", "medium", "hard"}


def test_whitening_is_learned_from_the_sfm_pairs(data):
    model = AnySize().eval()
    db = load_sfm120k_db(data["sfm"], "train")
    m, p = learn_sfm_whitening(model, db, TF, DEFAULT_SCALES)
    x = embed_at_scales(model, db.images(TF), DEFAULT_SCALES)  # every image, then the pairs' rows
    m_ref, p_ref = learn_whitening(x, db.qidxs, db.pidxs)
    np.testing.assert_allclose(m, m_ref, atol=1e-6)
    np.testing.assert_allclose(np.abs(p), np.abs(p_ref), atol=1e-5)  # eigenvectors up to sign
    rev = build_revisited(data["rev"], "roxford5k", TF)
    res, emb = evaluate_revisited_data(model, rev, DEFAULT_SCALES, whitening=(m, p))
    q = apply_whitening(embed_at_scales(model, rev.query, DEFAULT_SCALES), m, p)
    x = apply_whitening(embed_at_scales(model, rev.database, DEFAULT_SCALES), m, p)
    np.testing.assert_allclose(emb["query"], q, atol=1e-6)
    assert res == revisited_map(q.astype(np.float64) @ x.astype(np.float64).T, rev.gnd)
    m2, p2 = learn_sfm_whitening(model, db, TF, max_pairs=len(db.qidxs) - 1, shrinkage=0.1)
    assert p2.shape == p.shape
    with pytest.raises(ConfigError, match="max_pairs=0"):
        learn_sfm_whitening(model, db, TF, max_pairs=0)


def test_sfm_run_evaluates_with_whitening_and_scales(data, tmp_path):
    """run_experiment on SfM-120k with the DToP evaluation switched on (an untrained convnet, which takes any size)."""
    from nbsrc.experiment import run_experiment

    cfg = ExperimentConfig(name="dtop_eval", runs_dir=str(tmp_path), dataset="sfm120k", data_root=str(data["sfm"]),
                           backbone="resnet18", patch_size=None, pooling="avg", img_size=32, dim=8, iterations=0,
                           eval_scales=list(DEFAULT_SCALES), whitening="learned", progress=False, device="cpu")
    res = run_experiment(cfg, mode="new", roxford_root=data["rev"])
    saved = json.loads((res.run_dir / "results.json").read_text())
    assert 0 <= saved["roxford5k"]["medium"]["mAP"] <= 100
    plain = run_experiment(cfg.replace(name="plain", eval_scales=None, whitening=None), mode="new",
                               roxford_root=data["rev"])
    emb_w, emb_p = np.load(res.run_dir / "embeddings.npz"), np.load(plain.run_dir / "embeddings.npz")
    assert emb_w["roxford5k_query"].shape == emb_p["roxford5k_query"].shape
    assert not np.allclose(emb_w["roxford5k_query"], emb_p["roxford5k_query"])  # whitening and scales applied


# ----------------------------------------------------------------------------- IRT Fig. 5, Revisited form
def test_revisited_pair_similarities_by_hand():
    from nbsrc.analysis import revisited_pair_similarities, run_pair_similarities

    q = np.array([[1.0, 0.0], [0.0, 2.0]])
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    gnd = [{"easy": [0], "hard": [2], "junk": [3], "bbx": [0, 0, 1, 1]},
           {"easy": [], "hard": [1], "junk": [], "bbx": [0, 0, 1, 1]}]
    pos, neg, info = revisited_pair_similarities(q, x, gnd)  # medium: positives easy ∪ hard, junk left out
    r = 1 / np.sqrt(2)
    np.testing.assert_allclose(np.sort(pos), np.sort([1.0, r, 1.0]))
    np.testing.assert_allclose(np.sort(neg), np.sort([0.0, 0.0, r, 0.0]))  # q0: x1; q1: x0, x2, x3
    assert (info["positives_total"], info["negatives_total"]) == (3, 4)
    pos_h, neg_h, _ = revisited_pair_similarities(q, x, gnd, setup="hard")  # hard: P = hard, J = junk ∪ easy
    np.testing.assert_allclose(np.sort(pos_h), np.sort([r, 1.0]))
    assert len(neg_h) == 1 + 3
    _, sampled, info = revisited_pair_similarities(q, x, gnd, max_negatives=2, seed=1)
    assert len(sampled) == 2 and info["negatives_used"] == 2 and set(sampled) <= set(neg)
    emb = {"rparis6k_query": q, "rparis6k_database": x, "query": q, "query_labels": np.array([0, 1])}
    assert np.array_equal(run_pair_similarities(emb, gnd)[0], pos)
    with pytest.raises(ConfigError, match="pass gnd=load_revisited_gnd"):
        run_pair_similarities(emb)
    with pytest.raises(ConfigError, match="setup='medium2'"):
        revisited_pair_similarities(q, x, gnd, setup="medium2")
