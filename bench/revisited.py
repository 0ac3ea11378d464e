"""Revisited Oxford/Paris mAP: the vectorised protocol against the slow loop written from it.

:func:`nbsrc.eval.revisited_map.revisited_map` and :func:`~nbsrc.eval.revisited_map.revisited_map_reference`
score the same random rankings of ``n_queries`` queries over ``n_db`` images (70 × 4,993 is
rOxford5k) with random easy / hard / junk lists, in ``rounds`` rounds that alternate which runs
first. The speed-up is the median over rounds of reference seconds / vectorised seconds, with a 95%
bootstrap interval (:func:`bench.train.paired_ratio`); the largest difference between the two
results over every setup and metric is reported beside it (the tests hold it to 1e-9).

    python -m bench revisited --queries 70 --db 5000 --rounds 7
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bench import timed_rounds
from nbsrc.errors import ConfigError


def random_gnd(n_queries: int, n_db: int, rng: np.random.Generator, max_sizes=(60, 100, 80)) -> list[dict]:
    """Random disjoint easy / hard / junk lists (sizes uniform in ``0..max_sizes``), for tests and
    the benchmark; a few queries get no easy or no hard image, so the skip rule is exercised."""
    gnd = []
    for _ in range(n_queries):
        sizes = [int(rng.integers(0, m + 1)) for m in max_sizes]
        perm = rng.permutation(n_db)
        a, b = sizes[0], sizes[0] + sizes[1]
        gnd.append({"bbx": np.zeros(4), "easy": perm[:a], "hard": perm[a:b], "junk": perm[b : b + sizes[2]]})
    return gnd


def bench_revisited(n_queries: int = 70, n_db: int = 5000, rounds: int = 7, seed: int = 0) -> dict:
    """Seconds per round of both implementations, their paired speed-up and their largest difference."""
    from bench.train import paired_ratio
    from nbsrc.eval.revisited_map import revisited_map, revisited_map_reference

    if n_queries < 1 or n_db < 2 or rounds < 1:
        raise ConfigError(f"queries={n_queries}, db={n_db}, rounds={rounds}: need >= 1 query, >= 2 images, >= 1 round")
    rng = np.random.default_rng(seed)
    gnd = random_gnd(n_queries, n_db, rng)
    ranks = np.argsort(rng.random((n_queries, n_db)), axis=1)
    funcs = {"vectorised": revisited_map, "reference": revisited_map_reference}
    times, results = timed_rounds({name: (lambda r, f=f: f(ranks, gnd)) for name, f in funcs.items()}, rounds)
    fast, slow = results["vectorised"], results["reference"]
    diff = max(abs(fast[s][m] - slow[s][m]) for s in fast for m in fast[s])
    paired = paired_ratio(times["reference"], times["vectorised"])
    return {"n_queries": n_queries, "n_db": n_db, "rounds": rounds,
            "vectorised_s": float(np.median(times["vectorised"])), "reference_s": float(np.median(times["reference"])),
            "speedup": paired["median"], "speedup_ci95": paired["ci95"], "max_abs_diff": float(diff)}


def results_markdown(r: dict, info: dict, note: str = "") -> str:
    """The ``revisited`` section of bench/RESULTS.md."""
    from bench import machine_lines

    lo, hi = r["speedup_ci95"]
    return (machine_lines(info, note)
            + f"- setup: random rankings of {r['n_queries']} queries over {r['n_db']:,} images with random easy / "
            f"hard / junk lists; mAP and mP@1,5,10 in the Easy, Medium and Hard setups; {r['rounds']} rounds, "
            "alternating which implementation runs first\n"
            "- statistic: median over rounds of reference seconds / vectorised seconds, [95% bootstrap interval]\n\n"
            "| vectorised speed-up over the loop | largest difference |\n|---|---|\n"
            f"| {r['speedup']:.1f}x [{lo:.1f}, {hi:.1f}] | {r['max_abs_diff']:.1e} |\n\n"
            f"Reading: the vectorised protocol is {r['speedup']:.1f}x faster than the loop written from it and "
            f"agrees with it to {r['max_abs_diff']:.0e} (median seconds: vectorised {r['vectorised_s']:.3f}, "
            f"loop {r['reference_s']:.3f}).\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queries", type=int, default=70, help="70: rOxford5k and rParis6k")
    p.add_argument("--db", type=int, default=5000, help="database images (rOxford5k: 4,993)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)


def run(a, results_path=None, note: str = "") -> dict:
    from bench import RESULTS_PATH, machine_info, write_section

    r = bench_revisited(a.queries, a.db, a.rounds, a.seed)
    print(json.dumps(r, indent=2))
    write_section("revisited", results_markdown(r, machine_info(), note), results_path or RESULTS_PATH)
    return r
