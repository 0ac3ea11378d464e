"""DToP's evaluation protocol on the Revisited/SfM fixtures: a DToP run reports the six columns of its
tables (Oxf5k, Par6k, ROxf M/H, RPar M/H), each equal to revisitop's ``compute_map`` on the same ranks;
Table A11's four cells come from the Revisited evaluator; DToP's test images keep their aspect ratio
(longer side at the training size) while IRT's are squashed to a square."""

import json

import numpy as np
import pytest
import torch
from fixtures_benchmarks import make_original, make_revisited, make_sfm120k, write_image
from test_revisited import as_protocol, revisitop_compute_map
from torch import nn

from nbsrc.config import ExperimentConfig
from nbsrc.data.datasets import RetrievalDataset
from nbsrc.data.oxford_paris import load_original_gnd, load_revisited_gnd
from nbsrc.data.transforms import aspect_kept_transform, longer_side_size
from nbsrc.errors import DatasetError
from nbsrc.eval.particular import DEFAULT_SCALES, embed_at_scales, evaluate_revisited_data
from nbsrc.eval.revisited_map import build_revisited
from nbsrc.experiment import load_run, particular_eval_transform, run_experiment
from nbsrc.paper.grids import dtop_multiscale_table
from nbsrc.paper.reproduce import evaluate_scale_grid, preset_grid
from nbsrc.presets import load_preset

PRESET = "dtop_full_r50vitb16_sfm"  # the row of Tables A7-A13, A11's grid included
TINY = {"backbone": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "weights": "none", "device": "cpu",
        "progress": False, "iterations": 0, "warmup_iters": 0,
        "dtop": True, "k": 2, "elm": False, "fusion": "none", "head_dim": 8}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("dtop_protocol")
    rev = {n: make_revisited(base / "test", n, size=(24, 16)) for n in ("roxford5k", "rparis6k")}
    orig = {n: make_original(base / "test", n, size=(16, 24)) for n in ("oxford5k", "paris6k")}
    return {"sfm": make_sfm120k(base / "train", n_clusters=10, per_cluster=6), **rev, **orig}


@pytest.fixture(scope="module")
def dtop_run(trees, tmp_path_factory):
    cfg = load_preset(PRESET, **TINY, data_root=str(trees["sfm"]), runs_dir=str(tmp_path_factory.mktemp("runs")))
    torch.manual_seed(0)
    return run_experiment(cfg, mode="new", roxford_root=trees["roxford5k"], rparis_root=trees["rparis6k"],
                          oxford_root=trees["oxford5k"], paris_root=trees["paris6k"])


def ranks_of(emb, name):
    """revisitop's layout: ``[n_db, n_queries]``, database indices by decreasing similarity."""
    scores = emb[f"{name}_query"].astype(np.float64) @ emb[f"{name}_database"].astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable").T


def test_a_dtop_run_reports_the_six_columns_as_compute_map_gives_them(dtop_run, trees):
    saved = json.loads((dtop_run.run_dir / "results.json").read_text())
    emb = dtop_run.embeddings()
    for name in ("oxford5k", "paris6k"):
        m, *_ = revisitop_compute_map(ranks_of(emb, name), load_original_gnd(trees[name] / f"gnd_{name}.pkl")["gnd"])
        assert saved[name]["mAP"] == pytest.approx(100 * m, abs=1e-9)
    for name in ("roxford5k", "rparis6k"):
        gnd = load_revisited_gnd(trees[name] / f"gnd_{name}.pkl")["gnd"]
        for setup in ("medium", "hard"):
            m, *_ = revisitop_compute_map(ranks_of(emb, name), as_protocol(gnd, setup))
            assert saved[name][setup]["mAP"] == pytest.approx(100 * m, abs=1e-9)


def test_the_original_ground_truth_is_found_in_the_revisited_folder_or_named_when_missing(trees, tmp_path, capsys):
    import shutil

    rox = shutil.copytree(trees["roxford5k"], tmp_path / "roxford5k")
    sfm = make_sfm120k(tmp_path / "sfm")  # nothing beside it
    cfg = load_preset(PRESET, **TINY, data_root=str(sfm), runs_dir=str(tmp_path / "runs"), whitening=None)
    res = run_experiment(cfg, mode="new", roxford_root=rox)
    assert set(res.results) >= {"roxford5k"} and "oxford5k" not in res.results
    out = capsys.readouterr().out
    assert f"cnnimageretrieval/data/test/oxford5k/gnd_oxford5k.pkl into {rox}" in out
    shutil.copy(trees["oxford5k"] / "gnd_oxford5k.pkl", rox / "gnd_oxford5k.pkl")  # same images, other names
    with pytest.raises(DatasetError, match="oxford5k_000.jpg"):  # the fixture's names differ; found and read
        run_experiment(cfg.replace(name="with_oxford"), mode="new", roxford_root=rox)


def test_table_a11_cells_come_from_the_revisited_evaluator(dtop_run, trees):
    roots = {n: trees[n] for n in ("roxford5k", "rparis6k", "oxford5k", "paris6k")}
    table = evaluate_scale_grid(PRESET, dtop_run.run_dir, roots)
    grid = preset_grid(PRESET, "A11")
    assert len(table) == 4 * 6 and set(table.index.get_level_values("cell")) == set(grid)
    cell = "query single, database multi"
    assert table.loc[(cell, "roxford5k", "mAP M"), "paper"] == grid[cell]["paper"]["roxford5k"]["mAP M"] == 68.8
    # one cell by hand: the run's model, aspect-kept images, whitening learned at the preset's scales
    run = load_run(dtop_run.run_dir, with_model=True)
    from nbsrc.data.sfm import load_sfm120k_db
    from nbsrc.eval.particular import learn_sfm_whitening
    from nbsrc.models import data_config

    tf = particular_eval_transform(run.config, data_config(run.model))
    white = learn_sfm_whitening(run.model, load_sfm120k_db(trees["sfm"], "train"), tf, DEFAULT_SCALES)
    for name, col, key in (("rparis6k", "mAP H", "hard"), ("paris6k", "mAP", None)):
        res, _ = evaluate_revisited_data(run.model, build_revisited(trees[name], name, tf), DEFAULT_SCALES,
                                         query_scales=(1.0,), whitening=white)
        got = table.loc[(cell, name, col), "ours"]
        assert got == pytest.approx(round(res[key]["mAP"] if key else res["mAP"], 2), abs=1e-9)
    single = dtop_multiscale_table(run, {"1/1": ((1.0,), (1.0,))}, roots=roots)
    assert single.loc["1/1", ("oxford5k", "mAP")] == table.loc[("query single, database single", "oxford5k", "mAP"),
                                                               "ours"]


@pytest.mark.slow
def test_notebook_09_shows_the_six_columns_and_table_a11_of_a_dtop_run(dtop_run, trees, tmp_path):
    import nbformat

    from nbsrc.paper.notebooks import NOTEBOOKS_DIR, run_notebook

    params = {"preset": PRESET, "run_dir": str(dtop_run.run_dir), "sfm_root": str(trees["sfm"]),
              "roxford_root": str(trees["roxford5k"]), "rparis_root": str(trees["rparis6k"]),
              "oxford_root": str(trees["oxford5k"]), "paris_root": str(trees["paris6k"]),
              "runs_dir": str(tmp_path / "runs"), "figures_dir": str(tmp_path / "fig")}
    out = run_notebook(NOTEBOOKS_DIR / "09_benchmarks.ipynb", params, tmp_path / "09.ipynb")
    assert nbformat.read(out, as_version=4).cells[-1].outputs  # the A11 table was shown
    rows = (tmp_path / "fig" / f"benchmarks_{PRESET}.csv").read_text().splitlines()
    assert {tuple(r.split(",")[:2]) for r in rows[1:]} == {("oxford5k", "mAP"), ("paris6k", "mAP"),
                                                            ("roxford5k", "mAP M"), ("roxford5k", "mAP H"),
                                                            ("rparis6k", "mAP M"), ("rparis6k", "mAP H")}
    assert len((tmp_path / "fig" / f"tableA11_{PRESET}.csv").read_text().splitlines()) == 1 + 4 * 6


# ----------------------------------------------------------------------------- test geometry
class ShapeRecorder(nn.Module):
    """Records the input sizes it sees; the embedding is the image's mean colour and its shape."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen += [tuple(x.shape[-2:])] * len(x)
        h, w = x.shape[-2:]
        return torch.cat([x.mean((2, 3)), torch.full((len(x), 1), h / w)], dim=1)


def test_a_dtop_run_keeps_the_aspect_ratio_and_an_irt_run_squashes(tmp_path):
    root = make_revisited(tmp_path, "roxford5k", n_db=5, n_queries=2, size=(40, 30))  # 4:3 photos
    dtop = ExperimentConfig(dataset="sfm120k", img_size=32, dtop=True)
    irt = ExperimentConfig(dataset="sfm120k", img_size=32)
    norm = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    for cfg, expected in ((dtop, (24, 32)), (irt, (32, 32))):
        data = build_revisited(root, "roxford5k", particular_eval_transform(cfg, norm))
        net = ShapeRecorder()
        evaluate_revisited_data(net, data)
        assert net.seen[2:] == [expected] * 5  # the database (after the two query crops)
        crop_h, crop_w = data.query.sizes()[0]
        assert net.seen[0] == (longer_side_size(crop_h, crop_w, 32) if cfg is dtop else (32, 32))


def test_images_of_several_sizes_are_embedded_by_size_in_the_dataset_order(tmp_path):
    sizes = [(30, 40), (40, 30), (30, 40), (20, 20), (41, 30)]  # (w, h)
    paths = [str(write_image(tmp_path / f"{i}.jpg", i, s)) for i, s in enumerate(sizes)]
    ds = RetrievalDataset(np.asarray(paths, dtype=object), np.arange(5), aspect_kept_transform(16))
    net = ShapeRecorder()
    z = embed_at_scales(net, ds, DEFAULT_SCALES, batch_size=2)
    for i in range(5):  # each image alone, at its own size
        x = ds[i][0][None]
        assert tuple(x.shape[-2:]) == longer_side_size(sizes[i][1], sizes[i][0], 16)
        np.testing.assert_allclose(z[i], embed_at_scales(net, ds.subset(np.array([i])), DEFAULT_SCALES)[0], atol=1e-6)
