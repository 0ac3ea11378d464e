"""Runs trained at once in worker processes (nbsrc.workers, run_all(jobs=...)): the same weights as
the same runs trained one after the other with the workers' thread count, output relayed with each
job's tag, errors raised in the caller, bad values one-line errors."""

import math
import os

import pytest
import torch

from nbsrc.config import ExperimentConfig
from nbsrc.errors import ConfigError
from nbsrc.experiment import run_all
from nbsrc.workers import auto_jobs, check_jobs, map_jobs

TINY = dict(dataset="digits", train_classes="0-4", test_classes="5-9", backbone="test_vit", img_size=16,
            patch_size=4, iterations=6, batch_size=16, m_per_class=4, warmup_iters=0, log_every=2, ckpt_every=3)


def seed_configs(root) -> dict[int, ExperimentConfig]:
    return {s: ExperimentConfig.from_dict({**TINY, "name": f"r{s}", "seed": s, "runs_dir": str(root)}) for s in (0, 1)}


def test_runs_trained_by_two_workers_equal_the_same_runs_trained_in_turn(tmp_path, capsys):
    pooled = run_all(seed_configs(tmp_path / "pooled"), jobs=2)
    out = capsys.readouterr().out
    assert "[r0] " in out and "[r1] " in out  # each worker's lines, tagged with its run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of two workers uses on two cores
    try:
        serial = run_all(seed_configs(tmp_path / "serial"), jobs=1)
    finally:
        torch.set_num_threads(threads)
    for s in (0, 1):
        assert pooled[s].results["R@1"] == serial[s].results["R@1"]
        a = torch.load(pooled[s].run_dir / "model.pt", weights_only=True)
        b = torch.load(serial[s].run_dir / "model.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = run_all(seed_configs(tmp_path / "pooled"), jobs=2)  # finished: reused in this process
    assert all(r.reused for r in again.values())


def test_a_run_named_by_two_labels_is_trained_once(tmp_path, capsys):
    cfgs = seed_configs(tmp_path)
    runs = run_all({"a": cfgs[0], "b": cfgs[1], "a again": cfgs[0]}, jobs=2)
    assert runs["a"].run_dir == runs["a again"].run_dir
    assert capsys.readouterr().out.count("[r0] r0: R@1=") == 1


def test_the_callers_mode_still_holds_for_the_runs_it_makes_itself(tmp_path):
    """mode='new' forbids reusing a run: the off-the-shelf run (made by the caller, not a worker) that
    exists already is an error, while the two new runs were trained by the workers."""
    from nbsrc.errors import RunDirError

    cfgs = seed_configs(tmp_path)
    off = cfgs[0].replace(name="off", iterations=0)
    run_all({"off": off}, mode="new")
    with pytest.raises(RunDirError, match="off"):
        run_all({"off": off, "a": cfgs[0], "b": cfgs[1]}, mode="new", jobs=2)
    assert all((tmp_path / n / "results.json").exists() for n in ("r0", "r1"))


def test_map_jobs_keeps_the_order_and_relays_output(capsys):
    assert map_jobs(math.sqrt, [4.0, 9.0, 16.0], ["a", "b", "c"], jobs=2) == [2.0, 3.0, 4.0]
    map_jobs(print, ["hello from a worker"], ["w"], jobs=2)
    assert "[w] hello from a worker" in capsys.readouterr().out


def test_an_error_in_a_job_is_raised_in_the_caller_after_the_others_finish():
    with pytest.raises(ConfigError, match="jobs=0 is invalid"):
        map_jobs(check_jobs, [1, 0, 2], ["ok", "bad", "ok2"], jobs=2)


def test_a_job_that_dies_without_a_result_is_named():
    with pytest.raises(RuntimeError, match="job dies ended with exit code 3 and no result"):
        map_jobs(os._exit, [3], ["dies"], jobs=1)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True, "-1"])
def test_bad_jobs_is_a_one_line_error(bad):
    with pytest.raises(ConfigError, match="give a number of runs to train at once"):
        check_jobs(bad)
    with pytest.raises(ConfigError, match="jobs="):
        run_all({}, jobs=bad)


def test_jobs_from_a_command_line_is_read_as_a_number():
    assert check_jobs("2") == 2 and check_jobs(" 1 ") == 1 and check_jobs("auto") == "auto"
    with pytest.raises(ConfigError, match="jobs=0 is invalid"):
        check_jobs("0")


def test_auto_jobs_is_one_on_a_gpu_and_at_most_two():
    assert auto_jobs("cuda") == 1
    assert auto_jobs("cpu") in (1, 2)
