"""The one loop and its registries: the learning-rate schedule (linear warm-up, then cosine decay), the
cross-batch memory's warm-up (``memory_start``, as XBM starts its memory only once the features drift
slowly), and a loss added by one function and one registry line."""

import pytest
import torch

from nbsrc.experiment import run_experiment
from nbsrc.train import build_optimizer, lr_factor, read_metrics


def _weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)


@pytest.fixture
def cfg(tiny_cfg):
    return tiny_cfg.replace(iterations=6, log_every=1, ckpt_every=0, memory_size=64, memory_start=3, lam=0.0,
                            device="cpu")


def test_schedule_warms_up_linearly_then_decays_by_a_cosine_to_min_lr_factor(tiny_cfg):
    """DToP §A.1: SGD with momentum 0.9, linear warm-up, cosine decay to ``lr · 1e-4``."""
    cfg = tiny_cfg.replace(iterations=50, warmup_iters=10, scheduler="cosine", min_lr_factor=1e-4)
    assert lr_factor(cfg, 0) == pytest.approx(1 / 10)  # the first step uses lr / T_w
    assert lr_factor(cfg, 9) == pytest.approx(1.0) and lr_factor(cfg, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 30) == pytest.approx(1e-4 + (1 - 1e-4) * 0.5)  # half-way through the cosine
    assert lr_factor(cfg, 50) == pytest.approx(1e-4) and lr_factor(cfg, 80) == pytest.approx(1e-4)
    factors = [lr_factor(cfg, t) for t in range(10, 51)]
    # strictly decreasing after the warm-up (consecutive pairs, hence strict=False)
    assert all(a > b for a, b in zip(factors, factors[1:], strict=False))
    assert lr_factor(cfg.replace(scheduler="constant"), 30) == 1.0
    opt = build_optimizer(cfg.replace(optimizer="sgd"), [torch.nn.Parameter(torch.zeros(3))])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9


def test_the_losss_own_parameters_train_at_their_multiple_of_the_learning_rate(cfg):
    net, head = [torch.nn.Parameter(torch.zeros(3))], [torch.nn.Parameter(torch.zeros(2))]
    one = build_optimizer(cfg, net, head)
    assert len(one.param_groups) == 1 and len(one.param_groups[0]["params"]) == 2
    two = build_optimizer(cfg.replace(loss_lr_mult=100.0), net, head)
    assert [g["lr"] for g in two.param_groups] == pytest.approx([cfg.optim.lr, 100 * cfg.optim.lr])
    assert two.param_groups[1]["params"] == head
    # a proxy loss's run: the schedule scales both groups, the head keeping its multiple
    run = run_experiment(cfg.replace(name="mult", loss="nsoftmax", memory_size=0, loss_lr_mult=10.0), mode="new")
    state = torch.load(run.run_dir / "checkpoint.pt", weights_only=True)
    lrs = [g["lr"] for g in state["optimizer"]["param_groups"]]
    assert lrs[1] == pytest.approx(10 * lrs[0])


def test_a_run_steps_the_learning_rate_by_the_schedule(cfg):
    """The ``lr`` a run logs after step ``t`` is the one step ``t + 1`` uses: ``lr · lr_factor(t)``."""
    run = run_experiment(cfg.replace(name="lr", warmup_iters=2, min_lr_factor=0.1, memory_size=0), mode="new")
    rows = read_metrics(run.run_dir, "train")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
    c = run.config
    assert [r["lr"] for r in rows] == pytest.approx([c.optim.lr * lr_factor(c, r["iteration"]) for r in rows])
    assert rows[0]["lr"] == pytest.approx(c.optim.lr)  # warm-up over: 2 of 2 steps done
    assert rows[-1]["lr"] == pytest.approx(0.1 * c.optim.lr)  # the end of the cosine


def test_no_memory_term_before_memory_start(cfg):
    with_memory = run_experiment(cfg.replace(name="warm"), mode="new")
    without = run_experiment(cfg.replace(name="off", memory_size=0, memory_start=0), mode="new")
    from_start = run_experiment(cfg.replace(name="on", memory_start=0), mode="new")
    rows = {k: [r["total"] for r in read_metrics(r.run_dir, "train")] for k, r in
            {"warm": with_memory, "off": without, "on": from_start}.items()}
    # steps 0-2: no memory; step 3 reads the memory before anything is enqueued (empty), then fills it
    assert rows["warm"][:4] == rows["off"][:4]
    assert rows["warm"][4:] != rows["off"][4:]  # from step 4 on the memory adds batch x memory pairs
    assert rows["on"][1] != rows["off"][1]  # memory_start=0: the memory is used from the second step
    memory = _weights(with_memory.run_dir)["memory"]
    assert memory["filled"] == 3 * cfg.optim.batch_size  # filled at steps 3, 4 and 5 only


def test_resume_across_memory_start_equals_an_uninterrupted_run(cfg):
    full = run_experiment(cfg.replace(name="full"), mode="new")
    part = cfg.replace(name="part", ckpt_every=2)
    run_experiment(part, mode="new", stop_after=2)  # killed before the memory starts
    assert _weights(part.run_dir)["iteration"] == 2 and _weights(part.run_dir)["memory"]["filled"] == 0
    resumed = run_experiment(part, mode="resume")
    a, b = _weights(full.run_dir), _weights(resumed.run_dir)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["memory"]["embeddings"], b["memory"]["embeddings"])
    assert [r["total"] for r in read_metrics(full.run_dir, "train")] == \
        [r["total"] for r in read_metrics(resumed.run_dir, "train")]


def test_memory_start_must_not_be_negative(cfg):
    from nbsrc.errors import ConfigError

    with pytest.raises(ConfigError, match="memory_start=-1"):
        cfg.replace(memory_start=-1)


def test_a_new_loss_is_one_function_and_one_registry_line(tiny_cfg, monkeypatch):
    """A toy loss (mean squared distance of positive pairs, hinge on negatives) trains through the
    whole runner, by name, with nothing else changed."""
    from nbsrc import losses

    def toy_loss(cfg, feature_dim, classes):
        def term(z, labels, ref_emb=None, ref_labels=None, indices=None, ref_indices=None):
            d = torch.cdist(z, z) ** 2
            same = labels[:, None] == labels[None, :]
            return d[same].mean() + torch.relu(1.0 - d[~same]).mean()
        return term

    monkeypatch.setitem(losses.PAIR_LOSSES, "toy", toy_loss)  # the one registry line
    res = run_experiment(tiny_cfg.replace(name="toy", loss="toy", iterations=2, log_every=1, memory_size=0),
                         mode="new")
    rows = res.metrics("train")
    assert [r["iteration"] for r in rows] == [1, 2] and "toy" in rows[0]
    assert rows[0]["total"] == pytest.approx(rows[0]["toy"] + 0.5 * rows[0]["koleo"], rel=1e-5)
    assert 0 <= res.results["R@1"] <= 100


def test_an_unknown_loss_is_an_error_before_anything_is_written(tiny_cfg):
    from nbsrc.errors import ConfigError

    cfg = tiny_cfg.replace(loss="no_such_loss")
    with pytest.raises(ConfigError, match="loss='no_such_loss' is invalid: expected one of arcface, contrastive"):
        run_experiment(cfg, mode="new")
    assert not cfg.run_dir.exists()
