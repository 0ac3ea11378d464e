"""The dataset registry (``nbsrc.data.DATASETS``): a new dataset is its module (``tests/toy_dataset.py``)
and one registry line; it then trains, is evaluated by its evaluator, is described by ``nbsrc eval`` and is
a choice of ``--dataset``. An unknown name is a one-line error before anything is written."""

import numpy as np
import pytest
import toy_dataset

from nbsrc.__main__ import describe_evaluation, field_choices
from nbsrc.config import config_fields
from nbsrc.data import DATASETS, DatasetSpec, build_data
from nbsrc.errors import ConfigError
from nbsrc.eval.evaluators import evaluator_name
from nbsrc.experiment import run_experiment


def test_a_new_dataset_is_one_module_and_one_registry_line(tiny_cfg, monkeypatch):
    monkeypatch.setitem(DATASETS, "toy", DatasetSpec(toy_dataset.build))  # the one registry line
    cfg = tiny_cfg.replace(name="toy_data", dataset="toy", train_classes="0-3", test_classes="4-7",
                           iterations=2, log_every=1, eval_per_class=None)
    data = build_data(cfg)
    assert sorted(np.unique(data.train.labels)) == [0, 1, 2, 3] and sorted(np.unique(data.query.labels)) == [4, 5, 6, 7]
    assert len(data.query) == 4 * toy_dataset.PER_CLASS
    assert evaluator_name(cfg) == "recall"
    dataset_field = next(f for f in config_fields() if f.name == "dataset")
    assert "toy" in field_choices(dataset_field)
    res = run_experiment(cfg, mode="new")
    assert [r["iteration"] for r in res.metrics("train")] == [1, 2]
    assert res.results["n_query"] == 4 * toy_dataset.PER_CLASS
    assert 0 <= res.results["R@1"] <= 100
    assert "evaluated on toy classes 4-7 (all images per class" in describe_evaluation(cfg, res.results)


def test_an_unknown_dataset_is_an_error_before_anything_is_written(tiny_cfg):
    cfg = tiny_cfg.replace(dataset="imagenet")
    with pytest.raises(ConfigError, match="dataset='imagenet' is invalid: expected one of fashion_mnist, digits"):
        run_experiment(cfg, mode="new")
    assert not cfg.run_dir.exists()


def test_each_dataset_names_a_registered_evaluator_and_sfm120k_is_particular_object():
    from nbsrc.eval.evaluators import EVALUATORS

    assert all(spec.evaluator in EVALUATORS for spec in DATASETS.values())
    assert [n for n, spec in DATASETS.items() if spec.particular] == ["sfm120k"]
    assert DATASETS["sfm120k"].evaluator == "revisited" and DATASETS["sfm120k"].build is None
