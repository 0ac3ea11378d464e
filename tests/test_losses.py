"""Contrastive loss (IRT eq. 1), KoLeo (eq. 5), cross-batch memory, NSoftmax and SNCA against slow
references written from the formulas, and against pytorch-metric-learning."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from nbsrc.losses import (
    CrossBatchMemory,
    LinearCrossEntropyLoss,
    NormalizedSoftmaxLoss,
    RetrievalLoss,
    contrastive_loss,
    koleo_loss,
    snca_loss,
)


def contrastive_reference(z, y, beta, ref=None, ref_y=None, idx=None, ref_idx=None):
    """Eq. (1) as a double loop: 1/N Σ_i [Σ_pos (1 − s_ij) + Σ_neg max(0, s_ij − β)]."""
    z = [v / v.norm() for v in z.double()]
    others = [(j, z[j], int(y[j]), None if idx is None else int(idx[j]), True) for j in range(len(z))]
    if ref is not None:
        others += [(j, r / r.norm(), int(ref_y[j]), None if ref_idx is None else int(ref_idx[j]), False)
                   for j, r in enumerate(ref.double())]
    total = 0.0
    for i in range(len(z)):
        for j, zj, yj, ij, in_batch in others:
            if in_batch and j == i:
                continue
            if idx is not None and ij is not None and ij == int(idx[i]):
                continue
            s = float(z[i] @ zj)
            total += (1 - s) if yj == int(y[i]) else max(0.0, s - beta)
    return total / len(z)


def koleo_reference(z, eps=1e-8):
    """Eq. (5): −1/N Σ_i log(min_{j≠i} ‖z_i − z_j‖ + ε)."""
    z = [v / v.norm() for v in z.double()]
    out = 0.0
    for i in range(len(z)):
        rho = min(float((z[i] - z[j]).norm()) for j in range(len(z)) if j != i)
        out += math.log(rho + eps)
    return -out / len(z)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_contrastive_matches_reference(beta):
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    assert contrastive_loss(z, y, beta=beta).item() == pytest.approx(contrastive_reference(z, y, beta), abs=1e-5)


def test_contrastive_with_memory_and_own_copy_matches_reference():
    g = torch.Generator().manual_seed(2)
    z, y, idx = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g), torch.arange(8)
    ref, ref_y = torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g)
    ref_idx = torch.arange(10) + 5  # indices 5, 6, 7 are stored copies of batch samples
    got = contrastive_loss(z, y, ref, ref_y, 0.5, idx, ref_idx).item()
    assert got == pytest.approx(contrastive_reference(z, y, 0.5, ref, ref_y, idx, ref_idx), abs=1e-5)
    # without the index mask the stored copies would count as (easy) positives or negatives
    assert got != pytest.approx(contrastive_loss(z, y, ref, ref_y, 0.5).item(), abs=1e-6)


def test_contrastive_hand_computed():
    # three unit vectors: a, b = a (same class), c ⟂ a (other class), beta = 0.5:
    # positives (a,b),(b,a): 1 - 1 = 0; negatives have s = 0 < beta: 0  -> loss 0
    z = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0]])
    assert contrastive_loss(z, torch.tensor([0, 0, 1]), beta=0.5).item() == pytest.approx(0.0)
    # now c = a with another label: 4 negative ordered pairs with s = 1 -> (4 * 0.5) / 3
    z = torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0]])
    assert contrastive_loss(z, torch.tensor([0, 0, 1]), beta=0.5).item() == pytest.approx(2.0 / 3)


def test_contrastive_matches_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.losses import ContrastiveLoss
    from pytorch_metric_learning.reducers import SumReducer

    g = torch.Generator().manual_seed(3)
    for beta in (0.2, 0.5, 0.8):
        z, y = torch.randn(32, 16, generator=g), torch.randint(0, 6, (32,), generator=g)
        ref = ContrastiveLoss(pos_margin=1, neg_margin=beta, distance=CosineSimilarity(), reducer=SumReducer())
        assert pml.__version__
        assert contrastive_loss(z, y, beta=beta).item() == pytest.approx(ref(z, y).item() / len(z), abs=1e-5)
        # with a memory as pml's reference embeddings
        m, my = torch.randn(20, 16, generator=g), torch.randint(0, 6, (20,), generator=g)
        want = (ref(z, y).item() + ref(z, y, ref_emb=m, ref_labels=my).item()) / len(z)
        assert contrastive_loss(z, y, m, my, beta).item() == pytest.approx(want, abs=1e-5)


def test_contrastive_gradient_matches_reference():
    g = torch.Generator().manual_seed(4)
    z0, y = torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g)
    z = z0.clone().requires_grad_(True)
    contrastive_loss(z, y, beta=0.3).backward()

    def ref_fn(v):  # differentiable version of the reference formula
        u = F.normalize(v, dim=1)
        s = u @ u.T
        same = y[:, None] == y[None, :]
        off = ~torch.eye(len(v), dtype=torch.bool)
        terms = torch.where(same & off, 1 - s, 0 * s) + torch.where(~same, (s - 0.3).clamp(min=0), 0 * s)
        return terms.sum() / len(v)

    zr = z0.clone().requires_grad_(True)
    ref_fn(zr).backward()
    torch.testing.assert_close(z.grad, zr.grad.to(z.grad.dtype), atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradcheck(lambda v: contrastive_loss(v, y, beta=0.3).double(), (z0.clone().requires_grad_(),),
                                    atol=1e-4, eps=1e-6)


def test_koleo_matches_reference_and_gradient():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(9, 4, generator=g)
    assert koleo_loss(z).item() == pytest.approx(koleo_reference(z), abs=1e-5)
    zz = z.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: koleo_loss(v).double(), (zz,), atol=1e-4, eps=1e-6)


def test_koleo_hand_computed_and_spreading():
    # 4 orthogonal... the 4 points ±e1, ±e2: nearest distance sqrt(2) for all -> -log(sqrt 2)
    z = torch.tensor([[1.0, 0], [-1.0, 0], [0, 1.0], [0, -1.0]])
    assert koleo_loss(z).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    # duplicates stay finite (eps) and are penalised more than spread points
    dup = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0]])
    assert math.isfinite(koleo_loss(dup).item()) and koleo_loss(dup) > koleo_loss(z)


def test_memory_fifo_order_and_wraparound():
    mem = CrossBatchMemory(5, 2)
    for step in range(4):  # batches of 2: entries 0..7, memory keeps the newest 5: 3..7
        e = torch.arange(2 * step, 2 * step + 2).float()[:, None].repeat(1, 2)
        mem.enqueue(e, torch.arange(2) + 10 * step, torch.arange(2 * step, 2 * step + 2))
    emb, lab, idx = mem.get()
    assert idx.tolist() == [3, 4, 5, 6, 7]
    assert emb[:, 0].tolist() == [3, 4, 5, 6, 7]
    assert lab.tolist() == [11, 20, 21, 30, 31]
    state = mem.state_dict()
    other = CrossBatchMemory(5, 2)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.get(), mem.get(), strict=True))


def test_memory_batch_larger_than_memory_keeps_newest():
    mem = CrossBatchMemory(3, 1)
    mem.enqueue(torch.arange(5).float()[:, None], torch.zeros(5, dtype=torch.long), torch.arange(5))
    assert mem.get()[2].tolist() == [2, 3, 4]


def test_nsoftmax_matches_reference():
    torch.manual_seed(0)
    loss = NormalizedSoftmaxLoss(4, 3, temperature=0.1)
    z, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    w = F.normalize(loss.weight.detach(), dim=1)
    ref = 0.0
    for i in range(6):
        zi = z[i] / z[i].norm()
        logits = [float(zi @ w[c]) / 0.1 for c in range(4)]
        ref -= logits[int(y[i])] - math.log(sum(math.exp(v) for v in logits))
    assert loss(z, y).item() == pytest.approx(ref / 6, abs=1e-5)


def test_linear_cross_entropy_matches_reference():
    torch.manual_seed(1)
    loss = LinearCrossEntropyLoss(5, 4)
    z, y = torch.randn(7, 4) * 3, torch.tensor([0, 1, 2, 3, 4, 0, 2])
    w, b = loss.head.weight.detach(), loss.head.bias.detach()
    ref = 0.0
    for i in range(7):
        zi = z[i] / z[i].norm() * 2.0  # sqrt(D) = 2
        logits = [float(zi @ w[c] + b[c]) for c in range(5)]
        ref -= logits[int(y[i])] - math.log(sum(math.exp(v) for v in logits))
    assert loss(z, y).item() == pytest.approx(ref / 7, abs=1e-5)
    # through the registry: dataset labels map to the head's rows; the head is the criterion's state
    from types import SimpleNamespace

    from nbsrc.losses import PAIR_LOSSES

    term = PAIR_LOSSES["linear_ce"](SimpleNamespace(), 4, [10, 20, 30, 40, 50])
    term.proxy.load_state_dict(loss.state_dict())
    assert term(z, y * 10 + 10).item() == pytest.approx(ref / 7, abs=1e-5)


def test_snca_matches_reference():
    g = torch.Generator().manual_seed(6)
    z, y = torch.randn(8, 3, generator=g), torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
    u = F.normalize(z, dim=1)
    terms = []
    for i in range(8):
        num = sum(math.exp(float(u[i] @ u[j]) / 0.1) for j in range(8) if j != i and y[j] == y[i])
        den = sum(math.exp(float(u[i] @ u[j]) / 0.1) for j in range(8) if j != i)
        if num > 0:
            terms.append(-math.log(num / den))
    assert snca_loss(z, y, temperature=0.1).item() == pytest.approx(sum(terms) / len(terms), abs=1e-4)


def test_retrieval_loss_total_is_main_plus_lambda_koleo():
    g = torch.Generator().manual_seed(7)
    z, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
    term = partial(contrastive_loss, beta=0.5)
    out = RetrievalLoss("contrastive", term, lam=0.7)(z, y)
    assert out["total"].item() == pytest.approx(out["contrastive"].item() + 0.7 * out["koleo"].item(), abs=1e-6)
    assert out["contrastive"].item() == pytest.approx(contrastive_loss(z, y, beta=0.5).item(), abs=1e-7)
    assert RetrievalLoss("contrastive", term, lam=0.0)(z, y)["koleo"].item() == 0.0
