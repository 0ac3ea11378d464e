"""Atomic checkpoints that survive a kill, a full disk or a truncated file.

``checkpoint.pt`` is the latest, ``checkpoint.prev.pt`` the one before. A save writes a temporary
file first and renames it into place only once it is complete, so a crash or a full disk never
destroys a good checkpoint. A load that finds the latest one unreadable falls back to the previous
one and says so.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from nbsrc.errors import RunDirError

LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


def save_checkpoint(state: dict, run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    latest, prev = run_dir / LATEST, run_dir / PREVIOUS
    tmp = run_dir / f".{LATEST}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves the earlier checkpoints untouched
        raise
    if latest.exists():
        os.replace(latest, prev)
    os.replace(tmp, latest)
    return latest


def _try_load(path: Path) -> dict | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, ...
        warnings.warn(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:80]})", stacklevel=3)
        return None
    if not isinstance(state, dict) or "iteration" not in state:
        warnings.warn(f"checkpoint {path} is not an nbsrc checkpoint", stacklevel=3)
        return None
    return state


def load_checkpoint(run_dir: str | Path) -> dict:
    """The latest readable checkpoint of a run, falling back to the previous one."""
    run_dir = Path(run_dir)
    latest, prev = run_dir / LATEST, run_dir / PREVIOUS
    if not latest.exists() and not prev.exists():
        raise RunDirError(f"no checkpoint in {run_dir}; start the run without --resume")
    if latest.exists():
        state = _try_load(latest)
        if state is not None:
            return state
    if prev.exists():
        state = _try_load(prev)
        if state is not None:
            warnings.warn(
                f"using the previous checkpoint {prev} (iteration {state['iteration']}) because {latest} "
                "is unreadable", stacklevel=2,
            )
            return state
    raise RunDirError(f"every checkpoint in {run_dir} is unreadable (truncated?); restart with --overwrite")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
