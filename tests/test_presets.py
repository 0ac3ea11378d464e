"""Presets (the paper's rows as configs), the CLI's ``--preset`` and ``presets``, and notebook 09.

Every preset is loaded, validated, built at its native architecture (random weights), given its
optimizer, and run through its data pipeline on fixture trees in the official layouts. The settings
the papers state (IRT §4: AdamW 3e-5, weight decay 5e-4, batch 64, β = 0.5, λ = 0.7; SfM-120k: Adam
5e-7, weight decay 1e-6, β = 0.85) are checked against the files, not copied from them.
"""

import json
import math
import re

import numpy as np
import pytest
import torch
from fixtures_benchmarks import (
    assert_notebook_09_without_data,
    make_cub,
    make_inshop,
    make_revisited,
    make_sfm120k,
    make_sop,
)

from nbsrc.config import ExperimentConfig
from nbsrc.data import RetrievalTransform, build_data
from nbsrc.data.benchmarks import RECALL_KS
from nbsrc.errors import ConfigError
from nbsrc.models import model_from_config
from nbsrc.paper.reproduce import BENCHMARKS, evaluate_benchmarks
from nbsrc.presets import (
    PRESETS_DIR,
    list_presets,
    load_preset,
    preset_dict,
    preset_grid_tables,
    preset_paper,
    preset_table,
)
from nbsrc.train.loop import build_optimizer

pytestmark = pytest.mark.xdist_group("presets")  # its tests share module-scoped fixtures: one worker

PRESETS = list_presets()
TINY = {"backbone": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "weights": "none", "device": "cpu",
        "progress": False}


def method(name: str) -> str:
    return name.split("_")[1]  # irt_<o|l|r>_...


IRT = [n for n in PRESETS if n.startswith("irt_")]
DTOP = [n for n in PRESETS if n.startswith("dtop_")]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """Fixture trees in the official layouts: the data_root of each preset dataset, and the revisited ones."""
    base = tmp_path_factory.mktemp("benchmarks")
    return {
        "cub": make_cub(base / "cub"), "sop": make_sop(base / "sop"), "inshop": make_inshop(base / "inshop"),
        "sfm120k": make_sfm120k(base / "sfm"),
        "roxford5k": make_revisited(base / "rev", "roxford5k"), "rparis6k": make_revisited(base / "rev", "rparis6k"),
    }


_MODELS: dict = {}


def built(cfg: ExperimentConfig) -> torch.nn.Module:
    """The preset's model with random weights, built once per architecture (building DeiT-S takes ~1 s)."""
    flat = cfg.fingerprint()
    key = json.dumps({k: flat[k] for k in ("backbone", "pooling", "dim", "img_size", "patch_size",
                                                  "gem_p", "model_options")}, sort_keys=True)
    if key not in _MODELS:
        torch.manual_seed(0)
        _MODELS[key] = model_from_config(cfg).eval()
    return _MODELS[key]


# ----------------------------------------------------------------------------- every preset
def test_there_are_presets_for_the_tables():
    assert sorted(IRT + DTOP) == PRESETS  # every preset is an IRT or a DToP row
    tables = {t.strip() for n in IRT for t in preset_paper(n)["table"].split(",")}
    assert {"2", "3", "4", "5", "6", "7", "8", "9"} <= tables
    assert {preset_paper(n)["table"] for n in DTOP} == {"A5", "A7-A13", "A10"}
    assert preset_dict("dtop_full_r50vitb16_sfm")["model"]["backbone"] == "vit_base_r50_s16_384"  # DToP's hybrid
    assert set(preset_grid_tables("dtop_full_r50vitb16_sfm")) == {f"A{i}" for i in range(7, 14)}
    for ds in ("cub", "sop", "inshop"):  # IRT Table 3: the three methods on each dataset
        assert {f"irt_{m}_{ds}_deits" for m in "olr"} <= set(PRESETS)


@pytest.mark.parametrize("name", IRT)
def test_preset_loads_and_builds_its_model(name):
    raw = json.loads((PRESETS_DIR / f"{name}.json").read_text())
    cfg = load_preset(name, weights="none")
    assert cfg.run.name == name and cfg.model.weights == "none"
    assert raw["model"]["weights"] == "timm" and raw["model"]["patch_size"] is None  # pretrained, its own patches
    model = built(cfg)
    net = model.backbone
    width = 2048 if cfg.model.backbone.startswith("resnet") else 768 if "base" in cfg.model.backbone else 384
    if not cfg.model.backbone.startswith("resnet"):
        assert type(net).__name__ == "VisionTransformer" or "distilled" in cfg.model.backbone
        assert net.patch_embed.img_size == (cfg.data.img_size, cfg.data.img_size)
        assert net.patch_embed.patch_size == (16, 16)  # DeiT-S/16, DeiT-B/16
        assert net.embed_dim == width and len(net.blocks) == 12  # DeiT-S: width 384, DeiT-B: 768; depth 12
        assert (getattr(net, "dist_token", None) is not None) == ("distilled" in cfg.model.backbone)
    with torch.no_grad():
        z = model(torch.randn(1, 3, cfg.data.img_size, cfg.data.img_size))
    assert z.shape == (1, width)  # the full descriptor until the PCA is fitted
    assert torch.allclose(z.norm(dim=1), torch.ones(1), atol=1e-5)


@pytest.mark.parametrize("name", DTOP)
def test_dtop_preset_builds_its_dtop_model(name):
    from nbsrc.models.dtop import DToPModel

    raw = json.loads((PRESETS_DIR / f"{name}.json").read_text())
    assert raw["model"]["weights"] == "timm" and raw["model"]["patch_size"] is None
    cfg = load_preset(name, weights="none")
    model = built(cfg)
    pit = cfg.model.backbone.startswith("pit_")  # PiT-B: k within its last stage of 4 blocks (our reading)
    assert isinstance(model, DToPModel) and model.k == (4 if pit else 6)
    hybrid = "_r" in cfg.model.backbone.split("_", 1)[1]  # vit_<size>_r<depth>_s<stride>_384
    assert (type(model.backbone.patch_embed).__name__ == "HybridEmbed") == hybrid
    width = 1024 if pit else 768  # PiT-B's last stage; ViT-B, DeiT-B, R50+ViT-B
    full = name.startswith("dtop_full_")
    if full:  # the full model: both branches, ELM + orthogonal fusion, N = 1536
        assert model.elm is not None and model.fusion.kind == "orthogonal" and model.branch == "both"
    else:  # Table A5: one branch, no ELM, N = 768
        # _cls_, _dist_: global
        assert model.elm is None and model.branch == ("local" if "_patch_" in name else "global")
        assert model.head.in_features == (model.k * width if model.branch == "global" else width)
    with torch.no_grad():
        z = model(torch.randn(1, 3, 64, 48))  # DPE: any size
    assert z.shape == (1, 1536 if full else 768) and torch.allclose(z.norm(dim=1), torch.ones(1), atol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_optimizer(name):
    cfg = load_preset(name, weights="none")
    opt = build_optimizer(cfg, built(cfg).parameters())
    expected = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[cfg.optim.optimizer]
    assert type(opt) is expected
    group = opt.param_groups[0]
    assert group["lr"] == cfg.optim.lr and group["weight_decay"] == cfg.optim.weight_decay
    n_trainable = sum(p.numel() for p in built(cfg).parameters() if p.requires_grad)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_trainable


@pytest.mark.parametrize("name", PRESETS)
def test_preset_data_pipeline_on_fixture_tree(name, trees):
    cfg = load_preset(name, weights="none", data_root=str(trees[preset_dict(name)["data"]["dataset"]]))
    size = cfg.data.img_size
    if cfg.data.dataset == "sfm120k":
        from nbsrc.data.sfm import load_sfm120k_db
        from nbsrc.eval.revisited_map import build_revisited

        db = load_sfm120k_db(cfg.data.data_root, "train")
        img, label, _ = db.images(RetrievalTransform(size, train=False))[0]
        assert img.shape == (3, size, size) and label == db.cluster[0]
        if cfg.data.sfm_training == "classes":  # DToP: the ordinary loop's sampler over the 3D models
            from nbsrc.data.group_sampler import training_sampler
            from nbsrc.experiment import class_dataset

            train_ds = class_dataset(db, RetrievalTransform(size, train=True))
            # 8 fixture clusters
            small = cfg.replace(iterations=2, warmup_iters=0, batch_size=4 * cfg.optim.m_per_class)
            sampler, ds, collate = training_sampler(small, train_ds)
            batch = next(iter(sampler))
            assert len(batch) == small.optim.batch_size
            if collate is None:  # fixed-size batches: every image an img_size square
                x, y, _ = ds[batch[0]]
                assert x.shape == (3, size, size) and y == ds.labels[batch[0][0]]
            else:  # group-size batches (DToP Table A12): one size per batch, longer side img_size
                x, y, _ = collate([ds[key] for key in batch])
                assert x.shape[0] == small.optim.batch_size and max(x.shape[-2:]) == size
                assert y[0] == ds.labels[batch[0][0]]
        for bench in ("roxford5k", "rparis6k"):
            rev = build_revisited(trees[bench], bench, RetrievalTransform(size, train=False))
            assert rev.query[0][0].shape == (3, size, size)
        return
    data = build_data(cfg)
    assert (data.gallery is not None) == (cfg.data.dataset == "inshop")
    train_img = data.train[(0, 1)][0]  # an augmented training view
    assert train_img.shape == (3, size, size) and torch.isfinite(train_img).all()
    assert data.query[0][0].shape == (3, size, size)


# ----------------------------------------------------------------------------- the papers' settings
CATEGORY = [n for n in PRESETS if preset_dict(n)["data"]["dataset"] in ("cub", "sop", "inshop")]
SFM = [n for n in IRT if preset_dict(n)["data"]["dataset"] == "sfm120k"]


@pytest.mark.parametrize("name", IRT)
def test_method_in_the_name_matches_the_settings(name):
    cfg = load_preset(name)
    m = method(name)
    assert m in ("o", "l", "r")
    if m == "o":  # IRT_O: off the shelf, nothing trained
        assert cfg.optim.iterations == 0
    else:
        assert cfg.optim.iterations > 0
        assert (cfg.loss.lam == 0) == (m == "l")  # IRT_L: no KoLeo; IRT_R: KoLeo
    assert cfg.data.dataset in name.replace("sfm", "sfm120k")
    assert ("distilled" in cfg.model.backbone) == ("_dist" in name)
    assert ("_128" in name) == (cfg.model.dim == 128)


@pytest.mark.parametrize("name", CATEGORY)
def test_category_level_presets_follow_irt(name):
    cfg = load_preset(name)
    assert cfg.eval.ks == RECALL_KS[cfg.data.dataset]  # each dataset's own Recall@K
    assert cfg.data.img_size == 224 and cfg.model.dim in (None, 128)  # Table 2: the [CLS] descriptor at 224 px, or ▷128
    assert cfg.loss.beta == 0.5
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.batch_size) == \
        ("adamw", 3e-5, 5e-4, 64)
    # nothing the paper does not say
    assert (cfg.optim.scheduler, cfg.optim.warmup_iters, cfg.optim.grad_clip) == ("constant", 0, None)
    if method(name) == "r":
        assert cfg.loss.lam == 0.7


@pytest.mark.parametrize("name", SFM)
def test_sfm_presets_follow_irt_section_4_2(name):
    cfg = load_preset(name)
    # cirtorch's loss (IRT builds on its code)
    assert cfg.loss.name == "contrastive" and cfg.loss.tuple_loss == "distance"
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.weight_decay, cfg.loss.beta) == ("adam", 5e-7, 1e-6, 0.85)
    t = cfg.tuples
    assert (t.tuples_per_batch, t.negatives_per_tuple, t.pairs_per_epoch, t.negative_pool) == (5, 5, 2000, 22000)
    o = cfg.optim
    assert (o.scheduler, o.lr_decay_per_epoch, o.freeze_batchnorm, o.grad_clip) == ("constant", 0.01, True, None)
    if cfg.optim.iterations:  # 100 epochs of ceil(2000 / 5) steps
        assert cfg.optim.iterations == 100 * math.ceil(cfg.tuples.pairs_per_epoch / cfg.tuples.tuples_per_batch)


@pytest.mark.parametrize("name", DTOP)
def test_dtop_presets_follow_dtop_a1(name):
    cfg = load_preset(name)
    # 3D models as classes, the ordinary loop
    assert cfg.data.dataset == "sfm120k" and cfg.data.sfm_training == "classes"
    assert (cfg.loss.name, cfg.loss.arcface_margin, cfg.loss.lam, cfg.loss.memory_size) == ("arcface", 0.15, 0.0, 0)
    o = cfg.optim
    assert (o.optimizer, o.lr, o.scheduler, o.min_lr_factor, o.batch_size) == ("sgd", 1e-3, "cosine", 1e-4, 64)
    assert cfg.data.sampler == "group_size" and cfg.eval.whitening == "learned"  # Tables A12, A7
    assert cfg.eval.eval_scales == pytest.approx([1.0, 2 ** -0.5, 0.5])  # Table A11: 3 scales on both sides
    # warm-up of 3 epochs on SfM-120k (§A.1), none for the Table A5 benchmark ("except without warm-up")
    assert cfg.optim.warmup_iters == (0 if name.startswith("dtop_a5_") else 3 * math.ceil(91642 / 64))
    pit = cfg.model.backbone.startswith("pit_")  # timm's PiT-B exists at 224 px only; k within its last stage of 4
    # head = descriptor
    assert cfg.model.dtop is not None and cfg.model.dtop.k == (4 if pit else 6) and cfg.model.dim is None
    assert cfg.model.backbone.endswith("_224" if pit else "_384")  # DPE resamples the position grid to any input
    assert cfg.data.img_size == 384  # the longer side of the group-size batches


@pytest.mark.parametrize("name", PRESETS)
def test_paper_block(name):
    p = preset_paper(name)
    assert p["paper"] == ("IRT" if name.startswith("irt_") else "DToP") and p["row"] and p["notes"]
    cfg = load_preset(name)
    expected = ({cfg.data.dataset: {f"R@{k}" for k in cfg.eval.ks}} if cfg.data.dataset != "sfm120k"
                else {b: {"mAP M", "mAP H"} for b in ("roxford5k", "rparis6k")})
    if p["paper"] == "DToP":  # DToP's tables also print the old Oxford 5k / Paris 6k mAP
        expected.update({"oxford5k": {"mAP"}, "paris6k": {"mAP"}})
    assert {b: set(m) for b, m in p["results"].items()} == expected
    for metrics in p["results"].values():
        vals = [v for v in metrics.values() if v is not None]
        assert all(0 < v <= 100 for v in vals)
        if cfg.data.dataset != "sfm120k":
            assert vals == sorted(vals)  # Recall@K cannot fall as K grows
        elif len(vals) == 2:
            assert metrics["mAP M"] >= metrics["mAP H"]  # Hard's positives are a subset of Medium's


def test_the_paper_block_is_not_a_config_field():
    assert "paper" not in preset_dict("irt_r_cub_deits")
    assert "paper" in json.loads((PRESETS_DIR / "irt_r_cub_deits.json").read_text())


# ----------------------------------------------------------------------------- errors
def test_unknown_preset_is_one_line_with_suggestion():
    with pytest.raises(ConfigError) as e:
        load_preset("irt_r_sop_deit")
    msg = str(e.value)
    assert "\n" not in msg and "unknown preset 'irt_r_sop_deit'" in msg and "did you mean 'irt_r_sop_deits'" in msg
    with pytest.raises(ConfigError, match="unknown preset 'zzz'; `python -m nbsrc presets`"):
        load_preset("zzz")


def test_unknown_override_is_rejected():
    with pytest.raises(ConfigError, match="unknown parameter 'learning_rate'"):
        load_preset("irt_r_cub_deits", learning_rate=1e-4)
    with pytest.raises(ConfigError, match="beta=2.0 is invalid"):
        load_preset("irt_r_cub_deits", beta=2.0)


def test_overrides_apply_on_top():
    cfg = load_preset("irt_r_sop_deits", lr=1e-4, name="mine", data_root="/data/sop")
    assert (cfg.optim.lr, cfg.run.name, cfg.data.data_root) == (1e-4, "mine", "/data/sop")
    assert cfg.loss.memory_size == preset_dict("irt_r_sop_deits")["loss"]["memory_size"]


# ----------------------------------------------------------------------------- table and CLI
def test_preset_table_has_one_row_per_preset_and_the_papers_numbers():
    table = preset_table()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [re.match(r"\| `([^`]+)`", r).group(1) for r in rows] == PRESETS
    n_cols = table.splitlines()[0].count("|")
    assert all(line.count("|") == n_cols for line in table.splitlines())
    for name in PRESETS:
        row = next(r for r in rows if r.startswith(f"| `{name}`"))
        for metrics in preset_paper(name)["results"].values():
            for v in metrics.values():
                if v is not None:
                    assert f"{v:g}" in row


def test_presets_page_table_is_the_generated_one():
    """docs/presets.md holds the table that ``python -m nbsrc presets`` prints, as printed."""
    text = (PRESETS_DIR.parent.parent / "docs" / "presets.md").read_text()
    assert preset_table() in text


def test_cli_preset_then_config_then_flags(tmp_path):
    from nbsrc.__main__ import build_parser, config_from_args

    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"lr": 5e-5, "iterations": 7}))
    ns = build_parser().parse_args(["train", "--preset", "irt_r_cub_deits", "--config", str(cfg_file),
                                    "--lr", "1e-4", "--weights", "none"])
    cfg = config_from_args(ns)
    base = preset_dict("irt_r_cub_deits")
    assert cfg.run.name == "irt_r_cub_deits" and cfg.loss.beta == base["loss"]["beta"]
    assert cfg.eval.ks == tuple(base["eval"]["ks"])
    assert cfg.optim.iterations == 7  # the config file over the preset
    assert cfg.optim.lr == 1e-4 and cfg.model.weights == "none"  # flags over both
    assert config_from_args(build_parser().parse_args(["train", "--preset", "irt_l_sop_deits"])) == \
        load_preset("irt_l_sop_deits")


def test_cli_flags_can_reset_preset_values():
    """``--weights none`` sets the word 'none' (a string field), ``--dim none`` sets None (an optional
    field): both must override the preset's 'timm' and 128, not be dropped as 'not given'."""
    from nbsrc.__main__ import build_parser, config_from_args

    ns = build_parser().parse_args(["train", "--preset", "irt_r_sfm_deits", "--weights", "none", "--dim", "none",
                                    "--no-amp", "--ks", "1", "5"])
    cfg = config_from_args(ns)
    assert (cfg.model.weights, cfg.model.dim, cfg.optim.amp, cfg.eval.ks) == ("none", None, False, (1, 5))
    bare = config_from_args(build_parser().parse_args(["train"]))  # no flag: the defaults, under the CLI's own name
    assert bare.run.name.startswith("cli_") and bare.replace(name=ExperimentConfig().run.name) == ExperimentConfig()


def test_cli_unknown_preset_and_presets_command(capsys):
    from nbsrc.__main__ import main

    assert main(["train", "--preset", "irt_r_cub_deit"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'irt_r_cub_deits'" in err
    assert main(["presets"]) == 0
    assert capsys.readouterr().out == preset_table()


# ----------------------------------------------------------------------------- notebook 09's function
@pytest.fixture(scope="module")
def tiny_run(trees, tmp_path_factory):
    """A finished off-the-shelf run of a tiny ViT on the CUB fixture."""
    from nbsrc.experiment import run_experiment

    runs_dir = tmp_path_factory.mktemp("runs")
    return run_experiment(load_preset("irt_o_cub_deits", **TINY, data_root=str(trees["cub"]), runs_dir=str(runs_dir)))


def test_evaluate_benchmarks_reproduces_a_runs_own_evaluation(trees, tiny_run):
    """A finished run, loaded again and evaluated on its benchmark, gives the Recall@K it saved."""
    run = tiny_run
    table = evaluate_benchmarks("irt_o_cub_deits", {"cub": trees["cub"], "sop": None}, run_dir=run.config.run.name,
                                runs_dir=run.config.run.runs_dir)
    assert list(table.index) == [("cub", f"R@{k}") for k in RECALL_KS["cub"]]
    for (_, metric), ours in table["ours"].items():
        assert ours == pytest.approx(run.results[metric], abs=1e-9)
    assert table.loc[("cub", "R@1"), "paper"] == 58.5  # IRT Table 3 prints Recall@1 only
    assert table["paper"].iloc[1:].isna().all()


def test_evaluate_benchmarks_off_the_shelf_and_paper_column(trees):
    table = evaluate_benchmarks("irt_r_cub_deits_dist", {"cub": trees["cub"], "roxford5k": trees["roxford5k"]},
                                overrides=TINY)
    assert set(table.index.get_level_values(0)) == {"cub", "roxford5k"}
    assert table.loc[("cub", "R@1"), "paper"] == preset_paper("irt_r_cub_deits_dist")["results"]["cub"]["R@1"]
    assert np.isnan(table.loc[("roxford5k", "mAP M"), "paper"])  # not the row's benchmark
    assert table.loc[("cub", "R@1"), "difference"] == pytest.approx(table.loc[("cub", "R@1"), "ours"] - 76.6)
    assert np.isnan(table.loc[("roxford5k", "mAP M"), "difference"])
    ours = table["ours"].to_numpy()
    assert np.isfinite(ours).all() and ((0 <= ours) & (ours <= 100)).all()
    r = table.loc["cub", "ours"].to_numpy()
    assert (np.diff(r) >= 0).all()  # Recall@K grows with K


def test_evaluate_benchmarks_errors(trees, tiny_run):
    with pytest.raises(ConfigError, match="unknown benchmark 'oxford'"):
        evaluate_benchmarks("irt_o_cub_deits", {"oxford": "x"})
    with pytest.raises(ConfigError, match="no benchmark root given"):
        evaluate_benchmarks("irt_o_cub_deits", {b: None for b in BENCHMARKS})
    with pytest.raises(ConfigError, match="pass a preset"):
        evaluate_benchmarks(None, {"cub": trees["cub"]})
    with pytest.raises(ConfigError, match=r"overrides \['lr'\] would change what the run"):
        evaluate_benchmarks(None, {"cub": trees["cub"]}, run_dir=tiny_run.run_dir, overrides={"lr": 1.0})


# ----------------------------------------------------------------------------- notebook 09
def _outputs(path) -> str:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


@pytest.mark.slow
def test_notebook_09_without_data_prints_what_to_download(tmp_path):
    """The same check runs on the demo's smoke run of notebook 09 (tests/test_spine.py, which runs 09
    without data); this own kernel is needed only where that test cannot run (no Fashion-MNIST)."""
    from nbsrc.data.fashion_mnist import DEBIAN_ROOT
    from nbsrc.paper.notebooks import NOTEBOOKS_DIR, run_notebook

    if DEBIAN_ROOT.exists():
        pytest.skip("checked on the demo's run of notebook 09 (test_spine.py::test_demo_notebooks_run_headless)")
    out = run_notebook(NOTEBOOKS_DIR / "09_benchmarks.ipynb", {"runs_dir": str(tmp_path / "runs"),
                       "figures_dir": str(tmp_path / "fig")}, tmp_path / "09.ipynb")
    assert_notebook_09_without_data(out, tmp_path / "fig")
    assert not (tmp_path / "fig").exists()


@pytest.mark.slow
def test_notebook_09_on_the_cub_fixture(tmp_path, trees):
    from nbsrc.paper.notebooks import NOTEBOOKS_DIR, run_notebook

    params = {"preset": "irt_o_cub_deits", "cub_root": str(trees["cub"]), "overrides": TINY,
              "runs_dir": str(tmp_path / "runs"), "figures_dir": str(tmp_path / "fig")}
    text = _outputs(run_notebook(NOTEBOOKS_DIR / "09_benchmarks.ipynb", params, tmp_path / "09.ipynb"))
    assert all(f"R@{k}" in text for k in RECALL_KS["cub"])
    saved = (tmp_path / "fig" / "benchmarks_irt_o_cub_deits.csv").read_text().splitlines()
    assert saved[0] == "benchmark,metric,ours,paper,difference" and len(saved) == 1 + len(RECALL_KS["cub"])


def test_lambda_sweep_of_a_preset_gives_the_table_6_rows():
    """IRT Table 6's rows are an IRT_R preset with only λ changed (docs/presets.md)."""
    from nbsrc.paper.grids import lambda_sweep

    base = load_preset("irt_r_sop_deits")
    rows = lambda_sweep(base, [0, 0.3, 0.7, 1.0], prefix="sop")
    assert [c.run.name for c in rows.values()] == ["sop_irt_l", "sop_irt_r_lam0.3", "sop_irt_r", "sop_irt_r_lam1"]
    assert [c.loss.lam for c in rows.values()] == [0.0, 0.3, 0.7, 1.0]
    for cfg in rows.values():
        diff = {k for k, v in cfg.fingerprint().items() if v != base.fingerprint()[k]}
        assert diff <= {"name", "lam"}, diff
