"""Tables for the notebooks and the demo: Recall@K in the format of IRT Table 3."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def recall_table(runs: dict, ks=None) -> pd.DataFrame:
    """One row per method (``{label: RunResult}``), one column per Recall@K, in percent."""
    rows = {}
    for label, run in runs.items():
        rec = run.recall if hasattr(run, "recall") else run
        rows[label] = {k: round(float(v), 2) for k, v in rec.items() if ks is None or k in {f"R@{x}" for x in ks}}
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "method"
    return df


def save_table(df: pd.DataFrame, name: str, out_dir: str | Path = "figures") -> list[Path]:
    """Write ``<name>.csv`` and ``<name>.md`` atomically; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in ((".csv", df.to_csv()), (".md", df.to_markdown() + "\n")):
        path = out_dir / f"{name}{suffix}"
        tmp = out_dir / f".{name}{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, path)
        paths.append(path)
    return paths
