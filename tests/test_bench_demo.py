"""`python -m bench demo`: the demo's time split, read from a log and run directories written here
(no run is trained)."""

import datetime as dt
import json
import os

import pytest

from bench.demo import demo_time_split, parse_demo_log, train_seconds
from nbsrc.errors import ConfigError

LOG = """== 01_off_the_shelf.ipynb: started at 23:58:00
  | some output
== 01_off_the_shelf.ipynb: done in 60 s -> runs/notebooks/01_off_the_shelf.ipynb
== 02_train.ipynb: started at 23:59:00
== 02_train.ipynb: done in 300 s -> runs/notebooks/02_train.ipynb
"""


def test_log_times_cross_midnight():
    end = dt.datetime(2026, 11, 30, 0, 4, 5)
    rows = parse_demo_log(LOG, end)
    assert [r["notebook"] for r in rows] == ["01_off_the_shelf.ipynb", "02_train.ipynb"]
    assert rows[0]["start"] == dt.datetime(2026, 11, 29, 23, 58)
    assert rows[1]["start"] == dt.datetime(2026, 11, 29, 23, 59)
    assert [r["seconds"] for r in rows] == [60, 300]
    with pytest.raises(ConfigError, match="done in N s"):
        parse_demo_log("nothing here", end)


def _run(root, name, finished, seconds, iterations, batch, rows):
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"iterations": iterations, "batch_size": batch}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "results.json").write_text(json.dumps({"seconds": seconds}))
    t = finished.timestamp()
    os.utime(d / "results.json", (t, t))


def test_time_split_per_notebook(tmp_path):
    # 20 iterations of 10 images: 10 at 50 img/s (2 s) + 10 at 25 img/s (4 s) = 6 s of training
    rows = [{"kind": "train", "iteration": 10, "img_per_s": 50.0}, {"kind": "eval", "iteration": 10},
            {"kind": "train", "iteration": 20, "img_per_s": 25.0}]
    assert train_seconds(tmp_path / "missing.jsonl", 10) == 0.0
    _run(tmp_path, "irt_o", dt.datetime(2026, 11, 29, 23, 58, 30), 20.0, 0, 10, [])
    _run(tmp_path, "irt_l", dt.datetime(2026, 11, 30, 0, 1), 50.0, 20, 10, rows)
    _run(tmp_path, "old", dt.datetime(2026, 11, 20), 99.0, 20, 10, rows)  # reused, from an earlier demo
    assert train_seconds(tmp_path / "irt_l" / "metrics.jsonl", 10) == pytest.approx(6.0)
    split = demo_time_split(LOG, dt.datetime(2026, 11, 30, 0, 4, 5), tmp_path)
    assert split[0] == {"notebook": "01_off_the_shelf.ipynb", "seconds": 60, "runs": 1, "train_s": 0,
                        "pca_eval_s": 20, "runs_summed_s": 20, "rest_s": 40, "run_names": ["irt_o"]}
    assert split[1]["run_names"] == ["irt_l"]
    assert (split[1]["train_s"], split[1]["pca_eval_s"], split[1]["rest_s"]) == (6, 44, 250)


def test_runs_trained_at_once_count_once(tmp_path):
    """Two runs of 50 s each that overlap by 30 s cover 70 s of the notebook, not 100 s."""
    from bench.demo import covered_seconds

    assert covered_seconds([(0, 10), (5, 20), (30, 40), (32, 35)]) == 30
    assert covered_seconds([]) == 0
    rows = [{"kind": "train", "iteration": 20, "img_per_s": 10.0}]  # 200 images at 10 img/s: 20 s of training
    _run(tmp_path, "a", dt.datetime(2026, 11, 30, 0, 1), 50.0, 20, 10, rows)
    _run(tmp_path, "b", dt.datetime(2026, 11, 30, 0, 1, 20), 50.0, 20, 10, rows)
    row = demo_time_split(LOG, dt.datetime(2026, 11, 30, 0, 4, 5), tmp_path)[1]
    assert row["run_names"] == ["a", "b"] and row["runs_summed_s"] == 100
    assert (row["train_s"], row["pca_eval_s"], row["rest_s"]) == (28, 42, 300 - 70)  # 70 s covered, 40 % training


def test_cli_writes_its_section(tmp_path):
    from bench.__main__ import main

    log = tmp_path / "demo.log"
    log.write_text(LOG)
    end = dt.datetime(2026, 11, 30, 0, 4, 5).timestamp()
    os.utime(log, (end, end))
    (tmp_path / "runs").mkdir()
    out = tmp_path / "RESULTS.md"
    assert main(["demo", "--log", str(log), "--runs", str(tmp_path / "runs"), "--results", str(out)]) == 0
    text = out.read_text()
    assert "<!-- bench:demo -->" in text and "| **total** | **6.0** | 0 |" in text
    assert main(["demo", "--log", str(tmp_path / "nope.log"), "--runs", str(tmp_path)]) == 2
