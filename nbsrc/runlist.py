"""What is under a runs directory, and how runs differ: ``nbsrc runs`` (:func:`list_runs`, every run
with its state) and ``nbsrc compare`` (:func:`compare_runs`); the finished runs that the notebooks and
widgets pick from (:func:`list_finished_runs`, a :class:`RunSummary` each); and :func:`as_run`, a
finished run loaded from however it is named.

A run directory is one that holds a ``config.json`` (:mod:`nbsrc.train.rundir`). Its state is
``finished`` (``results.json`` written), ``resumable`` (a checkpoint: ``train --resume`` continues it)
or ``leftover`` (neither: a start that failed or was killed before its first checkpoint; a new start
under its name replaces it); a run that a live process holds (:mod:`nbsrc.locking`) is ``training``."""

from __future__ import annotations

import csv
import datetime
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from nbsrc.config import config_fields
from nbsrc.errors import ConfigError, NbsrcError, RunDirError
from nbsrc.experiment import EMBEDDINGS, RunResult, load_run
from nbsrc.locking import held_elsewhere, holder
from nbsrc.train.rundir import CONFIG, RESULTS, load_run_config, read_json, read_metrics, run_state

STATES = {"done": "finished", "partial": "resumable"}


def run_directories(runs_dir: Path) -> list[Path]:
    """The run directories directly under the folder ``runs_dir`` (those with a ``config.json``), by name."""
    return sorted(p for p in runs_dir.iterdir() if (p / CONFIG).is_file())


def flat_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) results dict, keys joined with ``/`` (``roxford5k/medium/mAP``)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def scores(results: dict) -> dict[str, float]:
    """The retrieval scores of a results dict: Recall@K, and the Revisited mAP (medium, hard)."""
    flat = flat_numbers(results)
    return {k: v for k, v in flat.items() if k.startswith("R@") or k.endswith(("medium/mAP", "hard/mAP"))}


def run_row(run_dir: Path) -> dict:
    """One line of ``nbsrc runs``: name, state, iterations done / planned, R@1 or mAP, date."""
    cfg = load_run_config(run_dir / CONFIG)
    state = STATES.get(run_state(run_dir), "leftover")
    if state != "finished" and held_elsewhere(run_dir):
        state = f"training (process {holder(run_dir)})"
    results = read_json(run_dir / RESULTS, "run it again with --resume") if state == "finished" else {}
    try:
        done = max((r["iteration"] for r in read_metrics(run_dir, "train")), default=0)
    except RunDirError:
        done = "?"
    if state == "finished":
        done = cfg.optim.iterations
    score = scores(results)
    shown = f"R@1 {score['R@1']:.2f}" if "R@1" in score else "  ".join(
        f"{k.split('/')[0]} {k.split('/')[1][0].upper()} mAP {v:.2f}" for k, v in score.items())
    newest = max((p.stat().st_mtime for p in run_dir.iterdir()), default=run_dir.stat().st_mtime)
    return {"name": run_dir.name, "state": state, "iterations": f"{done}/{cfg.optim.iterations}", "score": shown or "-",
            "date": datetime.datetime.fromtimestamp(newest).strftime("%Y-%m-%d %H:%M")}


def list_runs(runs_dir: str | Path = "runs") -> list[dict]:
    """A :func:`run_row` for every run directory directly under ``runs_dir``, by name. A run whose
    ``config.json`` is damaged is listed with state ``damaged`` and the reason, never a crash."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise RunDirError(f"{runs_dir} is not a directory of runs; pass the --runs-dir used to train")
    rows = []
    for d in run_directories(runs_dir):
        try:
            rows.append(run_row(d))
        except RunDirError as e:
            rows.append({"name": d.name, "state": "damaged", "iterations": "?", "score": str(e)[:60], "date": ""})
    return rows


def format_table(rows: list[dict]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers="keys", tablefmt="simple", disable_numparse=True)


def write_csv(rows: list[dict], path: str | Path) -> None:
    """Write ``rows`` as CSV to ``path``, creating its folder; a file on the way is a one-line error."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"--csv {path}: its folder {path.parent} cannot be made (a file is on its way); "
                         "choose another --csv path") from None
    if path.is_dir():
        raise ConfigError(f"--csv {path} is a folder; pass a file name such as {path / 'runs.csv'}")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["name"])
        w.writeheader()
        w.writerows(rows)


def compare_runs(run_dirs: list[str | Path]) -> list[dict]:
    """One row per run: its name, the config fields whose values differ between the runs (execution
    fields such as device included, since they can explain a speed), and its scores."""
    loaded = []
    for d in map(Path, run_dirs):
        if not (d / CONFIG).is_file():
            raise RunDirError(f"run {d} does not exist (no {CONFIG}); pass run directories such as runs/irt_r")
        run_cfg = load_run_config(d / CONFIG)  # by name; DToP's fields say whether and which DToP model
        cfg = {f.name: run_cfg.value(f.name) for f in config_fields() if f.name != "dtop"}
        results = read_json(d / RESULTS, "run it again with --resume") if (d / RESULTS).exists() else {}
        loaded.append((d.name, cfg, scores(results)))
    keys = [k for k in loaded[0][1] if k not in ("name", "runs_dir")
            and len({json.dumps(c.get(k), sort_keys=True) for _, c, _ in loaded}) > 1]
    score_keys = list(dict.fromkeys(k for _, _, s in loaded for k in s))
    return [{"run": name, **{k: cfg.get(k) for k in keys},
             **{k: f"{s[k]:.2f}" if k in s else "-" for k in score_keys}} for name, cfg, s in loaded]


# ----------------------------------------------------------------------------- finished runs
@dataclass(frozen=True)
class RunSummary:
    """A finished run of ``runs_dir`` (it has ``config.json`` and ``embeddings.npz``)."""

    name: str
    run_dir: Path
    dataset: str
    loss: str
    lam: float
    beta: float
    iterations: int
    recall_at_1: float | None  # as stored in results.json (percent), None if missing

    @classmethod
    def of(cls, run: RunResult) -> RunSummary:
        """The summary of a loaded run (:func:`nbsrc.experiment.load_run`)."""
        cfg, r1 = run.config, run.results.get("R@1")
        return cls(run.run_dir.name, run.run_dir, cfg.data.dataset, cfg.loss.name, cfg.loss.lam, cfg.loss.beta,
                   cfg.optim.iterations, None if r1 is None else float(r1))

    @property
    def label(self) -> str:
        """``"irt_r · λ=0.7 β=0.5 · R@1 54.0"``: what the widgets' run pickers show."""
        r1 = f" · R@1 {self.recall_at_1:.1f}" if self.recall_at_1 is not None else ""
        return f"{self.name} · λ={self.lam:g} β={self.beta:g}{r1}"

    @property
    def short_label(self) -> str:
        """``"irt_r (λ=0.7, β=0.5)"``: the legend entry of a run in the overlaid figures."""
        return f"{self.name} (λ={self.lam:g}, β={self.beta:g})"


def list_finished_runs(runs_dir: str | Path = "runs") -> list[RunSummary]:
    """The finished runs directly under ``runs_dir`` (``runs_dir/<name>/`` with ``config.json``
    and ``embeddings.npz``), sorted by name. A run whose config no longer loads is skipped with a
    warning. Raises :class:`~nbsrc.errors.RunDirError` when there is none."""
    runs_dir = Path(runs_dir)
    found = []
    for run_dir in run_directories(runs_dir) if runs_dir.is_dir() else []:
        if not (run_dir / EMBEDDINGS).is_file():
            continue
        try:
            found.append(RunSummary.of(load_run(run_dir)))
        except NbsrcError as e:
            warnings.warn(f"skipping run {run_dir}: {e}", stacklevel=2)
    if not found:
        missing = "" if runs_dir.is_dir() else " (the folder does not exist)"
        raise RunDirError(f"no finished runs in {runs_dir}/{missing}: run notebook 02 first "
                          f"(a finished run is a folder with config.json and {EMBEDDINGS})")
    return found


def as_run(run) -> RunResult:
    """A finished run, loaded (:func:`nbsrc.experiment.load_run`), from a
    :class:`~nbsrc.experiment.RunResult` (returned as it is), a :class:`RunSummary` (anything with a
    ``run_dir``) or a run directory."""
    if isinstance(run, RunResult):
        return run
    if hasattr(run, "run_dir"):
        return load_run(run.run_dir)
    return load_run(run)
