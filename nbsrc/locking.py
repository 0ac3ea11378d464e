"""One process at a time per output directory: a run directory (``runs/<name>``) or an index (``embed --out``).

:func:`acquire` takes an exclusive OS lock on the lock file ``.<name>.lock`` beside the directory
(:func:`lock_path`) and writes the holder's PID into it; :func:`release` deletes the file and drops the
lock. A second process that finds the lock held stops with a one-line
:class:`~nbsrc.errors.RunDirError` (``runs/x is being trained by process 123; wait for it or choose
another --name``) before it has touched anything.

Our choices, and why:

* **Beside the directory, not inside it.** The directory itself is created by a rename, moved aside by
  ``--overwrite`` and deleted when it is a leftover of a killed start; a lock file inside would move or
  vanish with it. The name ``.<name>.lock`` stays put through all of these, so whoever holds it owns
  every change to ``<name>``, the rename of the old directory and the creation of the new one included.
* **POSIX record locks** (``fcntl.lockf``), not ``flock``: the kernel drops them when the holding process
  dies, SIGKILL included, and a child made by ``fork`` (a DataLoader worker) does not inherit them, so a
  killed run's lock is free at once even while its workers are still exiting. (A process holds a POSIX
  lock until it closes *any* descriptor of the file; this module opens the file once per process and
  never again while it holds it, and nothing else should open it.)
* **The file is deleted on release**, so a finished run or a refused start leaves nothing beside the
  directory; only a killed process leaves its file, which the next start takes over. Deleting a lock
  file races with a process that opened it just before: :func:`acquire` therefore checks, once it holds
  the lock, that the path still names the file it locked, and starts again when it does not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nbsrc.errors import RunDirError

_held: dict[Path, tuple[int, int]] = {}  # lock file (absolute) -> (PID, descriptor): the locks held here


def lock_path(target: str | Path) -> Path:
    """The lock file of the directory ``target``: ``.<name>.lock`` beside it (``/.lock`` for ``/``)."""
    target = Path(os.path.abspath(target))
    return target.with_name(f".{target.name}.lock") if target.name else target / ".lock"


def holder(target: str | Path) -> int | None:
    """The PID written in ``target``'s lock file (None when it cannot be read: not there, or not yet written)."""
    if is_held(target):  # never open the file again while holding it: closing that would drop the lock
        return os.getpid()
    try:
        return int(lock_path(target).read_text().strip())
    except (OSError, ValueError):
        return None


def _busy(target: Path, doing: str, flag: str) -> RunDirError:
    pid = None
    for _ in range(20):  # the holder writes its PID just after it locks: give it a moment
        pid = holder(target)
        if pid is not None and _alive(pid):
            break
        time.sleep(0.05)
    who = f"process {pid}" if pid is not None else "another process"
    return RunDirError(f"{target} is being {doing} by {who}; wait for it or choose another {flag}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_held(target: str | Path) -> bool:
    """Whether this process holds ``target``'s lock (a child made by ``fork`` does not hold its parent's)."""
    return _held.get(lock_path(target), (None,))[0] == os.getpid()


def check_free(target: str | Path, doing: str = "trained", flag: str = "--name") -> None:
    """Raise the one-line :class:`RunDirError` of :func:`acquire` when another process holds ``target``'s
    lock; writes nothing (an early check, before minutes of building: :func:`acquire` decides)."""
    if held_elsewhere(target):
        raise _busy(Path(target), doing, flag)


def held_elsewhere(target: str | Path) -> bool:
    """Whether another live process holds ``target``'s lock (writes nothing)."""
    if is_held(target):
        return False
    try:
        fd = os.open(lock_path(target), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # no lock file: nobody holds it (or it cannot be read; acquire() will say why)
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a shared lock, given back at once
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)
    return False


def acquire(target: str | Path, doing: str = "trained", flag: str = "--name") -> None:
    """Hold ``target``'s lock until :func:`release` or the end of this process (a no-op when it holds it
    already). The folder that holds ``target`` must exist. Held by another process: a one-line
    :class:`RunDirError` saying ``<target> is being <doing> by process <PID>; wait for it or choose
    another <flag>``, after a few quick retries (another process's :func:`check_free` holds a shared
    lock for an instant)."""
    target = Path(target)
    path = lock_path(target)
    if is_held(target):
        return
    tries = 0
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            tries += 1
            if tries >= 5:
                raise _busy(target, doing, flag) from None
            time.sleep(0.02)
            continue
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us deleted the file after we opened it: lock the current one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[path] = (os.getpid(), fd)


def release(target: str | Path) -> None:
    """Delete ``target``'s lock file and drop the lock, if this process holds it (else nothing)."""
    if not is_held(target):
        return
    path = lock_path(target)
    _, fd = _held.pop(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.close(fd)


@contextmanager
def holding(target: str | Path, doing: str, flag: str) -> Iterator[Path]:
    """Hold ``target``'s lock for the ``with`` block (an index build, a study's figures folder): a live
    holder elsewhere is said first (:func:`check_free`, before any folder is made), then the folder that
    holds ``target`` is made (a file in its way: a one-line :class:`RunDirError` naming ``flag``), the lock
    taken (:func:`acquire`) and released at the end, however the block ends."""
    target = Path(target)
    check_free(target, doing, flag)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunDirError(f"{target} cannot be made: a file is on its way ({target.parent}); "
                          f"choose another {flag}") from None
    acquire(target, doing, flag)
    try:
        yield target
    finally:
        release(target)
