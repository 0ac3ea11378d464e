"""Nothing on disk until a run can start, and non-finite settings are refused.

Each failed start below leaves the runs directory as it was (or, for a failure inside training
before the first checkpoint, a leftover that is not a run), and the corrected command then
succeeds under the same name."""

import math
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nbsrc.__main__ import main
from nbsrc.config import ExperimentConfig, config_fields
from nbsrc.errors import ConfigError, NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "test_vit", "--dataset", "digits", "--img-size", "8", "--patch-size", "4", "--batch-size", "16",
        "--m-per-class", "4", "--iterations", "2", "--eval-per-class", "20", "--log-every", "1", "--ckpt-every", "0",
        "--memory-size", "0", "--no-progress", "--device", "cpu", "--lam", "0"]


def train(tmp_path, *flags, name="r", capsys=None):
    rc = main(["train", "--name", name, "--runs-dir", str(tmp_path / "runs"), *TINY, *flags])
    err = capsys.readouterr().err.strip() if capsys is not None else ""
    return rc, err


def listing(tmp_path) -> list[str]:
    runs = tmp_path / "runs"
    return sorted(str(p.relative_to(runs)) for p in runs.rglob("*")) if runs.exists() else []


def folder(root: Path, n_classes=4, per_class=4, size=8) -> Path:
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def corrected_command_succeeds(tmp_path, capsys, *flags):
    rc, err = train(tmp_path, *flags, capsys=capsys)
    assert rc == 0, err
    assert (tmp_path / "runs" / "r" / "results.json").exists()


@pytest.mark.parametrize("bad,good,needle", [
    (["--backbone", "vit_tinny_patch16_224"], [], "unknown backbone"),
    (["--dim", "500"], ["--dim", "8"], "dim=500"),
    (["--weights", "missing.pt"], [], "weights='missing.pt'"),
    (["--train-classes", "0-11"], [], "class"),
], ids=["backbone", "dim", "weights", "classes"])
def test_failed_start_writes_nothing_and_the_corrected_command_succeeds(tmp_path, capsys, bad, good, needle):
    rc, err = train(tmp_path, *bad, capsys=capsys)
    assert rc == 2 and needle in err and "\n" not in err, err
    assert listing(tmp_path) == []
    corrected_command_succeeds(tmp_path, capsys, *good)


def test_cuda_without_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc, err = train(tmp_path, "--device", "cuda", capsys=capsys)
    assert rc == 2 and "CUDA is not available" in err and listing(tmp_path) == []
    corrected_command_succeeds(tmp_path, capsys)


def test_missing_and_empty_data_root(tmp_path, capsys):
    flags = ["--dataset", "folder", "--train-classes", "0-1", "--test-classes", "2-3", "--batch-size", "8",
             "--eval-per-class", "4"]
    rc, err = train(tmp_path, *flags, "--data-root", str(tmp_path / "nowhere"), capsys=capsys)
    assert rc == 2 and "does not exist" in err and listing(tmp_path) == []
    (tmp_path / "empty").mkdir()
    rc, err = train(tmp_path, *flags, "--data-root", str(tmp_path / "empty"), capsys=capsys)
    assert rc == 2 and "has no images" in err and listing(tmp_path) == []
    corrected_command_succeeds(tmp_path, capsys, *flags, "--data-root", str(folder(tmp_path / "images")))


def test_unreadable_training_image_is_found_before_anything_is_written(tmp_path, capsys):
    root = folder(tmp_path / "images")
    flags = ["--dataset", "folder", "--data-root", str(root), "--train-classes", "0-1", "--test-classes", "2-3",
             "--batch-size", "8", "--eval-per-class", "4"]
    good = (root / "c0" / "1.png").read_bytes()
    (root / "c0" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # a training class (c0 is class 0)
    rc, err = train(tmp_path, *flags, capsys=capsys)
    assert rc == 2 and "unreadable image" in err and "1.png" in err, err
    assert listing(tmp_path) == []
    (root / "c0" / "1.png").write_bytes(good)
    corrected_command_succeeds(tmp_path, capsys, *flags)


def test_nan_loss_at_iteration_0_says_no_checkpoint_and_the_next_start_replaces_it(tmp_path, capsys, monkeypatch):
    from nbsrc import losses

    real = losses.PAIR_LOSSES["contrastive"]
    monkeypatch.setitem(losses.PAIR_LOSSES, "contrastive",
                        lambda cfg, d, c: (lambda z, *a, **k: real(cfg, d, c)(z, *a, **k) * float("nan")))
    cfg = ExperimentConfig.from_dict({"name": "r", "runs_dir": str(tmp_path / "runs"), "dataset": "digits",
                                      "img_size": 8, "patch_size": 4, "batch_size": 16, "m_per_class": 4,
                                      "iterations": 2, "eval_per_class": 20, "progress": False, "device": "cpu"})
    from nbsrc.experiment import run_experiment
    from nbsrc.train import read_metrics

    with pytest.raises(NonFiniteLossError) as e:
        run_experiment(cfg, mode="new")
    msg = str(e.value)
    assert "iteration 0" in msg and "no checkpoint was written" in msg and "last good checkpoint" not in msg
    assert "\n" not in msg
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["config.json"]
    monkeypatch.setitem(losses.PAIR_LOSSES, "contrastive", real)
    capsys.readouterr()
    res = run_experiment(cfg, mode="new")  # the same command, now that the loss is finite
    assert "replacing" in capsys.readouterr().out
    rows = read_metrics(cfg.run_dir, "train")  # the rerun's own rows only: the failed run's were replaced
    assert [r["iteration"] for r in rows] == [2] and math.isfinite(rows[0]["total"])  # logged at the end
    assert math.isfinite(res.results["R@1"])
    assert not any(p.name.startswith(".") for p in cfg.run_dir.parent.iterdir())  # no temporary left


def _cli(tmp_path, *extra):
    return [sys.executable, "-m", "nbsrc", "train", "--name", "k", "--runs-dir", str(tmp_path / "runs"), *TINY, *extra]


def _train_rows(run_dir: Path) -> list[str]:
    return [r for r in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in r]


def _same_name_starts_again(tmp_path, capsys, how: str) -> None:
    """The command of the killed start, run again under the same name (``how``: ``new`` or
    ``--resume``), replaces the leftover and trains from iteration 0."""
    capsys.readouterr()
    rc = main(["train", "--name", "k", "--runs-dir", str(tmp_path / "runs"), *TINY,
               *(["--resume"] if how == "resume" else [])])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    run_dir = tmp_path / "runs" / "k"
    assert "replacing" in out.out and (run_dir / "results.json").exists()
    assert len(_train_rows(run_dir)) == 2  # iterations 1 and 2 of the new run, nothing of the killed one
    assert not any(p.name.startswith(".") for p in run_dir.parent.iterdir())  # no temporary left


# What a start killed before its first checkpoint can leave, each piece built explicitly (a real kill
# lands wherever it lands): the config is written first (atomically), then each logged iteration
# appends a metrics line and, with tensorboard installed, its copy under tb/; a kill in the middle of
# an append leaves a partial last line; a kill in a checkpoint save leaves its temporary file.
LEFTOVERS = {
    "config only": (),
    "metrics": ("metrics",),
    "partial metrics line": ("metrics", "partial"),
    "tensorboard": ("metrics", "tb"),
    "metrics rewrite temporary": ("metrics", "metrics.tmp"),
    "checkpoint temporary": ("metrics", "tb", "checkpoint.tmp"),
    "all of it": ("metrics", "partial", "tb", "metrics.tmp", "checkpoint.tmp"),
}


def _leftover(tmp_path, pieces) -> Path:
    from nbsrc.__main__ import build_parser, config_from_args
    from nbsrc.train.checkpoint import LATEST

    args = build_parser().parse_args(["train", "--name", "k", "--runs-dir", str(tmp_path / "runs"), *TINY])
    cfg = config_from_args(args)
    run_dir = tmp_path / "runs" / "k"
    run_dir.mkdir(parents=True)
    cfg.save(run_dir / "config.json")
    row = '{"kind": "train", "iteration": 1, "contrastive": 0.5, "koleo": 0.0, "total": 0.5, "lr": 0.001}\n'
    if "metrics" in pieces:
        (run_dir / "metrics.jsonl").write_text(row + ("{\"kind\": \"train\", \"iter" if "partial" in pieces else ""))
    if "metrics.tmp" in pieces:
        (run_dir / "metrics.jsonl.tmp").write_text(row)
    if "tb" in pieces:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(run_dir / "tb")) as w:
            w.add_scalar("train/total", 0.5, global_step=1)
    if "checkpoint.tmp" in pieces:
        (run_dir / f".{LATEST}.tmp-999999").write_bytes(b"PK\x03\x04 half a checkpoint")
    return run_dir


@pytest.mark.parametrize("what", list(LEFTOVERS))
def test_every_leftover_of_a_killed_start_is_not_a_run(tmp_path, what):
    from nbsrc.train.rundir import is_leftover

    run_dir = _leftover(tmp_path, LEFTOVERS[what])
    assert is_leftover(run_dir)
    (run_dir / "notes.txt").write_text("the user's own file")  # anything else: it is not ours to replace
    assert not is_leftover(run_dir)
    (run_dir / "notes.txt").unlink()
    (run_dir / "checkpoint.pt").write_bytes(b"")  # a checkpoint: a run, to be resumed, never replaced
    assert not is_leftover(run_dir)


@pytest.mark.parametrize("what,how", [("config only", "new"), ("partial metrics line", "resume"),
                                      ("tensorboard", "new"), ("all of it", "new"), ("all of it", "resume")])
def test_the_same_name_starts_again_over_a_leftover(tmp_path, capsys, what, how):
    _leftover(tmp_path, LEFTOVERS[what])
    _same_name_starts_again(tmp_path, capsys, how)


def test_sigkill_before_the_first_checkpoint_then_the_same_name_starts_again(tmp_path, capsys):
    """A real ``python -m nbsrc train`` SIGKILLed once it has logged its first iteration, before any
    checkpoint; whatever it left (the pieces above), the same command with ``--resume`` starts again."""
    run_dir = tmp_path / "runs" / "k"
    proc = subprocess.Popen(_cli(tmp_path, "--iterations", "100000"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    try:
        while not (run_dir / "metrics.jsonl").exists():  # the first logged iteration
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "checkpoint.pt").exists()
    _same_name_starts_again(tmp_path, capsys, "resume")


# ----------------------------------------------------------------------------- non-finite settings
FLOAT_FIELDS = [f.name for f in config_fields()
                if f.type is float
                or (typing.get_origin(f.type) in (typing.Union, getattr(__import__("types"), "UnionType", None))
                    and float in typing.get_args(f.type))]


def test_the_float_fields_are_found():
    assert {"lr", "lam", "beta", "weight_decay", "grad_clip", "momentum", "gem_p", "min_lr_factor"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_every_float_field_rejects_non_finite_values(field, value):
    with pytest.raises(ConfigError, match=f"^{field}=") as e:
        ExperimentConfig.from_dict({field: value})
    assert "finite" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_cli_lr_nan_is_one_line(tmp_path, capsys, value):
    rc, err = train(tmp_path, "--lr", value, capsys=capsys)
    assert rc == 2 and err.startswith(f"error: lr={value}") and "\n" not in err and listing(tmp_path) == []
