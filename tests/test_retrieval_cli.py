"""``python -m nbsrc embed`` / ``search`` as a user runs them (subprocesses): a photo folder with
damaged files indexed and searched, a build killed with SIGKILL and resumed by the same command,
``--grid``, ``--help``, and every bad input a one-line error with nothing written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_photos import make_photo_folder
from PIL import Image

pytestmark = pytest.mark.xdist_group("retrieval_cli")  # its tests share module-scoped fixtures: one worker


ROOT = Path(__file__).resolve().parent.parent
MODEL = ["efficientnet_lite0", "--img-size", "64"]


def nbsrc(*args, check=None, prelude: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if prelude is None:
        cmd = [sys.executable, "-m", "nbsrc", *map(str, args)]
    else:
        code = prelude + "\nimport sys\nfrom nbsrc.__main__ import main\nsys.exit(main(sys.argv[1:]))\n"
        cmd = [sys.executable, "-c", code, *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd or ROOT, timeout=600)
    if check is not None:
        assert r.returncode == check, r.stdout + r.stderr
    return r


def run_main(capsys, *args) -> subprocess.CompletedProcess:
    """``python -m nbsrc ARGS`` in this process (what the subprocess runs, without the start-up cost)."""
    from nbsrc.__main__ import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse: --help
        rc = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), rc, out.out, out.err)


def _one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# SIGKILL from inside the process after the second batch is on disk and before the sidecar records it
KILL_AFTER_TWO_BATCHES = """
import os, signal
import nbsrc.retrieval.index as ix
_real = ix.embed_to_memmap
def _killing(*a, on_batch=None, **kw):
    n = [0]
    def hook(first, batch):
        on_batch(first, batch)
        n[0] += 1
        if n[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return _real(*a, on_batch=hook, **kw)
ix.embed_to_memmap = _killing
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    root = base / "my photos é"  # spaces and non-ASCII
    queries = make_photo_folder(root, per_class=3, seed=2)
    truncated = root / "china" / "cut.jpg"
    data = (root / "china" / "0.jpg").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    (root / "flower" / "readme.png").write_text("not an image")
    os.symlink(".", root / "self")  # a link to '.'
    os.symlink(root, root / "hopper" / "loop")  # a loop
    return base, root, queries


@pytest.mark.slow  # end to end: a build killed with SIGKILL, resumed by the same command in a new process
def test_embed_kill_resume_search_grid(folder, tmp_path, capsys):
    """The build that is killed, the one that resumes it and the uninterrupted one it is compared
    with bit for bit are real processes (the same thread count for all three); the commands that
    only read the index run in this process (:func:`run_main`, the same ``main``)."""
    base, root, queries = folder
    out = tmp_path / "index"
    killed = nbsrc("embed", *MODEL, root, "--out", out, "--batch-size", "2", "--workers", "0", "--no-progress",
                   prelude=KILL_AFTER_TWO_BATCHES)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    side = json.loads((out / "embeddings.npy.progress.json").read_text())
    assert side["rows_done"] == 2 and not (out / "manifest.json").exists()
    _one_line_error(run_main(capsys, "search", out, queries["china"]), "did not finish", "run the same nbsrc embed "
                                                                                         "command again")

    r = nbsrc("embed", *MODEL, root, "--out", out, "--batch-size", "2", "--workers", "0", "--no-progress", check=0)
    assert "resuming the index build" in r.stdout and "2 of 11 images already embedded" in r.stdout
    assert "index " in r.stdout and ": 9 images of" in r.stdout
    assert "skipped 2 unreadable image(s)" in r.stdout and "cut.jpg" in r.stdout and "readme.png" in r.stdout
    report = (out / "skipped.tsv").read_text().splitlines()
    assert report[0] == "path\treason" and len(report) == 3
    assert {Path(line.split("\t")[0]).name for line in report[1:]} == {"cut.jpg", "readme.png"}

    # the same as an uninterrupted build
    fresh = tmp_path / "fresh"
    nbsrc("embed", *MODEL, root, "--out", fresh, "--batch-size", "2", "--workers", "0", "--no-progress", check=0)
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), np.load(fresh / "embeddings.npy"))

    # run again when finished: nothing to do, nothing changed
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_main(capsys, "embed", *MODEL, root, "--out", out, "--batch-size", "2", "--workers", "0",
                     "--no-progress")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to do" in again.stdout and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp

    grid = tmp_path / "figs" / "hits.png"
    s = run_main(capsys, "search", out, queries["hopper"], root / "flower" / "1.jpg", "-k", "3", "--grid", grid)
    assert s.returncode == 0, s.stdout + s.stderr
    lines = s.stdout.splitlines()
    assert lines[0] == f"query {queries['hopper']}" and len(lines) == 8
    assert all("[hopper]" in line for line in lines[1:4])  # an ImageNet convnet finds the same photograph
    assert lines[4].endswith("[flower]") and lines[5].strip().startswith("1. ") and "flower/1.jpg" in lines[5]
    with Image.open(grid) as im:
        assert im.size[0] > 500 and im.size[1] > 200


def test_help_shows_defaults_and_choices(capsys):
    e = run_main(capsys, "embed", "--help").stdout
    from nbsrc.models.pooling import POOLINGS

    assert "{" + ",".join(POOLINGS) + "}" in e and "(default: auto)" in e and "efficientnet_lite0" in e
    assert "resumes" in e and "skipped.tsv" in e
    s = run_main(capsys, "search", "--help").stdout
    assert "(default: 10)" in s and "--grid" in s


def test_bad_inputs_are_one_line_errors(folder, tmp_path, capsys):
    base, root, queries = folder
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "never"
    (tmp_path / "empty").mkdir()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    cases = [
        (("embed", *MODEL, tmp_path / "missing", "--out", out), ("does not exist",)),
        (("embed", *MODEL, tmp_path / "empty", "--out", out), ("no images under",)),
        (("embed", "no_such_model", root, "--out", out), ("unknown model 'no_such_model'",)),
        (("embed", tmp_path / "empty", root, "--out", out), ("not a run directory",)),
        (("embed", *MODEL, root, "--out", tmp_path / "busy"), ("not empty and not an index",)),
        (("embed", *MODEL, root, "--out", out, "--batch-size", "0"), ("--batch-size 0 is invalid",)),
        (("embed", *MODEL, root, "--out", out, "--device", "cuda:7"), ("cuda",)),
        (("search", tmp_path / "empty", queries["china"]), ("not an index directory",)),
        (("search", tmp_path / "missing", queries["china"]), ("not an index directory",)),
    ]
    if _has_cuda():  # the case is about a machine without a GPU
        cases = [c for c in cases if "cuda:7" not in c[0]]
    for args, fragments in cases:
        _one_line_error(run_main(capsys, *args), *fragments)
    assert not out.exists()
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine" and len(list((tmp_path / "busy").iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["empty", "busy"])


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_search_bad_queries(folder, tmp_path, capsys):
    base, root, queries = folder
    flat = tmp_path / "flat"
    flat.mkdir()
    for name, q in queries.items():
        (flat / f"{name}.jpg").write_bytes(q.read_bytes())
    out = tmp_path / "idx"
    assert run_main(capsys, "embed", *MODEL, flat, "--out", out, "--workers", "0", "--no-progress").returncode == 0
    _one_line_error(run_main(capsys, "search", out, tmp_path / "nope.jpg"), "query image", "does not exist")
    bad = tmp_path / "bad.jpg"
    bad.write_text("text")
    _one_line_error(run_main(capsys, "search", out, bad), "cannot decode image", "bad.jpg")
    _one_line_error(run_main(capsys, "search", out, flat / "china.jpg", "-k", "0"), "-k 0 is invalid")
    _one_line_error(run_main(capsys, "search", out, flat / "china.jpg", "--grid", tmp_path / "g.txt"), "--grid",
                    ".png or .pdf")
    r = run_main(capsys, "search", out, flat / "china.jpg", "-k", "50")  # k capped at the 3 images
    assert len(r.stdout.splitlines()) == 4 and "[" not in r.stdout  # no classes in a flat folder
