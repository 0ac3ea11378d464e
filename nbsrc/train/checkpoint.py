"""Atomic checkpoints that survive a kill, a full disk or a truncated file.

``checkpoint.pt`` is the latest, ``checkpoint.prev.pt`` the one before. A save writes a temporary
file first and renames it into place only once it is complete, so a crash or a full disk never
destroys a good checkpoint; a full disk raises a one-line :class:`~nbsrc.errors.RunDirError` saying
so. A load that finds the latest one unreadable (truncated, corrupt, missing) falls back to the
previous one and says so in one warning line.

A checkpoint holds tensors, plain containers, numbers and strings only (the numpy RNG state as a
tensor), and is read with ``weights_only=True`` (:func:`nbsrc.safeload.load_torch`): a file that asks
to call a function is refused in one line, nothing in it run, and never skipped over for the previous
one. Checkpoints written before (numpy arrays in the RNG state and tuples) are read too.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from nbsrc.errors import RunDirError
from nbsrc.safeload import is_refused, load_torch, why_unreadable

LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # no space left, quota exceeded


def save_checkpoint(state: dict, run_dir: str | Path) -> Path:
    """Write ``state`` as the run's latest checkpoint, keeping the one before as the previous.

    Written to a temporary file, flushed to disk, then renamed over ``checkpoint.pt``; the old
    latest becomes ``checkpoint.prev.pt``. A failure while writing (a full disk: ``ENOSPC`` or
    ``EDQUOT``) removes the partial file, leaves both earlier checkpoints as they were and raises a
    :class:`~nbsrc.errors.RunDirError` that says so. Temporary files left by a killed save are removed.
    """
    run_dir = Path(run_dir)
    latest, prev = run_dir / LATEST, run_dir / PREVIOUS
    for stale in run_dir.glob(f".{LATEST}.tmp-*"):  # left behind by a process killed mid-save
        stale.unlink(missing_ok=True)
    tmp = run_dir / f".{LATEST}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # a full disk leaves the earlier checkpoints untouched
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            free = shutil.disk_usage(run_dir).free / 2**20
            kept = f"the last good checkpoint {latest} is unchanged" if latest.exists() else "no checkpoint was kept"
            raise RunDirError(
                f"disk full while saving a checkpoint in {run_dir} ({free:.0f} MiB free, {os.strerror(e.errno)}); "
                f"{kept}: free some space (or use another --runs-dir) and continue with --resume"
            ) from e
        raise
    if latest.exists():
        os.replace(latest, prev)
    os.replace(tmp, latest)
    _fsync_dir(run_dir)
    return latest


def _fsync_dir(path: Path) -> None:
    """Make the renames durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _try_load(path: Path, fallback: Path | None = None) -> tuple[dict | None, str]:
    """``(state, "")`` or ``(None, why it is unusable)`` for one checkpoint file; a file that asks to
    call a function is a :class:`~nbsrc.errors.RunDirError` (``fallback``: the checkpoint to name in
    the way out)."""
    try:
        state = load_torch(path)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, ...
        if is_refused(e):
            out = f"delete it to resume from {fallback.name}, or " if fallback is not None and fallback.exists() else ""
            raise RunDirError(f"checkpoint {path} is not an nbsrc checkpoint ({why_unreadable(e)}); "
                              f"{out}restart with --overwrite") from None
        detail = " ".join(str(e).split())[:100]
        return None, f"truncated or corrupt ({type(e).__name__}: {detail})"
    if not isinstance(state, dict) or "iteration" not in state:
        return None, "not an nbsrc checkpoint (no 'iteration' entry)"
    return state, ""


def load_checkpoint(run_dir: str | Path) -> dict:
    """The latest readable checkpoint of a run, falling back to the previous one.

    A latest checkpoint that cannot be read (truncated on disk, corrupt, missing after a kill between
    the two renames of :func:`save_checkpoint`) gives one warning line naming the file, the reason and
    the iteration of the previous checkpoint that is used instead.
    """
    run_dir = Path(run_dir)
    latest, prev = run_dir / LATEST, run_dir / PREVIOUS
    if not latest.exists() and not prev.exists():
        raise RunDirError(f"no checkpoint in {run_dir}; start the run without --resume")
    why_latest = "missing"
    if latest.exists():
        state, why_latest = _try_load(latest, fallback=prev)
        if state is not None:
            return state
    if prev.exists():
        state, why_prev = _try_load(prev)
        if state is not None:
            warnings.warn(
                f"checkpoint {latest} is {why_latest}; resuming from the previous checkpoint {prev} "
                f"(iteration {state['iteration']})", stacklevel=2,
            )
            return state
        raise RunDirError(
            f"no usable checkpoint in {run_dir}: {latest.name} is {why_latest} and {prev.name} is {why_prev}; "
            "restart with --overwrite"
        )
    raise RunDirError(
        f"checkpoint {latest} is {why_latest} and there is no previous one; restart with --overwrite"
    )


def rng_state() -> dict:
    """The torch, numpy, python (and CUDA) RNG states as tensors, numbers and tuples: numpy's
    ``('MT19937', keys, pos, has_gauss, cached_gaussian)`` is stored with its keys as an int64 tensor."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved (numpy's state also in its own tuple form, as written before)."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], np.asarray(numpy_state["keys"].numpy(), dtype=np.uint32),
                       numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
