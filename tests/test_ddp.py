"""DDP on CPU (gloo, 2 processes): the real training loop gives what one process on the global batch gives.

One module fixture spawns 2 ranks with :mod:`torch.multiprocessing`; each calls
:func:`nbsrc.train.train` on the tiny digits config (contrastive + KoLeo, λ = 0.5, cross-batch
memory) for an uninterrupted run, then for a run stopped after iteration 2 and resumed. The same
uninterrupted run is then trained here in one process on the global batch. The tests check:

* the loss terms of every step (contrastive over the gathered batch × batch and batch × memory,
  KoLeo over the gathered batch) and the first parameter update equal the single process's;
* the cross-batch memories of the two ranks are bitwise equal, and equal to the single process's;
* the resumed DDP run ends with exactly the weights of the uninterrupted one, and checkpoints,
  metrics and evaluation happen on rank 0 only.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.xdist_group("ddp")  # its tests share module-scoped fixtures: one worker

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(runs_dir: Path, name: str):
    """Tiny digits run, global batch 16 (8 per rank), memory of 40 that wraps around in 4 steps.
    SGD with lr 0.5, no clipping or weight decay: the first update is −0.5 × the gradient, so
    comparing updates compares gradients (Adam's first step would be sign-like). The CUDA switches
    are on, to show that they change nothing on CPU (``torch.compile`` fails the run if called)."""
    from nbsrc.config import ExperimentConfig

    return ExperimentConfig(
        name=name, runs_dir=str(runs_dir), dataset="digits", img_size=8, patch_size=4,
        backbone="vit_tiny_patch16_224", iterations=4, batch_size=16, m_per_class=4, optimizer="sgd", lr=0.5,
        weight_decay=0.0, grad_clip=None, log_every=1, ckpt_every=2, eval_every=1, eval_per_class=10,
        progress=False, lam=0.5, memory_size=40, device="cpu",
        compile=True, fused_optimizer=True, pin_memory=True,  # CUDA switches: no-ops on CPU
    )


def _train_here(cfg, out: Path, tag: str, rank: int = 0, resume: bool = False, stop_after: int | None = None):
    """Build the model and data as ``run_experiment`` does, train, and dump into ``out/<tag>_rank<r>.pt``:
    the final weights and memory of this rank, the weights after each step (taken by ``evaluate``,
    which only rank 0 calls) and the ranks that evaluated and saved checkpoints."""
    from nbsrc.data import build_data
    from nbsrc.models import data_config, model_from_config
    from nbsrc.train import loop, pair_task
    from nbsrc.train.rundir import CONFIG

    memories, saved_by, evaluated_by, snapshots = [], [], [], {}
    real = pair_task.CrossBatchMemory, loop.save_checkpoint

    class RecordedMemory(real[0]):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            memories.append(self)

    def recorded_save(state, run_dir):
        saved_by.append(rank)
        return real[1](state, run_dir)

    def evaluate(m):
        snapshots[len(snapshots) + 1] = {k: v.detach().clone() for k, v in m.state_dict().items()}
        evaluated_by.append(rank)
        return {"R@1": 0.0}

    torch.manual_seed(cfg.run.seed)
    model = model_from_config(cfg)
    norm = data_config(model)
    data = build_data(cfg, norm["mean"], norm["std"])
    if rank == 0 and not resume:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(cfg.run_dir / CONFIG)
    def no_compile(*a, **k):
        raise AssertionError("torch.compile was called on CPU")

    real_compile = torch.compile
    pair_task.CrossBatchMemory, loop.save_checkpoint, torch.compile = RecordedMemory, recorded_save, no_compile
    try:
        loop.fit(cfg, model, pair_task.PairTask(cfg, data.train), cfg.run_dir, resume=resume, evaluate=evaluate,
                 stop_after=stop_after)
    finally:
        (pair_task.CrossBatchMemory, loop.save_checkpoint), torch.compile = real, real_compile
    torch.save({"model": model.state_dict(), "memory": memories[0].state_dict(), "snapshots": snapshots,
                "saved_by": saved_by, "evaluated_by": evaluated_by}, out / f"{tag}_rank{rank}.pt")


def _worker(rank: int, port: int, jobs: list[tuple], out: str) -> None:
    """One rank: join the gloo group, then run ``jobs`` ``(tag, config dict, resume, stop_after)`` in order."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from nbsrc.config import ExperimentConfig
    from nbsrc.train.distributed import init_distributed, wrap_ddp

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    info = init_distributed("cpu")
    assert info.rank == rank and info.world_size == WORLD and dist.get_backend() == "gloo"
    wrapped = wrap_ddp(torch.nn.Linear(2, 2), torch.device("cpu"))
    assert isinstance(wrapped, DistributedDataParallel) and wrapped.device_ids is None  # CPU: no device_ids
    try:
        for tag, cfg_dict, resume, stop_after in jobs:
            _train_here(ExperimentConfig.from_dict(cfg_dict), Path(out), tag, rank, resume, stop_after)
    finally:
        dist.destroy_process_group()


def _load(out: Path, tag: str, ranks=range(WORLD)) -> list[dict]:
    return [torch.load(out / f"{tag}_rank{r}.pt", weights_only=False) for r in ranks]


def _metrics(cfg, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    cfgs = {tag: _config(tmp / "runs", tag) for tag in ("ddp", "resumed", "single")}
    jobs = [("ddp", cfgs["ddp"].to_dict(), False, None), ("part1", cfgs["resumed"].to_dict(), False, 2),
            ("part2", cfgs["resumed"].to_dict(), True, None)]  # part2: fresh model/optimizer/memory, resumed
    mp.spawn(_worker, args=(_free_port(), jobs, str(tmp)), nprocs=WORLD, join=True)
    _train_here(cfgs["single"], tmp, "single")
    out = {t: _load(tmp, t) for t in ("ddp", "part1", "part2")}
    return {"cfg": cfgs, "single": _load(tmp, "single", [0])[0], **out}


@pytest.mark.slow  # shares one 2-process spawn (~30 s with the single-process reference)
def test_one_ddp_step_equals_one_process_on_the_global_batch(runs):
    from nbsrc.models import model_from_config

    ddp_rows, one_rows = _metrics(runs["cfg"]["ddp"], "train"), _metrics(runs["cfg"]["single"], "train")
    assert [r["iteration"] for r in ddp_rows] == [1, 2, 3, 4]  # logged once (rank 0), not once per rank
    for a, b in zip(ddp_rows, one_rows, strict=True):
        for key in ("contrastive", "koleo", "total"):
            # step 1 is the 1e-5; later steps (memory filled, weights moved) track it to float32
            # accumulation: relative 1e-5 of a loss of ~13 (different thread counts reorder the sums)
            tol = dict(abs=1e-5) if a["iteration"] == 1 else dict(rel=1e-5, abs=1e-5)
            assert a[key] == pytest.approx(b[key], **tol), (a["iteration"], key)
    assert ddp_rows[0]["koleo"] != 0 and ddp_rows[1]["contrastive"] > 0

    torch.manual_seed(runs["cfg"]["ddp"].run.seed)
    init = model_from_config(runs["cfg"]["ddp"]).state_dict()
    after_ddp, after_one = runs["ddp"][0]["snapshots"][1], runs["single"]["snapshots"][1]
    biggest = 0.0
    for k, v0 in init.items():
        if v0.is_floating_point():
            d_ddp, d_one = after_ddp[k] - v0, after_one[k] - v0
            torch.testing.assert_close(d_ddp, d_one, atol=1e-5, rtol=0, msg=f"update of {k}")
            biggest = max(biggest, float(d_one.abs().max()))
    assert biggest > 1e-3  # the step moved the weights: an update twice or half as big would fail
    a, b = runs["ddp"][0]["model"], runs["ddp"][1]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the ranks stay in sync


@pytest.mark.slow  # shares one 2-process spawn (~30 s with the single-process reference)
def test_memories_are_equal_across_ranks_and_to_one_process(runs):
    m0, m1, one = runs["ddp"][0]["memory"], runs["ddp"][1]["memory"], runs["single"]["memory"]
    assert m0["filled"] == one["filled"] == 40 and m0["ptr"] == one["ptr"] == (4 * 16) % 40  # wrapped around
    for k in ("embeddings", "labels", "indices", "ptr", "filled"):
        assert (torch.equal(m0[k], m1[k]) if torch.is_tensor(m0[k]) else m0[k] == m1[k]), k
    assert torch.equal(m0["labels"], one["labels"]) and torch.equal(m0["indices"], one["indices"])  # rank order
    torch.testing.assert_close(m0["embeddings"], one["embeddings"], atol=1e-5, rtol=0)


@pytest.mark.slow  # shares one 2-process spawn (~30 s with the single-process reference)
def test_resume_under_ddp_matches_uninterrupted_run(runs):
    part1, part2, cfg = runs["part1"], runs["part2"], runs["cfg"]["resumed"]
    assert [d["saved_by"] for d in part1] == [[0], []]  # the stop at iteration 2: rank 0 only
    assert [d["saved_by"] for d in part2] == [[0], []]  # the end (iteration 4)
    assert [d["evaluated_by"] for d in part1] == [[0, 0], []] and [d["evaluated_by"] for d in part2] == [[0], []]

    final = torch.load(cfg.run_dir / "checkpoint.pt", weights_only=False)
    ref = torch.load(runs["cfg"]["ddp"].run_dir / "checkpoint.pt", weights_only=False)
    assert final["iteration"] == ref["iteration"] == 4
    assert all(torch.equal(final["model"][k], ref["model"][k]) for k in ref["model"])
    assert all(torch.equal(part2[1]["model"][k], ref["model"][k]) for k in ref["model"])  # rank 1 too
    assert torch.equal(final["memory"]["embeddings"], ref["memory"]["embeddings"])
    assert [r["iteration"] for r in _metrics(cfg, "train")] == [1, 2, 3, 4]  # no row twice after the resume
    assert [r["iteration"] for r in _metrics(cfg, "eval")] == [1, 2, 3]
    assert [r["total"] for r in _metrics(cfg, "train")] == [r["total"] for r in _metrics(runs["cfg"]["ddp"], "train")]


def test_backend_and_wrapping_follow_the_device(monkeypatch):
    from nbsrc.train import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.backend_for("auto") == "nccl" and distributed.backend_for("cuda:1") == "nccl"
    assert distributed.backend_for("cpu") == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.backend_for("auto") == "gloo"
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(model, torch.device("cpu")) is model  # no process group: unchanged


def test_fused_optimizer_is_a_no_op_on_cpu():
    from nbsrc.config import ExperimentConfig
    from nbsrc.train import build_optimizer

    params = [torch.nn.Parameter(torch.ones(3))]
    for name in ("adamw", "adam", "sgd"):
        cfg = ExperimentConfig(optimizer=name, fused_optimizer=True, compile=True, pin_memory=True)
        opt = build_optimizer(cfg, params)
        assert not opt.defaults.get("fused")  # CPU parameters: the plain kernels
        params[0].grad = torch.ones(3)
        opt.step()
    assert torch.all(params[0] < 1)


@pytest.mark.slow
def test_torchrun_cli_writes_the_run_once(tmp_path):
    """``torchrun --nproc_per_node=2 -m nbsrc train``: rank 0 alone creates the run directory,
    evaluates and writes the results; both ranks exit cleanly."""
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "nbsrc", "train",
           "--name", "ddp_cli", "--runs-dir", str(tmp_path), "--dataset", "digits", "--img-size", "8",
           "--patch-size", "4", "--iterations", "3", "--batch-size", "16", "--m-per-class", "4",
           "--memory-size", "32", "--eval-per-class", "10", "--device", "cpu", "--no-progress", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "ddp_cli"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp_cli"]  # no second, racing directory
    results = json.loads((run / "results.json").read_text())
    assert 0.0 <= results["R@1"] <= 100.0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    its = [r["iteration"] for r in rows if r.get("kind") == "train"]
    assert its == sorted(set(its)) and len(its) == 3  # each iteration logged once, by rank 0
    assert proc.stdout.count("ddp_cli: R@1=") == 1  # evaluated and reported once
