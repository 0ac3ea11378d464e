"""Progress reporting: tqdm bars in notebooks and terminals, plain lines in logs."""

from __future__ import annotations

import os
import sys
import time


def _interactive() -> bool:
    if os.environ.get("NBSRC_PROGRESS") == "lines":  # set by `make demo`: a kernel's bars as plain log lines
        return False
    try:
        from IPython import get_ipython

        if get_ipython() is not None and "IPKernelApp" in get_ipython().config:
            return True
    except Exception:  # noqa: BLE001 - no IPython
        pass
    return sys.stderr.isatty()


class _LineProgress:
    """A tqdm stand-in for logs: one line every ``every`` fraction of the work."""

    def __init__(self, total: int, desc: str, initial: int = 0, every: float = 0.1):
        self.total, self.desc, self.n = total, desc, initial
        self.step = max(1, int(total * every))
        self.start = time.perf_counter()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.step == 0 or self.n == self.total:
            rate = self.n / max(time.perf_counter() - self.start, 1e-9)
            print(f"{self.desc}: {self.n}/{self.total} ({rate:.1f}/s) {self.postfix}", file=sys.stderr, flush=True)

    def set_postfix(self, d: dict | None = None, **kw) -> None:
        d = {**(d or {}), **kw}
        self.postfix = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _NoProgress(_LineProgress):
    def update(self, n: int = 1) -> None:
        self.n += n


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0):
    """A progress bar (tqdm.auto) when interactive, plain log lines otherwise, nothing if disabled."""
    if not enabled:
        return _NoProgress(total, desc, initial)
    if _interactive():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True)
    return _LineProgress(total, desc, initial)
