"""What produced a result: package versions, the git commit and the machine.

One helper, :func:`provenance`, used by the runner (``results.json``) and by ``nbsrc embed`` (the
index's metadata), so that a number can be traced to the code and hardware that computed it.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

PACKAGES = ("torch", "timm", "faiss", "numpy")


def package_version(name: str) -> str:
    """The installed version of ``name`` ("faiss" is the ``faiss-cpu`` / ``faiss-gpu`` wheel), or
    ``"absent"``."""
    try:
        module = __import__(name)
        return str(module.__version__)
    except (ImportError, AttributeError):
        pass
    for dist in (name, f"{name}-cpu", f"{name}-gpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


def git_commit(path: str | Path | None = None) -> str:
    """The commit of the git checkout holding ``path`` (default: the nbsrc package), with ``+dirty``
    when tracked files differ from it, ``figures/`` aside (the runs' outputs: a study or demo rewrites its
    committed figures before it records its commit); ``"unknown"`` outside a checkout or without git."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)figures"], cwd=where,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_name() -> str | None:
    """The name of CUDA device 0, or None without one."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def provenance() -> dict:
    """``{"versions": {torch, timm, faiss, numpy, nbsrc, python}, "git_commit": ..., "machine": {cpu, gpu,
    platform}}``."""
    import nbsrc

    versions = {name: package_version(name) for name in PACKAGES}
    versions["nbsrc"] = getattr(nbsrc, "__version__", None) or package_version("nbsrc")
    versions["python"] = platform.python_version()
    return {"versions": versions, "git_commit": git_commit(),
            "machine": {"cpu": cpu_model(), "gpu": gpu_name(), "platform": platform.platform()}}
