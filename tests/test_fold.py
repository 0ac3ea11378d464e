"""BatchNorm folded into the convolution before it (nbsrc.models.fold): the same network up to float
rounding, on a copy, and refused wherever folding would change what the network computes."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nbsrc.models.fold import conv_norm_pairs, fold_batchnorm, inference_model


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and affine parameters far from the identity, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


def _eval_bn(x, m):
    """BatchNorm in eval mode written from its formula, y = γ (x − μ) / √(σ² + ε) + β."""
    shape = (1, -1, 1, 1)
    y = (x - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)
    return y * m.weight.view(shape) + m.bias.view(shape) if m.weight is not None else y


def test_one_pair_folds_to_the_formula():
    torch.manual_seed(0)
    model = _randomise_norms(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)))
    x = torch.randn(2, 3, 9, 9)
    folded, n = fold_batchnorm(model, x)
    assert n == 1 and isinstance(folded[1], nn.Identity)
    expected = _eval_bn(nn.functional.conv2d(x, model[0].weight, padding=1), model[1])
    torch.testing.assert_close(folded(torch.clone(x)), expected, rtol=1e-5, atol=1e-5)


def test_timm_convnets_fold_every_norm_on_a_copy_with_the_same_embeddings():
    """ResNet (nn.BatchNorm2d) and EfficientNet-Lite0 (timm BatchNormAct2d, 'same' padding), both in
    channels-last as RetrievalModel runs them: every BatchNorm folded, the embeddings of new images
    equal to float rounding, and the caller's model untouched."""
    from nbsrc.models import build_model

    for name in ("resnet18", "efficientnet_lite0"):
        torch.manual_seed(0)
        model = _randomise_norms(build_model(name, "gem", weights="none", img_size=64))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        folded, n = fold_batchnorm(model, torch.randn(2, 3, 64, 64))
        assert n == n_norms and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), name
        x = torch.randn(5, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=2e-5)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_norms
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Residual(nn.Module):
    """The convolution's output feeds its BatchNorm and the sum: folding would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        c = self.conv(x)
        return self.bn(c) + c


def test_folding_is_refused_where_it_would_change_the_network():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    res = _randomise_norms(_Residual())
    assert len(conv_norm_pairs(res, x)) == 1  # the pair is seen, the check on the probe refuses it
    same, n = fold_batchnorm(res, x)
    assert same is res and n == 0
    inplace = _randomise_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(inplace=True), nn.BatchNorm2d(4)))
    assert conv_norm_pairs(inplace, x) == []  # changed in place between the two: not a pair
    assert fold_batchnorm(inplace, x) == (inplace, 0)


def test_a_vit_is_embedded_as_it_is():
    from nbsrc.models import build_model

    vit = build_model("vit_tiny_patch16_224", "cls", weights="none", img_size=32, patch_size=8)
    assert inference_model(vit, torch.randn(2, 3, 32, 32)) is vit


def test_extract_embeddings_folds_and_keeps_recall(tmp_path):
    """The embedding function with and without folding: the same embeddings to float rounding, the
    same Recall@K, and the model's train/eval modes restored."""
    from sklearn.datasets import load_digits

    from nbsrc.data import RetrievalDataset
    from nbsrc.data.transforms import RetrievalTransform
    from nbsrc.eval import recall_at_k
    from nbsrc.models import build_model
    from nbsrc.models.extract import extract_embeddings

    digits = load_digits()
    keep = np.arange(0, len(digits.target), 6)
    images = (digits.images[keep] * 16).astype(np.uint8)
    ds = RetrievalDataset(images, digits.target[keep], RetrievalTransform(32, train=False))
    torch.manual_seed(0)
    model = _randomise_norms(build_model("resnet18", "gem", weights="none", img_size=32)).train()
    a, la, _ = extract_embeddings(model, ds, batch_size=64, progress=False, fold=True)
    b, lb, _ = extract_embeddings(model, ds, batch_size=64, progress=False, fold=False)
    assert model.training and all(m.training for m in model.modules())
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    assert recall_at_k(a, la, ks=(1, 2, 4)) == recall_at_k(b, lb, ks=(1, 2, 4))


def test_folding_inside_inference_mode():
    """Index.build embeds under torch.inference_mode, where tensors keep no version counter."""
    torch.manual_seed(0)
    model = _randomise_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    with torch.inference_mode():
        x = torch.randn(2, 3, 8, 8)
        folded, n = fold_batchnorm(model, x)
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert n == 1


def test_an_index_embeds_queries_as_it_embedded_its_images(tmp_path):
    """Index.build embeds with the folded network and Index.embed (queries) folds the same way: a
    query that is an indexed image gets its stored embedding back (to float16 storage rounding)."""
    from bench.embed import make_jpegs
    from nbsrc.retrieval import Index
    from nbsrc.retrieval.models import load_embedding_model

    torch.manual_seed(0)
    em = load_embedding_model("resnet18", weights="none", img_size=64)
    _randomise_norms(em.model)
    folder = make_jpegs(tmp_path / "photos", 6, 80, 60)
    idx = Index.build(em, folder, tmp_path / "idx", num_workers=0, progress=False, log=None)
    again = Index.load(tmp_path / "idx")
    paths = [again.listing.path(i) for i in range(len(again.listing.paths))]
    z = again.embed(paths)
    assert again._net is not again.model and not any(isinstance(m, nn.BatchNorm2d) for m in again._net.modules())
    np.testing.assert_allclose(z, np.load(idx.path / "embeddings.npy").astype(np.float32), atol=2e-3)
    assert all(again.search(p, k=1).rows[0][0] == i for i, p in enumerate(paths))


def test_convolutions_that_do_not_fold_linearly_are_left_alone():
    """A weight-standardised convolution (timm StdConv2d) undoes a scaled weight, and a weight-normed
    one (a parametrization) cannot be written: both keep their BatchNorm, with the same output."""
    from timm.layers import StdConv2d

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    std = _randomise_norms(nn.Sequential(StdConv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert fold_batchnorm(std, x) == (std, 0)
    wn = _randomise_norms(nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)))
    folded, n = fold_batchnorm(wn, x)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), wn(x), rtol=1e-5, atol=1e-5)
