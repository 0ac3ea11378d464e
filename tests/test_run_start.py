"""Nothing on disk until a run can start (issue 16.1), and non-finite settings (16.2).

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
from nbsrc.config import ExperimentConfig
from nbsrc.errors import ConfigError, NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--img-size", "8", "--patch-size", "4", "--batch-size", "16", "--m-per-class", "4",
        "--iterations", "2", "--eval-per-class", "20", "--log-every", "1", "--ckpt-every", "0", "--memory-size", "0",
        "--no-progress", "--device", "cpu", "--lam", "0"]


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

    with pytest.raises(NonFiniteLossError) as e:
        run_experiment(cfg, mode="new")
    msg = str(e.value)
    assert "iteration 0" in msg and "no checkpoint was written" in msg and "last good checkpoint" not in msg
    assert "\n" not in msg
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["config.json"]
    monkeypatch.setitem(losses.PAIR_LOSSES, "contrastive", real)
    capsys.readouterr()
    res = run_experiment(cfg, mode="new")  # the same command, now that the loss is finite
    assert "replacing" in capsys.readouterr().out and res.results["R@1"] >= 0
    assert not any(p.name.startswith(".") for p in cfg.run_dir.parent.iterdir())  # no temporary left


def _cli(tmp_path, *extra):
    return [sys.executable, "-m", "nbsrc", "train", "--name", "k", "--runs-dir", str(tmp_path / "runs"), *TINY, *extra]


def _kill_before_first_checkpoint(tmp_path) -> Path:
    """Start a long run without intermediate checkpoints and SIGKILL it once it has begun training."""
    run_dir = tmp_path / "runs" / "k"
    proc = subprocess.Popen(_cli(tmp_path, "--iterations", "100000"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    try:
        while not (run_dir / "metrics.jsonl").exists():  # the first logged iteration
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "checkpoint.pt").exists()
    return run_dir


@pytest.mark.parametrize("how", ["new", "resume"])
def test_sigkill_before_the_first_checkpoint_then_the_same_name_starts_again(tmp_path, how):
    run_dir = _kill_before_first_checkpoint(tmp_path)
    flags = ["--resume"] if how == "resume" else []
    proc = subprocess.run(_cli(tmp_path, *flags), cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "replacing" in proc.stdout and (run_dir / "results.json").exists()
    rows = [r for r in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in r]
    assert len(rows) == 2  # iterations 1 and 2 of the new run, nothing of the killed one


# ----------------------------------------------------------------------------- 16.2
FLOAT_FIELDS = [name for name, t in typing.get_type_hints(ExperimentConfig).items()
                if t is float or (typing.get_origin(t) in (typing.Union, getattr(__import__("types"), "UnionType", None))
                                  and float in typing.get_args(t))]


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
