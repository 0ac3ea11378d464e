"""The IRT ablation grids of nbsrc.experiment (Tables 4, 5, 9, Fig. 4) and their tables in
nbsrc.paper.reporting: names unique and stable, only the ablated field changes, reruns train nothing."""

import math

import pandas as pd
import pytest

from nbsrc import experiment
from nbsrc.config import ExperimentConfig, config_fields
from nbsrc.errors import ConfigError
from nbsrc.experiment import run_all
from nbsrc.paper.grids import ablation_base, beta_lambda_cell, beta_lambda_grid, objective_variants, pooling_variants
from nbsrc.paper.reporting import change_word, config_table, grad_noise_se, gradient_noise_table, mean_grad_noise


def _differences(a: ExperimentConfig, b: ExperimentConfig) -> set[str]:
    names = [f.name for f in config_fields()]
    return {k for k in names if a.value(k) != b.value(k)}


BASE = ExperimentConfig(name="g", beta=0.5, lam=0.7, pooling="cls")


# ----------------------------------------------------------------------------- β × λ grid
def test_beta_lambda_grid_covers_the_product_with_unique_stable_names():
    grid = beta_lambda_grid(BASE, (0.3, 0.5), (0, 0.7, 1))
    assert len(grid) == 6
    assert {(c.loss.beta, c.loss.lam) for c in grid.values()} == {(b, lam) for b in (0.3, 0.5) for lam in (0, 0.7, 1)}
    names = [c.run.name for c in grid.values()]
    assert len(set(names)) == 6
    assert names == [c.run.name for c in beta_lambda_grid(BASE, (0.3, 0.5), (0, 0.7, 1)).values()]  # stable
    assert grid["β = 0.3, λ = 0"].run.name == "g_b0.3_lam0"


def test_beta_lambda_grid_changes_only_beta_lam_and_name():
    for cfg in beta_lambda_grid(BASE, (0.3, 0.5), (0, 0.7)).values():
        assert _differences(BASE, cfg) <= {"name", "beta", "lam"}
        assert cfg.run.name != BASE.run.name  # even the base's own (β, λ) cell gets the derived name


def test_beta_lambda_grid_names_do_not_depend_on_the_base_beta_lam():
    other = BASE.replace(beta=0.3, lam=0.0)
    a = {c.run.name for c in beta_lambda_grid(BASE, (0.3, 0.5), (0, 0.7)).values()}
    b = {c.run.name for c in beta_lambda_grid(other, (0.3, 0.5), (0, 0.7)).values()}
    assert a == b


@pytest.mark.parametrize("betas, lams, match", [((), (0,), "betas is empty"), ((0.3,), (), "lams is empty"),
                                                ((0.3, 0.3), (0,), "repeated"), ((1.5,), (0,), "beta=1.5")])
def test_beta_lambda_grid_rejects_bad_values(betas, lams, match):
    with pytest.raises(ConfigError, match=match):
        beta_lambda_grid(BASE, betas, lams)


def test_beta_lambda_cell_is_the_grid_cell_and_ablation_base_is_shared():
    assert beta_lambda_cell(BASE, 0.5, 0) == beta_lambda_grid(BASE, (0.3, 0.5), (0, 0.7))["β = 0.5, λ = 0"]
    full = BASE.replace(iterations=300, warmup_iters=20)
    short = ablation_base(full, 100)
    assert _differences(full, short) == {"name", "iterations", "record_grad_noise"}
    assert short.run.record_grad_noise and short.optim.iterations == 100 and short.optim.warmup_iters == 20
    # lengths never clash
    assert short.run.name == "ablation_it100" and ablation_base(full, 50).run.name == "ablation_it50"
    assert ablation_base(full, 4).optim.warmup_iters == 4  # warm-up clipped to fit a tiny run
    # notebook 04 builds its base at the short length directly; both give the same runs
    assert ablation_base(full.replace(iterations=100), 100) == short


# ----------------------------------------------------------------------------- pooling, objectives
def test_pooling_variants_change_only_pooling_and_keep_the_base_run():
    v = pooling_variants(BASE, ("cls", "avg", "max", "gem"))
    assert list(v) == ["cls", "avg", "max", "gem"]
    assert v["cls"] is BASE
    assert len({c.run.name for c in v.values()}) == 4
    for p in ("avg", "max", "gem"):
        assert v[p].model.pooling == p and v[p].run.name == f"g_pool_{p}"
        assert _differences(BASE, v[p]) == {"name", "pooling"}
    # a pooling name is checked against the registry when the model is built (before a run writes anything)
    from nbsrc.models import model_from_config

    with pytest.raises(ConfigError, match="pooling='mean'"):
        model_from_config(pooling_variants(BASE, ("cls", "mean"))["mean"])


def test_objective_variants_change_only_the_loss():
    v = objective_variants(BASE.replace(lam=0.0))
    assert list(v) == ["Contrastive", "Normalized Softmax", "Scalable NCA"]
    assert v["Contrastive"].run.name == "g"
    assert [c.loss.name for c in v.values()] == ["contrastive", "nsoftmax", "snca"]
    for label in ("Normalized Softmax", "Scalable NCA"):
        assert _differences(v["Contrastive"], v[label]) == {"name", "loss"}
    with pytest.raises(ConfigError, match="repeated"):
        objective_variants(BASE, ("snca", "snca"))


# ----------------------------------------------------------------------------- tables
class _FakeRun:
    def __init__(self, cfg, recall, rows=()):
        self.config, self.recall, self._rows = cfg, recall, list(rows)

    def metrics(self, kind="train"):
        return self._rows


def test_mean_grad_noise_averages_the_logged_values_and_skips_nan():
    rows = [{"iteration": 10, "grad_noise": 0.2}, {"iteration": 20, "grad_noise": float("nan")},
            {"iteration": 30, "grad_noise": 0.5}, {"iteration": 40, "contrastive": 1.0}]
    assert mean_grad_noise(rows) == pytest.approx(0.35)
    assert math.isnan(mean_grad_noise([{"grad_noise": float("nan")}]))
    with pytest.raises(ConfigError, match="record_grad_noise=True"):
        mean_grad_noise([{"iteration": 10, "contrastive": 1.0}])


def test_grad_noise_se_and_change_word():
    import numpy as np

    vals = [0.2, float("nan"), 0.5, 0.35, 0.1]
    finite = np.array([0.2, 0.5, 0.35, 0.1])
    rows = [{"grad_noise": v} for v in vals] + [{"contrastive": 1.0}]
    assert grad_noise_se(rows) == pytest.approx(finite.std(ddof=1) / np.sqrt(4))
    assert math.isnan(grad_noise_se([{"grad_noise": 0.3}]))
    assert change_word(0.80, 0.90, 0.02, 0.02) == "rises"  # 0.10 > 2 * 0.028
    assert change_word(0.90, 0.80, 0.02, 0.02) == "falls"
    assert change_word(0.810, 0.813, 0.02, 0.02) == "shows no clear change"
    assert change_word(0.8, 0.9, float("nan"), 0.01) == "shows no clear change"


def test_config_table_and_gradient_noise_table():
    runs = {"a": _FakeRun(BASE.replace(beta=0.3, lam=0.0), {"R@1": 50.0, "R@2": 60.0}, [{"grad_noise": 0.4}]),
            "b": _FakeRun(BASE.replace(beta=0.5, lam=0.7), {"R@1": 70.123, "R@2": 80.0},
                          [{"grad_noise": 0.1}, {"grad_noise": 0.3}])}
    t = config_table(runs, ("beta", "lam"))
    assert list(t.columns) == ["beta", "lam", "R@1", "R@2"]
    assert t.loc["b", "R@1"] == 70.12 and t.loc["a", "beta"] == 0.3
    grid = t.pivot(index="beta", columns="lam", values="R@1")
    assert grid.loc[0.5, 0.7] == 70.12 and pd.isna(grid.loc[0.5, 0.0])
    g = gradient_noise_table(runs)
    assert list(g.columns) == ["beta", "lam", "gamma", "gamma_se", "gamma_logged", "R@1"]
    assert g.loc["b", "gamma"] == pytest.approx(0.2) and g.loc["b", "gamma_logged"] == 2
    assert g.loc["b", "gamma_se"] == pytest.approx(0.1) and pd.isna(g.loc["a", "gamma_se"])  # sd 0.1414 / sqrt 2
    assert list(config_table(runs, "lam").columns) == ["lam", "R@1", "R@2"]


# ----------------------------------------------------------------------------- run_all reuse
def test_run_all_trains_once_then_reuses(tiny_cfg, monkeypatch):
    base = tiny_cfg.replace(iterations=2, ckpt_every=0, record_grad_noise=True, log_every=1)
    grid = beta_lambda_grid(base, (0.3, 0.5), (0.0,))
    first = run_all(grid)
    assert list(first) == list(grid)
    assert not any(r.reused for r in first.values())
    for label, r in first.items():
        assert r.run_dir.name == grid[label].run.name and (r.run_dir / "results.json").exists()
        gamma = mean_grad_noise(r.metrics("train"))
        assert 0.0 <= gamma <= 1.0  # γ = 1 − ‖ḡ‖² for unit directions

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr(experiment, "fit", no_training)
    second = run_all(beta_lambda_grid(base, (0.3, 0.5), (0.0,)))
    assert all(r.reused for r in second.values())
    assert {k: r.recall for k, r in second.items()} == {k: r.recall for k, r in first.items()}


def test_plot_energy_by_backbone_one_colour_per_backbone_one_style_per_state():
    import numpy as np

    from nbsrc.plots.figures import plot_energy_by_backbone

    e_small, e_big = np.linspace(0.5, 1, 4), np.linspace(0.1, 1, 10)
    fig = plot_energy_by_backbone({"ViT": {"off": e_small, "trained": e_small},
                                   "CNN": {"off": e_big, "trained": e_big}}, threshold=0.9)
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label() and not ln.get_label().startswith("_")]
    assert len(lines) == 4
    colours = [ln.get_color() for ln in lines]
    styles = [ln.get_linestyle() for ln in lines]
    assert colours[0] == colours[1] != colours[2] == colours[3]
    assert styles[0] == styles[2] != styles[1] == styles[3]
    assert "90% at 4" in lines[0].get_label() and "90% at 9" in lines[2].get_label()
    assert fig.axes[0].get_xlim()[1] == 10
    with pytest.raises(ConfigError, match="non-empty"):
        plot_energy_by_backbone({"ViT": {}})


def test_energy_table_counts_components_to_the_threshold():
    """Embeddings whose energy is all in 2 of 5 directions reach 90 % at 2 components;
    full-rank isotropic ones need nearly all 5."""
    import numpy as np

    from nbsrc.paper.reporting import energy_table

    rng = np.random.default_rng(0)

    class Run:  # the two things energy_table reads from a RunResult
        def __init__(self, z):
            self.z, self.recall = z, {"R@1": 50.0, "R@2": 60.0}

        def embeddings(self):
            return {"query": self.z}

    flat = np.zeros((400, 5))
    flat[:, :2] = rng.normal(size=(400, 2))
    iso = rng.normal(size=(400, 5))
    t = energy_table({"flat": Run(flat), "iso": Run(iso)}, threshold=0.9)
    assert list(t.columns) == ["R@1", "dim_90", "embedding_dim"]
    assert t.loc["flat", "dim_90"] == 2 and t.loc["iso", "dim_90"] >= 4
    assert (t["embedding_dim"] == 5).all()


# ----------------------------------------------------------------------------- seeds
def test_seed_variants_keep_the_own_seed_run_and_name_the_others():
    from nbsrc.paper.grids import irt_variants, seed_variants

    cfgs = irt_variants(BASE.replace(seed=0))
    v = seed_variants(cfgs, [0, 1, 2])
    assert list(v) == [(m, s) for m in cfgs for s in (0, 1, 2)]
    assert v[("IRT_L", 0)] is cfgs["IRT_L"]  # the existing run (notebooks 03-07 reuse it) is reused
    assert v[("IRT_R", 2)].run.name == "irt_r_seed2" and v[("IRT_R", 2)].run.seed == 2
    assert _differences(v[("IRT_R", 2)], cfgs["IRT_R"]) == {"name", "seed"}
    assert len({c.run.name for c in v.values()}) == len(v)
    for bad in ([], [1, 1]):
        with pytest.raises(ConfigError, match="distinct seeds"):
            seed_variants(cfgs, bad)


def test_recall_over_seeds_is_mean_and_sample_std_per_method():
    import numpy as np

    from nbsrc.paper.reporting import recall_over_seeds

    r1 = {("IRT_L", 0): 60.0, ("IRT_L", 1): 64.5, ("IRT_L", 2): 58.25, ("IRT_R", 0): 50.0, ("IRT_R", 1): 61.0}
    runs = {key: {"R@1": v, "R@2": v + 10} for key, v in r1.items()}
    t = recall_over_seeds(runs)
    assert list(t.index) == ["IRT_L", "IRT_R"] and list(t["n"]) == [3, 2]
    for method in ("IRT_L", "IRT_R"):
        vals = np.array([v for (m, _), v in r1.items() if m == method])
        assert t.loc[method, "R@1 mean"] == pytest.approx(round(vals.mean(), 2))
        assert t.loc[method, "R@1 std"] == pytest.approx(round(vals.std(ddof=1), 2))
        assert (t.loc[method, "R@1 min"], t.loc[method, "R@1 max"]) == (vals.min(), vals.max())
        assert t.loc[method, "R@2 mean"] == pytest.approx(round(vals.mean() + 10, 2))
    assert math.isnan(recall_over_seeds({("a", 0): {"R@1": 1.0}}).loc["a", "R@1 std"])  # one seed: no spread
