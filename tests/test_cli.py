"""The command line as docs/cli.md shows it: ``--resume`` reads the run's own config, the
default run name never collides with a notebook's, ``--help`` explains every flag, ``eval``,
``runs`` and ``compare``."""

import json
import re
from pathlib import Path

import pytest
from doc_blocks import block, nbsrc_commands

from nbsrc.__main__ import build_parser, default_run_name, main
from nbsrc.config import ExperimentConfig

pytestmark = pytest.mark.xdist_group("cli")  # its tests share module-scoped fixtures: one worker

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--img-size", "8", "--patch-size", "4", "--batch-size", "16", "--m-per-class", "4",
        "--iterations", "2", "--eval-per-class", "20", "--log-every", "1", "--ckpt-every", "1", "--memory-size", "0",
        "--no-progress", "--device", "cpu", "--lam", "0"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny finished run, ``runs/r``, trained through the CLI."""
    runs = tmp_path_factory.mktemp("cli") / "runs"
    assert main(["train", "--name", "r", "--runs-dir", str(runs), *TINY]) == 0
    return runs


def test_resume_reads_the_saved_config(finished, capsys):
    """docs/cli.md's resume example: ``--name X --resume`` with no other flag continues runs/X as saved."""
    rc = main(["train", "--name", "r", "--runs-dir", str(finished), "--resume"])
    assert rc == 0, capsys.readouterr().err


def test_resume_accepts_execution_flags(finished, capsys):
    rc = main(["train", "--name", "r", "--runs-dir", str(finished), "--resume", "--device", "cpu",
               "--num-workers", "0", "--no-progress"])
    assert rc == 0, capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [(["--lr", "0.5"], "--lr 0.5"), (["--lam", "0.3"], "--lam 0.3"),
                                          (["--iterations", "5"], "--iterations 5")])
def test_resume_refuses_a_flag_that_changes_the_run(finished, capsys, flags, named):
    before = sorted(p.name for p in (finished / "r").iterdir())
    rc = main(["train", "--name", "r", "--runs-dir", str(finished), "--resume", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and named in err and "cannot change a resumed run" in err
    assert sorted(p.name for p in (finished / "r").iterdir()) == before


def test_resume_refuses_preset(finished, capsys):
    rc = main(["train", "--name", "r", "--runs-dir", str(finished), "--resume", "--preset", "irt_r_sop_deits"])
    assert rc == 2 and "--preset cannot be combined with --resume" in capsys.readouterr().err


def test_resume_of_a_missing_run_names_it(tmp_path, capsys):
    rc = main(["train", "--name", "ghost", "--runs-dir", str(tmp_path / "runs"), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "ghost" in err and "no config.json" in err and not (tmp_path / "runs").exists()


def notebook_run_names() -> set[str]:
    """Every run name a notebook can produce: literal names and the runner's variant names."""
    names = set()
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        src = "".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"])
        names.update(re.findall(r"""name=f?["']([A-Za-z0-9_{}]+)""", src))
    return names


def test_default_name_is_none_a_notebook_uses():
    cfg = ExperimentConfig()
    name = default_run_name(cfg)
    assert name.startswith("cli_fashion_mnist_contrastive_lam0.7_")
    prefixes = {n.split("{")[0] for n in notebook_run_names()} | {"irt_r", "irt_l", "irt_o", "dtop", "effnet"}
    assert prefixes and not any(name == p or (p and name.startswith(p) and "{" in p) for p in prefixes)
    assert not any(name.startswith(p) for p in prefixes if p)
    # the same settings give the same name, different ones another
    assert default_run_name(ExperimentConfig()) == name
    assert default_run_name(cfg.replace(lr=1e-3)) != name
    assert default_run_name(cfg.replace(device="cpu")) == name  # execution fields do not count


def test_train_without_name_uses_the_default_name(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["train", "--runs-dir", str(runs), *TINY]) == 0
    (made,) = [p.name for p in runs.iterdir()]
    assert made == default_run_name(ExperimentConfig.load(runs / made / "config.json"))
    # docs/cli.md: the same command with --resume and no --name finds the same run
    assert main(["train", "--runs-dir", str(runs), *TINY, "--resume"]) == 0, capsys.readouterr().err


def test_train_help_shows_every_flag_with_help_default_and_choices(capsys):
    from nbsrc import config
    from nbsrc.losses import PAIR_LOSSES
    from nbsrc.models.pooling import POOLINGS

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    helps = {a.dest: a.help for a in train._actions}
    for f in config.config_fields():
        m = re.fullmatch(r"(.+) \(default: (.+)\)", helps[f.name] or "", re.S)
        assert m and m.group(1).strip(), f"--{f.name} has no help text with a default: {helps[f.name]!r}"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--pooling {" + ",".join(POOLINGS) + "}" in text
    assert "choices: " + ", ".join(PAIR_LOSSES) in text
    assert "(default: 0.7)" in text and "(default: 1 2 4 8)" in text  # lam, ks
    assert "margin on negatives" in text  # the papers' name where ours differs


def test_eval_prints_results_and_how_they_were_evaluated(finished, capsys):
    assert main(["eval", str(finished / "r")]) == 0
    first, how = capsys.readouterr().out.strip().splitlines()
    saved = json.loads((finished / "r" / "results.json").read_text())
    assert first == "r: " + "  ".join(f"{k}={saved[k]:.2f}" for k in ("R@1", "R@2", "R@4", "R@8"))
    assert "evaluated on digits classes 5-9 (at most 20 images per class" in how
    assert "after 2 iterations" in how and "on cpu" in how and "nbsrc 0.1.0" in how


def test_results_record_provenance(finished):
    import numpy
    import timm
    import torch

    saved = json.loads((finished / "r" / "results.json").read_text())
    v = saved["versions"]
    assert (v["torch"], v["timm"], v["numpy"], v["nbsrc"]) == (torch.__version__, timm.__version__,
                                                               numpy.__version__, "0.1.0")
    assert v["faiss"] != "absent"
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", saved["git_commit"])
    assert saved["machine"]["cpu"] and saved["machine"]["gpu"] == (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def test_git_commit_outside_a_checkout_is_unknown(tmp_path):
    from nbsrc.provenance import git_commit

    assert git_commit(tmp_path) == "unknown"
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", git_commit(ROOT)) or not (ROOT / ".git").exists()


def test_git_commit_is_dirty_for_changed_code_not_for_rewritten_figures(tmp_path):
    import subprocess

    from nbsrc.provenance import git_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "table.md").write_text("old\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "pkg").mkdir()  # asked from a subfolder (the package's), as provenance() does
    (tmp_path / "pkg" / "mod.py").write_text("y = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    (tmp_path / "figures" / "table.md").write_text("new\n")  # a study rewrote its committed figures
    assert re.fullmatch(r"[0-9a-f]{40}", git_commit(tmp_path))
    assert re.fullmatch(r"[0-9a-f]{40}", git_commit(tmp_path / "pkg"))
    (tmp_path / "code.py").write_text("x = 2\n")  # changed code outside the subfolder
    assert git_commit(tmp_path).endswith("+dirty") and git_commit(tmp_path / "pkg").endswith("+dirty")


def test_metrics_go_to_a_readable_tensorboard_event_file(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nbsrc.train import read_metrics

    events = list((finished / "r" / "tb").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(finished / "r" / "tb"))
    acc.Reload()
    rows = read_metrics(finished / "r", "train")
    assert rows
    keys = [k for k, v in rows[0].items() if k not in ("kind", "iteration") and isinstance(v, float)]
    assert "lr" in keys and len(keys) >= 3  # the loss terms, lr, img/s
    for key in keys:
        got = {e.step: e.value for e in acc.Scalars(f"train/{key}")}  # a resume (tests above) may repeat a step
        assert got == {r["iteration"]: pytest.approx(r[key], rel=1e-6) for r in rows}
    saved = json.loads((finished / "r" / "results.json").read_text())
    r1 = acc.Scalars("results/R@1")[-1]  # a resumed finished run is evaluated again
    assert (r1.step, r1.value) == (2, pytest.approx(saved["R@1"], rel=1e-6))


def test_without_tensorboard_nothing_is_written_and_it_is_said_once(tmp_path, monkeypatch, capsys):
    import sys

    from nbsrc.train import rundir

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setattr(rundir, "_tb_missing_said", False)
    for it in (1, 2):
        rundir.log_tensorboard(tmp_path, {"kind": "train", "iteration": it, "loss": 0.5})
    assert capsys.readouterr().out.count("tensorboard package is not installed") == 1
    assert not (tmp_path / "tb").exists()


def test_notebook_progress_is_printed_as_plain_lines(tmp_path, capsys, monkeypatch):
    """``make demo``'s notebooks (``show_progress``): papermill's cell lines and the kernel's progress
    lines appear on stdout while the notebook runs, as plain lines, not widgets."""
    import nbformat

    from nbsrc.paper.notebooks import run_notebook

    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports this checkout's nbsrc
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": kernelspec})
    params = nbformat.v4.new_code_cell("n = 3")
    params.metadata["tags"] = ["parameters"]
    work = nbformat.v4.new_code_cell("from nbsrc.progress import progress\nbar = progress(n, 'work')\n"
                                     "for _ in range(n):\n    bar.update(1)\nprint('after the loop')")
    nb.cells = [params, work]
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)
    run_notebook(path, {"n": 10}, tmp_path / "out.ipynb", show_progress=True)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("  | ")]
    assert any("work: 10/10" in ln for ln in lines), out
    assert any("after the loop" in ln for ln in lines) and any("Executing Cell" in ln for ln in lines), out
    assert "\r" not in out and "NBSRC_PROGRESS" not in __import__("os").environ


def test_runs_lists_finished_resumable_and_leftover(finished, tmp_path, capsys):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(finished / "r", runs / "r")
    shutil.copytree(finished / "r", runs / "half")
    for f in ("results.json", "model.pt", "embeddings.npz"):
        (runs / "half" / f).unlink()
    (runs / "gone").mkdir()
    shutil.copy(finished / "r" / "config.json", runs / "gone" / "config.json")
    (runs / "not_a_run").mkdir()
    assert main(["runs", str(runs), "--csv", str(tmp_path / "runs.csv")]) == 0
    out = capsys.readouterr().out
    saved = json.loads((finished / "r" / "results.json").read_text())
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines()[2:] if ln and not ln.startswith("wrote")}
    assert set(rows) == {"r", "half", "gone"}
    assert rows["r"][1:5] == ["finished", "2/2", "R@1", f"{saved['R@1']:.2f}"]
    assert rows["half"][1:3] == ["resumable", "2/2"] and rows["gone"][1:3] == ["leftover", "0/2"]
    import csv

    assert [r["name"] for r in csv.DictReader(open(tmp_path / "runs.csv"))] == ["gone", "half", "r"]


def test_compare_shows_the_settings_that_differ_and_the_results(finished, tmp_path, capsys):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(finished / "r", runs / "a")
    shutil.copytree(finished / "r", runs / "b")
    cfg = json.loads((runs / "b" / "config.json").read_text())
    cfg["optim"]["lr"], cfg["run"]["name"] = 0.5, "b"
    (runs / "b" / "config.json").write_text(json.dumps(cfg))
    res = json.loads((runs / "b" / "results.json").read_text())
    res["R@1"] = 12.345
    (runs / "b" / "results.json").write_text(json.dumps(res))
    assert main(["compare", str(runs / "a"), str(runs / "b")]) == 0
    header, _, a, b = capsys.readouterr().out.strip().splitlines()
    assert header.split()[:3] == ["run", "lr", "R@1"]  # lr is the only setting that differs
    assert b.split()[:3] == ["b", "0.5", "12.35"]
    assert main(["compare", str(runs / "a"), str(runs / "ghost")]) == 2
    assert "ghost does not exist" in capsys.readouterr().err


CLI_PAGE = ("docs/cli.md", "## Commands")


def test_cli_page_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """docs/cli.md's command block, in order, in a fresh directory: each train command with the tiny
    settings appended (and then the same on --resume), the others as written. Not run here: the notebook
    line (a notebook run, as README's notebook line, which tests/test_docs.py runs) and the preset line
    (it needs the SOP images; tests/test_presets.py builds every preset on fixture trees)."""
    monkeypatch.chdir(tmp_path)
    commands = nbsrc_commands(block(*CLI_PAGE))
    assert [c[0] for c in commands][:6] == ["train", "train", "train", "eval", "runs", "compare"]
    (tmp_path / "runs").mkdir()
    ran = 0
    for args in commands:
        if args[0] == "notebook" or "--preset" in args:
            continue
        if args[0] == "compare":  # runs/fashion_mnist/irt_r is notebook 02's run: compare the page's run with itself
            args = [a if a != "runs/fashion_mnist/irt_r" else "runs/my_irt_r" for a in args]
        extra = [f for f in TINY if args[0] == "train"] if "--resume" not in args else []
        rc = main([*args, *extra])
        assert rc == 0, (args, capsys.readouterr().err)
        ran += 1
    assert ran >= 6
    assert (tmp_path / "runs" / "my_irt_r" / "results.json").exists()


WALK_THROUGH = ("docs/your-images.md", "## From a folder of photos")
# appended to the walk-through's train command: what makes it run in seconds on a CPU (the flags given
# later win); everything else, and every other command, runs as the page writes it
WALK_THROUGH_TINY = ["--img-size", "32", "--batch-size", "8", "--m-per-class", "2", "--iterations", "2",
                     "--device", "cpu", "--no-progress"]


def test_your_images_walk_through_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/your-images.md's walk-through, start to finish, on a generated 20-class folder (a drawn shape per
    class) in a fresh directory: train on half of the classes and evaluate on the rest, index the folder,
    search it with a new image and save the grid, export; then its two Python snippets load the run and
    the exported file."""
    from fixtures_photos import make_drawn_folder

    monkeypatch.chdir(tmp_path)
    commands = nbsrc_commands(block(*WALK_THROUGH))
    assert [c[0] for c in commands] == ["train", "eval", "embed", "search", "export"]
    names = make_drawn_folder(tmp_path / "photos", n_classes=20, per_class=4)
    make_drawn_folder(tmp_path / "new", n_classes=20, per_class=1, seed=7)  # other draws of the same shapes
    from PIL import Image

    Image.open(tmp_path / "new" / names[15] / "0.png").save(tmp_path / "query.jpg")  # a new image of class c15
    for args in commands:
        extra = WALK_THROUGH_TINY if args[0] == "train" else []
        rc = main([*args, *extra])
        out, err = capsys.readouterr()
        assert rc == 0, (args, err)
        assert "warning" not in err, err  # --split 0.5 uses every class
        if args[0] == "eval":
            assert re.search(r"R@1=\d", out) and "folder classes" in out
        if args[0] == "search":
            hits = [line for line in out.splitlines() if re.match(r"\s+\d+\. ", line)]
            assert len(hits) == 8 and all(re.search(r"\[c\d\d\]$", h) for h in hits)  # each hit with its class
    cfg = json.loads((tmp_path / "runs" / "my_photos" / "config.json").read_text())
    assert cfg["data"]["split"] == 0.5 and cfg["model"]["backbone"] == "tf_efficientnet_lite0"
    assert (tmp_path / "hits.png").stat().st_size > 0
    assert json.loads((tmp_path / "photos_index" / "manifest.json").read_text())["n_images"] == 80
    meta = json.loads((tmp_path / "my_photos.onnx.json").read_text())
    assert meta["check"]["max_abs_diff"] <= 1e-5 and meta["img_size"] == 32

    import numpy as np

    scope = {}
    exec(block(*WALK_THROUGH, "python", 0), scope)  # noqa: S102 - the page's own two lines
    model = scope["model"]
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    scope["x"] = x
    exec(block(*WALK_THROUGH, "python", 1), scope)  # noqa: S102
    import torch

    with torch.no_grad():
        want = model.model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(scope["embeddings"], want, atol=1e-5, rtol=0)
