"""Benchmarks: ``python -m bench {train,eval,dtop,loader,revisited,embed,demo,jobs}``.

Each bench compares methods *within one run* (their steps alternate, so they share the machine's
load) and reports ratios, which survive a busy machine better than absolute times. Each writes its
own section of ``bench/RESULTS.md`` (machine, library versions, date, the ratios and a one-line
reading), leaving the other sections as they are. Every bench times through the helpers below:
:func:`timed` (one call, the device synchronised around it), :func:`rotation` (the order of a round)
and :func:`timed_rounds` (methods interleaved round by round).
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nbsrc.provenance import cpu_model

RESULTS_PATH = Path("bench") / "RESULTS.md"


def sync(device) -> None:
    """Wait for the device's queued work, so that a timer read after it times the work (CUDA)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device="cpu") -> tuple[Any, float]:
    """``(fn(), seconds)``: one call timed on its own, the device synchronised before and after, so
    that the time is that of the call's work and not of work queued before it."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def rotation(names: list[str], r: int) -> list[str]:
    """The order of round ``r``: ``names`` rotated by ``r`` (A B C, B C A, C A B, ...), so that no method
    always runs first or right after the same other one (two methods alternate)."""
    r %= len(names)
    return names[r:] + names[:r]


def timed_rounds(fns: dict[str, Callable[[int], Any]], rounds: int, device="cpu",
                 warmup: int = 0) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """``({name: [seconds of each timed round]}, {name: what its last call returned})``: every
    ``fns[name](r)`` once per round ``r`` of ``warmup + rounds``, in the order of :func:`rotation`, each
    call :func:`timed`; the first ``warmup`` rounds are not timed."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    last: dict[str, Any] = {}
    for r in range(warmup + rounds):
        for name in rotation(list(fns), r):
            last[name], seconds = timed(lambda fn=fns[name], r=r: fn(r), device)
            if r >= warmup:
                times[name].append(seconds)
    return times, last
_HEADER = ("# Benchmark results\n\n"
           "Written by `python -m bench {train,eval,dtop,loader,revisited,embed,demo,jobs}` "
           "(`embed --source run` writes *embed-run*, `train --section NAME` another train section); "
           "each command rewrites only its own section.\n")


def machine_info() -> dict:
    """CPU model, cores, RAM, GPU, and the versions of torch / timm / faiss / numpy, plus the date."""
    import numpy as np
    import torch

    info = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(),
            "cores": os.cpu_count(), "ram_gb": round(_ram_bytes() / 2**30, 1), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__}
    for name in ("timm", "faiss", "pytorch_metric_learning"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - reported as missing
            info[name] = "not installed"
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return info


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def machine_lines(info: dict, note: str = "") -> str:
    """The machine/version preamble of a section, as markdown lines."""
    s = (f"- machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, GPU: {info['gpu']}\n"
         f"- versions: torch {info['torch']}, timm {info['timm']}, faiss {info['faiss']}, "
         f"pytorch-metric-learning {info['pytorch_metric_learning']}, numpy {info['numpy']}, "
         f"python {info['python']}\n- date: {info['date']}\n")
    return s + (f"- note: {note}\n" if note else "")


def write_section(name: str, body: str, path: str | Path = RESULTS_PATH) -> Path:
    """Replace (or append) the section ``## name`` of ``path`` with ``body``; other sections stay.

    Sections are delimited by ``<!-- bench:name -->`` markers; the file is replaced atomically.
    """
    path = Path(path)
    text = path.read_text() if path.exists() else _HEADER
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n## {name}\n\n{body.rstrip()}\n{end}\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
