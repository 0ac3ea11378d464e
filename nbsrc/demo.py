"""``make demo``: run the notebooks in order through papermill on Fashion-MNIST, then print the
Recall@K table of IRT_O, IRT_L and IRT_R.

Never silent: each notebook is announced with a start line and an end line with its elapsed time, and
in between its cells' outputs, training progress included, are printed as plain lines (``  | ...``;
:func:`nbsrc.notebook.run_notebook` with ``show_progress``)."""

from __future__ import annotations

import time
from pathlib import Path

from nbsrc.notebook import NOTEBOOKS_DIR, run_notebook

TABLE = Path("figures") / "table3_irt.md"
# Tiny parameters for the smoke run (CI): each notebook finishes in well under a minute.
QUICK = {
    "runs_dir": "runs/quick", "figures_dir": "runs/quick/figures", "iterations": 4, "eval_per_class": 20,
    "batch_size": 32, "m_per_class": 8, "memory_size": 64, "warmup_iters": 0, "seeds": [0, 1],
}


def notebooks() -> list[Path]:
    return sorted(p for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def run_demo(quick: bool = False, notebooks_to_run: list[str] | None = None, out_dir: str | Path = "runs/notebooks") -> None:
    from nbsrc.notebook import notebook_parameters

    t0 = time.perf_counter()
    for nb in notebooks():
        if notebooks_to_run and nb.name not in notebooks_to_run:
            continue
        declared = notebook_parameters(nb)
        params = {k: v for k, v in QUICK.items() if k in declared} if quick else {}
        t = time.perf_counter()
        print(f"== {nb.name}: started at {time.strftime('%H:%M:%S')}", flush=True)
        out = run_notebook(nb, params, Path(out_dir) / ("quick" if quick else "") / nb.name, show_progress=True)
        print(f"== {nb.name}: done in {time.perf_counter() - t:.0f} s -> {out}", flush=True)
    table = Path(QUICK["figures_dir"]) / TABLE.name if quick else TABLE
    print(f"\nDemo finished in {(time.perf_counter() - t0) / 60:.1f} min. Recall@K (%) on the unseen classes:\n")
    print(table.read_text() if table.exists() else f"(no table: {table} was not written)")
