"""Partial and damaged files in a run directory: a partial last metrics line is
dropped on resume and said in one line; a damaged config.json, results.json or metrics line is a
one-line error naming the file; two ``--overwrite`` in the same second get distinct backups."""

from __future__ import annotations

import json

import pytest

from nbsrc.config import ExperimentConfig
from nbsrc.errors import RunDirError
from nbsrc.train import rundir
from nbsrc.train.rundir import (
    load_results,
    load_run_config,
    move_aside,
    prepare_run_dir,
    read_metrics,
    truncate_metrics,
)

ROWS = [{"kind": "train", "iteration": i, "loss": 1.0 / i} for i in (1, 2, 3)]


def _metrics(tmp_path, tail: bytes) -> None:
    (tmp_path / "metrics.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in ROWS) + tail)


@pytest.mark.parametrize("tail", [b'{"kind": "train", "itera', b'{"kind": "tr\xc3', b"{"])
def test_a_partial_last_metrics_line_is_dropped_on_resume_and_said(tmp_path, capsys, tail):
    _metrics(tmp_path, tail)
    assert read_metrics(tmp_path) == ROWS  # reading leaves it out, silently (it may be being written)
    truncate_metrics(tmp_path, after_iteration=2)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"dropped the partial last line of {tmp_path / 'metrics.jsonl'} (left by an interrupted "
                           "write)")
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in ROWS[:2])


def test_a_complete_last_row_without_newline_is_kept(tmp_path, capsys):
    _metrics(tmp_path, json.dumps({"kind": "eval", "iteration": 3}).encode())
    assert read_metrics(tmp_path, "eval") == [{"kind": "eval", "iteration": 3}]
    truncate_metrics(tmp_path, after_iteration=3)
    assert capsys.readouterr().out == "" and len(read_metrics(tmp_path)) == 4


def test_a_damaged_metrics_line_before_the_last_names_the_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(ROWS[0]) + "\n{garbage\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(RunDirError, match=rf"{tmp_path / 'metrics.jsonl'}, line 2 is damaged, not a JSON row"):
        read_metrics(tmp_path)


@pytest.mark.parametrize("text, why", [('{"name": "x",', "line 1, column 14"), ("", "line 1, column 1"),
                                       ("\xff\xfe", "not valid JSON")])
def test_a_damaged_config_json_is_a_one_line_error_naming_it(tmp_path, text, why):
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(RunDirError) as err:
        load_run_config(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path} is damaged, not valid JSON (") and why in msg
    assert msg.endswith("restore it, or start the run again with --overwrite (the old directory is moved aside)")


def test_a_config_json_this_version_cannot_read_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(RunDirError, match=rf"{path} holds a JSON list, not a config"):
        load_run_config(path)
    path.write_text(json.dumps({**ExperimentConfig().to_dict(), "lr_typo": 1}))
    with pytest.raises(RunDirError, match=rf"{path} is not a usable config \(unknown parameter 'lr_typo'"):
        load_run_config(path)


def test_a_damaged_results_json_names_the_file_and_the_way_out(tmp_path):
    (tmp_path / "results.json").write_text('{"R@1": 5')
    with pytest.raises(RunDirError, match=r"results\.json is damaged, not valid JSON \(line 1, column 10.*"
                                          r"run the same command with --resume to evaluate the last checkpoint"):
        load_results(tmp_path)


def test_resume_of_a_run_with_a_damaged_config_is_a_one_line_error(tiny_cfg):
    run = tiny_cfg.run_dir
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"x")
    (run / "config.json").write_text('{"name": "tiny"')
    with pytest.raises(RunDirError, match=rf"{run / 'config.json'} is damaged"):
        prepare_run_dir(tiny_cfg, "resume")


def test_two_overwrites_in_the_same_second_get_distinct_backups(tiny_cfg, monkeypatch, capsys):
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20261129-120000")
    run = tiny_cfg.run_dir
    for generation in ("first", "second", "third"):
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({"generation": generation}))
        (run / "config.json").write_text(json.dumps(tiny_cfg.to_dict()))
        prepare_run_dir(tiny_cfg, "overwrite")
        (run / "config.json").unlink()
        run.rmdir()
    base = run.with_name("tiny.old-20261129-120000")
    backups = {p.name: json.loads((p / "results.json").read_text())["generation"] for p in run.parent.iterdir()
               if p.is_dir()}  # not the run's lock file, .tiny.lock, which this process holds
    assert backups == {base.name: "first", f"{base.name}-2": "second", f"{base.name}-3": "third"}
    assert capsys.readouterr().out.splitlines()[1] == f"moved the existing {run} to {base}-2"


def test_a_backup_name_reserved_by_another_process_is_not_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "T")
    (tmp_path / "x.old-T").mkdir()  # another --overwrite reserved it and is about to rename into it
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text("{}")
    assert move_aside(tmp_path / "x") == tmp_path / "x.old-T-2"
    assert not any((tmp_path / "x.old-T").iterdir()) and (tmp_path / "x.old-T-2" / "results.json").exists()
    with pytest.raises(RunDirError, match="disappeared while it was being moved aside"):
        move_aside(tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.old-T", "x.old-T-2"]
