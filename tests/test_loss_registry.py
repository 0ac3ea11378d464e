"""A pair loss registers itself with its hyperparameters (nbsrc.losses.register_pair_loss): the config
takes the hyperparameter by name, checks it and saves it, the CLI has its flag, and a run trains with
it; nothing else in nbsrc names the loss (tests/toy_loss.py)."""

import importlib
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from nbsrc import config, losses
from nbsrc.config import ExperimentConfig
from nbsrc.errors import ConfigError


@pytest.fixture
def toy():
    """tests/toy_loss.py imported (registering loss 'toy'), and the registries as they were afterwards."""
    held = dict(losses.PAIR_LOSSES), dict(config.LOSS_HYPERPARAMETERS)
    sys.modules.pop("toy_loss", None)
    yield importlib.import_module("toy_loss")
    sys.modules.pop("toy_loss", None)
    for registry, before in zip((losses.PAIR_LOSSES, config.LOSS_HYPERPARAMETERS), held, strict=True):
        registry.clear()
        registry.update(before)


def test_the_toy_loss_matches_its_formula_pair_by_pair(toy):
    z, labels = F.normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1), torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.allclose(toy.toy_loss(z, labels, scale=2.0), toy.toy_reference(z, labels, 2.0))


def test_its_hyperparameter_is_a_field_by_name_saved_with_the_run(toy):
    cfg = ExperimentConfig.from_dict({"loss": "toy", "toy_scale": 2.0})
    assert cfg.loss.hyperparameters == {"toy_scale": 2.0} and cfg.value("toy_scale") == 2.0
    assert ExperimentConfig(loss="toy").value("toy_scale") == 1.0  # its declared default
    assert ExperimentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert ExperimentConfig.from_dict({"loss": {"name": "toy", "toy_scale": 2.0}}) == cfg  # in its section
    assert cfg.replace(toy_scale=3.0).value("toy_scale") == 3.0
    assert cfg.fingerprint()["hyperparameters"] == {"toy_scale": 2.0}
    assert "hyperparameters" not in ExperimentConfig(loss="toy").fingerprint()  # none given: names unchanged
    built = losses.build_loss(cfg, 4, [0, 1, 2])
    z, labels = F.normalize(torch.randn(6, 4), dim=-1), torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.allclose(built(z, labels)["toy"], toy.toy_loss(z, labels, scale=2.0))


def test_a_wrong_hyperparameter_is_a_one_line_error(toy):
    for given, message in [({"toy_scael": 2.0}, r"unknown parameter 'toy_scael' \(did you mean 'toy_scale'\?\)"),
                           ({"loss": {"name": "toy", "toy_scael": 2.0}}, r"unknown parameter 'loss.toy_scael'"),
                           ({"hyperparameters": {"toy_scael": 2.0}}, r"unknown loss hyperparameter 'toy_scael' "
                                                                     r"\(did you mean 'toy_scale'\?\)"),
                           ({"toy_scale": -1.0}, r"toy_scale=-1.0 is invalid: expected a positive number"),
                           ({"loss": "contrastive", "toy_scale": 2.0}, r"hyperparameter of loss toy, not of loss="
                                                                       r"'contrastive'")]:
        with pytest.raises(ConfigError, match=message) as err:
            ExperimentConfig.from_dict({"loss": "toy", **given})
        assert "\n" not in str(err.value)


def test_the_cli_has_its_flag_with_help(toy, capsys):
    from nbsrc.__main__ import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", "--loss", "toy", "--toy-scale", "2"]))
    assert cfg.value("toy_scale") == 2.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--toy-scale TOY_SCALE scale s of the toy loss (loss toy); paper: 2.0 (default: 1.0)" in text


def test_a_run_trains_with_it(toy, tiny_cfg):
    from nbsrc.experiment import run_experiment

    cfg = tiny_cfg.replace(loss="toy", toy_scale=2.0, lam=0.0, memory_size=0, iterations=3, log_every=1)
    run = run_experiment(cfg)
    rows = run.metrics("train")
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["toy"])) for r in rows)
    assert json.loads((cfg.run_dir / "config.json").read_text())["loss"]["hyperparameters"] == {"toy_scale": 2.0}


def test_the_architecture_page_shows_the_toy_loss_as_registered():
    from doc_blocks import ROOT, block

    shown = block("docs/architecture.md", "## Adding a loss", "python")
    assert " ".join(shown.split()) in " ".join((ROOT / "tests" / "toy_loss.py").read_text().split())


def test_registering_checks_names():
    with pytest.raises(ConfigError, match="registered twice"):
        losses.register_pair_loss("contrastive")(lambda feature_dim, classes: None)
    with pytest.raises(ConfigError, match="named like a config field"):
        losses.register_pair_loss("x", lr=losses.loss_hyperparameter(1.0, "a rate"))
    with pytest.raises(ConfigError, match="not a field of the loss section"):
        losses.register_pair_loss("x", "toy_scale")
    assert "x" not in losses.PAIR_LOSSES


def test_a_notebook_takes_its_hyperparameter_by_name(toy):
    """`nbsrc notebook 02_train.ipynb -p toy_scale 2` reaches the notebook's overrides, as a field does."""
    from nbsrc.paper.notebooks import NOTEBOOKS_DIR, check_parameters, fold_overrides

    nb = NOTEBOOKS_DIR / "02_train.ipynb"
    assert fold_overrides(nb, {"loss": "toy", "toy_scale": 2.0})["overrides"] == {"loss": "toy", "toy_scale": 2.0}
    check_parameters(nb, {"loss": "toy", "toy_scale": 2.0})
    with pytest.raises(ConfigError, match=r"unknown parameter 'toy_scal' .*did you mean 'toy_scale'"):
        check_parameters(nb, {"toy_scal": 2.0})
