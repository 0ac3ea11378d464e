"""nbsrc.widgets and the pure helpers behind the explorers (the run listing of nbsrc.runlist, one
query's neighbours and hits from nbsrc.retrieval, spectra from nbsrc.analysis.run_spectra) checked against
brute force on a tiny finished run, the errors, and the widgets themselves driven from Python (set a
control, the Output's content changes accordingly)."""

import base64
import shutil

import numpy as np
import pytest
import torch

from nbsrc.analysis import average_precision_per_query, cumulative_energy
from nbsrc.analysis.run_spectra import spectrum_data
from nbsrc.config import ExperimentConfig
from nbsrc.data import build_data
from nbsrc.errors import ConfigError, RunDirError
from nbsrc.experiment import load_embeddings, run_experiment
from nbsrc.retrieval import display_image, load_retrieval, retrieval_for_query
from nbsrc.runlist import list_finished_runs
from nbsrc.widgets import retrieval_browser, spectrum_explorer

pytestmark = pytest.mark.xdist_group("widgets")  # its tests share module-scoped fixtures: one worker

K = 5


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """Two finished runs on the digits: one trained for 2 iterations (λ = 0.5), one off-the-shelf
    (λ = 0, β = 0.3); plus an unfinished run (no embeddings) and a stray folder."""
    root = tmp_path_factory.mktemp("widgets") / "runs"
    cfg = ExperimentConfig(
        name="tiny", runs_dir=str(root), dataset="digits", img_size=8, patch_size=4,
        backbone="vit_tiny_patch16_224", iterations=2, batch_size=16, m_per_class=4, lr=1e-3,
        log_every=2, ckpt_every=3, eval_per_class=20, progress=False, lam=0.5, memory_size=32,
    )
    run_experiment(cfg)
    run_experiment(cfg.replace(name="tiny0", iterations=0, lam=0.0, beta=0.3, memory_size=0))
    (root / "unfinished").mkdir()
    cfg.replace(name="unfinished").save(root / "unfinished" / "config.json")
    (root / "notes").mkdir()
    return root


def _png(output: dict) -> bytes:
    png = base64.b64decode(output["data"]["image/png"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    return png


# ----------------------------------------------------------------------------- run listing
def test_list_finished_runs(runs_dir):
    runs = list_finished_runs(runs_dir)
    assert [r.name for r in runs] == ["tiny", "tiny0"]  # unfinished and stray folders left out
    tiny, tiny0 = runs
    assert (tiny.lam, tiny.beta, tiny.iterations, tiny.dataset) == (0.5, 0.5, 2, "digits")
    assert (tiny0.lam, tiny0.beta, tiny0.iterations) == (0.0, 0.3, 0)
    assert "λ=0.5" in tiny.label and "β=0.5" in tiny.label and "R@1" in tiny.label
    assert tiny0.short_label == "tiny0 (λ=0, β=0.3)"


@pytest.mark.parametrize("make", ["empty", "missing", "unfinished_only"])
def test_no_finished_runs_is_a_clear_error(tmp_path, make):
    d = tmp_path / "runs"
    if make != "missing":
        d.mkdir()
    if make == "unfinished_only":
        (d / "a").mkdir()
        ExperimentConfig(name="a").save(d / "a" / "config.json")
    with pytest.raises(RunDirError, match=r"no finished runs in .*runs/.*run notebook 02 first"):
        list_finished_runs(d)
    with pytest.raises(RunDirError, match="no finished runs"):
        retrieval_browser(d, static=False)
    with pytest.raises(RunDirError, match="no finished runs"):
        spectrum_explorer(d, static=False)


# ----------------------------------------------------------------------------- one query
def _brute_force_topk(q: np.ndarray, k: int, row: int) -> np.ndarray:
    """Top-k rows of the query set for query ``row`` (itself excluded), by decreasing inner product,
    ties by lower row, from a plain loop over the gallery."""
    scores = [(-float(np.dot(q[row], q[g])), g) for g in range(len(q)) if g != row]
    return np.array([g for _, g in sorted(scores)[:k]])


@pytest.mark.parametrize("run_name", ["tiny", "tiny0"])
def test_retrieval_for_query_matches_brute_force_and_labels(runs_dir, run_name):
    run_dir = runs_dir / run_name
    e = load_embeddings(run_dir)
    data = build_data(ExperimentConfig.load(run_dir / "config.json"))
    rr = load_retrieval(run_dir, K)
    for row in (0, 7, len(e["query"]) - 1):
        r = retrieval_for_query(rr, row, K)
        expected = _brute_force_topk(e["query"].astype(np.float64), K, row)
        # float32 similarities may swap near-equal neighbours: compare as sets, sims in order
        assert set(r.gallery_rows.tolist()) == set(expected.tolist())
        assert np.all(np.diff(r.sims) <= 1e-6)
        # the labels and hits come from the dataset's own labels of the images shown
        image_ids = e["query_indices"][r.gallery_rows]
        np.testing.assert_array_equal(r.labels, data.query.labels[image_ids])
        assert r.query_label == data.query.labels[e["query_indices"][row]]
        np.testing.assert_array_equal(r.hits, data.query.labels[image_ids] == r.query_label)
        np.testing.assert_array_equal(r.query_image, data.query.raw(int(e["query_indices"][row])).numpy())
        for img, i in zip(r.images, image_ids, strict=True):
            np.testing.assert_array_equal(img, data.query.raw(int(i)).numpy())
        assert row not in r.gallery_rows.tolist()
    # some query has both hits and misses, so the green/red marking is exercised both ways
    all_hits = rr.results.hits[:, :K]
    assert all_hits.any() and not all_hits.all()


def test_retrieval_for_query_from_a_run_dir_and_bad_rows(runs_dir):
    r = retrieval_for_query(runs_dir / "tiny", 3, k=2)
    assert r.hits.shape == (2,) and r.run_name == "tiny"
    n = len(load_embeddings(runs_dir / "tiny")["query"])
    for bad in (-1, n, 1.5, True):
        with pytest.raises(ConfigError, match=rf"query_row=.* expected an integer in \[0, {n - 1}\]"):
            retrieval_for_query(runs_dir / "tiny", bad, k=2)


def test_images_that_no_longer_match_the_embeddings(runs_dir, tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(runs_dir / "tiny", copy)
    e = load_embeddings(copy)
    e["query_labels"] = np.roll(e["query_labels"], 1)  # as if the dataset's split had changed
    np.savez(copy / "embeddings.npz", **e)
    with pytest.raises(RunDirError, match="no longer match.*retrain"):
        load_retrieval(copy)


def test_display_image_layouts():
    hw = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(display_image(torch.from_numpy(hw)), hw)
    np.testing.assert_array_equal(display_image(hw[None]), hw)
    chw = np.stack([hw, hw + 1, hw + 2])
    out = display_image(torch.from_numpy(chw))
    assert out.shape == (3, 4, 3) and out[1, 2, 1] == chw[1, 1, 2]
    with pytest.raises(ConfigError, match="uint8"):
        display_image(hw.astype(np.float32))


# ----------------------------------------------------------------------------- spectra
def test_spectrum_data(runs_dir):
    curves, sims = spectrum_data([runs_dir / "tiny", runs_dir / "tiny0"])
    assert list(curves) == ["tiny (λ=0.5, β=0.5)", "tiny0 (λ=0, β=0.3)"]
    e = load_embeddings(runs_dir / "tiny0")
    np.testing.assert_allclose(curves["tiny0 (λ=0, β=0.3)"], cumulative_energy(e["query"]))
    pos, neg = sims["tiny0 (λ=0, β=0.3)"]
    y = e["query_labels"]
    counts = np.bincount(y)
    assert len(pos) == (counts * (counts - 1) // 2).sum()
    assert len(pos) + len(neg) == len(y) * (len(y) - 1) // 2


# ----------------------------------------------------------------------------- widgets
def test_retrieval_browser_interaction(runs_dir):
    b = retrieval_browser(runs_dir, k=K, static=False)
    assert [v for _, v in b.run_picker.options] == ["tiny", "tiny0"]
    n = len(load_embeddings(runs_dir / "tiny")["query"])
    assert (b.slider.min, b.slider.max, b.slider.value) == (0, n - 1, 0)
    first = _png(b.output.outputs[0])
    assert b.current.query_row == 0 and len(b.current.hits) == K

    b.slider.value = 7
    assert b.current.query_row == 7 and "query 7 " in b.info.value
    assert _png(b.output.outputs[0]) != first
    assert f"{int(b.current.hits.sum())} of {K} neighbours correct" in b.info.value

    b.worst.value = True  # slider = rank among the worst queries, lowest average precision first
    e = load_embeddings(runs_dir / "tiny")
    ap = average_precision_per_query(e["query"], e["query_labels"])
    assert b.slider.value == 0 and b.current.query_row == int(np.nanargmin(ap))
    b.slider.value = 1
    assert ap[b.current.query_row] >= np.nanmin(ap)

    b.run_picker.value = "tiny0"
    assert b.current.run_name == "tiny0" and b.worst.value
    assert b.figures and len(b.output.outputs) == 1


def test_spectrum_explorer_interaction(runs_dir):
    ex = spectrum_explorer(runs_dir, static=False)
    assert ex.picker.value == ("tiny", "tiny0")
    assert len(ex.output.outputs) == 2 and all(_png(o) for o in ex.output.outputs)
    energy_ax = ex.figures[0].axes[0]
    assert len(energy_ax.lines) == 3  # two runs and the 90 % line

    ex.picker.value = ("tiny0",)
    assert len(ex.figures[0].axes[0].lines) == 2
    assert "tiny0 (λ=0, β=0.3)" in ex.figures[0].axes[0].get_legend().get_texts()[0].get_text()

    ex.picker.value = ()
    assert ex.figures == [] and "select one or more runs" in ex.output.outputs[0]["text"]


def test_static_render_without_a_frontend(runs_dir, monkeypatch):
    """With no widget frontend (papermill) the default view is also displayed as a plain figure."""
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *objs: shown.extend(objs))
    b = retrieval_browser(runs_dir, k=2)  # static=None: no frontend has connected in pytest
    assert len(shown) == len(b.figures) == 1
    assert shown[0].data.startswith(b"\x89PNG") and shown[0].format == "png"
    shown.clear()
    retrieval_browser(runs_dir, k=2, static=False)
    assert shown == []


def test_bad_widget_arguments(runs_dir):
    with pytest.raises(ConfigError, match="k=0 is invalid"):
        retrieval_browser(runs_dir, k=0)
    with pytest.raises(ConfigError, match="default=0 is invalid"):
        spectrum_explorer(runs_dir, default=0)


@pytest.mark.parametrize("metadata, expected", [({"cellId": "c1", "deletedCells": []}, True), ({}, False)])
def test_frontend_detection_from_the_execute_request(monkeypatch, metadata, expected):
    """JupyterLab's execute requests carry cell metadata; papermill's (nbclient) carry none."""
    import types

    from nbsrc.widgets import widget_frontend_connected

    kernel = types.SimpleNamespace(get_parent=lambda: {"header": {}, "metadata": metadata})
    monkeypatch.setattr("IPython.get_ipython", lambda: types.SimpleNamespace(kernel=kernel))
    assert widget_frontend_connected() is expected
