"""Multi-scale representation (DToP Table A11): scale averaging, re-normalisation, and evaluation
with different scales for queries and database."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nbsrc.data import RetrievalData, RetrievalDataset, RetrievalTransform
from nbsrc.errors import ConfigError
from nbsrc.eval import evaluate
from nbsrc.eval.multiscale import DEFAULT_SCALES, MultiScaleModel, evaluate_multiscale, multiscale_embed
from nbsrc.eval.recall import RetrievalResults, knn_search


class SizeAwareNet(torch.nn.Module):
    """A tiny model whose output depends on the input size (so the scales matter)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        return F.normalize(self.conv(x).amax((2, 3)) + x.shape[-1] * 0.01, dim=-1)


def batch(seed=0, h=16, w=24):
    return torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_default_scales_are_the_papers():
    assert DEFAULT_SCALES == pytest.approx((1.0, 1 / math.sqrt(2), 0.5))


def test_scale_one_is_the_plain_model():
    net, x = SizeAwareNet(), batch()
    assert torch.equal(multiscale_embed(net, x, (1,)), F.normalize(net(x), dim=-1))
    assert torch.equal(MultiScaleModel(net, (1.0,))(x), F.normalize(net(x), dim=-1))


def test_mean_of_resized_embeddings_renormalised():
    net, x = SizeAwareNet(), batch()
    z = multiscale_embed(net, x)
    ref = net(x)
    for _scale, size in ((1 / math.sqrt(2), (11, 17)), (0.5, (8, 12))):
        ref = ref + net(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
    assert torch.allclose(z, F.normalize(ref, dim=-1), atol=1e-6)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-6)
    assert not torch.allclose(z, net(x), atol=1e-3)


def test_with_a_dtop_model_at_several_sizes():
    from nbsrc.models import build_model

    torch.manual_seed(0)
    m = build_model("vit_tiny_patch16_224", img_size=32, patch_size=8, dtop=True, k=2, head_dim=16).eval()
    with torch.no_grad():
        z = MultiScaleModel(m)(batch(h=32, w=32))
    assert z.shape == (3, 16) and torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)


def tiny_data(gallery=False):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 5)
    imgs = (rng.random((20, 16, 16)) * 255).astype(np.uint8)
    imgs += (labels[:, None, None] * 40).astype(np.uint8)
    tf = RetrievalTransform(16, train=False, resize=False)
    ds = RetrievalDataset(imgs, labels, tf)
    return RetrievalData(train=ds, query=ds, gallery=ds.subset(np.arange(20)) if gallery else None)


def test_evaluate_multiscale_same_scales_is_the_ordinary_evaluation():
    net, data = SizeAwareNet(), tiny_data()
    got = evaluate_multiscale(net, data, (1.0,), (1.0,), progress=False)
    assert got == evaluate(net, data, progress=False)


def test_evaluate_multiscale_different_scales_excludes_self():
    net, data = SizeAwareNet(), tiny_data()
    got = evaluate_multiscale(net, data, (1.0,), (1.0, 0.5), ks=(1, 2), progress=False)
    with torch.no_grad():
        x = torch.stack([data.query[i][0] for i in range(len(data.query))])
        q, db = multiscale_embed(net, x, (1.0,)).numpy(), multiscale_embed(net, x, (1.0, 0.5)).numpy()
    sims, idx = knn_search(q, db, 2, exclude_self=True)
    assert (idx != np.arange(20)[:, None]).all()
    ref = RetrievalResults(data.query.labels, data.query.labels, idx, sims, True).recall_at_k((1, 2))
    assert got == pytest.approx({f"R@{k}": 100 * v for k, v in ref.items()})


def test_evaluate_multiscale_separate_gallery():
    net, data = SizeAwareNet(), tiny_data(gallery=True)
    got = evaluate_multiscale(net, data, (1.0,), (1.0,), ks=(1,), progress=False)
    assert got == pytest.approx(evaluate(net, data, ks=(1,), progress=False))


@pytest.mark.parametrize("scales", [(), (1.0, 0.0), (-0.5,)])
def test_bad_scales(scales):
    with pytest.raises(ConfigError, match="scales"):
        MultiScaleModel(SizeAwareNet(), scales)
