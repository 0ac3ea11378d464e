"""nbsrc.plots: every figure function draws small synthetic data with labelled axes, titles and
legends, in the house style whatever the global rcParams; save_figure writes PNG (300 dpi) and PDF
atomically, leaving no temporary file and never a half-written one."""

import os

import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from nbsrc.errors import ConfigError
from nbsrc.plots import (
    MODEL_COLORS,
    PALETTE,
    STYLE,
    color_for,
    figsize,
    plot_cumulative_energy,
    plot_gradient_noise,
    plot_recall_heatmap,
    plot_retrieval_grid,
    plot_similarity_histograms,
    plot_training_curves,
    plot_tsne,
    save_figure,
)
from nbsrc.plots.style import HIT_COLOR, MISS_COLOR, QUERY_COLOR


def panels(fig):
    """The visible data axes of a figure (not colorbars)."""
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def assert_labelled(fig):
    assert isinstance(fig, Figure)
    for ax in panels(fig):
        assert ax.get_xlabel() and ax.get_ylabel(), f"unlabelled axes {ax.get_title()!r}"
    has_title = (fig._suptitle is not None and fig._suptitle.get_text()) or all(ax.get_title() for ax in panels(fig))
    assert has_title


def legend_texts(ax):
    leg = ax.get_legend()
    assert leg is not None, f"no legend on {ax.get_title()!r}"
    return [t.get_text() for t in leg.get_texts()]


# ----------------------------------------------------------------------------- figures
def test_cumulative_energy_figure():
    d = 16
    curves = {"IRT_L": np.cumsum(np.r_[0.8, np.full(d - 1, 0.2 / (d - 1))]), "IRT_R": np.arange(1, d + 1) / d}
    fig = plot_cumulative_energy(curves)
    assert_labelled(fig)
    (ax,) = panels(fig)
    texts = legend_texts(ax)
    # effective dimension in the legend: IRT_L reaches 90% at k = 1 + ceil(0.1/(0.2/15)) = 9; IRT_R at 15
    assert texts[:2] == ["IRT_L (90% at 9)", "IRT_R (90% at 15)"] and "90%" in texts[2]
    assert [line.get_color() for line in ax.get_lines()[:2]] == [color_for("IRT_L"), color_for("IRT_R")]
    assert any(np.allclose(line.get_ydata(), 0.9) for line in ax.get_lines())  # the reference line


def test_gradient_noise_figure_and_length_check():
    betas = [0.3, 0.5, 0.7]
    fig = plot_gradient_noise(betas, {"λ = 0": [0.2, 0.4, 0.6], "λ = 0.7": [0.3, np.nan, 0.7]})
    assert_labelled(fig)
    (ax,) = panels(fig)
    assert legend_texts(ax) == ["λ = 0", "λ = 0.7"]
    np.testing.assert_array_equal(ax.get_lines()[0].get_xdata(), betas)
    with pytest.raises(ConfigError, match="one γ per β"):
        plot_gradient_noise(betas, {"λ = 0": [0.1, 0.2]})
    fig = plot_gradient_noise(betas, {"λ = 0": [0.2, 0.4, 0.6]}, errors={"λ = 0": [0.01, 0.02, 0.03]})
    (ax,) = panels(fig)
    (bars,) = ax.containers  # one error-bar container per line, the bars ± the errors
    segments = bars.lines[2][0].get_segments()
    np.testing.assert_allclose([seg[:, 1] for seg in segments], [[0.19, 0.21], [0.38, 0.42], [0.57, 0.63]])
    with pytest.raises(ConfigError, match="errors must give one value per β"):
        plot_gradient_noise(betas, {"λ = 0": [0.2, 0.4, 0.6]}, errors={"λ = 0": [0.1]})


def test_similarity_histograms_one_panel_per_model(rng):
    sims = {name: (rng.uniform(0.3, 1, 50), rng.uniform(-0.5, 0.6, 400)) for name in ("IRT_O", "IRT_L", "IRT_R")}
    fig = plot_similarity_histograms(sims, bins=20)
    assert_labelled(fig)
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == ["IRT_O", "IRT_L", "IRT_R"]
    for ax in axes:
        assert legend_texts(ax) == ["positive", "negative"]
        assert ax.get_ylabel() == "density" and ax.get_xlabel() == "cosine similarity"
    with pytest.raises(ConfigError, match="pair"):
        plot_similarity_histograms({"a": np.zeros(3)})


def test_tsne_panels_share_one_class_legend(rng):
    pts = {name: (rng.normal(size=(30, 2)), rng.integers(0, 3, 30)) for name in ("IRT_L", "IRT_R")}
    fig = plot_tsne(pts, class_names=["shirt", "bag", "boot"])
    assert_labelled(fig)
    assert [ax.get_title() for ax in panels(fig)] == ["IRT_L", "IRT_R"]
    assert len(fig.legends) == 1 and [t.get_text() for t in fig.legends[0].get_texts()] == ["shirt", "bag", "boot"]
    # the same class has the same colour in both panels
    colours = [[tuple(c.get_facecolor()[0]) for c in ax.collections] for ax in panels(fig)]
    assert colours[0] == colours[1]
    with pytest.raises(ConfigError, match=r"xy \[n, 2\]"):
        plot_tsne({"a": (np.zeros((4, 3)), np.zeros(4))})


def test_training_curves_one_panel_per_key():
    def rows(s):
        return [{"iteration": i, "contrastive": s / (i + 1), "koleo": -s * i, "total": s} for i in range(5)]

    metrics = {"run a": rows(1.0) + [{"kind": "eval", "iteration": 5, "R@1": 0.5}], "run b": rows(2.0)}
    fig = plot_training_curves(metrics, keys=("contrastive", "koleo", "total", "grad_noise"))
    assert_labelled(fig)
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == ["contrastive", "koleo", "total", "grad_noise"]
    for ax in axes[:3]:
        assert legend_texts(ax) == ["run a", "run b"]
        np.testing.assert_array_equal(ax.get_lines()[0].get_xdata(), range(5))  # the eval row is skipped
    assert not axes[3].get_lines() and "not recorded" in axes[3].texts[0].get_text()


def test_recall_heatmap_long_and_grid_tables_agree():
    long = pd.DataFrame({"beta": [0.3, 0.3, 0.5, 0.5], "lam": [0.0, 1.0, 0.0, 1.0], "R@1": [50.0, 55.5, 60.25, 65.0]})
    figs = [plot_recall_heatmap(long), plot_recall_heatmap(long.pivot(index="beta", columns="lam", values="R@1"))]
    annots = []
    for fig in figs:
        assert_labelled(fig)
        (ax,) = panels(fig)
        assert ax.get_xlabel() == "KoLeo weight λ" and ax.get_ylabel() == "margin β"
        annots.append([t.get_text() for t in ax.texts])
    assert annots[0] == annots[1] and sorted(annots[0]) == ["50.0", "55.5", "60.2", "65.0"]
    with pytest.raises(ConfigError, match="several rows"):
        plot_recall_heatmap(pd.concat([long, long]))


def test_retrieval_grid_frames_hits_green_and_misses_red(rng):
    q_imgs = [rng.integers(0, 256, (8, 8), dtype=np.uint8), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)]
    r_imgs = [[rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(3)] for _ in range(2)]
    hits = np.array([[True, False, True], [False, False, True]])
    fig = plot_retrieval_grid(q_imgs, r_imgs, hits, retrieved_titles=[["a", "b", "c"], ["d", "e", "f"]])
    axes = np.array(fig.axes).reshape(2, 4)
    to_rgba = mpl.colors.to_rgba
    for q in range(2):
        assert axes[q, 0].spines["top"].get_edgecolor() == to_rgba(QUERY_COLOR)
        assert axes[q, 0].get_ylabel() == f"query {q}"
        for j in range(3):
            spine = axes[q, j + 1].spines["left"]
            assert spine.get_visible() and spine.get_edgecolor() == to_rgba(HIT_COLOR if hits[q, j] else MISS_COLOR)
    assert [ax.get_title() for ax in axes[0]] == ["query", "#1", "#2", "#3"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["query", "correct", "incorrect"]


@pytest.mark.parametrize("q_img, hits, match", [
    (np.zeros((8, 8), np.float32), np.array([[True]]), "uint8"),
    (np.zeros((8, 8, 4), np.uint8), np.array([[True]]), "H×W×3"),
    (np.zeros((8, 8), np.uint8), np.array([[1]]), "bool"),
])
def test_retrieval_grid_bad_input(q_img, hits, match):
    with pytest.raises(ConfigError, match=match):
        plot_retrieval_grid([q_img], [[np.zeros((8, 8), np.uint8)]], hits)


def test_figures_use_the_house_style_whatever_the_global_rcparams():
    with mpl.rc_context({"font.size": 20, "axes.labelsize": 20, "xtick.labelsize": 20, "axes.spines.top": True}):
        fig = plot_gradient_noise([0.1, 0.2], {"a": [0.1, 0.2]})
    (ax,) = panels(fig)
    assert ax.xaxis.label.get_size() == STYLE["axes.labelsize"]
    assert ax.xaxis.get_major_ticks()[0].label1.get_size() == STYLE["xtick.labelsize"]
    assert not ax.spines["top"].get_visible()


def test_color_for_is_fixed_for_paper_models_and_stable_otherwise():
    assert color_for("IRT_O") == MODEL_COLORS["IRT_O"]
    assert len({color_for("IRT_O"), color_for("IRT_L"), color_for("IRT_R")}) == 3
    for name in ("λ = 0.3", "deit_small", "x"):
        assert color_for(name) == color_for(name) and color_for(name) in PALETTE
        assert color_for(name) not in {color_for("IRT_O"), color_for("IRT_L"), color_for("IRT_R")}
    assert figsize(2)[0] > figsize(1)[0]
    with pytest.raises(ConfigError, match="columns"):
        figsize(3)


def test_series_whose_names_hash_to_one_colour_get_distinct_colours_in_a_figure():
    from nbsrc.plots import colors_for, plot_training_curves

    a, b = "lr 3e-05, BN eval", "lr 3e-05, BN eval, 96 px"  # the study's convnet recipes: one hashed colour
    assert color_for(a) == color_for(b)
    names = [a, b, "IRT_L", *(f"run {i}" for i in range(3))]
    got = colors_for(names)
    assert got[a] == color_for(a) and got["IRT_L"] == MODEL_COLORS["IRT_L"] and len(set(got.values())) == len(names)
    assert colors_for(names) == got  # the same list, the same colours
    fig = plot_training_curves({a: [{"iteration": 0, "R@1": 1.0}, {"iteration": 1, "R@1": 2.0}],
                                b: [{"iteration": 0, "R@1": 1.0}, {"iteration": 1, "R@1": 3.0}]}, keys=("R@1",))
    assert len({line.get_color() for line in fig.axes[0].get_lines()}) == 2


# ----------------------------------------------------------------------------- save_figure
def small_figure(value=1.0):
    fig = Figure(figsize=(2, 1.5))
    fig.add_subplot().plot([0, 1], [0, value])
    return fig


def test_save_figure_writes_png_at_300_dpi_and_pdf_without_temp_files(tmp_path):
    old = os.umask(0o022)
    try:
        paths = save_figure(small_figure(), "fig_test", tmp_path / "figures")
    finally:
        os.umask(old)
    assert [p.name for p in paths] == ["fig_test.png", "fig_test.pdf"]
    assert sorted(os.listdir(tmp_path / "figures")) == ["fig_test.pdf", "fig_test.png"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:5] == b"%PDF-"
    with Image.open(paths[0]) as im:
        assert im.info["dpi"] == pytest.approx((300, 300), abs=0.5)
        assert im.size[0] > 300  # about 2 inches at 300 dpi, minus tight-bbox cropping
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in paths)


def test_save_figure_is_byte_reproducible(tmp_path):
    import time

    first = [p.read_bytes() for p in save_figure(small_figure(), "fig", tmp_path / "a")]
    time.sleep(1.1)  # a PDF creation date would now differ
    second = [p.read_bytes() for p in save_figure(small_figure(), "fig", tmp_path / "b")]
    assert first == second and b"CreationDate" not in first[1]


@pytest.mark.parametrize("failing_format", ["png", "pdf"])
def test_failed_save_leaves_previous_files_intact(tmp_path, monkeypatch, failing_format):
    paths = save_figure(small_figure(1.0), "fig", tmp_path)
    before = [p.read_bytes() for p in paths]
    real_savefig = Figure.savefig

    def broken(self, fname, *args, format=None, **kwargs):
        if format == failing_format:
            fname.write(b"half a file")  # something was written before the failure
            raise OSError("disk full")
        return real_savefig(self, fname, *args, format=format, **kwargs)

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        save_figure(small_figure(5.0), "fig", tmp_path)
    assert [p.read_bytes() for p in paths] == before  # both old files, unchanged
    assert sorted(os.listdir(tmp_path)) == ["fig.pdf", "fig.png"]  # no temporary file left


def test_save_figure_replaces_existing_files(tmp_path):
    first = [p.read_bytes() for p in save_figure(small_figure(1.0), "fig", tmp_path)]
    second = [p.read_bytes() for p in save_figure(small_figure(9.0), "fig", tmp_path)]
    assert first[0] != second[0] and sorted(os.listdir(tmp_path)) == ["fig.pdf", "fig.png"]


@pytest.mark.parametrize("name", ["", "../fig", "sub/fig", ".hidden"])
def test_save_figure_rejects_bad_names(tmp_path, name):
    with pytest.raises(ConfigError, match="figure name"):
        save_figure(small_figure(), name, tmp_path)
