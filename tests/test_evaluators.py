"""The evaluator registry (``nbsrc.eval.evaluators.EVALUATORS``): a new evaluator is one function and one
registry line, picked by ``cfg.eval.evaluator``; None keeps each dataset's own (Recall@K, or Revisited
mAP for SfM-120k); an unknown name is a one-line error before anything is written."""

import json

import numpy as np
import pytest

from nbsrc.data import build_data
from nbsrc.errors import ConfigError, DatasetError
from nbsrc.eval import extract_embeddings
from nbsrc.eval.evaluators import EVALUATORS, Evaluator, evaluator_name
from nbsrc.experiment import run_experiment
from nbsrc.train import read_metrics


def test_the_dataset_picks_the_evaluator_unless_the_config_names_one(tiny_cfg):
    assert evaluator_name(tiny_cfg) == "recall"
    assert evaluator_name(tiny_cfg.replace(dataset="sfm120k")) == "revisited"
    assert evaluator_name(tiny_cfg.replace(evaluator="revisited")) == "revisited"
    assert tiny_cfg.eval.evaluator is None and tiny_cfg.to_dict()["eval"]["evaluator"] is None


def test_a_new_evaluator_is_one_function_and_one_registry_line(tiny_cfg, monkeypatch):
    """A toy evaluator (the mean cosine similarity of each query to the other queries of its class)
    runs through the whole runner by name, during and after training; it is gone once removed."""
    calls = {"during": 0}

    def mean_same_class_similarity(z, labels):
        s, same = z @ z.T, labels[:, None] == labels[None, :]
        np.fill_diagonal(same, False)
        return float(s[same].mean())

    def toy_evaluator(cfg, inputs):
        data = inputs.data

        def final(model, device, query_raw):
            z, labels, idx = extract_embeddings(model, data.query, 64, device, 0, False)
            return {"same_class_cos": mean_same_class_similarity(z, labels)}, {"toy_query": z, "toy_labels": labels}

        def during(model):
            calls["during"] += 1
            return {"toy_during": 1.0}

        return Evaluator(final, during)

    cfg = tiny_cfg.replace(name="toy_eval", evaluator="toy", iterations=4, eval_every=2, ckpt_every=0)
    with monkeypatch.context() as m:
        m.setitem(EVALUATORS, "toy", toy_evaluator)  # the one registry line
        res = run_experiment(cfg, mode="new")
    assert "toy" not in EVALUATORS

    saved = json.loads((res.run_dir / "results.json").read_text())
    assert "same_class_cos" in saved and not any(k.startswith("R@") for k in saved)
    arrays = res.embeddings()
    assert set(arrays) == {"toy_query", "toy_labels"}
    z, labels, _ = extract_embeddings(res.model, build_data(cfg, *_norm(res.model)).query, 64, "cpu", 0, False)
    np.testing.assert_array_equal(arrays["toy_query"], z)  # evaluated on the trained model
    assert saved["same_class_cos"] == pytest.approx(mean_same_class_similarity(z, labels), abs=1e-6)
    assert calls["during"] == 1  # eval_every=2 of 4 iterations: at step 2 (the end is the final evaluation)
    assert [r["toy_during"] for r in read_metrics(res.run_dir, "eval")] == [1.0]
    assert json.loads((res.run_dir / "config.json").read_text())["eval"]["evaluator"] == "toy"


def _norm(model):
    from nbsrc.models import data_config

    d = data_config(model)
    return d["mean"], d["std"]


def test_recall_by_name_is_the_default_evaluation(tiny_cfg):
    """``evaluator='recall'`` on a dataset of classes is what None gives: the same results.json."""
    off = tiny_cfg.replace(iterations=0, warmup_iters=0, memory_size=0)
    default = run_experiment(off.replace(name="default"), mode="new")
    named = run_experiment(off.replace(name="named", evaluator="recall"), mode="new")
    drop = {"seconds"}
    assert {k: v for k, v in default.results.items() if k not in drop} == \
           {k: v for k, v in named.results.items() if k not in drop}
    assert {"R@1", "R@2", "R@4", "R@8", "n_query"} <= set(default.results)
    a, b = default.embeddings(), named.embeddings()
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_an_unknown_evaluator_is_a_one_line_error_before_anything_is_written(tiny_cfg):
    cfg = tiny_cfg.replace(evaluator="no_such_evaluator")
    with pytest.raises(ConfigError, match=r"evaluator='no_such_evaluator' is invalid: expected one of recall, "
                                          r"revisited") as e:
        run_experiment(cfg, mode="new")
    assert "\n" not in str(e.value)
    assert not cfg.run_dir.exists()
    with pytest.raises(ConfigError, match="evaluator='' is invalid"):
        tiny_cfg.replace(evaluator="")


def test_an_evaluator_without_its_inputs_says_what_is_missing(tiny_cfg):
    """Revisited mAP on a dataset of classes needs the Revisited folders; nothing is written without them."""
    cfg = tiny_cfg.replace(evaluator="revisited")
    with pytest.raises(DatasetError, match="no Revisited dataset to evaluate on: pass roxford_root="):
        run_experiment(cfg, mode="new")
    assert not cfg.run_dir.exists()
