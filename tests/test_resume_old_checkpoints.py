"""A checkpoint written before the loss registry (its criterion state as ``classes`` and
``proxy_loss.*``, now ``term.classes`` and ``term.proxy.*``, nothing for a loss without parameters)
resumes exactly as an uninterrupted run; a loss state that fits no layout is a one-line error."""

import pytest
import torch

from nbsrc.config import ExperimentConfig, parse_classes
from nbsrc.errors import RunDirError
from nbsrc.experiment import run_experiment
from nbsrc.losses import build_loss, current_criterion_state
from nbsrc.train import read_metrics
from nbsrc.train.checkpoint import LATEST


def old_style(criterion_state: dict, train_classes) -> dict:
    """The criterion state as nbsrc wrote it before the registry (240d580^): the classes buffer on
    the criterion itself, for every loss, and the proxy module under ``proxy_loss``."""
    out = {"classes": torch.as_tensor(sorted(train_classes), dtype=torch.long)}
    for key, value in criterion_state.items():
        if key.startswith("term.proxy."):
            out["proxy_loss." + key[len("term.proxy."):]] = value
        elif key != "term.classes":
            raise AssertionError(f"unexpected key {key}")
    return out


@pytest.mark.parametrize("loss", ["nsoftmax", "arcface", "contrastive"])
def test_an_old_checkpoint_resumes_exactly(tiny_cfg, loss):
    cfg = tiny_cfg.replace(loss=loss, iterations=4, log_every=1, ckpt_every=2, memory_size=0, lam=0.0,
                           device="cpu")
    full = run_experiment(cfg.replace(name="full"), mode="new", stop_after=4)
    part = cfg.replace(name="part")
    run_experiment(part, mode="new", stop_after=2)
    path = part.run_dir / LATEST
    state = torch.load(path, weights_only=False)
    assert state["iteration"] == 2
    state["criterion"] = old_style(state["criterion"], parse_classes(cfg.data.train_classes))
    assert ("proxy_loss.weight" in state["criterion"]) == (loss != "contrastive")
    torch.save(state, path)

    resumed = run_experiment(part, mode="resume", stop_after=4)
    a = torch.load(full.run_dir / LATEST, weights_only=False)
    b = torch.load(resumed.run_dir / LATEST, weights_only=False)
    assert a["iteration"] == b["iteration"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["criterion"].keys() == b["criterion"].keys()  # written back in today's keys
    assert all(torch.equal(a["criterion"][k], b["criterion"][k]) for k in a["criterion"])
    assert [r["total"] for r in read_metrics(full.run_dir, "train")] == \
        [r["total"] for r in read_metrics(resumed.run_dir, "train")]


def test_todays_keys_pass_unchanged_and_old_classes_go_where_they_are_kept():
    proxy = build_loss(ExperimentConfig(loss="nsoftmax"), 6, [1, 3])
    today = proxy.state_dict()
    assert set(today) == {"term.classes", "term.proxy.weight"}
    assert current_criterion_state(today, today) is today
    old = {"classes": torch.tensor([1, 3]), "proxy_loss.weight": torch.ones(2, 6)}
    assert set(current_criterion_state(old, today)) == {"term.classes", "term.proxy.weight"}
    contrastive = build_loss(ExperimentConfig(), 6, [1, 3])
    assert current_criterion_state({"classes": torch.tensor([1, 3])}, contrastive.state_dict()) == {}


def test_a_loss_state_of_another_loss_is_a_one_line_error():
    proxy = build_loss(ExperimentConfig(loss="nsoftmax"), 6, [1, 3])
    with pytest.raises(RunDirError, match=r"does not fit loss 'nsoftmax' \(missing: term.classes, term.proxy.weight; "
                                          r"unexpected: none\).*--overwrite") as e:
        proxy.load_state_dict({})
    assert "\n" not in str(e.value)
    with pytest.raises(RunDirError, match=r"term.proxy.weight has shape \(3, 6\), loss 'nsoftmax' expects \(2, 6\)"):
        proxy.load_state_dict({"term.classes": torch.tensor([1, 3]), "term.proxy.weight": torch.ones(3, 6)})
    contrastive = build_loss(ExperimentConfig(), 6, [1, 3])
    with pytest.raises(RunDirError, match=r"unexpected: term.proxy.weight"):
        contrastive.load_state_dict({"term.proxy.weight": torch.ones(2, 6)})
