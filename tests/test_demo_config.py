"""The demo's settings live in one place (nbsrc.paper.demo); the notebooks' parameters cells hold only what
each notebook varies, and any config field reaches a notebook through ``overrides``."""

import json

import pytest

from nbsrc.errors import ConfigError
from nbsrc.paper.demo import DEMO_DATA, DEMOS, RECIPE, demo_config, notebooks, pretrain_config
from nbsrc.paper.notebooks import NOTEBOOKS_DIR, check_parameters, fold_overrides, notebook_parameters, parse_parameters

pytestmark = pytest.mark.xdist_group("demo_config")  # its tests share module-scoped fixtures: one worker

NB02 = NOTEBOOKS_DIR / "02_train.ipynb"


def test_demo_config_is_data_plus_recipe_plus_overrides():
    for demo in DEMOS:
        cfg = demo_config(demo, "somewhere")
        pre = pretrain_config(demo, "somewhere")
        expected = {**DEMO_DATA[demo], **RECIPE, **({"weights": str(pre.run_dir)} if pre else {})}
        assert all(cfg.value(k) == (tuple(v) if isinstance(v, list) and k == "ks" else v) for k, v in expected.items())
        assert cfg.run.runs_dir == f"somewhere/{demo}"  # each demo's runs apart
    # the glyph demo fine-tunes its pretraining run, named after that run's config
    pre = pretrain_config("glyphs", "r")
    assert pre.data.train_classes == "pretrain" and pre.run.name.startswith("pretrain_")
    assert pre.run_dir.parent.name == "glyphs"
    assert pretrain_config("glyphs", "r", device="cpu").run.name == pre.run.name  # execution fields do not count
    assert pretrain_config("glyphs", "r", iterations=50).run.name != pre.run.name
    want = str(pretrain_config("glyphs", "r", patch_size=4).run_dir)
    assert demo_config("glyphs", "r", patch_size=4).model.weights == want
    assert pretrain_config("fashion_mnist") is None
    cfg = demo_config("fashion_mnist", lr=1e-4, iterations=7)
    assert (cfg.optim.lr, cfg.optim.iterations, cfg.loss.lam) == (1e-4, 7, RECIPE["lam"])
    assert cfg.optim.warmup_iters == min(RECIPE["warmup_iters"], 7)  # the recipe's warm-up shortened to fit
    with pytest.raises(ConfigError, match="warmup_iters=20 is invalid"):  # but never one given explicitly
        demo_config("fashion_mnist", iterations=7, warmup_iters=20)
    with pytest.raises(ConfigError, match="demo='mnist' is invalid: expected one of"):
        demo_config("mnist")
    with pytest.raises(ConfigError, match="did you mean 'iterations'"):
        demo_config("fashion_mnist", iteration=3)


def test_demo_notebooks_do_not_repeat_the_recipe():
    """Notebooks 01-07 declare no training value of the recipe: it comes from demo_config only."""
    for nb in notebooks():
        if nb.name[:2] not in {f"0{i}" for i in range(1, 8)}:
            continue
        declared = notebook_parameters(nb)
        assert {"demo", "overrides", "pretrain", "runs_dir", "figures_dir"} <= set(declared), nb.name
        repeated = set(declared) & (set(RECIPE) | set(DEMO_DATA["fashion_mnist"]))
        assert not repeated, (nb.name, repeated)
        src = "".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"])
        assert "prepare_demo(demo, runs_dir, pretrain" in src and "ExperimentConfig(" not in src, nb.name


def test_config_fields_become_overrides():
    params = parse_parameters(NB02, [("lr", "1e-4"), ("weights", "none"), ("data_root", "null"), ("seeds", "[0, 1]")])
    assert params == {"lr": 1e-4, "weights": "none", "data_root": None, "seeds": [0, 1]}
    folded = fold_overrides(NB02, params)
    assert folded == {"seeds": [0, 1], "overrides": {"lr": 1e-4, "weights": "none", "data_root": None}}
    # merged into an overrides dict given too; the notebook's own parameters stay its own
    assert fold_overrides(NB02, {"overrides": {"lam": 0.3}, "iterations": 5}) == \
        {"overrides": {"lam": 0.3, "iterations": 5}}
    check_parameters(NB02, {"lr": 1e-4, "seeds": [0, 1]})
    demo_config().replace(**folded["overrides"])  # the fields are valid


def test_unknown_name_still_fails_with_a_suggestion():
    with pytest.raises(ConfigError, match="unknown parameter 'lerning_rate'.*any config field"):
        check_parameters(NB02, {"lerning_rate": 1e-4})
    with pytest.raises(ConfigError, match="did you mean 'iterations'"):
        check_parameters(NB02, {"iteration": 3})
    with pytest.raises(ConfigError, match="overrides=.*expected a dict"):
        fold_overrides(NB02, {"overrides": [1], "lr": 1e-4})


# ----------------------------------------------------------------- the glyph demo, headless, on a small set
@pytest.fixture(scope="module")
def small_glyphs(tmp_path_factory):
    """A 24-class glyph set drawn by matplotlib's own fonts (no CJK package needed): parts of 8 classes."""
    from pathlib import Path

    import matplotlib

    from nbsrc.data.glyphs import FontFace, build_glyphs

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = tuple(FontFace("(matplotlib)", str(ttf / n)) for n in (
        "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
        "DejaVuSerif-Italic.ttf", "DejaVuSansMono.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "cmr10.ttf"))
    g = build_glyphs(fonts, parts=(("pretrain", 8), ("train", 8), ("test", 8)), chars=list("ABCDEFGHJKLMNPQRSTUVWXYZ"),
                     cache_dir=tmp_path_factory.mktemp("glyphs"), val_classes=3, progress=False)
    return str(g.path)


@pytest.mark.slow
def test_glyph_demo_pretrains_once_and_the_study_runs_headless(small_glyphs, tmp_path):
    """Notebook 02 on the glyph demo pretrains (once), fine-tunes from that run, and notebook 11 (the recipe
    study, on the validation classes) reuses the same pretraining run."""
    import nbformat
    from fixtures_glyphs import tiny_study_settings

    from nbsrc.experiment import load_run
    from nbsrc.paper.notebooks import run_notebook

    runs, figs = tmp_path / "runs", tmp_path / "figs"
    tiny = {"data_root": small_glyphs, "batch_size": 16, "m_per_class": 4, "warmup_iters": 0}
    pretrain = {"iterations": 2, "warmup_iters": 0, "batch_size": 16, "m_per_class": 4}
    run_notebook(NOTEBOOKS_DIR / "02_train.ipynb", {
        "demo": "glyphs", "runs_dir": str(runs), "figures_dir": str(figs), "pretrain": pretrain,
        "overrides": {**tiny, "iterations": 2, "memory_size": 32, "eval_per_class": None}}, tmp_path / "02.ipynb")
    pre = sorted((runs / "glyphs").glob("pretrain_*"))
    assert len(pre) == 1 and (pre[0] / "model.pt").exists()
    irt_l = load_run(runs / "glyphs" / "irt_l")
    assert irt_l.config.model.weights == str(pre[0]) and irt_l.config.data.test_classes == "test"
    assert "IRT_R" in (figs / "table3_irt.md").read_text()

    out = run_notebook(NOTEBOOKS_DIR / "11_recipe_study.ipynb", {
        "runs_dir": str(runs), "figures_dir": str(figs), "iterations": 2, "lrs": [3e-4],
        "memory_starts": [1], "memory_size": 32, "overrides": tiny, "pretrain": pretrain,
        "study_runs_dir": str(tmp_path / "study_runs"), "study": tiny_study_settings()}, tmp_path / "11.ipynb")
    assert sorted((runs / "glyphs").glob("pretrain_*")) == pre  # reused, not trained again
    study = load_run(runs / "glyphs" / "study_pre_lr3e-4_xbm32_from1")
    got = (study.config.data.train_classes, study.config.data.test_classes, study.config.loss.memory_start)
    assert got == ("train_fit", "train_val", 1)
    table = (figs / "recipe_study.md").read_text()
    assert "random init, off the shelf" in table and "XBM 32 from it. 1" in table
    text = "".join(o.get("text", "") for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "chosen: " in text
    # the study's choices (nbsrc.paper.study): the pretraining stand-in and each backbone's recipe, on train_val
    assert "pretraining chosen: " in text
    assert "ce_print" in (figs / "study_pretraining.md").read_text()
    assert "EfficientNet-Lite0" in (figs / "study_selection.md").read_text()
    assert (figs / "study_learning_curves.png").stat().st_size > 1000


def test_make_demo_leaves_the_grids_to_demo_full():
    from nbsrc.paper.demo import FULL_ONLY, STUDIES, demo_notebooks

    names = lambda nbs: [nb.name for nb in nbs]  # noqa: E731
    every = [nb.name for nb in notebooks() if nb.name not in STUDIES]
    assert set(FULL_ONLY) <= set(every)
    assert names(demo_notebooks()) == [n for n in every if n not in FULL_ONLY]
    assert names(demo_notebooks(full=True)) == every == names(demo_notebooks(quick=True))  # the smoke run: all
    assert names(demo_notebooks(only=["11_recipe_study.ipynb", "02_train.ipynb"])) == ["02_train.ipynb",
                                                                                         "11_recipe_study.ipynb"]


def test_an_unknown_notebook_name_is_a_one_line_error_before_anything_runs(tmp_path, monkeypatch):
    from nbsrc.paper.demo import run_demo

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"--only 02_trian.ipynb: no such notebook"):
        run_demo(notebooks_to_run=["02_trian.ipynb"])
    assert list(tmp_path.iterdir()) == []


def test_printed_verdicts_say_which_claims_an_earlier_run_judged(tmp_path, capsys):
    import datetime
    import time

    from nbsrc.paper.claims import Comparison, judge_claim
    from nbsrc.paper.demo import print_verdicts

    started = time.time()
    judge_claim("C1", [Comparison("R@1", "IRT_O", "IRT_L", {0: 1.0, 1: 2.0, 2: 3.0},
                                  {0: 5.0, 1: 6.0, 2: 7.0})]).save(tmp_path)  # judged now
    old = json.loads((tmp_path / "claims" / "C1.json").read_text())
    for cid, measured, commit in (("C5", "2026-11-29T23:10:00+00:00", "0123456789ab"), ("C7", None, None)):
        # an earlier run with its date and commit; one saved without either
        saved = {**old, "id": cid, "line": f"**{cid}** earlier", "measured": measured, "commit": commit}
        (tmp_path / "claims" / f"{cid}.json").write_text(json.dumps({k: v for k, v in saved.items() if v is not None}))
    print_verdicts(tmp_path, started)
    lines = {line[4:6]: line for line in capsys.readouterr().out.splitlines() if line.startswith("- **C")}
    assert "earlier run" not in lines["C1"] and "**reproduced**" in lines["C1"]
    earlier = "[from an earlier run (2026-11-29, commit 0123456), not judged by this one: notebook 04_gradient_noise"
    assert earlier in lines["C5"]
    assert "(date not recorded)" in lines["C7"] and "`make demo-full`" in lines["C7"]
    assert lines["C2"].endswith("not measured yet (notebook 02_train)")
    assert datetime.datetime.fromisoformat(json.loads((tmp_path / "claims" / "C1.json").read_text())["measured"])
    # judged just before an invocation starts, within the same second, is earlier than it (the study's C7-only
    # rerun right after a full one read C1 as its own when compared to the second)
    judged = json.loads((tmp_path / "claims" / "C1.json").read_text())
    judged["measured"] = "2026-12-07T05:00:00.250000+00:00"
    (tmp_path / "claims" / "C1.json").write_text(json.dumps(judged))
    print_verdicts(tmp_path, datetime.datetime.fromisoformat("2026-12-07T05:00:00.500000+00:00").timestamp())
    lines = {line[4:6]: line for line in capsys.readouterr().out.splitlines() if line.startswith("- **C")}
    assert "[from an earlier run (2026-12-07, commit " in lines["C1"], lines["C1"]


def test_a_one_seed_demo_says_it_judged_no_claim(tmp_path, capsys):
    from nbsrc.paper.claims import Comparison, judge_claim
    from nbsrc.paper.demo import print_verdicts

    judge_claim("C1", [Comparison("R@1", "IRT_O", "IRT_L", {0: 1.0}, {0: 5.0})]).save(tmp_path)
    print_verdicts(tmp_path, 0.0, [0])
    out = capsys.readouterr().out
    assert "This demo trained 1 seed (0): a verdict needs at least 3" in out
    assert "**C1" in out and "**inconclusive** over 1 seed" in out
    print_verdicts(tmp_path, 0.0, [0, 1, 2])
    assert "This demo trained" not in capsys.readouterr().out


def test_jobs_takes_auto_or_a_count():
    """The smoke run gives jobs=1 to notebooks whose default is "auto" (a count is not a string)."""
    for ok in ("auto", 1, 2, "2"):
        check_parameters(NB02, {"jobs": ok})
    for bad in (0, "0", "two", 1.5, True):
        with pytest.raises(ConfigError, match=r"parameter jobs=.* expected 'auto' or a positive integer"):
            check_parameters(NB02, {"jobs": bad})


def test_every_name_a_parameters_cell_assigns_is_a_declared_parameter():
    """papermill reads a parameters cell line by line and drops a line it cannot parse (an '=' in the
    comment did), so that `-p NAME` became an unknown parameter and the smoke run's value never arrived."""
    import ast

    import nbformat

    for path in notebooks():
        cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        assigned = [t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets]
        assert list(notebook_parameters(path)) == assigned, path.name


def test_a_config_field_whose_default_is_auto_still_takes_any_string():
    check_parameters(NB02, {"device": "cpu"})  # the config's device: "auto", "cpu", "cuda:1" ...
