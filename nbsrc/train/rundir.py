"""Run directories: ``runs/<name>/`` holds ``config.json``, ``metrics.jsonl``, checkpoints and,
once finished, ``results.json`` and ``embeddings.npz``. Nothing in an existing run directory is
overwritten unless asked (``--overwrite``, which moves the old directory aside, never deletes it).

Damaged files are named, never a raw traceback: a ``config.json`` or ``results.json`` that is not
valid JSON is a one-line :class:`~nbsrc.errors.RunDirError` naming the file and what to do; a
partial last line of ``metrics.jsonl`` (what a kill in the middle of an append leaves) is dropped,
and said in one line when a resume rewrites the file.
A directory with no checkpoint and no results, only what a start leaves before its first
checkpoint, is not a run: a new start under its name replaces it, unless a live process holds the
run's lock (one process per run directory: :func:`prepare_run_dir`)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from nbsrc import locking
from nbsrc.config import ExperimentConfig
from nbsrc.errors import ConfigError, RunDirError
from nbsrc.train.checkpoint import LATEST, PREVIOUS

CONFIG, METRICS, RESULTS = "config.json", "metrics.jsonl", "results.json"
MODES = ("new", "resume", "overwrite", "reuse")


def run_state(run_dir: Path) -> str:
    """``absent``, ``empty``, ``done`` (results written), ``partial`` (checkpoint) or ``started``."""
    if not run_dir.exists():
        return "absent"
    if not any(run_dir.iterdir()):
        return "empty"
    if (run_dir / RESULTS).exists():
        return "done"
    if (run_dir / LATEST).exists() or (run_dir / PREVIOUS).exists():
        return "partial"
    return "started"


def is_leftover(run_dir: Path) -> bool:
    """A directory that holds no checkpoint and no results, only what a start leaves before its
    first checkpoint (``config.json``, ``metrics.jsonl``, the TensorBoard copy of the metrics, a
    killed save's temporary file): not a run, so a new start under its name may replace it."""
    return run_state(run_dir) == "started" and all(
        p.name in (CONFIG, METRICS, METRICS + ".tmp", TENSORBOARD) or p.name.startswith(f".{LATEST}.tmp-")
        for p in run_dir.iterdir())


def _check_same(cfg: ExperimentConfig, run_dir: Path) -> None:
    saved_path = run_dir / CONFIG
    if not saved_path.exists():
        raise RunDirError(f"{run_dir} has no {CONFIG}; it is not an nbsrc run, choose another name")
    saved = load_run_config(saved_path).fingerprint()
    new = cfg.fingerprint()
    diff = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))
    if diff:
        k = diff[0]
        raise RunDirError(
            f"run {run_dir} was made with a different config ({k}={saved.get(k)!r}, now {new.get(k)!r}"
            f"{f' and {len(diff) - 1} more' if len(diff) > 1 else ''}); choose another name or pass overwrite"
        )


def _make_runs_dir(run_dir: Path) -> None:
    """Create the folder that holds ``run_dir``; a file on its way is a one-line :class:`RunDirError`."""
    for parent in (run_dir.parent, *run_dir.parent.parents):
        if parent.exists() and not parent.is_dir():
            raise RunDirError(f"runs directory {run_dir.parent} cannot be made: {parent} is a file, not a folder; "
                              "choose another runs_dir")
    run_dir.parent.mkdir(parents=True, exist_ok=True)


def _create_atomically(cfg: ExperimentConfig, run_dir: Path, replace: bool) -> None:
    """Write ``config.json`` into a temporary directory beside ``run_dir`` and rename it into place,
    so that ``run_dir`` never exists half-made; ``replace``: a leftover (:func:`is_leftover`) is
    moved out of the way first and deleted once the new directory is in place."""
    _make_runs_dir(run_dir)
    tmp = run_dir.with_name(f".{run_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    cfg.save(tmp / CONFIG)
    stale = run_dir.with_name(f".{run_dir.name}.leftover-{os.getpid()}") if replace else None
    try:
        if stale is not None:
            os.replace(run_dir, stale)
        os.rename(tmp, run_dir)  # onto nothing or an empty directory; fails if another start got there first
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunDirError(f"cannot create run directory {run_dir} ({os.strerror(e.errno) if e.errno else e}); "
                          "another run may have started under this name: choose another --name") from None
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def prepare_run_dir(cfg: ExperimentConfig, mode: str = "new") -> tuple[Path, str]:
    """Create or check ``cfg.run_dir``; returns ``(path, action)`` with action ``train``,
    ``resume`` or ``reuse`` (finished run with the same config: nothing to do).

    * ``new``: the directory must not exist (or be empty).
    * ``resume``: it must exist with the same config and a checkpoint.
    * ``overwrite``: an existing directory is renamed to ``<name>.old-<time>``, then start fresh.
    * ``reuse``: as notebooks use it: a finished run with the same config is reused, a partial one
      resumed, an absent one started; a different config is an error.

    In every mode a leftover of a start that failed or was killed before its first checkpoint
    (:func:`is_leftover`) is not a run: it is replaced (one line says so), and ``resume`` starts it
    from iteration 0. A new directory is created atomically (:func:`_create_atomically`).

    **One process per run directory.** Before it looks at the directory, this process takes the run's
    lock (:mod:`nbsrc.locking`: ``.<name>.lock`` beside the directory, released by the kernel when the
    process dies, even by SIGKILL) and keeps it after returning, until :func:`release_run_lock`
    (:func:`nbsrc.experiment.run_experiment` releases it when the run ends) or the end of the process.
    A directory without a checkpoint is therefore a leftover only when no live process holds its lock;
    when one does, every mode stops with the one-line :class:`RunDirError` ``runs/<name> is being
    trained by process <PID>; wait for it or choose another --name`` and touches nothing. An error
    raised here gives back a lock taken here.
    """
    if mode not in MODES:
        raise RunDirError(f"run mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    run_dir = cfg.run_dir
    _make_runs_dir(run_dir)
    had_lock = locking.is_held(run_dir)
    locking.acquire(run_dir)
    try:
        return _prepare(cfg, run_dir, mode)
    except BaseException:
        if not had_lock:
            locking.release(run_dir)
        raise


def release_run_lock(run_dir: Path) -> None:
    """Give back the lock of ``run_dir`` taken by :func:`prepare_run_dir` (nothing when not held here)."""
    locking.release(run_dir)


def _prepare(cfg: ExperimentConfig, run_dir: Path, mode: str) -> tuple[Path, str]:
    """:func:`prepare_run_dir` once this process holds the run's lock."""
    state = run_state(run_dir)
    replace = is_leftover(run_dir)
    if replace:
        print(f"replacing {run_dir}: it holds no checkpoint and no results (a start that failed or was killed "
              "before its first checkpoint), so it is not a run")
        state = "absent"
    if mode == "overwrite" and state not in ("absent", "empty"):
        backup = move_aside(run_dir)
        print(f"moved the existing {run_dir} to {backup}")
        state = "absent"
    if mode == "new" and state not in ("absent", "empty"):
        raise RunDirError(
            f"run directory {run_dir} already exists; pass --resume to continue it, --overwrite to start "
            "again (the old one is moved aside), or choose another --name"
        )
    if mode == "resume" and not replace:
        if state not in ("partial", "done"):
            raise RunDirError(f"cannot resume {run_dir}: it has no checkpoint; start it without --resume")
        _check_same(cfg, run_dir)
        return run_dir, "resume"
    if mode == "reuse" and state not in ("absent", "empty"):
        _check_same(cfg, run_dir)
        if state == "done":
            return run_dir, "reuse"
        if state == "partial":
            return run_dir, "resume"
        raise RunDirError(f"{run_dir} is neither a run nor a leftover of one; choose another name")
    _create_atomically(cfg, run_dir, replace)
    return run_dir, "train"


def move_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``<name>.old-<time>`` (``-2``, ``-3``, ... when that name is taken).

    The backup name is reserved by creating it as an empty directory (``mkdir`` fails if it exists,
    atomically), then the run is renamed onto it (a rename may replace an empty directory), so two
    ``--overwrite`` in the same second never collide, and no existing backup is ever replaced.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        backup = run_dir.with_name(f"{run_dir.name}.old-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            backup.mkdir()
        except FileExistsError:
            continue
        try:
            os.replace(run_dir, backup)
        except FileNotFoundError:
            backup.rmdir()
            raise RunDirError(
                f"{run_dir} disappeared while it was being moved aside (another --overwrite of the same run?); "
                "run the command again"
            ) from None
        return backup
    raise AssertionError("unreachable")


def read_json(path: str | Path, fix: str) -> Any:
    """The JSON in ``path``; a file that is not valid JSON is a one-line :class:`RunDirError` naming
    it, the place of the damage and ``fix`` (what the user can do)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        where = f"line {e.lineno}, column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)[:80]
        raise RunDirError(f"{path} is damaged, not valid JSON ({where}); {fix}") from None


def load_run_config(path: str | Path) -> ExperimentConfig:
    """A run's saved ``config.json``; damaged JSON or a config this version cannot read is a one-line
    :class:`RunDirError` naming the file."""
    fix = "restore it, or start the run again with --overwrite (the old directory is moved aside)"
    d = read_json(path, fix)
    if not isinstance(d, dict):
        raise RunDirError(f"{path} holds a JSON {type(d).__name__}, not a config; {fix}")
    try:
        return ExperimentConfig.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise RunDirError(f"{path} is not a usable config ({e}); {fix}") from None


def append_metrics(run_dir: Path, row: dict) -> None:
    """Append ``row`` to ``metrics.jsonl``, and its numbers to the run's TensorBoard log
    (:func:`log_tensorboard`)."""
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")
    log_tensorboard(run_dir, row)


TENSORBOARD = "tb"  # runs/<name>/tb/: TensorBoard event files (`tensorboard --logdir runs`)
_tb_writers: dict[Path, Any] = {}
_tb_missing_said = False


def log_tensorboard(run_dir: Path, row: dict) -> None:
    """Write the numbers of a metrics row to ``<run_dir>/tb/`` as TensorBoard scalars tagged
    ``<kind>/<field>`` (``train/loss``, ``eval/R@1``, ``results/R@1``) at step ``row["iteration"]``.

    Needs the ``tensorboard`` package (``torch.utils.tensorboard.SummaryWriter``); without it nothing is
    written and one line says so, once per process. A resumed run adds a new event file beside the old
    one; TensorBoard reads them together (the rows a resume drops from ``metrics.jsonl`` stay in it)."""
    global _tb_missing_said
    run_dir = Path(run_dir)
    writer = _tb_writers.get(run_dir)
    if writer is None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if not _tb_missing_said:
                print("TensorBoard logs are off: the tensorboard package is not installed (pip install tensorboard); "
                      "metrics.jsonl has every metric")
                _tb_missing_said = True
            return
        writer = _tb_writers[run_dir] = SummaryWriter(log_dir=str(run_dir / TENSORBOARD))
    kind, step = row.get("kind", "train"), int(row.get("iteration", 0))

    def scalars(prefix: str, d: dict):  # nested dicts (Revisited easy/medium/hard) become tag paths
        for k, v in d.items():
            if isinstance(v, dict):
                yield from scalars(f"{prefix}/{k}", v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                yield f"{prefix}/{k}", v

    for tag, v in scalars(kind, {k: v for k, v in row.items() if k not in ("kind", "iteration")}):
        writer.add_scalar(tag, v, global_step=step)
    writer.flush()


def close_tensorboard(run_dir: Path) -> None:
    """Close the run's TensorBoard writer (if one is open); a later row opens a new event file."""
    writer = _tb_writers.pop(Path(run_dir), None)
    if writer is not None:
        writer.close()


def _metric_rows(path: Path) -> tuple[list[dict], str]:
    """``(rows, partial)``: the rows of ``metrics.jsonl`` and the partial last line, if any.

    Every row is appended with its newline in one write, so a last line without a newline that is not
    valid JSON is what a kill in the middle of an append leaves: it is returned apart, not parsed. A
    damaged line anywhere else is a one-line :class:`RunDirError` naming the file and the line.
    """
    if not path.exists():
        return [], ""
    *lines, tail = path.read_bytes().split(b"\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise RunDirError(
                f"{path}, line {i} is damaged, not a JSON row ({line[:40]!r}); delete that line (or the file, "
                "losing the logged curves) and run again"
            ) from None
    if tail.strip():
        try:
            rows.append(json.loads(tail))
        except ValueError:
            return rows, tail.decode("utf-8", "replace")
    return rows, ""


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    """The logged rows (of ``kind``: ``train``, ``eval``, ...); a partial last line (a run killed
    while writing it, or one being written right now) is left out."""
    rows, _ = _metric_rows(Path(run_dir) / METRICS)
    return [r for r in rows if kind is None or r.get("kind") == kind]


def truncate_metrics(run_dir: Path, after_iteration: int) -> None:
    """Drop rows logged after ``after_iteration`` (a resumed run logs them again), and a partial last
    line left by a kill in the middle of an append (said in one line)."""
    path = run_dir / METRICS
    rows, partial = _metric_rows(path)
    if partial:
        print(f"dropped the partial last line of {path} (left by an interrupted write): {partial[:40]!r}")
    rows = [r for r in rows if r.get("iteration", 0) <= after_iteration]
    tmp = run_dir / (METRICS + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RESULTS
    if not path.exists():
        raise RunDirError(f"run {run_dir} has no {RESULTS}: it does not exist or has not finished; train it first")
    return read_json(path, "run the same command with --resume to evaluate the last checkpoint again, or "
                           "--overwrite to start again")
