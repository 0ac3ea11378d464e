"""ArcFace (DToP §A.1) against a per-sample reference written from the formula, a hand-computed
case, and pytorch-metric-learning's ArcFaceLoss (margin in degrees there)."""

import math

import pytest
import torch

from nbsrc.errors import ConfigError
from nbsrc.losses.arcface import ArcFaceLoss


def arcface_reference(z, w, labels, m, s):
    """L = −1/N Σ_i log softmax(s·[φ(θ_{i,y_i}) at y_i, cos θ_ic elsewhere])_{y_i}, one sample at a time,
    with φ(θ) = cos(θ + m) for θ ≤ π − m and cos θ − m sin m beyond."""
    total = 0.0
    for i in range(len(z)):
        zi = z[i] / z[i].norm()
        logits = []
        for c in range(len(w)):
            cos = (zi @ (w[c] / w[c].norm())).clamp(-1 + 1e-7, 1 - 1e-7)
            if c == int(labels[i]):
                theta = torch.acos(cos)
                cos = torch.cos(theta + m) if theta <= math.pi - m else cos - m * math.sin(m)
            logits.append(s * cos)
        logits = torch.stack(logits)
        total = total - (logits[int(labels[i])] - torch.logsumexp(logits, 0))
    return total / len(z)


@pytest.mark.parametrize("m,s", [(0.15, 30.0), (0.5, 10.0), (0.0, 1.0)])
def test_value_and_gradient_match_the_reference(m, s):
    g = torch.Generator().manual_seed(0)
    loss = ArcFaceLoss(5, 4, margin=m, scale=s).double()
    z = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (9,), generator=g)
    got = loss(z, y)
    w = loss.weight.detach().clone().requires_grad_(True)
    ref = arcface_reference(z, w, y, m, s)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    gz, gw = torch.autograd.grad(got, [z, loss.weight])
    rz, rw = torch.autograd.grad(ref, [z, w])
    assert torch.allclose(gz.double(), rz, atol=1e-5) and torch.allclose(gw.double(), rw, atol=1e-5)


def test_obtuse_targets_use_the_monotonic_branch():
    """θ > π − m: φ = cos θ − m sin m (covered by the reference too)."""
    loss = ArcFaceLoss(2, 2, margin=0.5, scale=2.0).double()
    with torch.no_grad():
        loss.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    z = torch.tensor([[-1.0, 0.01]], dtype=torch.float64)  # θ_0 close to π
    ref = arcface_reference(z, loss.weight, torch.tensor([0]), 0.5, 2.0)
    assert loss(z, torch.tensor([0])).item() == pytest.approx(ref.item(), rel=1e-6)


def test_hand_computed_two_classes():
    """z = w_0 ⟂ w_1: target logit s·cos(m), other s·0, so L = log(1 + exp(−s cos m))."""
    m, s = 0.15, 30.0
    loss = ArcFaceLoss(2, 3, margin=m, scale=s)
    with torch.no_grad():
        loss.weight.copy_(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]))
    z = torch.tensor([[5.0, 0.0, 0.0]], requires_grad=True)
    value = loss(z, torch.tensor([0]))
    assert value.item() == pytest.approx(math.log1p(math.exp(-s * math.cos(m))), rel=1e-3)
    value.backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(loss.weight.grad).all()  # cos θ = 1 exactly


def test_margin_raises_the_loss_of_the_same_batch():
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    a, b = ArcFaceLoss(4, 8, margin=0.0), ArcFaceLoss(4, 8, margin=0.15)
    b.load_state_dict(a.state_dict())
    assert b(z, y) > a(z, y)


@pytest.mark.parametrize("m,s", [(0.15, 30.0), (0.4, 16.0)])
def test_matches_pytorch_metric_learning(m, s):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(1)
    ours = ArcFaceLoss(6, 5, margin=m, scale=s)
    theirs = pml.ArcFaceLoss(6, 5, margin=math.degrees(m), scale=s)
    with torch.no_grad():
        theirs.W.copy_(ours.weight.T)  # pml stores W as [embedding, classes]
    z = torch.randn(10, 5, generator=g, requires_grad=True)
    y = torch.randint(0, 6, (10,), generator=g)
    a, b = ours(z, y), theirs(z, y)
    assert a.item() == pytest.approx(b.item(), rel=1e-4)
    ga, = torch.autograd.grad(a, z)
    gb, = torch.autograd.grad(b, z)
    assert torch.allclose(ga, gb, atol=1e-5)


def test_reference_arguments_are_ignored():
    g = torch.Generator().manual_seed(2)
    loss = ArcFaceLoss(3, 4)
    z, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    assert torch.equal(loss(z, y), loss(z, y, ref_emb=torch.randn(5, 4), ref_labels=torch.zeros(5, dtype=torch.long)))


def test_bad_input_is_an_error():
    with pytest.raises(ConfigError, match="margin"):
        ArcFaceLoss(3, 4, margin=2.0)
    with pytest.raises(ConfigError, match="scale"):
        ArcFaceLoss(3, 4, scale=0.0)
    with pytest.raises(ConfigError, match="at least 2"):
        ArcFaceLoss(1, 4)
    with pytest.raises(ConfigError, match="class rows 0..2"):
        ArcFaceLoss(3, 4)(torch.randn(2, 4), torch.tensor([0, 7]))


def test_build_loss_uses_it(tiny_cfg):
    from nbsrc.losses import build_loss

    loss = build_loss(tiny_cfg.replace(loss="arcface", arcface_margin=0.2, arcface_scale=16.0), 8, [5, 6, 7])
    assert isinstance(loss.term.proxy, ArcFaceLoss) and loss.term.proxy.margin == 0.2
    out = loss(torch.randn(4, 8), torch.tensor([5, 6, 7, 5]))
    assert torch.isfinite(out["total"])
