"""Notebook parameters and command-line errors, in process: each bad value is
one line naming the parameter, before a kernel starts; an error inside a notebook is one line."""

from __future__ import annotations

import math

import pytest

from nbsrc.errors import ConfigError, NbsrcError
from nbsrc.paper.notebooks import NOTEBOOKS_DIR, check_parameters, parse_parameters, run_notebook

NB = NOTEBOOKS_DIR / "02_train.ipynb"


@pytest.mark.parametrize("text, value", [
    ("300", 300), ("1e-3", 1e-3), ("none", None), ("null", None), ("None", None), ("[0, 1, 2]", [0, 1, 2]),
    ("NaN", "nan"), ("abc", "abc"),
])
def test_command_line_values(text, value):
    (got,) = parse_parameters(NB, [("iterations", text)]).values()
    assert (math.isnan(got) if value == "nan" else got == value and type(got) is type(value))


def test_a_string_parameter_keeps_the_text():
    assert parse_parameters(NB, [("weights", "none"), ("backbone", "123")]) == {"weights": "none", "backbone": "123"}


@pytest.mark.parametrize("params", [{"iterations": 10}, {"lr": 1}, {"lr": 0.5}, {"patch_size": None}, {"dim": 8},
                                    {"dim": None}, {"seeds": [0, 1]}, {"weights": "runs/x"}])
def test_parameters_of_the_declared_type_pass(params):
    check_parameters(NB, params)


@pytest.mark.parametrize("params, says", [
    ({"iterations": "abc"}, "parameter iterations='abc' of 02_train.ipynb is invalid: expected an integer, like the "
                            "config's default 1000"),
    ({"iterations": 1.5}, "iterations=1.5 .* expected an integer"),
    ({"iterations": True}, "iterations=True .* expected an integer"),
    ({"iterations": None}, "iterations=None .* expected an integer"),
    ({"lr": float("nan")}, "lr=nan .* expected a finite number, like the config's default 3e-05"),
    ({"lr": "inf"}, "lr='inf' .* expected a finite number"),
    ({"weights": 5}, "weights=5 .* expected a string"),
    ({"lams": [0.3]}, "unknown parameter 'lams' for 02_train.ipynb \\(did you mean 'lam'\\?\\)"),
])
def test_parameters_of_another_type_are_one_line_errors(params, says):
    with pytest.raises(ConfigError, match=says) as err:
        check_parameters(NB, params)
    assert "\n" not in str(err.value)


def test_an_error_inside_a_notebook_is_one_line(tmp_path, monkeypatch):
    import papermill as pm

    def fails(*a, **k):
        raise pm.PapermillExecutionError(3, 4, "cfg = ...", "ConfigError", "patch_size=None does not\ntile img_size=28",
                                         ["Traceback ...", "ConfigError: ..."])

    monkeypatch.setattr(pm, "execute_notebook", fails)
    with pytest.raises(NbsrcError) as err:
        run_notebook(NB, {"iterations": 2}, tmp_path / "out.ipynb", kernel="python3")
    assert str(err.value) == (f"02_train.ipynb stopped in cell 4: ConfigError: patch_size=None does not tile "
                              f"img_size=28 (the whole traceback is in {tmp_path / 'out.ipynb'})")


def test_a_bad_command_line_is_one_line(capsys):
    from nbsrc.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--iterations", "abc"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: argument --iterations: invalid int value: 'abc'; "
                                       "see `python -m nbsrc train --help`\n")


def test_an_unwritable_runs_directory_is_one_line(tmp_path, capsys):
    from nbsrc.__main__ import main

    (tmp_path / "afile").write_text("")
    rc = main(["train", "--runs-dir", str(tmp_path / "afile"), "--dataset", "digits", "--img-size", "8",
               "--patch-size", "4", "--iterations", "1", "--batch-size", "8", "--m-per-class", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("error: runs directory") and f"{tmp_path / 'afile'} is a file, not a folder" in err
