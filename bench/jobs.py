"""Runs trained at once against runs trained in turn: what ``run_all(..., jobs=N)`` saves.

Each round trains the same ``runs`` runs of the demo's config (different seeds, ``iterations`` each,
evaluation included) twice, in fresh run directories: *in turn* (``jobs=1``, in this process with all
its torch threads) and *at once* (``jobs=N``, :func:`nbsrc.workers.map_jobs`: N processes with
``cores // N`` threads each, their start-up included). The two alternate round by round
(:func:`bench.timed_rounds`), so they share the machine's load; the ratio is in-turn seconds
over at-once seconds (> 1: training at once is faster).

    python -m bench jobs --iterations 40 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from nbsrc.errors import ConfigError


def bench_jobs(runs: int = 2, jobs: int = 2, iterations: int = 40, rounds: int = 2, demo: str = "fashion_mnist",
               **overrides) -> dict:
    """``{"ratio": median in-turn / at-once seconds, "seconds": {...}, ...}`` (see the module doc);
    ``overrides``: config fields over the demo's (a smaller model or dataset for a smoke run)."""
    import torch

    from bench import timed_rounds
    from nbsrc.experiment import run_all
    from nbsrc.paper.demo import demo_config
    from nbsrc.workers import cpu_cores

    if runs < 2 or jobs < 2 or iterations < 1 or rounds < 1:
        raise ConfigError(f"runs={runs}, jobs={jobs}, iterations={iterations}, rounds={rounds}: need runs >= 2, "
                          "jobs >= 2, iterations >= 1 and rounds >= 1")
    with tempfile.TemporaryDirectory(prefix="nbsrc-bench-jobs-") as tmp:

        def trial(n_jobs: int):
            def go(r: int):
                root = Path(tmp) / f"jobs{n_jobs}_round{r}"
                cfgs = {s: demo_config(demo, str(root), name=f"s{s}", seed=s, iterations=iterations, progress=False,
                                        **overrides)
                        for s in range(runs)}
                return {s: res.results["R@1"] for s, res in run_all(cfgs, jobs=n_jobs).items()}
            return go

        times, last = timed_rounds({"in turn": trial(1), "at once": trial(jobs)}, rounds)
    ratios = [a / b for a, b in zip(times["in turn"], times["at once"], strict=True)]
    return {"demo": demo, "runs": runs, "jobs": jobs, "iterations": iterations, "rounds": rounds,
            "cores": cpu_cores(), "torch_threads": torch.get_num_threads(), "seconds": times,
            "ratio": statistics.median(ratios), "ratios": ratios, "recall_at_1": last}


def results_markdown(r: dict, info: dict, note: str = "") -> str:
    """The ``jobs`` section of bench/RESULTS.md."""
    from bench import machine_lines

    s = (machine_lines(info, note)
         + f"- setup: {r['runs']} runs of the {r['demo']} demo's config ({r['iterations']} iterations each, evaluation "
           f"included), trained in turn (1 process, {r['torch_threads']} torch threads) and at once ({r['jobs']} "
           f"processes, {max(1, r['cores'] // r['jobs'])} thread(s) each, start-up included); {r['rounds']} "
           "alternating rounds, fresh run directories each time\n\n"
           "| round | in turn s | at once s | in turn / at once |\n|---|---:|---:|---:|\n")
    for i, (a, b) in enumerate(zip(r["seconds"]["in turn"], r["seconds"]["at once"], strict=True)):
        s += f"| {i + 1} | {a:.1f} | {b:.1f} | {a / b:.2f} |\n"
    s += (f"\nReading: training {r['runs']} runs at once is {r['ratio']:.2f}x as fast as in turn (median over rounds). "
          "A run's Recall@K can differ between the two (its thread count changes the order of floating-point "
          "sums): R@1 in turn " + ", ".join(f"{v:.2f}" for v in r["recall_at_1"]["in turn"].values())
          + "; at once " + ", ".join(f"{v:.2f}" for v in r["recall_at_1"]["at once"].values()) + ".\n")
    return s


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=2, help="runs trained each way (different seeds)")
    p.add_argument("--jobs", type=int, default=2, help="processes training at once")
    p.add_argument("--iterations", type=int, default=40, help="iterations of each run")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    p.add_argument("--demo", default="fashion_mnist",
                   help="the demo whose config is trained (nbsrc.paper.demo.DEMO_DATA)")


def run(a, results_path=None, note: str = "") -> dict:
    from bench import RESULTS_PATH, machine_info, write_section

    r = bench_jobs(a.runs, a.jobs, a.iterations, a.rounds, a.demo)
    print(json.dumps(r, indent=2))
    write_section("jobs", results_markdown(r, machine_info(), note), results_path or RESULTS_PATH)
    return r
