"""Run the notebooks headless with papermill, rejecting parameters the notebook does not declare.

papermill only warns about an unknown parameter and runs on with the default, so a typo silently
changes nothing; here it is an error that names the valid parameters.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from pathlib import Path

from nbsrc.errors import ConfigError, NbsrcError

KERNEL = "nbsrc"
NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def notebook_parameters(path: str | Path) -> dict:
    import papermill as pm

    return pm.inspect_notebook(str(path))


def check_parameters(path: str | Path, params: dict) -> None:
    declared = notebook_parameters(path)
    for k in params:
        if k not in declared:
            close = difflib.get_close_matches(k, list(declared), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown parameter {k!r} for {Path(path).name}{hint}; it declares: {', '.join(declared)}"
            )


def run_notebook(path: str | Path, params: dict | None = None, out: str | Path | None = None,
                 kernel: str | None = None, cwd: str | Path | None = None, log_output: bool = False) -> Path:
    """Execute ``path`` with ``params`` into ``out`` (default ``runs/notebooks/<name>``)."""
    import papermill as pm

    path = Path(path)
    if not path.exists():
        raise NbsrcError(f"notebook {path} does not exist; see {NOTEBOOKS_DIR} for the notebooks")
    params = dict(params or {})
    check_parameters(path, params)
    out = Path(out) if out is not None else Path("runs") / "notebooks" / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    kernel = kernel or os.environ.get("NBSRC_KERNEL") or _default_kernel()
    pm.execute_notebook(str(path), str(out), parameters=params, kernel_name=kernel,
                        cwd=str(cwd or Path.cwd()), progress_bar=False, log_output=log_output)
    return out


def _default_kernel() -> str:
    """The ``nbsrc`` kernel of *this* interpreter, registered under ``sys.prefix`` if needed.

    A kernelspec installed with ``--user`` is shared by every checkout on the machine, so the last
    ``make install`` anywhere would decide which venv runs the notebooks. The spec is therefore kept
    in the venv (``<sys.prefix>/share/jupyter``), repaired if it points at another interpreter, and
    that directory is put first on ``JUPYTER_PATH`` so that no user-wide spec shadows it.
    """
    share = Path(sys.prefix) / "share" / "jupyter"
    spec = share / "kernels" / KERNEL / "kernel.json"
    try:
        argv0 = json.loads(spec.read_text())["argv"][0]
    except (OSError, ValueError, KeyError, IndexError):
        argv0 = None
    if argv0 != sys.executable:
        try:
            from ipykernel.kernelspec import install

            install(kernel_name=KERNEL, display_name="Python (nbsrc)", prefix=sys.prefix)
            # ipykernel writes argv[0] = sys.executable; check rather than trust it.
            argv0 = json.loads(spec.read_text())["argv"][0]
        except Exception:  # noqa: BLE001 - read-only prefix, no ipykernel: fall back below
            return "python3"
    paths = [str(share)] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p and p != str(share)]
    os.environ["JUPYTER_PATH"] = os.pathsep.join(paths)
    return KERNEL if argv0 == sys.executable else "python3"
