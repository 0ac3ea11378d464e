"""Faults a long run meets: a SIGKILL at any moment, a checkpoint truncated on disk, a full disk.

* ``python -m nbsrc train`` killed with SIGKILL at a random iteration and continued with
  ``--resume`` ends with exactly the weights of an uninterrupted run.
* A truncated latest checkpoint is reported in one warning line and the previous one is used.
* A disk that fills up while a checkpoint is written loses no earlier checkpoint, and the error
  says the disk is full and what to do.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from nbsrc.errors import RunDirError
from nbsrc.train.checkpoint import LATEST, PREVIOUS, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- SIGKILL
def _train_cmd(runs_dir: Path, name: str, *extra: str) -> list[str]:
    flags = {"name": name, "runs-dir": runs_dir, "dataset": "digits", "img-size": 8, "patch-size": 4,
             "iterations": 12, "batch-size": 16, "m-per-class": 4, "lr": 1e-3, "log-every": 1,
             "ckpt-every": 2, "eval-per-class": 10, "lam": 0.5, "memory-size": 32, "device": "cpu"}
    args = [a for k, v in flags.items() for a in (f"--{k}", str(v))]
    return [sys.executable, "-m", "nbsrc", "train", *args, "--no-progress", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _last_iteration(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    last = 0
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if row.get("kind") == "train":
            last = max(last, row["iteration"])
    return last


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / LATEST, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_sigkill_at_a_random_iteration_then_resume_gives_identical_weights(tmp_path):
    runs = tmp_path / "runs"
    kill_at = random.SystemRandom().randint(3, 8)  # after the checkpoint at iteration 2 exists
    full = subprocess.Popen(_train_cmd(runs, "full"), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_train_cmd(runs, "killed"), env=_env(), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _last_iteration(runs / "killed" / "metrics.jsonl") < kill_at:
        assert victim.poll() is None, f"the run ended before the kill at {kill_at}: {victim.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "the run to kill made no progress"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    killed_after = _last_iteration(runs / "killed" / "metrics.jsonl")
    assert killed_after < 12 and not (runs / "killed" / "results.json").exists(), f"kill at {kill_at} came too late"

    resumed = subprocess.run(_train_cmd(runs, "killed", "--resume"), env=_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert full.wait(timeout=300) == 0, full.stderr.read()[-2000:]

    a, b = _weights(runs / "full"), _weights(runs / "killed")
    assert a["iteration"] == b["iteration"] == 12
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), f"killed after {killed_after}"
    assert torch.equal(a["memory"]["embeddings"], b["memory"]["embeddings"])
    res = [json.loads((runs / n / "results.json").read_text()) for n in ("full", "killed")]
    assert res[0]["R@1"] == res[1]["R@1"]
    iters = [r["iteration"] for r in map(json.loads, (runs / "killed" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert iters == list(range(1, 13))  # every iteration logged exactly once across the kill
    assert not list((runs / "killed").glob(f".{LATEST}.tmp-*"))  # a save cut by the kill is cleaned up


# ----------------------------------------------------------------------------- truncated checkpoint
def _two_checkpoints(run_dir: Path) -> tuple[dict, dict]:
    run_dir.mkdir(parents=True, exist_ok=True)
    old = {"iteration": 3, "w": torch.arange(1000.0)}
    new = {"iteration": 6, "w": torch.arange(1000.0) * 2}
    save_checkpoint(old, run_dir)
    save_checkpoint(new, run_dir)
    return old, new


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    old, new = _two_checkpoints(tmp_path)
    assert load_checkpoint(tmp_path)["iteration"] == 6  # both intact: the latest, silently
    _truncate(tmp_path / LATEST)
    with pytest.warns(UserWarning) as record:
        state = load_checkpoint(tmp_path)
    assert state["iteration"] == 3 and torch.equal(state["w"], old["w"])
    (msg,) = [str(w.message) for w in record]
    assert "\n" not in msg
    assert f"checkpoint {tmp_path / LATEST} is truncated or corrupt" in msg
    assert f"resuming from the previous checkpoint {tmp_path / PREVIOUS} (iteration 3)" in msg


def test_every_checkpoint_truncated_is_a_clear_error(tmp_path):
    _two_checkpoints(tmp_path)
    _truncate(tmp_path / LATEST)
    _truncate(tmp_path / PREVIOUS)
    with pytest.raises(RunDirError, match=r"no usable checkpoint.*truncated or corrupt.*restart with --overwrite"):
        load_checkpoint(tmp_path)
    (tmp_path / PREVIOUS).unlink()
    with pytest.raises(RunDirError, match=r"truncated or corrupt.*no previous one; restart with --overwrite"):
        load_checkpoint(tmp_path)


def test_latest_missing_after_a_kill_between_the_renames(tmp_path):
    _two_checkpoints(tmp_path)
    os.replace(tmp_path / LATEST, tmp_path / PREVIOUS)  # killed between the two renames of a save
    with pytest.warns(UserWarning, match=r"is missing; resuming from the previous checkpoint .*\(iteration 6\)"):
        assert load_checkpoint(tmp_path)["iteration"] == 6


# ----------------------------------------------------------------------------- full disk
def _disk_fills_up(monkeypatch) -> None:
    """``torch.save`` writes half of the checkpoint, then the disk is full."""
    real = torch.save

    def save(obj, f, *a, **k):
        buf = io.BytesIO()
        real(obj, buf, *a, **k)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)


def test_full_disk_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
    _two_checkpoints(tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in (LATEST, PREVIOUS)}
    _disk_fills_up(monkeypatch)
    with pytest.raises(RunDirError) as err:
        save_checkpoint({"iteration": 9, "w": torch.zeros(1000)}, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value.__cause__, OSError)
    assert msg.startswith(f"disk full while saving a checkpoint in {tmp_path}")
    assert f"the last good checkpoint {tmp_path / LATEST} is unchanged" in msg
    assert "free some space (or use another --runs-dir) and continue with --resume" in msg
    assert {n: (tmp_path / n).read_bytes() for n in (LATEST, PREVIOUS)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LATEST, PREVIOUS])  # the partial file is gone
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["iteration"] == 6


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def save(obj, f, *a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match="Input/output error") as err:
        save_checkpoint({"iteration": 1}, tmp_path)
    assert not isinstance(err.value, RunDirError) and not list(tmp_path.iterdir())


def test_full_disk_during_training_keeps_the_last_checkpoint(tiny_cfg, monkeypatch):
    from nbsrc.experiment import run_experiment
    from nbsrc.train import checkpoint

    cfg = tiny_cfg.replace(name="full_disk", iterations=2, ckpt_every=1, memory_size=0, eval_per_class=4)
    real, calls = checkpoint.torch.save, {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the final checkpoint, at iteration 2
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(RunDirError, match="disk full.*continue with --resume"):
        run_experiment(cfg, mode="new")
    monkeypatch.undo()
    assert load_checkpoint(cfg.run_dir)["iteration"] == 1


def test_a_stale_temporary_file_is_removed_by_the_next_save(tmp_path):
    stale = tmp_path / f".{LATEST}.tmp-999999"
    stale.write_bytes(b"half a checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_checkpoint({"iteration": 1}, tmp_path)
    assert not stale.exists() and load_checkpoint(tmp_path)["iteration"] == 1
