"""Run the notebooks headless with papermill, rejecting parameters the notebook does not declare.

papermill only warns about an unknown parameter and runs on with the default, so a typo silently
changes nothing; here it is an error that names the valid parameters. A value of the wrong type
(``-p iterations abc``) is an error naming the parameter before the kernel starts, and an error
raised inside the notebook ends in one line naming the notebook, the cell and the error (the
executed notebook keeps the whole traceback).
"""

from __future__ import annotations

import ast
import difflib
import json
import logging
import math
import os
import sys
import typing
from pathlib import Path

from nbsrc.errors import ConfigError, NbsrcError

KERNEL = "nbsrc"
# The kernel's own log on stderr: critical only (not ipykernel's warning, on every start, that its
# local TCP sockets are unencrypted, nor its "KeyboardInterrupt caught in kernel" when papermill stops
# it after a failed cell), so that a failed notebook ends in one line; a dead kernel is papermill's error.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=CRITICAL"]
NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"  # nbsrc/paper/notebooks.py -> the repository


def notebook_parameters(path: str | Path) -> dict:
    import papermill as pm

    return pm.inspect_notebook(str(path))


def _default(declared: dict, name: str):
    """The notebook's default of ``name`` as a value, or ``...`` when it is not a literal."""
    try:
        return ast.literal_eval(declared[name]["default"])
    except (ValueError, SyntaxError, TypeError, KeyError):
        return ...


def _optional_config_fields() -> set[str]:
    """Config fields that may be None (``patch_size``, ``dim``, ...): a notebook parameter of that
    name may be set to None even where its default is a number."""
    from nbsrc.config import config_fields

    return {f.name for f in config_fields() if type(None) in typing.get_args(f.type)}


def _expected(default) -> tuple[str, typing.Callable[[object], bool]] | None:
    """What a parameter with this default accepts: ``(words, test)``, or None for anything."""
    if default is ... or default is None:
        return None
    if isinstance(default, bool):
        return "True or False", lambda v: isinstance(v, bool)
    if isinstance(default, int):
        return "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)
    if isinstance(default, float):
        return "a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if isinstance(default, str):
        return "a string", lambda v: isinstance(v, str)
    if isinstance(default, (list, tuple)):
        return "a list such as [1, 2]", lambda v: isinstance(v, (list, tuple))
    if isinstance(default, dict):
        return "a dict such as {\"key\": 1}", lambda v: isinstance(v, dict)
    return None


def _is_jobs(v) -> bool:
    from nbsrc.workers import check_jobs

    try:
        check_jobs(v)
    except ConfigError:
        return False
    return True


# The notebooks' ``jobs`` (runs trained at once, run_all): "auto" or a count, as nbsrc.workers.check_jobs reads it.
_JOBS = ("'auto' or a positive integer", _is_jobs)


def config_field_types() -> dict[str, typing.Any]:
    """``{name: type hint}`` of the config's fields (:func:`nbsrc.config.config_fields`) and of the
    hyperparameters the registered losses declare (:func:`nbsrc.config.loss_hyperparameter_fields`)."""
    import nbsrc.losses  # noqa: F401  (registers the losses and their hyperparameters)
    from nbsrc.config import config_fields, loss_hyperparameter_fields

    return {f.name: f.type for f in (*config_fields(), *loss_hyperparameter_fields())}


def fold_overrides(path: str | Path, params: dict) -> dict:
    """A notebook that declares ``overrides = {}`` (the demo notebooks: their shared settings come
    from :func:`nbsrc.paper.demo.demo_config`) takes any config field as a parameter: ``-p lr 1e-4``
    becomes ``overrides={"lr": 1e-4}`` (merged into an ``overrides`` given too). A name the
    notebook declares itself stays its own parameter; other names are left for
    :func:`check_parameters` to reject."""
    declared = notebook_parameters(path)
    if "overrides" not in declared:
        return dict(params)
    fields = config_field_types()
    out = {k: v for k, v in params.items() if k in declared or k not in fields}
    extra = {k: v for k, v in params.items() if k not in declared and k in fields}
    if extra:
        given = params.get("overrides") or {}
        if not isinstance(given, dict):
            raise ConfigError(f"parameter overrides={given!r} of {Path(path).name} is invalid: expected a dict "
                              "of config fields such as {\"lr\": 1e-4}")
        out["overrides"] = {**given, **extra}
    return out


def check_parameters(path: str | Path, params: dict) -> None:
    """Every parameter is declared by the notebook and has the type of its default (None is also
    accepted where the default is None or the name is an optional config field). Config fields
    given to a notebook with ``overrides`` are folded into it first (:func:`fold_overrides`)."""
    declared = notebook_parameters(path)
    params = fold_overrides(path, params)
    optional = None
    for k, v in params.items():
        if k not in declared:
            takes_fields = "overrides" in declared
            names = list(declared) + (list(config_field_types()) if takes_fields else [])
            close = difflib.get_close_matches(k, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            also = " and any config field (ExperimentConfig)" if takes_fields else ""
            raise ConfigError(
                f"unknown parameter {k!r} for {Path(path).name}{hint}; it declares: {', '.join(declared)}{also}"
            )
        expected = _JOBS if k == "jobs" else _expected(_default(declared, k))
        if expected is None:
            continue
        words, accepts = expected
        if v is None:
            optional = _optional_config_fields() if optional is None else optional
            if k in optional:
                continue
        if not accepts(v):
            raise ConfigError(
                f"parameter {k}={v!r} of {Path(path).name} is invalid: expected {words}, like its default "
                f"{declared[k]['default']}"
            )
    if isinstance(params.get("overrides"), dict):
        _check_config_values(path, params["overrides"])


def _check_config_values(path: str | Path, overrides: dict) -> None:
    """Each config field of ``overrides`` has the type of the config's default (None where the field
    may be None): ``-p iterations abc`` is a one-line error before the kernel starts."""
    from nbsrc.config import config_fields

    fields = {f.name: f for f in config_fields()}
    for k, v in overrides.items():
        if k not in fields:
            continue  # an unknown field: the config says so, with a suggestion, when the notebook builds it
        f = fields[k]
        expected = _expected(f.default)
        if expected is None or (v is None and type(None) in typing.get_args(f.type)):
            continue
        words, accepts = expected
        if not accepts(v):
            raise ConfigError(
                f"parameter {k}={v!r} of {Path(path).name} is invalid: expected {words}, like the config's "
                f"default {f.default!r}"
            )


def parse_parameters(path: str | Path, pairs) -> dict:
    """``-p NAME VALUE`` pairs of the command line as values: JSON (``300``, ``[0, 1]``, ``null``),
    else a Python literal (``None``, ``{'a': 1}``), else ``none``/``null`` for None, else the text.
    For a parameter whose default is a string the text is taken as it is (``-p weights none``)."""
    declared = notebook_parameters(path) if Path(path).exists() else {}
    fields = config_field_types() if "overrides" in declared else {}
    out = {}
    for name, text in pairs:
        hint = fields.get(name) if name not in declared else None  # a config field going to overrides
        as_text = hint is str or (hint == str | None and text.lower() not in ("none", "null"))
        if as_text or (name in declared and isinstance(_default(declared, name), str)):
            out[name] = text
            continue
        try:
            out[name] = json.loads(text)
            continue
        except ValueError:
            pass
        try:
            out[name] = ast.literal_eval(text)
            continue
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
        out[name] = None if text.lower() in ("none", "null") else text
    return out


def run_notebook(path: str | Path, params: dict | None = None, out: str | Path | None = None,
                 kernel: str | None = None, cwd: str | Path | None = None, log_output: bool = False,
                 show_progress: bool = False) -> Path:
    """Execute ``path`` with ``params`` into ``out`` (default ``runs/notebooks/<name>``).

    ``log_output``: the cells' outputs go to papermill's log as they come. ``show_progress`` (what
    ``make demo`` uses): that log is printed to stdout as plain lines (``  | ...``), papermill's
    "Executing Cell N" lines included, and nbsrc's progress bars inside the kernel print plain lines
    (``train irt_r: 40/100 (3.1/s) loss=...``) instead of widgets, so a long notebook is never silent."""
    import papermill as pm

    if show_progress:
        log_output = True
        _print_papermill_log()

    path = Path(path)
    if not path.exists():
        raise NbsrcError(f"notebook {path} does not exist; see {NOTEBOOKS_DIR} for the notebooks")
    params = fold_overrides(path, dict(params or {}))
    check_parameters(path, params)
    out = Path(out) if out is not None else Path("runs") / "notebooks" / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    kernel = kernel or os.environ.get("NBSRC_KERNEL") or _default_kernel()
    saved_env = os.environ.get("NBSRC_PROGRESS")
    if show_progress:
        os.environ["NBSRC_PROGRESS"] = "lines"  # the kernel inherits the environment
    try:
        pm.execute_notebook(str(path), str(out), parameters=params, kernel_name=kernel,
                            cwd=str(cwd or Path.cwd()), progress_bar=False, log_output=log_output,
                            extra_arguments=KERNEL_ARGUMENTS)
    except pm.PapermillExecutionError as e:
        evalue = " ".join(str(e.evalue).split())
        raise NbsrcError(
            f"{path.name} stopped in cell {e.exec_count}: {e.ename}: {evalue} (the whole traceback is in {out})"
        ) from None
    finally:
        if show_progress:
            if saved_env is None:
                os.environ.pop("NBSRC_PROGRESS", None)
            else:
                os.environ["NBSRC_PROGRESS"] = saved_env
    return out


class _StdoutHandler(logging.Handler):
    """Writes to the ``sys.stdout`` of the moment (so that redirections and test captures see it)."""

    def emit(self, record: logging.LogRecord) -> None:
        for line in self.format(record).splitlines():
            if line.strip():
                print(f"  | {line.rstrip()}", flush=True)


def _print_papermill_log() -> None:
    """Route papermill's log (cell starts and, with ``log_output``, the cells' outputs) to stdout, once."""
    logger = logging.getLogger("papermill")
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        logger.addHandler(_StdoutHandler())
    logger.setLevel(logging.INFO)


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
