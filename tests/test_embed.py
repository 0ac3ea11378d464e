"""extract_embeddings and evaluate with tiny models on tiny random-image datasets."""

import numpy as np
import pytest
import torch
from torch import nn

from nbsrc.data import RetrievalData, RetrievalDataset, RetrievalTransform
from nbsrc.errors import ConfigError, DatasetError
from nbsrc.eval import evaluate, extract_embeddings, recall_at_k


def to_float(img):
    return img.float().div(255.0).unsqueeze(0)  # uint8 [H, W] -> float [1, H, W]


class ModeRecorder(nn.Module):
    """Identity that records whether it ran in training mode and with gradients enabled."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, torch.is_grad_enabled()))
        return x


def tiny_model(in_dim=64, dim=5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_dim, dim), nn.Dropout(0.5), ModeRecorder())


@pytest.fixture
def dataset(rng):
    return RetrievalDataset(rng.integers(0, 256, (23, 8, 8), dtype=np.uint8), rng.integers(0, 4, 23), to_float)


def test_extract_embeddings_is_the_model_applied_to_each_item_in_order(dataset):
    model = tiny_model()
    emb, labels, indices = extract_embeddings(model, dataset, batch_size=5, progress=False)  # 23 = 4*5 + 3
    assert emb.dtype == np.float32 and emb.shape == (23, 5)
    assert labels.dtype == np.int64 and indices.dtype == np.int64
    np.testing.assert_array_equal(labels, dataset.labels)
    np.testing.assert_array_equal(indices, np.arange(23))
    model.eval()
    with torch.no_grad():
        want = model(torch.stack([dataset[i][0] for i in range(23)])).numpy()
    np.testing.assert_allclose(emb, want, rtol=1e-6, atol=1e-6)  # dropout off: eval mode


@pytest.mark.parametrize("training", [True, False])
def test_extract_embeddings_runs_in_eval_mode_without_grad_and_restores_the_mode(dataset, training):
    model = tiny_model()
    model.train(training)
    model[1].train(not training)  # a submodule in the other mode must get its own mode back
    extract_embeddings(model, dataset, batch_size=8, progress=False)
    assert model[3].seen == [(False, False)] * 3
    assert model.training is training and model[3].training is training and model[1].training is (not training)


def test_extract_embeddings_with_the_evaluation_transform(rng):
    ds = RetrievalDataset(rng.integers(0, 256, (6, 10, 10), dtype=np.uint8), np.arange(6),
                          RetrievalTransform(8, train=False))
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    emb, _, _ = extract_embeddings(model, ds, batch_size=4, device=torch.device("cpu"), progress=False)
    assert emb.shape == (6, 4) and np.isfinite(emb).all()


def test_extract_embeddings_progress_false_is_silent(dataset, capsys):
    extract_embeddings(tiny_model(), dataset, batch_size=8, progress=False)
    assert capsys.readouterr() == ("", "")
    extract_embeddings(tiny_model(), dataset, batch_size=8, progress=True)
    assert "embed" in capsys.readouterr().err  # not a terminal: plain progress lines


def test_extract_embeddings_errors(dataset):
    with pytest.raises(DatasetError, match="empty dataset"):
        extract_embeddings(tiny_model(), dataset.subset(np.array([], dtype=np.int64)), progress=False)
    with pytest.raises(ConfigError, match=r"returned shape \(8, 1, 8, 8\)"):
        extract_embeddings(nn.Identity(), dataset, batch_size=8, progress=False)
    with pytest.raises(ConfigError, match="batch_size=0"):
        extract_embeddings(tiny_model(), dataset, batch_size=0, progress=False)


def one_hot_images(labels, n_pixels=16):
    """Image of class c: pixel c at 255, the rest 0 (so Flatten gives 255/255 * e_c)."""
    imgs = np.zeros((len(labels), 4, 4), np.uint8)
    imgs.reshape(len(labels), n_pixels)[np.arange(len(labels)), labels] = 255
    return imgs


def test_evaluate_perfect_embeddings_give_100_percent():
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    ds = RetrievalDataset(one_hot_images(y), y, to_float)
    out = evaluate(nn.Flatten(), RetrievalData(train=ds, query=ds), ks=(1, 2), batch_size=3, progress=False)
    assert out == {"R@1": 100.0, "R@2": 100.0}
    gallery = RetrievalDataset(one_hot_images(y[::-1].copy()), y[::-1].copy(), to_float)
    out = evaluate(nn.Flatten(), RetrievalData(train=ds, query=ds, gallery=gallery), ks=(1,), progress=False)
    assert out == {"R@1": 100.0}


def test_evaluate_constant_model_is_decided_by_the_tie_break():
    # Every embedding equal: each query's first neighbour is the lowest other index, 0 (or 1 for
    # query 0). Labels 0 0 1 1: queries 0 and 1 hit (label 0), queries 2 and 3 miss -> R@1 = 50 %.
    # R@2: query 2 sees 0, 1 (miss); query 3 sees 0, 1 (miss) -> 50 %; R@3 sees everything -> 100 %.
    y = np.array([0, 0, 1, 1])
    ds = RetrievalDataset(np.zeros((4, 2, 2), np.uint8), y, to_float)

    class Constant(nn.Module):
        def forward(self, x):
            return torch.ones(len(x), 3)

    out = evaluate(Constant(), RetrievalData(train=ds, query=ds), ks=(1, 2, 3), progress=False)
    assert out == {"R@1": 50.0, "R@2": 50.0, "R@3": 100.0}


@pytest.mark.parametrize("separate_gallery", [False, True])
def test_evaluate_is_recall_at_k_of_the_extracted_embeddings_in_percent(rng, separate_gallery):
    y = np.repeat(np.arange(5), 4)
    query = RetrievalDataset(rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), y, to_float)
    gallery = (RetrievalDataset(rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), y, to_float) if separate_gallery
               else None)
    model = tiny_model()
    out = evaluate(model, RetrievalData(train=query, query=query, gallery=gallery), ks=(1, 4), batch_size=6,
                   progress=False)
    q, ql, _ = extract_embeddings(model, query, progress=False)
    g, gl = extract_embeddings(model, gallery, progress=False)[:2] if separate_gallery else (None, None)
    want = recall_at_k(q, ql, (1, 4), gallery_emb=g, gallery_labels=gl)
    assert out == {"R@1": pytest.approx(100 * want[1]), "R@4": pytest.approx(100 * want[4])}
