"""Where ``make demo`` spends its time: per notebook, the runs it trained (training, then PCA and
evaluation) and the rest (kernel start, reusing runs, analyses, figures), read from the demo's printed
log and the run directories it wrote. Nothing is rerun.

- **per notebook**: the wall time printed by ``nbsrc demo`` (``== NB: done in N s``);
- **per run**: ``seconds`` of its ``results.json`` (model build, training, PCA, evaluation, writing), of
  which *training* is estimated from the throughput logged in ``metrics.jsonl`` (each logged row
  covers ``Δiteration × batch_size`` images at its ``img_per_s``); a run belongs to the notebook
  during which its ``results.json`` was written;
- **runs trained at once** (``jobs``): a notebook's runs may overlap in time. The wall time they cover is
  the union of their intervals ``[finished - seconds, finished]``, split into training and the rest in
  the proportion of their summed seconds; the summed seconds are reported beside it (their ratio to
  the covered time is how many runs were at work on average);
- **rest**: the notebook's time minus the time its runs cover.

    python -m nbsrc demo > demo.log 2>&1
    python -m bench demo --log demo.log --runs runs/fashion_mnist
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

from nbsrc.config import upgrade
from nbsrc.errors import ConfigError

_START = re.compile(r"^== (\S+\.ipynb): started at (\d\d):(\d\d):(\d\d)")
_DONE = re.compile(r"^== (\S+\.ipynb): done in (\d+) s")


def parse_demo_log(text: str, end: dt.datetime) -> list[dict]:
    """``[{notebook, start, seconds}]`` from the lines ``nbsrc demo`` prints; the clock times are put on
    dates by counting back from ``end`` (the log's last write), so a demo that runs past midnight is
    read right."""
    rows, clock = [], []
    for line in text.splitlines():
        if m := _START.match(line):
            clock.append((m.group(1), dt.time(int(m.group(2)), int(m.group(3)), int(m.group(4)))))
        elif (m := _DONE.match(line)) and clock and clock[-1][0] == m.group(1):
            rows.append({"notebook": m.group(1), "time": clock[-1][1], "seconds": int(m.group(2))})
    if not rows:
        raise ConfigError("no '== NB: done in N s' lines in the log: give the output of `python -m nbsrc demo`")
    # anchor the last notebook's end on `end`, then walk back
    day = end.date()
    last = rows[-1]
    start = dt.datetime.combine(day, last["time"])
    if start > end:
        start -= dt.timedelta(days=1)
    last["start"] = start
    for prev, nxt in zip(reversed(rows[:-1]), reversed(rows[1:]), strict=True):
        s = dt.datetime.combine(nxt["start"].date(), prev["time"])
        if s > nxt["start"]:
            s -= dt.timedelta(days=1)
        prev["start"] = s
    return [{"notebook": r["notebook"], "start": r["start"], "seconds": r["seconds"]} for r in rows]


def train_seconds(metrics_path: Path, batch_size: int) -> float:
    """Training time estimated from the logged throughput: Σ Δiteration · batch_size / img_per_s."""
    total, last = 0.0, 0
    if not metrics_path.exists():
        return 0.0
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "train" and row.get("img_per_s"):
            total += (row["iteration"] - last) * batch_size / row["img_per_s"]
            last = row["iteration"]
    return total


def run_times(runs_dir: Path) -> list[dict]:
    """``[{run, finished, seconds, train_s, images}]`` for every finished run under ``runs_dir``."""
    out = []
    for res in sorted(Path(runs_dir).glob("*/results.json")):
        cfg = upgrade(json.loads((res.parent / "config.json").read_text())).get("optim") or {}  # any version
        r = json.loads(res.read_text())
        batch = int(cfg.get("batch_size", 0) or 0)
        tr = train_seconds(res.parent / "metrics.jsonl", batch) if cfg.get("iterations") else 0.0
        out.append({"run": res.parent.name, "finished": dt.datetime.fromtimestamp(res.stat().st_mtime),
                    "seconds": float(r.get("seconds", 0.0)), "train_s": min(tr, float(r.get("seconds", tr))),
                    "images": int(cfg.get("iterations", 0) or 0) * batch})
    return out


def demo_time_split(log_text: str, log_end: dt.datetime, runs_dir: Path) -> list[dict]:
    """Per notebook: its seconds, the runs finished during it, their training and other seconds, and
    the rest."""
    nbs = parse_demo_log(log_text, log_end)
    runs = run_times(runs_dir)
    rows = []
    for nb in nbs:
        end = nb["start"] + dt.timedelta(seconds=nb["seconds"] + 1)
        mine = [r for r in runs if nb["start"] <= r["finished"] <= end]
        summed = sum(r["seconds"] for r in mine)
        covered = covered_seconds([((r["finished"] - dt.timedelta(seconds=r["seconds"])).timestamp(),
                                    r["finished"].timestamp()) for r in mine])
        train = covered * sum(r["train_s"] for r in mine) / summed if summed else 0.0
        rows.append({"notebook": nb["notebook"], "seconds": nb["seconds"], "runs": len(mine),
                     "train_s": round(train), "pca_eval_s": round(covered - train), "runs_summed_s": round(summed),
                     "rest_s": round(nb["seconds"] - covered), "run_names": [r["run"] for r in mine]})
    return rows


def covered_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``[start, end]`` intervals (runs that overlap count once)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def results_markdown(rows: list[dict], info: dict, note: str, log: str, runs_dir: str) -> str:
    from bench import machine_lines

    total = sum(r["seconds"] for r in rows)
    lines = [machine_lines(info, note).rstrip(),
             f"- source: the log `{log}` of `python -m nbsrc demo` and the run directories under `{runs_dir}`",
             "- training seconds are estimated from the throughput logged in each run's metrics.jsonl; "
             "'PCA + eval' is the rest of the run's own time (model build, PCA, evaluation, writing); 'rest' is "
             "the notebook's time outside the runs it trained (kernel start, reused runs, analyses, figures); runs "
             "trained at once count once: training and 'PCA + eval' split the wall time the runs cover, and "
             "'runs' own min' sums each run's own time (above the covered time when runs overlapped)",
             "", "| notebook | minutes | runs trained or evaluated | training min | PCA + eval min | rest min | "
             "runs' own min |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['notebook']} | {r['seconds'] / 60:.1f} | {r['runs']} | {r['train_s'] / 60:.1f} | "
                     f"{r['pca_eval_s'] / 60:.1f} | {r['rest_s'] / 60:.1f} | {r['runs_summed_s'] / 60:.1f} |")
    tr = sum(r["train_s"] for r in rows) / 60
    ev = sum(r["pca_eval_s"] for r in rows) / 60
    rest = sum(r["rest_s"] for r in rows) / 60
    own = sum(r["runs_summed_s"] for r in rows) / 60
    lines.append(f"| **total** | **{total / 60:.1f}** | {sum(r['runs'] for r in rows)} | {tr:.1f} | {ev:.1f} | "
                 f"{rest:.1f} | {own:.1f} |")
    return "\n".join(lines) + "\n"


def add_arguments(p) -> None:
    p.add_argument("--log", required=True, help="the printed output of `python -m nbsrc demo`")
    p.add_argument("--runs", required=True, help="the demo's runs folder, e.g. runs/fashion_mnist")


def run(a, results_path=None, note: str = "") -> list[dict]:
    from bench import RESULTS_PATH, machine_info, write_section

    log = Path(a.log)
    if not log.is_file():
        raise ConfigError(f"--log {log}: no such file; save the demo's output first: "
                          "python -m nbsrc demo > demo.log 2>&1")
    if not Path(a.runs).is_dir():
        raise ConfigError(f"--runs {a.runs}: no such folder; give the demo's runs folder, e.g. runs/fashion_mnist")
    rows = demo_time_split(log.read_text(), dt.datetime.fromtimestamp(log.stat().st_mtime), Path(a.runs))
    for r in rows:
        print(f"{r['notebook']}: {r['seconds']} s, {r['runs']} runs (training {r['train_s']} s, PCA + eval "
              f"{r['pca_eval_s']} s), rest {r['rest_s']} s")
    write_section("demo", results_markdown(rows, machine_info(), note, a.log, a.runs), results_path or RESULTS_PATH)
    return rows
