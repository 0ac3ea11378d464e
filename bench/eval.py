"""Recall@K evaluation at scale: time and peak memory of nbsrc's evaluator against brute-force torch
and pytorch-metric-learning's AccuracyCalculator, on the same memory-mapped float16 embeddings.

For each gallery size ``N×D`` and each kind of data, a gallery and a separate query set are written
to disk as float16 ``.npy`` files (``random``: unit vectors with random labels; ``clustered``:
unit vectors scattered around ``N / 1000`` class centres, labelled by centre). Each method then runs
in its own subprocess and opens the files memory-mapped; its peak RSS is the kernel's peak mark
(VmHWM), reset once the imports are done, so that the peak is the method's own:

- **nbsrc**: :func:`nbsrc.eval.recall.retrieve` (chunked exact faiss search) + ``recall_at_k``.
- **torch**: ``Q @ Gᵀ`` in float32 and ``topk``: the whole similarity matrix at once when it fits in
  ``--matrix-budget-gb``, otherwise gallery chunks with a running top-k (reported as ``chunked``).
- **pml**: ``AccuracyCalculator`` with a Recall@K metric per K (its own knn, via faiss); skipped
  when its float32 copies and label-match matrix would exceed ``--pml-budget-gb`` (reported).

Recall@K of every method is compared with nbsrc's (same number of hits), and the top-k indices of
torch with nbsrc's. Memory is reported as the peak RSS beyond what the process had after its
imports, and beyond that again minus the embedding files (every method reads all of them, and
memory-mapped pages count in the RSS).

    python -m bench eval --sizes 100000x384 1000000x128 --data random clustered
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nbsrc.errors import ConfigError

METHODS = ("nbsrc", "torch", "pml")
DATA_KINDS = ("random", "clustered")
_CHUNK_ROWS = 1 << 16


# ----------------------------------------------------------------------------- data on disk
def parse_size(s: str) -> tuple[int, int]:
    """``"100000x384"`` -> ``(100000, 384)``."""
    try:
        n, d = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise ConfigError(f"size {s!r} is invalid: expected ROWSxDIM, e.g. 100000x384") from None
    if n < 2 or d < 1:
        raise ConfigError(f"size {s!r} is invalid: need at least 2 rows and 1 dimension")
    return n, d


def write_embeddings(path: Path, n: int, dim: int, kind: str, n_classes: int, seed: int,
                     centres: np.ndarray | None = None) -> np.ndarray:
    """Write ``n`` float16 unit vectors to ``path`` (``.npy``, chunk by chunk, never all in RAM)
    and return their int64 labels."""
    from numpy.lib.format import open_memmap

    rng = np.random.default_rng(seed)
    out = open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    labels = rng.integers(0, n_classes, n).astype(np.int64)
    for s in range(0, n, _CHUNK_ROWS):
        x = rng.standard_normal((min(_CHUNK_ROWS, n - s), dim), dtype=np.float32)
        if kind == "clustered":  # centre + isotropic noise of about the same norm
            x = centres[labels[s : s + len(x)]] + 1.5 * x / np.sqrt(dim)
        out[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    return labels


def make_dataset(workdir: Path, n: int, dim: int, n_query: int, kind: str, seed: int = 0) -> dict:
    """Gallery, queries and labels of one case under ``workdir``; returns their paths."""
    if kind not in DATA_KINDS:
        raise ConfigError(f"data kind {kind!r} is invalid: expected one of {', '.join(DATA_KINDS)}")
    workdir.mkdir(parents=True, exist_ok=True)
    n_classes = max(2, n // 1000)
    rng = np.random.default_rng([seed, n, dim])
    centres = rng.standard_normal((n_classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    paths = {k: str(workdir / f"{k}.npy") for k in ("gallery", "query", "gallery_labels", "query_labels")}
    np.save(paths["gallery_labels"],
            write_embeddings(Path(paths["gallery"]), n, dim, kind, n_classes, seed + 1, centres))
    np.save(paths["query_labels"],
            write_embeddings(Path(paths["query"]), n_query, dim, kind, n_classes, seed + 2, centres))
    return paths


# ----------------------------------------------------------------------------- the methods
def _nbsrc(q, ql, g, gl, ks, info) -> tuple[dict, np.ndarray]:
    from nbsrc.eval.recall import retrieve

    res = retrieve(q, ql, g, gl, k=max(ks))
    info["how"] = "faiss IndexFlatIP, queries in chunks of 4096"
    return res.recall_at_k(ks), res.indices


def _recall_from_indices(idx: np.ndarray, ql: np.ndarray, gl: np.ndarray, ks) -> dict:
    hits = gl[idx] == ql[:, None]
    valid = np.isin(ql, gl)
    first = np.where(hits.any(1), hits.argmax(1), idx.shape[1])
    return {k: float(np.mean(first[valid] < k)) for k in ks}


def _torch(q, ql, g, gl, ks, info, matrix_budget: float) -> tuple[dict, np.ndarray]:
    import torch

    k = max(ks)
    qt = torch.from_numpy(np.asarray(q, dtype=np.float32))
    nq, ng = len(q), len(g)
    if nq * ng * 4 <= matrix_budget:
        info["how"] = f"full {nq}x{ng} float32 similarity matrix"
        sims, idx = (qt @ torch.from_numpy(np.asarray(g, dtype=np.float32)).T).topk(k, dim=1)
    else:
        rows = max(k, int(matrix_budget // (4 * nq)))
        info["how"] = (f"chunked: {nq}x{rows} similarity blocks over the gallery, running top-{k} "
                       f"(the whole matrix would take {nq * ng * 4 / 2**20:.0f} MB)")
        sims = torch.full((nq, 0), -float("inf"))
        idx = torch.zeros((nq, 0), dtype=torch.long)
        for s in range(0, ng, rows):
            block = qt @ torch.from_numpy(np.asarray(g[s : s + rows], dtype=np.float32)).T
            bs, bi = block.topk(min(k, block.shape[1]), dim=1)
            sims, sel = torch.cat([sims, bs], 1).topk(min(k, sims.shape[1] + bs.shape[1]), dim=1)
            idx = torch.cat([idx, bi + s], 1).gather(1, sel)
    sims, idx = sims.numpy(), idx.numpy()
    order = np.lexsort((idx, -sims), axis=-1)  # ties: lower gallery index first, as nbsrc
    idx = np.take_along_axis(idx, order, 1)
    return _recall_from_indices(idx, ql, gl, ks), idx


def pml_calculator(ks):
    """An ``AccuracyCalculator`` with one ``recall_at_K`` metric per K (plus its own
    ``precision_at_1``, which is Recall@1)."""
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator, try_getting_not_lone_labels

    def metric(k):
        def calculate(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
            knn_labels, query_labels = try_getting_not_lone_labels(knn_labels, query_labels, not_lone_query_mask)
            hits = (knn_labels[:, :k] == query_labels[:, None]).any(1)
            return int(hits.sum()) / len(hits)
        return calculate

    names = [f"recall_at_{k}" for k in ks]
    methods = {f"calculate_{n}": metric(k) for n, k in zip(names, ks, strict=True)}
    methods["requires_knn"] = lambda self: AccuracyCalculator.requires_knn(self) + names
    cls = type("RecallAtKCalculator", (AccuracyCalculator,), methods)
    return cls(include=(*names, "precision_at_1"), k=max(ks), device=torch.device("cpu"))


def pml_bytes(nq: int, ng: int, dim: int, n_query_labels: int) -> int:
    """What AccuracyCalculator holds at once: float32 copies of queries and gallery, faiss's copy
    of the gallery, and its [unique query labels × gallery] label-match matrix."""
    return 4 * nq * dim + 2 * 4 * ng * dim + n_query_labels * ng


def _pml(q, ql, g, gl, ks, info) -> tuple[dict, None]:
    calc = pml_calculator(ks)
    acc = calc.get_accuracy(np.asarray(q, dtype=np.float32), ql, np.asarray(g, dtype=np.float32), gl)
    info["how"] = "AccuracyCalculator (FaissKNN), custom recall_at_K metrics"
    info["precision_at_1"] = acc["precision_at_1"]
    return {k: acc[f"recall_at_{k}"] for k in ks}, None


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0: ``5`` into
    ``/proc/self/clear_refs``), so that the peak measured next is the work's own, not the imports'."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_meter() -> tuple[int, callable, str]:
    """``(baseline bytes, peak() -> bytes, how)``. With a resettable peak mark: the current RSS as the
    baseline and VmHWM as the peak. Otherwise ``ru_maxrss`` before and after, which underestimates
    the work's peak whenever the imports peaked higher."""
    if _reset_peak_rss() and _proc_status_kib("VmHWM") is not None:
        return (_proc_status_kib("VmRSS") * 1024, lambda: _proc_status_kib("VmHWM") * 1024,
                "VmHWM after resetting the peak mark, minus VmRSS at the reset")

    def maxrss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    return maxrss(), maxrss, "ru_maxrss after minus ru_maxrss before (a lower bound)"


def worker(spec: dict) -> dict:
    """Run one method in this process (called in a fresh subprocess) and return time and memory."""
    import faiss  # noqa: F401 - imported before the baseline, as every method needs it
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
        faiss.omp_set_num_threads(spec["threads"])
    if spec["method"] == "pml":
        import pytorch_metric_learning.utils.accuracy_calculator  # noqa: F401
    import nbsrc.eval.recall  # noqa: F401

    p = spec["paths"]
    q, g = np.load(p["query"], mmap_mode="r"), np.load(p["gallery"], mmap_mode="r")
    ql, gl = np.load(p["query_labels"]), np.load(p["gallery_labels"])
    base, peak_now, rss_how = rss_meter()  # the mapped files are not resident yet: they count in the peak
    ks, info = tuple(spec["ks"]), {}
    t0 = time.perf_counter()
    if spec["method"] == "nbsrc":
        recall, idx = _nbsrc(q, ql, g, gl, ks, info)
    elif spec["method"] == "torch":
        recall, idx = _torch(q, ql, g, gl, ks, info, spec["matrix_budget_gb"] * 2**30)
    else:
        recall, idx = _pml(q, ql, g, gl, ks, info)
    seconds = time.perf_counter() - t0
    if idx is not None:
        np.save(spec["indices_out"], idx)
    emb_bytes = g.nbytes + q.nbytes
    peak = peak_now()
    return {**info, "seconds": seconds, "recall": {str(k): v for k, v in recall.items()},
            "peak_rss_mb": peak / 2**20, "rss_after_imports_mb": base / 2**20, "rss_how": rss_how,
            "peak_beyond_imports_mb": (peak - base) / 2**20,
            "peak_beyond_embeddings_mb": (peak - base - emb_bytes) / 2**20,
            "indices": spec["indices_out"] if idx is not None else None}


def _run_worker(spec: dict) -> dict:
    root = str(Path(__file__).resolve().parents[1])  # bench is a folder of the repository, not installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "bench.eval", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"eval bench worker {spec['method']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the bench
def bench_eval(
    sizes=((100_000, 384), (1_000_000, 128)),
    data=DATA_KINDS,
    n_query: int = 1000,
    ks=(1, 2, 4, 8),
    methods=METHODS,
    matrix_budget_gb: float = 1.0,
    pml_budget_gb: float = 3.0,
    workdir: str | Path | None = None,
    keep: bool = False,
    threads: int | None = None,
    seed: int = 0,
    isolate: bool = True,
) -> dict:
    """Run every method on every ``(size, data)`` case; see the module docstring.

    ``isolate=False`` runs the methods in this process (fast, for tests): the results and times
    still hold, but the RSS figures are then not per method."""
    bad = [m for m in methods if m not in METHODS]
    if bad or "nbsrc" not in methods:
        raise ConfigError(f"methods={list(methods)} is invalid: choose among {', '.join(METHODS)}, including nbsrc")
    ks = tuple(sorted(int(k) for k in ks))
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="nbsrc_bench_eval_"))
    cases = []
    try:
        for n, dim in sizes:
            for kind in data:
                case_dir = root / f"{kind}_{n}x{dim}"
                t0 = time.perf_counter()
                paths = make_dataset(case_dir, n, dim, n_query, kind, seed)
                case = {"n": n, "dim": dim, "n_query": n_query, "data": kind, "ks": list(ks),
                        "write_seconds": time.perf_counter() - t0,
                        "embeddings_mb": (n + n_query) * dim * 2 / 2**20, "methods": {}}
                n_qlabels = len(np.unique(np.load(paths["query_labels"])))
                for m in methods:
                    if m == "pml" and pml_bytes(n_query, n, dim, n_qlabels) > pml_budget_gb * 2**30:
                        est = pml_bytes(n_query, n, dim, n_qlabels) / 2**30
                        skip = f"needs about {est:.1f} GiB (> --pml-budget-gb {pml_budget_gb})"
                        case["methods"][m] = {"skipped": skip}
                        continue
                    spec = {"method": m, "paths": paths, "ks": list(ks), "matrix_budget_gb": matrix_budget_gb,
                            "threads": threads, "indices_out": str(case_dir / f"idx_{m}.npy")}
                    case["methods"][m] = _run_worker(spec) if isolate else worker(spec)
                _compare(case)
                cases.append(case)
                if not keep:
                    shutil.rmtree(case_dir, ignore_errors=True)
    finally:
        if not keep and not workdir:
            shutil.rmtree(root, ignore_errors=True)
    return {"cases": cases, "n_query": n_query, "ks": list(ks), "matrix_budget_gb": matrix_budget_gb,
            "pml_budget_gb": pml_budget_gb, "threads": threads, "isolated": isolate,
            "all_agree": all(c["agree"] for c in cases)}


def _compare(case: dict) -> None:
    """Hits per K equal to nbsrc's for every method that ran; torch's top-k indices against nbsrc's."""
    ref = case["methods"]["nbsrc"]
    nq = case["n_query"]
    agree = True
    for name, r in case["methods"].items():
        if "skipped" in r:
            continue
        r["same_hits_as_nbsrc"] = all(round(r["recall"][k] * nq) == round(ref["recall"][k] * nq) for k in ref["recall"])
        r["time_ratio_vs_nbsrc"] = r["seconds"] / ref["seconds"]
        agree &= r["same_hits_as_nbsrc"]
        if r.get("indices") and name != "nbsrc":
            a, b = np.load(r["indices"]), np.load(ref["indices"])
            r["identical_topk_rows"] = float((a == b).all(1).mean())
    case["agree"] = agree
    for r in case["methods"].values():
        r.pop("indices", None)


def results_markdown(res: dict, info: dict, note: str = "") -> str:
    """The ``eval`` section of bench/RESULTS.md."""
    from bench import machine_lines

    s = machine_lines(info, note) + (
        f"- {res['n_query']} queries against each gallery, Recall@{','.join(map(str, res['ks']))}; float16 "
        f"embeddings memory-mapped from disk; one subprocess per method; peak RSS beyond the process's RSS "
        f"after imports, and beyond that minus the embedding files (budget for nbsrc at 1M: 2048 MB); "
        f"peak measured as {_rss_how(res)}\n\n"
        "| gallery | data | method | time / nbsrc | peak RSS beyond imports (MB) | beyond embeddings (MB) "
        "| R@1 | same hits as nbsrc | identical top-k rows | how |\n|---|---|---|---|---|---|---|---|---|---|\n")
    for c in res["cases"]:
        for name, r in c["methods"].items():
            head = f"| {c['n']:,}×{c['dim']} | {c['data']} | {name} "
            if "skipped" in r:
                s += head + f"| skipped | | | | | | {r['skipped']} |\n"
                continue
            rows = r.get("identical_topk_rows")
            s += (head + f"| {r['time_ratio_vs_nbsrc']:.2f} | {r['peak_beyond_imports_mb']:.0f} | "
                  f"{r['peak_beyond_embeddings_mb']:.0f} | {r['recall']['1']:.4f} | {r['same_hits_as_nbsrc']} | "
                  f"{'' if rows is None else f'{100 * rows:.1f}%'} | {r['how']} |\n")
    big = [c["methods"]["nbsrc"] for c in res["cases"] if c["n"] >= 1_000_000]
    worst = max((r["peak_beyond_embeddings_mb"] for r in big), default=None)
    s += (f"\nReading: the methods {'agree on every Recall@K' if res['all_agree'] else 'DISAGREE (see the table)'}"
          + (f"; at 1M the nbsrc evaluator peaks at {worst:.0f} MB beyond the embeddings "
             f"({'within' if worst <= 2048 else 'ABOVE'} the 2 GB budget)." if worst is not None else ".") + "\n")
    s += "Absolute seconds per case: " + "; ".join(
        f"{c['data']} {c['n']:,}×{c['dim']}: "
        + ", ".join(f"{m} {r['seconds']:.1f}s" for m, r in c["methods"].items() if "seconds" in r)
        for c in res["cases"]) + "\n"
    return s


def _rss_how(res: dict) -> str:
    hows = {r.get("rss_how", "?") for c in res["cases"] for r in c["methods"].values() if "seconds" in r}
    return " / ".join(sorted(hows))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", nargs="+", default=["100000x384", "1000000x128"], help="gallery sizes ROWSxDIM")
    p.add_argument("--data", nargs="+", default=list(DATA_KINDS), choices=DATA_KINDS)
    p.add_argument("--queries", type=int, default=1000, help="queries searched against each gallery")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--matrix-budget-gb", type=float, default=1.0,
                   help="torch builds the whole similarity matrix when it fits in this, else chunks")
    p.add_argument("--pml-budget-gb", type=float, default=3.0, help="skip AccuracyCalculator above this estimate")
    p.add_argument("--workdir", default=None, help="where the .npy files go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the .npy files")
    p.add_argument("--threads", type=int, default=None, help="torch / faiss threads in each worker")


def run(a, results_path=None, note: str = "") -> dict:
    from bench import RESULTS_PATH, machine_info, write_section

    res = bench_eval([parse_size(s) for s in a.sizes], a.data, a.queries, a.ks, a.methods, a.matrix_budget_gb,
                     a.pml_budget_gb, a.workdir, a.keep, a.threads)
    print(json.dumps(res, indent=2))
    write_section("eval", results_markdown(res, machine_info(), note), results_path or RESULTS_PATH)
    return res


if __name__ == "__main__":  # the per-method subprocess: python -m bench.eval --worker SPEC_JSON
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m bench eval ...  (this module's own entry is the per-method worker)")
