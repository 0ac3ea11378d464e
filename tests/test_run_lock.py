"""One process per run directory and per index (``nbsrc.locking``), with real processes: two starts of
one name at once, a start, ``--resume`` or ``--overwrite`` while a run trains, two ``--overwrite`` at
once, a SIGKILLed run's lock, and two ``embed`` builds into one ``--out``.

Each refused start must exit 2 with the one line ``runs/<name> is being trained by process <PID>; wait
for it or choose another --name`` and touch nothing: the live run finishes with every iteration logged
once, and no backup or extra directory appears."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nbsrc import locking
from nbsrc.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
# the tiny run of test_run_start, long enough (a few hundred iterations, 10-40 s) for a second process to
# start while it trains; ckpt_every 100: the first 100 iterations look like a leftover (no checkpoint)
TINY = ["--backbone", "test_vit", "--dataset", "digits", "--img-size", "8", "--patch-size", "4", "--batch-size", "16",
        "--m-per-class", "4", "--eval-per-class", "20", "--log-every", "1", "--memory-size", "0", "--no-progress",
        "--device", "cpu", "--lam", "0"]
LONG = 300
BUSY = re.compile(r"^error: (\S+) is being trained by process (\d+); wait for it or choose another --name$")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _start(tmp_path, *extra, iterations=LONG, name="k") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nbsrc", "train", "--name", name, "--runs-dir", str(tmp_path / "runs"), *TINY,
           "--iterations", str(iterations), *extra]
    return subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def _train_iterations(run_dir: Path) -> list[int]:
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["iteration"] for r in rows if r.get("kind") == "train"]


def _wait_until_training(proc: subprocess.Popen, run_dir: Path) -> None:
    while not (run_dir / "metrics.jsonl").exists():  # its first logged iteration
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)


def _refused(rc: int, err: str, run_dir: Path, pid: int | None = None) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    m = BUSY.match(lines[0])
    assert m and m.group(1) == str(run_dir), lines[0]
    if pid is not None:
        assert int(m.group(2)) == pid


def _intact(tmp_path, run_dir: Path, iterations: int = LONG) -> None:
    """The surviving run finished, every iteration logged once; nothing but it (and backups the test
    expects) under runs/, and no lock file left."""
    assert (run_dir / "results.json").exists()
    assert _train_iterations(run_dir) == list(range(1, iterations + 1))
    assert not locking.lock_path(run_dir).exists()


def test_two_starts_at_once_one_trains_the_other_stops_in_one_line(tmp_path):
    a, b = _start(tmp_path), _start(tmp_path)
    (rca, outa, erra), (rcb, outb, errb) = _finish(a), _finish(b)
    run_dir = tmp_path / "runs" / "k"
    ok, refused = ((rca, outa), (rcb, errb)) if rca == 0 else ((rcb, outb), (rca, erra))
    assert ok[0] == 0 and "k: R@1=" in ok[1], (erra, errb)
    _refused(*refused, run_dir)
    _intact(tmp_path, run_dir)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["k"]


@pytest.mark.parametrize("how", ["new", "resume", "overwrite"])
def test_a_second_start_while_a_run_trains_touches_nothing(tmp_path, capsys, how):
    """A real run trains; this process starts the same name (new, --resume or --overwrite) and is refused
    in one line naming the run's PID, before its first checkpoint; the run then finishes intact."""
    a = _start(tmp_path)
    run_dir = tmp_path / "runs" / "k"
    try:
        _wait_until_training(a, run_dir)
        assert not (run_dir / "checkpoint.pt").exists()  # it looks like a leftover, and must not be replaced
        flags = {"new": [], "resume": ["--resume"], "overwrite": ["--overwrite"]}[how]
        capsys.readouterr()
        rc = main(["train", "--name", "k", "--runs-dir", str(tmp_path / "runs"), *TINY, "--iterations", str(LONG),
                   *flags])
        _refused(rc, capsys.readouterr().err, run_dir, a.pid)
        # the lock itself, past the early check: prepare_run_dir refuses as well, and changes nothing
        from nbsrc.__main__ import build_parser, config_from_args
        from nbsrc.errors import RunDirError
        from nbsrc.train.rundir import prepare_run_dir

        cfg = config_from_args(build_parser().parse_args(["train", "--name", "k", "--runs-dir", str(tmp_path / "runs"),
                                                          *TINY, "--iterations", str(LONG)]))
        with pytest.raises(RunDirError, match=rf"^{re.escape(str(run_dir))} is being trained by process {a.pid};"):
            prepare_run_dir(cfg, "overwrite" if how == "new" else how)
        assert not locking.is_held(run_dir)
    finally:
        rc, out, err = _finish(a)
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    _intact(tmp_path, run_dir)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["k"]  # no backup, no second directory


def test_a_notebook_reusing_a_run_that_trains_is_refused(tmp_path):
    """``run_experiment(cfg)`` in its notebook mode (``reuse``) on a run another process trains; ``nbsrc runs``
    lists that run as training, with its process, not as a leftover."""
    from nbsrc.__main__ import build_parser, config_from_args
    from nbsrc.errors import RunDirError
    from nbsrc.experiment import run_experiment

    a = _start(tmp_path)
    run_dir = tmp_path / "runs" / "k"
    try:
        _wait_until_training(a, run_dir)
        cfg = config_from_args(build_parser().parse_args(["train", "--name", "k", "--runs-dir", str(tmp_path / "runs"),
                                                          *TINY, "--iterations", str(LONG)]))
        with pytest.raises(RunDirError, match=f"is being trained by process {a.pid}; wait for it or choose another"):
            run_experiment(cfg)
        from nbsrc.runlist import list_runs

        assert [(r["name"], r["state"]) for r in list_runs(tmp_path / "runs")] == [("k", f"training (process {a.pid})")]
    finally:
        rc, _, err = _finish(a)
    assert rc == 0, err[-2000:]
    _intact(tmp_path, run_dir)


def test_two_overwrites_at_once_make_one_backup_and_one_run(tmp_path, capsys):
    assert main(["train", "--name", "k", "--runs-dir", str(tmp_path / "runs"), *TINY, "--iterations", "2"]) == 0
    old = (tmp_path / "runs" / "k" / "results.json").read_text()
    a, b = _start(tmp_path, "--overwrite"), _start(tmp_path, "--overwrite")
    (rca, _, erra), (rcb, _, errb) = _finish(a), _finish(b)
    assert sorted([rca, rcb]) == [0, 2], (erra, errb)
    run_dir = tmp_path / "runs" / "k"
    _refused(*((rcb, errb) if rcb else (rca, erra)), run_dir)
    _intact(tmp_path, run_dir)
    backups = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("k.old-")]
    assert len(backups) == 1 and (backups[0] / "results.json").read_text() == old
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(["k", backups[0].name])


@pytest.mark.parametrize("how", ["new", "resume"])
def test_a_sigkilled_runs_lock_does_not_block_the_next_start(tmp_path, capsys, how):
    a = _start(tmp_path, iterations=100000)
    run_dir = tmp_path / "runs" / "k"
    try:
        _wait_until_training(a, run_dir)
        assert locking.holder(run_dir) == a.pid  # the live run's PID, in .k.lock beside its directory
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    assert locking.lock_path(run_dir).exists()  # a killed process leaves its file, but not its lock
    capsys.readouterr()
    rc = main(["train", "--name", "k", "--runs-dir", str(tmp_path / "runs"), *TINY, "--iterations", "2",
               *(["--resume"] if how == "resume" else [])])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert "replacing" in out.out  # the killed run's leftover, now that nobody holds it
    _intact(tmp_path, run_dir, 2)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["k"]


# ----------------------------------------------------------------------------- embed --out
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / f"c{c}").mkdir()
        for i in range(150):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def _embed(images: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nbsrc", "embed", "efficientnet_lite0", "--img-size", "64", str(images), "--out",
           str(out), "--batch-size", "8", "--workers", "0", "--no-progress", "--device", "cpu"]
    return subprocess.Popen(cmd, cwd=out.parent, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


HOLD = """
import sys
from nbsrc import locking
locking.acquire(sys.argv[1], "built", "--out")
print("held", flush=True)
sys.stdin.read()
"""


def test_an_embed_into_an_index_being_built_stops_and_touches_nothing(tmp_path, images):
    """A process holds the index's lock as a build does (nbsrc.locking); ``embed --out`` into it stops in one
    line naming that process and writes nothing; once the holder is SIGKILLed the same command builds."""
    out = tmp_path / "idx"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=tmp_path, env=_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, _, err = _finish(_embed(images, out))
        assert rc == 2 and err.strip() == (f"error: {out} is being built by process {holder.pid}; wait for it or "
                                           "choose another --out"), err
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    rc, stdout, err = _finish(_embed(images, out))
    assert rc == 0 and "600 images" in stdout, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # the killed holder's lock file is gone too


def test_two_embeds_into_one_out_at_once_build_one_index(tmp_path, images):
    """Two builds of one index started together: one builds, the other stops in one line (or, started
    after the first finished, finds the index made); never two writers, and the index is whole."""
    out = tmp_path / "idx"
    a, b = _embed(images, out), _embed(images, out)
    results = [_finish(a), _finish(b)]
    busy = [r for r in results if r[0] != 0]
    assert len(busy) <= 1, results
    for rc, _, err in busy:
        assert rc == 2 and re.fullmatch(rf"error: {re.escape(str(out))} is being built by process \d+; wait for it or "
                                        r"choose another --out\n", err), err
    assert all("Traceback" not in r[2] for r in results)
    from nbsrc.retrieval import Index

    index = Index.load(out, device="cpu")
    assert len(index) == 600 and index.manifest["n_skipped"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_a_stale_lock_file_is_taken_over_and_removed_on_release(tmp_path):
    """What a SIGKILLed holder leaves (its file and PID, no lock) blocks nobody; the new holder writes its own
    PID, and a fork of it does not hold the lock (POSIX locks are per process)."""
    target = tmp_path / "x"
    locking.lock_path(target).write_text("999999\n")
    locking.check_free(target)  # no error: nobody holds it
    locking.acquire(target)
    try:
        assert locking.is_held(target) and locking.holder(target) == os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: not a holder, and trying to take the lock is refused
            try:
                locking.acquire(target)
                os._exit(1)
            except Exception as e:  # noqa: BLE001
                os._exit(0 if f"is being trained by process {os.getppid()}" in str(e) else 2)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        locking.release(target)
    assert not locking.lock_path(target).exists() and not locking.is_held(target)
