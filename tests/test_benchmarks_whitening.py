"""Notebook 09's Revisited evaluation of a DToP preset is the DToP protocol (Table A7 "Using supervised
whitening"; Table A11, 3 scales on both sides): ``evaluate_benchmarks`` learns the whitening from
SfM-120k's training pairs and applies it at the preset's ``eval_scales``, exactly as computed here
step by step; without the SfM-120k folder it says so instead of silently skipping the whitening."""

import numpy as np
import pytest
import torch
from fixtures_benchmarks import make_revisited, make_sfm120k

from nbsrc.data.sfm import load_sfm120k_db
from nbsrc.data.transforms import aspect_kept_transform
from nbsrc.errors import ConfigError
from nbsrc.eval.particular import evaluate_revisited_data, learn_sfm_whitening
from nbsrc.eval.revisited_map import build_revisited
from nbsrc.models import data_config, model_from_config
from nbsrc.paper.reproduce import evaluate_benchmarks
from nbsrc.presets import load_preset

pytestmark = pytest.mark.xdist_group("benchmarks_whitening")  # its tests share module-scoped fixtures: one worker

PRESET = "dtop_a5_vitb16_cls_sfm"
TINY = {"backbone": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "weights": "none", "device": "cpu",
        "progress": False, "model_options": {"dtop": True, "k": 2, "elm": False, "fusion": "none", "head_dim": 8,
                                             "branch": "global"}}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench_whitening")
    return {"sfm": make_sfm120k(base / "sfm", n_clusters=10, per_cluster=6), "rev": make_revisited(base / "rev")}


def test_dtop_preset_is_evaluated_with_learned_whitening_at_its_scales(trees):
    cfg = load_preset(PRESET, **TINY)
    assert cfg.eval.whitening == "learned" and len(cfg.eval.eval_scales) == 3
    torch.manual_seed(0)
    table = evaluate_benchmarks(PRESET, {"roxford5k": trees["rev"]}, overrides=TINY, sfm_root=trees["sfm"])
    torch.manual_seed(0)
    model = model_from_config(cfg).eval()  # the same random model, step by step
    norm = data_config(model)
    kept = aspect_kept_transform(32, norm["mean"], norm["std"])  # DToP's test geometry (our reading)
    db = load_sfm120k_db(trees["sfm"], "train")
    m, p = learn_sfm_whitening(model, db, kept, cfg.eval.eval_scales)
    res, _ = evaluate_revisited_data(model, build_revisited(trees["rev"], "roxford5k", kept), cfg.eval.eval_scales,
                                     whitening=(m, p))
    assert table.loc[("roxford5k", "mAP M"), "ours"] == pytest.approx(res["medium"]["mAP"], abs=1e-9)
    assert table.loc[("roxford5k", "mAP H"), "ours"] == pytest.approx(res["hard"]["mAP"], abs=1e-9)
    assert table.loc[("roxford5k", "mAP M"), "paper"] == 49.3
    assert table.attrs["revisited"] == f"scales 1, 0.707, 0.5 on both sides; whitening learned from {len(db.qidxs)} " \
                                       "SfM-120k training pairs"
    assert not np.isnan(table.loc[("roxford5k", "mAP M"), "difference"])


def test_without_the_sfm_folder_it_says_what_is_missing(trees):
    with pytest.raises(ConfigError, match=r"whitening learned on SfM-120k .* pass sfm_root="):
        evaluate_benchmarks(PRESET, {"roxford5k": trees["rev"]}, overrides=TINY)
    table = evaluate_benchmarks(PRESET, {"roxford5k": trees["rev"]}, overrides={**TINY, "whitening": None})
    assert table.attrs["revisited"].endswith("whitening none")


@pytest.mark.slow
def test_notebook_09_whitens_a_dtop_preset(trees, tmp_path):
    from nbsrc.paper.notebooks import NOTEBOOKS_DIR, run_notebook

    params = {"preset": PRESET, "roxford_root": str(trees["rev"]), "sfm_root": str(trees["sfm"]), "overrides": TINY,
              "runs_dir": str(tmp_path / "runs"), "figures_dir": str(tmp_path / "fig")}
    out = run_notebook(NOTEBOOKS_DIR / "09_benchmarks.ipynb", params, tmp_path / "09.ipynb")
    import nbformat

    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", []))
    assert "whitening learned from" in text and "mAP M" in text
    assert (tmp_path / "fig" / f"benchmarks_{PRESET}.csv").exists()
