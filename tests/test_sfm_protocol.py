"""The SfM-120k protocol of IRT §4.2 on cirtorch: the distance-form contrastive loss against a slow
loop written from the formula, the per-epoch exp(−0.01) lr decay, frozen BatchNorm, and the
config fields that select them."""

import math

import pytest
import torch
from torch import nn

from nbsrc.config import ExperimentConfig
from nbsrc.errors import ConfigError
from nbsrc.losses.tuples import distance_contrastive_loss, tuple_contrastive_loss, tuple_loss, tuple_loss_terms
from nbsrc.train.bn_freeze_epoch_decay import epoch_lr_decay, freeze_batchnorm, train_mode
from nbsrc.train.tuple_task import check_tuple_config


def distance_reference(z, tuple_size, margin, eps=1e-6):
    """Σ_t [½ d(q, p)² + Σ_k ½ max(0, margin − d(q, n_k))²], d(a, b) = ‖a − b + eps‖, a loop."""
    z = [v / v.norm() for v in z.double()]
    total = 0.0
    for t in range(0, len(z), tuple_size):
        q = z[t]
        for j in range(1, tuple_size):
            d = math.sqrt(sum((float(a) - float(b) + eps) ** 2 for a, b in zip(q, z[t + j], strict=True)))
            total += 0.5 * d**2 if j == 1 else 0.5 * max(0.0, margin - d) ** 2
    return total


@pytest.mark.parametrize("margin", [0.3, 0.85, 1.4])
def test_distance_loss_matches_the_loop(margin):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(5 * 7, 6, generator=g, dtype=torch.float64)
    got = float(distance_contrastive_loss(z, 7, margin))
    assert got == pytest.approx(distance_reference(z, 7, margin), rel=1e-10)
    per = distance_contrastive_loss(z, 7, margin, reduce=False)
    assert per.shape == (5,)
    assert float(per[2]) == pytest.approx(distance_reference(z[14:21], 7, margin), rel=1e-10)
    assert float(per.sum()) == pytest.approx(got, rel=1e-12)  # summed over the tuples, not averaged


def test_distance_loss_hand_computed():
    """q = p, one negative equal to q (d = 0: ½·0.85²), one orthogonal (d = √2 > 0.85: 0), one at
    cosine 0.7 (d = √0.6 ≈ 0.775 < 0.85: active here, inactive under eq. 1 with β = 0.85)."""
    e = torch.eye(3, dtype=torch.float64)
    n3 = 0.7 * e[0] + math.sqrt(1 - 0.49) * e[1]
    z = torch.stack([e[0], e[0], e[0], e[2], n3])
    expected = 0.5 * 0.85**2 + 0.5 * (0.85 - math.sqrt(0.6)) ** 2
    assert float(distance_contrastive_loss(z, 5, 0.85, eps=0.0)) == pytest.approx(expected, abs=1e-12)
    assert float(tuple_contrastive_loss(z, 5, 0.85)) == pytest.approx(0.15, abs=1e-12)  # eq. 1: only n = q counts


def test_tuple_loss_forms_and_default():
    z = torch.randn(14, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tuple_loss(z, 7, 0.85), distance_contrastive_loss(z, 7, 0.85))
    assert torch.equal(tuple_loss(z, 7, 0.85, "eq1"), tuple_contrastive_loss(z, 7, 0.85))
    idx = torch.arange(14)
    assert torch.equal(tuple_loss_terms(z, idx, 7, 0.85, 0.0)["contrastive"], distance_contrastive_loss(z, 7, 0.85))
    assert ExperimentConfig().loss.tuple_loss == "distance"
    with pytest.raises(ConfigError, match="tuple_loss='cosine' is invalid"):
        tuple_loss(z, 7, 0.85, "cosine")
    with pytest.raises(ConfigError, match="whole tuples of 7"):
        distance_contrastive_loss(torch.randn(10, 4), 7)


def test_distance_loss_gradient_is_finite_at_zero_distance():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    distance_contrastive_loss(z, 3, 0.85).backward()
    assert torch.isfinite(z.grad).all()


def test_epoch_lr_decay():
    assert epoch_lr_decay(0, 400) == 1.0 and epoch_lr_decay(399, 400) == 1.0
    assert epoch_lr_decay(400, 400) == pytest.approx(math.exp(-0.01))
    assert epoch_lr_decay(99 * 400, 400) == pytest.approx(math.exp(-0.99))  # the 100th epoch
    assert epoch_lr_decay(12345, 400, 0.0) == 1.0
    with pytest.raises(ConfigError, match="steps_per_epoch=0"):
        epoch_lr_decay(1, 0)


def test_frozen_batchnorm_keeps_its_running_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2),
                          nn.Dropout(0.5))
    before = model[1].running_mean.clone()
    train_mode(model, frozen_batchnorm=True)
    assert not model[1].training and model[0].training and model[5].training
    model(torch.randn(2, 3, 8, 8))
    assert torch.equal(model[1].running_mean, before)
    train_mode(model, frozen_batchnorm=False)
    assert model[1].training
    model(torch.randn(2, 3, 8, 8))
    assert not torch.equal(model[1].running_mean, before)
    assert freeze_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))) == 0  # a ViT has none


def test_protocol_config_fields():
    cfg = ExperimentConfig()
    assert (cfg.optim.lr_decay_per_epoch, cfg.optim.freeze_batchnorm, cfg.eval.eval_scales, cfg.eval.whitening) == \
        (0.0, False, None, None)
    c = ExperimentConfig.from_dict({"eval_scales": [1, 0.5], "whitening": "learned", "lr_decay_per_epoch": 0.01})
    assert c.eval.eval_scales == [1.0, 0.5] and ExperimentConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="tuple_loss='cos' is invalid"):  # the registry's check, at build
        check_tuple_config(ExperimentConfig(tuple_loss="cos"))
    for bad, match in [({"lr_decay_per_epoch": -1}, "lr_decay_per_epoch=-1 is invalid"),
                       ({"eval_scales": []}, "eval_scales=\\[\\] is invalid"),
                       ({"eval_scales": [1, 0]}, "eval_scales"),
                       ({"whitening": "pca"}, "whitening='pca' is invalid")]:
        with pytest.raises(ConfigError, match=match):
            ExperimentConfig.from_dict(bad)
