"""The study (nbsrc.paper.study): its length rule, the print-face pretraining data, and the whole study on a tiny
glyph set, stopped halfway and run again with the same call."""

import json

import numpy as np
import pytest
from fixtures_glyphs import tiny_glyph_set, tiny_study_settings

from nbsrc.errors import ConfigError
from nbsrc.paper.study import STUDY, STUDY_PRETRAIN, chosen_length, flattened, study_settings


def test_length_rule_flattens_when_the_last_fifth_gains_less_than_the_threshold():
    rising = [(0, 50.0), (200, 60.0), (400, 66.0), (600, 69.0), (800, 70.0), (1000, 70.3)]
    assert not flattened(rising[:4], 0.5)  # 600: 69.0 - R@1(480) = 69.0 - 67.2 = 1.8
    assert flattened(rising, 0.5)  # 1000: 70.3 - R@1(800) = 0.3
    assert chosen_length(rising, 0.5) == (1000, True)
    assert chosen_length(rising[:5], 0.5) == (800, False)  # 800: 70.0 - R@1(640) = 70.0 - 69.2 = 0.8: still rising
    assert chosen_length(rising, 1.0) == (800, True)
    assert chosen_length([(0, 50.0), (100, 40.0), (200, 41.0)], 0.5) == (100, True)  # falling counts as flat


def test_study_settings_merge_and_refuse_unknown_keys():
    s = study_settings(vit={"candidates": [{"lr": 1e-3}]}, seeds_other=[0])
    assert s["vit"]["candidates"] == [{"lr": 1e-3}] and s["vit"]["backbone"] == STUDY["vit"]["backbone"]
    assert len(STUDY["seeds_main"]) >= 5 and len(STUDY["seeds_other"]) >= 3
    with pytest.raises(ConfigError, match="unknown"):
        study_settings(seed=[0])
    with pytest.raises(ConfigError, match="pretrain="):
        study_settings(pretrain="imagenet")
    with pytest.raises(ConfigError, match="spreading term"):
        study_settings(pretrain=["ce_print", "snca_koleo_all"])  # KoLeo presupposes C3
    for bad in (0, 1.5, True, "400", max(STUDY["max_iterations"], STUDY["vit"].get("max_iterations", 0)) + 1):
        with pytest.raises(ConfigError, match="grid_iterations="):
            study_settings(grid_iterations=bad)
    assert study_settings(grid_iterations=None)["grid_iterations"] is None
    for bad in ({"lr": 1e-4}, [{}], ["3e-5"]):
        with pytest.raises(ConfigError, match="pooling_candidates="):
            study_settings(pooling_candidates=bad)
    with pytest.raises(ConfigError, match="pooling_candidates: .*unknown parameter 'lrr'"):
        study_settings(pooling_candidates=[{"lrr": 1e-4}])
    assert study_settings(pooling_candidates=[])["pooling_candidates"] == []  # every pooling at the ViT's recipe


def test_study_plan_counts_the_grids_at_their_own_length_or_shares_irt_runs_at_the_vits():
    from nbsrc.paper.study import study_plan

    s = study_settings(claims=["C1", "C5", "C7"], grid_iterations=400)
    plan = study_plan(s, vit_length=1200)
    grid = plan.loc[[p for p in plan.index if p.startswith("claims β")][0]]
    pools = plan.loc[[p for p in plan.index if p.startswith("claims poolings")][0]]
    n, b = len(s["seeds_other"]), grid["images"] // (grid["runs"] * 400)
    assert grid["runs"] == 6 * n and pools["runs"] == 4 * n and pools["images"] == 4 * n * 400 * b
    assert plan.loc["selection poolings (C7)", "runs"] == 4 * len(s["pooling_candidates"])  # each pooling's lr
    assert "selection poolings (C7)" not in study_plan({**s, "pooling_candidates": []}, vit_length=1200).index
    shared = study_plan({**s, "grid_iterations": None}, vit_length=1200)
    grid = shared.loc[[p for p in shared.index if p.startswith("claims β")][0]]
    assert grid["runs"] == 4 * n and grid["images"] == 4 * n * 1200 * b  # its β = 0.5 cells are IRT_L and IRT_R
    assert plan.loc["claims ViT IRT_L/IRT_R", "runs"] == 2 * len(s["seeds_main"])  # C1 asks for the main seeds


def test_a_study_of_some_claims_trains_only_the_irt_runs_they_compare():
    from nbsrc.paper.study import irt_runs_needed

    main, other = STUDY["seeds_main"], STUDY["seeds_other"]
    for claims, grid, want in ((["C2"], 400, (["IRT_O", "IRT_L", "IRT_R"], main)),
                               (["C4"], 400, (["IRT_O", "IRT_L"], other)),
                               (["C5", "C7"], 400, (["IRT_O"], other)),  # the grids at their own length
                               (["C7"], None, (["IRT_O", "IRT_L"], other)),  # CLS is IRT_L itself (Table 9)
                               (["C5"], 1200, (["IRT_O", "IRT_L", "IRT_R"], other))):  # the ViT's length
        assert irt_runs_needed(study_settings(claims=claims, grid_iterations=grid), 1200) == want, claims
    assert study_settings(pretrain=[])["pretrain"] == []  # none tried: the ViT from random init


def test_no_study_pretraining_candidate_but_the_demos_has_a_spreading_term():
    for name, cand in STUDY_PRETRAIN.items():
        assert (cand["lam"] > 0) == (name == "snca_koleo_all"), name
    assert all(STUDY_PRETRAIN[c]["lam"] == 0 and STUDY_PRETRAIN[c]["faces"] == "print" for c in STUDY["pretrain"])


def test_print_face_subset_keeps_every_class_and_only_the_faces_kept(tmp_path):
    from nbsrc.data.glyph_faces import HAND_FACES, face_labels, face_subset
    from nbsrc.data.glyphs import CJK_FONTS, load_built

    assert set(HAND_FACES) <= {f.label for f in CJK_FONTS}  # every hand face is a face of the CJK set
    g = load_built(tiny_glyph_set(tmp_path))
    drop = ("DejaVuSans-Oblique.ttf", "cmti10.ttf")
    path = face_subset(g, drop)
    h = load_built(path)
    dropped = [face_labels(g).index(n) for n in drop]
    keep = ~np.isin(g.faces, dropped)
    assert np.array_equal(h.images, g.images[keep]) and np.array_equal(h.labels, g.labels[keep])
    assert not np.isin(h.faces, dropped).any() and set(np.unique(h.labels)) == set(np.unique(g.labels))
    assert h.parts == g.parts and h.meta["face_subset"]["excluded"] == sorted(drop)
    assert face_subset(g, drop) == path  # written once, found after
    with pytest.raises(ConfigError, match="not a face"):
        face_subset(g, ("Comic.ttf",))
    with pytest.raises(ConfigError, match="keep some"):
        face_subset(g, tuple(face_labels(g)))


@pytest.mark.slow
def test_study_killed_halfway_continues_without_retraining_finished_runs(tmp_path, monkeypatch):
    from nbsrc import experiment
    from nbsrc.paper.study import run_study
    from nbsrc.train.rundir import run_state

    data = str(tiny_glyph_set(tmp_path / "glyph_cache"))
    runs, figs = tmp_path / "runs", tmp_path / "figs"
    real = experiment.run_experiment
    trained: list[str] = []

    def killed_at(n):
        def run(cfg, mode="reuse", **kw):
            if cfg.optim.iterations > 0 and run_state(cfg.run_dir) != "done":
                trained.append(cfg.run.name)
                if len(trained) == n:  # killed mid-training, after a checkpoint
                    real(cfg, mode, stop_after=1, **kw)
                    raise KeyboardInterrupt("killed")
            return real(cfg, mode, **kw)
        return run

    monkeypatch.setattr(experiment, "run_experiment", killed_at(6))
    with pytest.raises(KeyboardInterrupt):
        run_study(str(runs), str(figs), data, **tiny_study_settings())
    first, partial = list(trained[:5]), trained[5]
    done = {p.name: (p / "results.json").stat().st_mtime_ns for p in (runs / "glyphs").iterdir()
            if (p / "results.json").is_file()}
    assert set(first) <= set(done) and partial not in done
    assert run_state(runs / "glyphs" / partial) == "partial"

    trained.clear()
    monkeypatch.setattr(experiment, "run_experiment", killed_at(10**6))
    verdicts = run_study(str(runs), str(figs), data, **tiny_study_settings())
    assert not set(first) & set(trained) and trained[0] == partial  # finished runs reused; the killed one resumed
    for name, mtime in done.items():
        assert (runs / "glyphs" / name / "results.json").stat().st_mtime_ns == mtime, name
    assert run_state(runs / "glyphs" / partial) == "done"

    assert set(verdicts) == {f"C{i}" for i in range(1, 8)}
    for name in ("choices.json", "pretraining.md", "selection.md", "learning_curves.png", "learning_curves.pdf",
                 "table3_irt_seeds.md", "convnet_seeds.md", "fig4_gradient_noise.md", "table9_pooling_seeds.md",
                 "verdicts.md"):
        assert (figs / name).stat().st_size > 0, name
    choices = json.loads((figs / "choices.json").read_text())
    assert choices["vit"]["length"] in (2, 4) and choices["vit"]["curves"]["lr 0.0001"][0][0] == 0
    assert choices["convnet"]["chosen"] == "lr 0.0001, BN eval"
    grid_runs = [p for p in (runs / "glyphs").iterdir() if "_b0.3_lam0" in p.name]  # C5's, at its own length
    assert grid_runs and all(json.loads((p / "config.json").read_text())["optim"]["iterations"] == 3
                             for p in grid_runs)
    pools = choices["poolings"]  # C7: each pooling's lr chosen on train_val at the grids' length, then trained so
    assert set(pools) == {"cls", "avg"} and (figs / "pooling_selection.md").stat().st_size > 0
    seed0 = [json.loads((q / "config.json").read_text()) for q in (runs / "glyphs").iterdir()
             if q.name.startswith("claims_vit") and "seed" not in q.name and (q / "config.json").is_file()]
    for p, c in pools.items():
        assert c["val_r1"] == max(c["candidates"].values()) and c["iterations"] == 3, p
        used = [cfg["optim"]["lr"] for cfg in seed0 if cfg["model"]["pooling"] == p and cfg["optim"]["iterations"] == 3
                and cfg["loss"]["lam"] == 0 and cfg["loss"]["beta"] == 0.5]
        # avg: C7's run alone; cls: C7's, and C5's β = 0.5, λ = 0 cell where CLS's lr is not the ViT's
        assert c["fields"]["lr"] in used and (p == "cls" or used == [c["fields"]["lr"]]), (p, used)
    c7 = json.loads((figs / "claims" / "C7.json").read_text())
    assert "learning rate chosen per pooling on train_val" in c7["line"]
    pre = choices["pretraining"]
    assert set(pre["candidates"]) == {"ce_print", "snca_print"} and (pre["chosen"] is None) == (pre["run"] == "none")
    for c, v in pre["candidates"].items():  # the rule: above random init in R@1 and not narrower in dim_90
        usable = v["val_r1"] > pre["random_init_val_r1"] and v["dim_90"] >= pre["random_init_dim_90"]
        assert (c == pre["chosen"]) <= usable, c
    if pre["chosen"] is None:  # the stand-in of 2 iterations is no better than random init: C3 says so
        assert "no pretraining stand-in" in json.loads((figs / "claims" / "C3.json").read_text())["untestable"]
        c4 = json.loads((figs / "claims" / "C4.json").read_text())  # C4's ViT side has C3's premise missing too
        assert "no pretrained spectrum to collapse: no pretraining stand-in" in c4["untestable"]
        assert c4["verdict"] == "untestable" and c4["comparisons"], c4  # the measured comparison is still reported
    text = (figs / "verdicts.md").read_text()
    assert "commit:" in text and "native bf16" in text and text.count("**C") == 7
    for cid in verdicts:
        saved = json.loads((figs / "claims" / f"{cid}.json").read_text())
        assert saved["verdict"] == verdicts[cid] in ("inconclusive", "untestable"), cid  # 1-2 seeds: never decided
        assert (saved["verdict"] == "untestable") == bool(saved["untestable"]), cid

    trained.clear()
    run_study(str(runs), str(figs), data, **tiny_study_settings())  # a third time: nothing left to train
    assert trained == []
    some = run_study(str(runs), str(tmp_path / "some"), data, **{**tiny_study_settings(), "claims": ["C1", "C6"]})
    assert list(some) == ["C1", "C6"] and trained == []  # a subset of the claims: the same runs
    assert not (tmp_path / "some" / "convnet_seeds.md").exists()  # C4's convnet was not asked for
    table3 = (figs / "table3_irt_seeds.md").read_text()  # over seeds_main, IRT_R included
    assert list(run_study(str(runs), str(figs), data, **{**tiny_study_settings(), "claims": ["C4"]})) == ["C4"]
    assert trained == [] and (figs / "table3_irt_seeds.md").read_text() == table3  # C4's seeds left it whole

    written = json.loads((figs / "choices.json").read_text())["written"]
    fresh = tmp_path / "runs_c7"  # C7 alone, at its own length: no IRT_L/R runs, the earlier verdicts kept and marked
    only = {**tiny_study_settings(), "claims": ["C7"], "pretrain": []}  # none tried: the ViT from random init
    assert list(run_study(str(fresh), str(figs), data, **only)) == ["C7"]
    lengths = {p.name: json.loads((p / "config.json").read_text())["optim"]["iterations"]
               for p in (fresh / "glyphs").iterdir() if p.name.startswith("claims_")}
    # 2 poolings x 1 seed, trained and off the shelf (CLS's off-the-shelf run is IRT_O)
    assert len(lengths) == 2 * 2 and sorted(lengths.values()) == [0, 0, 3, 3]
    assert (figs / "table9_pooling_off_the_shelf.md").stat().st_size > 0
    lines = {line[4:6]: line for line in (figs / "verdicts.md").read_text().splitlines() if line.startswith("- **C")}
    assert "from an earlier run (" in lines["C1"] and ", commit " in lines["C1"] and "--set claims" in lines["C1"]
    assert "earlier run" not in lines["C7"]
    assert "pretraining: none tried (pretrain=[]; random init" in (figs / "verdicts.md").read_text()
    choices = json.loads((figs / "choices.json").read_text())
    assert "recorded" in choices["convnet"] and "recorded" not in choices["vit"]
    assert choices["convnet"]["recorded"] == written  # the earlier file's own time, not its mtime (a clone's)
    assert f"EfficientNet-Lite0 (recorded {written[:10]})" in (figs / "selection.md").read_text()  # its rows kept
    assert f"- EfficientNet-Lite0 (recorded {written[:10]}): " in (figs / "verdicts.md").read_text()


def test_study_command_refuses_a_bad_setting_in_one_line_before_anything_runs(tmp_path, capsys):
    from nbsrc.__main__ import main

    for args, msg in ((["--set", "seeds_main", "[0, 1"], "not JSON"), (["--set", "seed", "[0]"], "unknown"),
                      (["--set", "claims", '["C9"]'], "claims=")):
        assert main(["study", "--runs-dir", str(tmp_path / "r"), "--figures-dir", str(tmp_path / "f"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "f").exists()


HOLD = """
import sys
from nbsrc import locking
locking.acquire(sys.argv[1], "written by a study", "--figures-dir")
print("held", flush=True)
sys.stdin.read()
"""


def test_a_second_study_into_the_same_figures_dir_stops_in_one_line_and_touches_nothing(tmp_path, capsys):
    """A live study holds its ``--figures-dir``'s lock (here a process holding it as run_study does); a second
    study into it stops in one line naming that process, before any run or file; once the holder is gone
    (SIGKILLed: its lock file stays, unlocked) the lock is free again."""
    import signal
    import subprocess
    import sys

    from nbsrc import locking
    from nbsrc.__main__ import main

    figs = tmp_path / "f"
    figs.mkdir()
    (figs / "verdicts.md").write_text("an earlier study's verdicts\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(figs)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["study", "--runs-dir", str(tmp_path / "r"), "--figures-dir", str(figs)]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: {figs} is being written by a study by process {holder.pid}; wait for it or choose "
                       "another --figures-dir\n"), err
        assert not (tmp_path / "r").exists() and [p.name for p in figs.iterdir()] == ["verdicts.md"]
        assert (figs / "verdicts.md").read_text() == "an earlier study's verdicts\n"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not locking.held_elsewhere(figs)


def test_a_study_whose_figures_dir_cannot_be_made_stops_in_one_line_and_leaves_nothing(tmp_path, capsys):
    """A file where the --figures-dir's folder should be: one line naming it and the flag; nothing made, no
    lock file left behind (nbsrc.locking.holding, shared with the index build)."""
    from nbsrc.__main__ import main

    (tmp_path / "notes").write_text("a file, not a folder\n")
    figs = tmp_path / "notes" / "study"
    assert main(["study", "--runs-dir", str(tmp_path / "r"), "--figures-dir", str(figs)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {figs} cannot be made: a file is on its way ({tmp_path / 'notes'}); choose another "
                   "--figures-dir\n"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
    assert (tmp_path / "notes").read_text() == "a file, not a folder\n"


def test_demo_prints_the_studys_verdicts_marked_as_the_studys_with_date_and_commit(tmp_path, capsys):
    from nbsrc.paper.demo import print_study_verdicts

    study = tmp_path / "study"
    print_study_verdicts(study)
    assert "none yet" in capsys.readouterr().out
    (study / "claims").mkdir(parents=True)
    for cid in ("C6", "C1"):
        (study / "claims" / f"{cid}.json").write_text(json.dumps({"id": cid, "line": f"**{cid}** reproduced"}))
    (study / "verdicts.md").write_text("# The study's verdicts\n\n- date: 2026-12-06T18:00:00+00:00\n"
                                       "- commit: 0123456789abcdef\n")
    print_study_verdicts(study)
    out = capsys.readouterr().out
    assert "The study's verdicts (`make study`, 2026-12-06, commit 0123456789ab; judged by the study" in out
    assert out.index("**C1**") < out.index("**C6**")
