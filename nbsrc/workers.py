"""Independent jobs in worker processes on a CPU, their output relayed line by line to the caller.

A small ViT does not use several CPU cores well, so independent runs trained side by side, one core
each, finish sooner than the same runs trained in turn; a worker's start-up and its one-thread
evaluation take part of that back for short runs (the measurements: docs/speed.md, *Defaults and the
measurements behind them*; ``python -m bench jobs``).
:func:`map_jobs` runs ``fn(item)`` for each item in ``jobs`` processes (``python -m nbsrc.workers``) with
``cores // jobs`` torch threads each, and prints what the workers print, each line prefixed with its
job's tag, in the caller's process (so a notebook cell shows the workers' progress lines).

Floating-point sums depend on how work is split across threads, so a run trained with 1 thread and
the same run with 2 differ in the last bits of their weights, and training from scratch amplifies it:
after 300 steps the demo's seed-0 IRT_L reached 73.0 R@1 with one thread and 74.9 with two. With the
same ``jobs`` on the same machine a run is reproduced bit for bit.
"""

from __future__ import annotations

import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from nbsrc.errors import ConfigError


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_jobs(device: str = "auto") -> int:
    """How many runs to train at once: 1 on a GPU (a run already fills it; our reading) or a 1-core CPU,
    else 2 (docs/speed.md; more jobs on more cores are untested)."""
    import torch

    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return 1 if on_gpu or cpu_cores() < 2 else 2


def check_jobs(jobs: int | str) -> int | str:
    """``jobs`` as ``"auto"`` or a positive int (a string of digits, as a command line gives it, becomes
    its int), or a one-line error."""
    if isinstance(jobs, str) and jobs.strip().isdigit():
        jobs = int(jobs)
    if jobs == "auto" or (isinstance(jobs, int) and not isinstance(jobs, bool) and jobs >= 1):
        return jobs
    raise ConfigError(f"jobs={jobs!r} is invalid: give a number of runs to train at once (1, 2, ...) or 'auto'")


class _Job:
    """One job in its own ``python -m nbsrc.workers`` process: the pickled ``(fn, item, threads)`` on
    its stdin, its result (or exception) pickled to a file, its output relayed line by line."""

    def __init__(self, fn: Callable, item, tag: str, threads: int, result_path: Path, lines: queue.SimpleQueue):
        self.tag, self.result_path = tag, result_path
        self.result_path.touch()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONUNBUFFERED": "1", "NBSRC_PROGRESS": "lines"}
        self.proc = subprocess.Popen([sys.executable, "-m", "nbsrc.workers", str(self.result_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self.proc.stdin.write(pickle.dumps((fn, item, threads)))
        self.proc.stdin.close()
        self.reader = threading.Thread(target=self._relay, args=(lines,), daemon=True)
        self.reader.start()

    def _relay(self, lines: queue.SimpleQueue) -> None:  # a reader thread: the caller's thread prints
        for raw in iter(self.proc.stdout.readline, b""):
            for line in raw.decode(errors="replace").replace("\r", "\n").split("\n"):
                if line.strip():
                    lines.put(f"[{self.tag}] {line}")

    def outcome(self):
        """``(ok, value)`` once the process has ended."""
        self.reader.join()
        data = self.result_path.read_bytes()
        if not data:
            return False, RuntimeError(f"job {self.tag} ended with exit code {self.proc.returncode} and no result "
                                       f"(killed, or out of memory?); its output is above")
        return pickle.loads(data)


def _print_lines(lines: queue.SimpleQueue) -> None:
    while not lines.empty():
        print(lines.get(), flush=True)


def map_jobs(fn: Callable, items: Sequence, tags: Sequence[str], jobs: int) -> list:
    """``[fn(item) for item in items]``, at most ``jobs`` at a time, each in its own process
    (``python -m nbsrc.workers``) with ``cpu_cores() // jobs`` torch threads; in order. ``fn`` must be
    importable (a module-level function); ``items`` and the results picklable. Each job's output comes
    back as lines ``[tag] ...``. The first error is raised once every job has ended (the others are
    not stopped half-way: a run cut off would have to be resumed); an interrupt stops them all."""
    if len(tags) != len(items):
        raise ConfigError(f"map_jobs: {len(items)} items but {len(tags)} tags")
    jobs = max(1, min(int(jobs), len(items)))
    threads = max(1, cpu_cores() // jobs)
    lines: queue.SimpleQueue = queue.SimpleQueue()  # printed by this thread (a notebook shows it in the cell)
    todo, running, done = list(enumerate(items)), {}, {}
    with tempfile.TemporaryDirectory(prefix="nbsrc-jobs-") as tmp:
        try:
            while todo or running:
                while todo and len(running) < jobs:
                    i, item = todo.pop(0)
                    running[i] = _Job(fn, item, tags[i], threads, Path(tmp) / f"{i}.pkl", lines)
                for i, job in list(running.items()):
                    if job.proc.poll() is not None:
                        done[i] = job.outcome()
                        del running[i]
                _print_lines(lines)
                time.sleep(0.1)
            _print_lines(lines)
        except BaseException:
            for job in running.values():  # interrupted: no orphan keeps training
                job.proc.terminate()
            raise
    for i in range(len(items)):
        ok, value = done[i]
        if not ok:
            raise value
    return [done[i][1] for i in range(len(items))]


def _main(result_path: str) -> None:
    fn, item, threads = pickle.loads(sys.stdin.buffer.read())
    import torch

    torch.set_num_threads(threads)
    try:
        out = (True, fn(item))
    except Exception as e:  # noqa: BLE001 - handed to the caller, which raises it
        out = (False, e)
    Path(result_path).write_bytes(pickle.dumps(out))
    sys.exit(0 if out[0] else 1)


if __name__ == "__main__":
    _main(sys.argv[1])
