"""One name per size (the table in ``nbsrc.config``'s docstring): ``feature_dim`` is what the model is
trained with and what the loss and the memory hold, ``dim`` the PCA's output, ``output_dim`` what the
model returns; the config's names and the help of β are as the papers and pytorch-metric-learning say."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from nbsrc.config import ExperimentConfig, config_fields
from nbsrc.losses import CrossBatchMemory, build_loss
from nbsrc.models import build_model

PKG = Path(__file__).resolve().parents[1] / "nbsrc"


def test_plain_model_sizes_follow_the_table():
    torch.manual_seed(0)
    m = build_model("vit_tiny_patch16_224", img_size=16, patch_size=4, dim=4).eval()
    x = torch.randn(6, 3, 16, 16)
    assert m.feature_dim == m.backbone.num_features == m.backbone.embed_dim == 192  # timm's width
    assert m.output_dim == m.feature_dim and m(x).shape == (6, m.feature_dim)  # PCA not fitted: identity
    m.pca.fit(np.random.default_rng(0).normal(size=(8, m.feature_dim)))
    assert m.output_dim == 4 == m.pca.dim and m(x).shape == (6, 4)


def test_dtop_feature_dim_is_head_dim():
    m = build_model("vit_tiny_patch16_224", img_size=16, patch_size=4, dim=3, dtop=True, k=1, head_dim=8).eval()
    assert m.feature_dim == 8 and m.output_dim == 8
    assert m.forward_features(torch.randn(2, 3, 16, 16)).shape == (2, 8)


@pytest.mark.parametrize("loss", ["nsoftmax", "arcface"])
def test_the_loss_and_the_memory_hold_feature_dim(loss):
    cfg = ExperimentConfig(loss=loss, memory_size=8)
    criterion = build_loss(cfg, 12, [3, 5, 7])
    assert criterion.term.proxy.weight.shape == (3, 12)  # one proxy of feature_dim per class
    memory = CrossBatchMemory(8, 12)
    assert memory.feature_dim == 12 and memory.get()[0].shape == (0, 12)


def test_no_module_uses_the_retired_size_names():
    """``embed_dim`` is timm's width (read, never defined here), ``embedding_dim`` and ``in_dim`` were
    ``feature_dim``: no parameter, attribute or property of nbsrc is named so again."""
    retired = {"embed_dim", "embedding_dim", "in_dim"}
    found = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.args + node.args.kwonlyargs] + [node.name]
                found += [f"{path.name}:{node.lineno} {n}" for n in names if n in retired]
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self" \
                            and t.attr in retired:
                        found.append(f"{path.name}:{node.lineno} self.{t.attr}")
    assert not found, found


def test_help_of_the_names_that_differ_from_their_libraries():
    FIELD_HELP = {f.name: f.help for f in config_fields()}
    assert "margin on negatives (pytorch-metric-learning: neg_margin)" in FIELD_HELP["beta"]
    assert "▷dim" in FIELD_HELP["dim"] and "feature_dim" in FIELD_HELP["dim"]
    import nbsrc.config

    for name in ("width", "feature_dim", "head_dim", "dim", "output_dim", "whitening_dim"):
        assert f"``{name}``" in nbsrc.config.__doc__, name
