"""Data loading against the training step: how many DataLoader workers keep the step fed.

The training DataLoader of a config, built as :func:`nbsrc.train.train` builds it (the dataset and
training transform of :func:`~nbsrc.data.build_data`, the batch sampler of
:func:`~nbsrc.data.group_sampler.training_sampler`, pinned memory on CUDA), is read for ``batches``
batches with each worker count of ``workers``, after ``warmup`` batches that also start the workers.
Its img/s is compared with the img/s of nbsrc's training step on batches of the same loader
(:class:`bench.train.NbsrcStep`: forward, loss, backward, update, memory). Loading keeps up
when it delivers at least the step's rate; the smallest worker count that does is reported.

The two rates are measured apart, so each is what it gets with the machine to itself. On a CPU-only
machine the workers and the step share the cores, so during training both are slower than this; on
a GPU machine the step runs on the device and the workers have the CPU.

    python -m bench loader --workers 0 1 2 --batches 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.data import DataLoader

from nbsrc.config import ExperimentConfig
from nbsrc.errors import ConfigError


def _loader(cfg: ExperimentConfig, ds, n_batches: int, workers: int, pin: bool) -> DataLoader:
    from nbsrc.data.group_sampler import training_sampler

    sampler, ds, collate = training_sampler(cfg.replace(iterations=n_batches, warmup_iters=0), ds)
    return DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers, pin_memory=pin,
                      persistent_workers=False, generator=torch.Generator().manual_seed(cfg.run.seed))


def loader_img_per_s(cfg: ExperimentConfig, ds, workers: int, batches: int, warmup: int, pin: bool) -> float:
    """img/s of the training DataLoader with ``workers`` workers over ``batches`` batches, after
    ``warmup`` batches (worker start-up included in the warm-up)."""
    it = iter(_loader(cfg, ds, warmup + batches, workers, pin))
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        n += len(next(it)[1])
    return n / (time.perf_counter() - t0)


def bench_loader(cfg: ExperimentConfig, workers=(0, 1, 2), batches: int = 40, warmup: int = 3,
                 steps: int = 10) -> dict:
    """Loader img/s per worker count beside the training step's img/s (median of ``steps`` steps)."""
    from bench import timed
    from bench.train import NbsrcStep
    from nbsrc.data import build_data
    from nbsrc.train.loop import resolve_device

    workers = sorted({int(w) for w in workers})
    if not workers or workers[0] < 0 or batches < 1 or warmup < 0 or steps < 1:
        raise ConfigError(f"workers={workers}, batches={batches}, warmup={warmup}, steps={steps}: need worker counts "
                          ">= 0, batches >= 1, warmup >= 0 and steps >= 1")
    cfg.validate()
    device = resolve_device(cfg.run.device)
    pin = cfg.run.pin_memory and device.type == "cuda"
    ds = build_data(cfg).train
    rates = {w: loader_img_per_s(cfg, ds, w, batches, warmup, pin) for w in workers}

    step = NbsrcStep(cfg, device, len(set(ds.labels.tolist())))
    step_times = []
    for i, (x, y, idx) in enumerate(_loader(cfg, ds, 2 + steps, 0, pin)):
        _, seconds = timed(lambda x=x, y=y, idx=idx: step(x, y, idx), device)
        if i >= 2:
            step_times.append(seconds)
    step_rate = cfg.optim.batch_size / statistics.median(step_times)
    enough = next((w for w in workers if rates[w] >= step_rate), None)
    return {"dataset": cfg.data.dataset, "backbone": cfg.model.backbone, "img_size": cfg.data.img_size,
            "batch": cfg.optim.batch_size, "sampler": cfg.data.sampler, "device": str(device), "pin_memory": pin,
            "torch_threads": torch.get_num_threads(),
            "batches": batches, "warmup": warmup, "steps": steps, "step_img_per_s": step_rate,
            "loader_img_per_s": {str(w): r for w, r in rates.items()},
            "loader_over_step": {str(w): r / step_rate for w, r in rates.items()},
            "workers_that_keep_up": enough}


def results_markdown(r: dict, info: dict, note: str = "") -> str:
    """The ``loader`` section of bench/RESULTS.md."""
    from bench import machine_lines

    s = (machine_lines(info, note)
         + f"- setup: {r['dataset']} training transform and {r['sampler']} sampler, batch {r['batch']}, img "
         f"{r['img_size']}, step of {r['backbone']} on {r['device']} (torch threads {r['torch_threads']}), "
         f"pin_memory {r['pin_memory']}; {r['batches']} batches per worker count after {r['warmup']} warm-up batches; "
         f"step rate = batch / median of {r['steps']} steps; each measured with the machine to itself\n\n"
         "| DataLoader workers | loader img/s / step img/s | keeps up |\n|---|---|---|\n")
    for w, ratio in r["loader_over_step"].items():
        s += f"| {w} | {ratio:.2f} | {'yes' if ratio >= 1 else 'no'} |\n"
    w = r["workers_that_keep_up"]
    s += ("\nReading: " + (f"{w} worker(s) deliver batches at least as fast as the step consumes them"
                           if w is not None else "none of the worker counts tried keeps up with the step")
          + f" (step: {r['step_img_per_s']:.0f} img/s; loader with "
          + ", ".join(f"{k} workers: {v:.0f}" for k, v in r["loader_img_per_s"].items()) + " img/s).\n")
    return s


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="fashion_mnist",
                   help="fashion_mnist (default), digits, folder, cub, sop, inshop")
    p.add_argument("--data-root", default=None)
    p.add_argument("--backbone", default="vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=7)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--m-per-class", type=int, default=16, help="as the demo: 64 = 4 classes x 16")
    p.add_argument("--memory-size", type=int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=40, help="timed batches per worker count")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed training steps")


def run(a, results_path=None, note: str = "") -> dict:
    from bench import RESULTS_PATH, machine_info, write_section

    cfg = ExperimentConfig(name="bench_loader", dataset=a.dataset, data_root=a.data_root, backbone=a.backbone,
                           img_size=a.img_size, patch_size=a.patch_size, batch_size=a.batch, m_per_class=a.m_per_class,
                           memory_size=a.memory_size, device=a.device, progress=False, iterations=10**6)
    r = bench_loader(cfg, a.workers, a.batches, a.warmup, a.steps)
    print(json.dumps(r, indent=2))
    write_section("loader", results_markdown(r, machine_info(), note), results_path or RESULTS_PATH)
    return r
