"""The pooling registry (``nbsrc.models.pooling.POOLINGS``) and R-MAC (IRT Table 7), against a slow
reference written from Tolias et al.'s formula and against region grids worked out by hand from
cirtorch's rule (the code IRT §4.2 built on)."""

import pytest
import torch
import torch.nn.functional as F

from nbsrc.config import ExperimentConfig
from nbsrc.errors import ConfigError
from nbsrc.models import build_model, model_from_config
from nbsrc.models.pooling import POOLINGS, RMAC, rmac_regions


def test_rmac_regions_of_a_square_map_by_hand():
    """7×7 (a ResNet at 224 px): l = 1 the whole map; l = 2 side ⌊14/3⌋ = 4, step 3; l = 3 side 3, step 2."""
    assert rmac_regions(7, 7) == [(0, 0, 7),
                                  (0, 0, 4), (0, 3, 4), (3, 0, 4), (3, 3, 4),
                                  (0, 0, 3), (0, 2, 3), (0, 4, 3), (2, 0, 3), (2, 2, 3), (2, 4, 3),
                                  (4, 0, 3), (4, 2, 3), (4, 4, 3)]


def test_rmac_regions_of_a_wide_map_by_hand():
    """7×10: w = 7; overlaps 1 − b/7 for s = 2..7 regions are 0.571, 0.786, ... → s = 2 (closest to 0.4),
    one extra region along the width. l = 1: two 7-squares at x = 0, 3; l = 2: 2 × 3 regions of side 4
    (x step 3, y step 3); l = 3: 3 × 4 regions of side 3 (x = ⌊0⌋, ⌊2.33⌋, ⌊4.67⌋, ⌊7⌋; y step 2)."""
    got = rmac_regions(7, 10)
    want = ([(0, x, 7) for x in (0, 3)] + [(y, x, 4) for y in (0, 3) for x in (0, 3, 6)]
            + [(y, x, 3) for y in (0, 2, 4) for x in (0, 2, 4, 7)])
    assert got == want
    assert sorted(rmac_regions(10, 7)) == sorted((x, y, s) for y, x, s in want)  # the tall map: the transpose
    for top, left, side in got:  # every region lies inside the map
        assert 0 <= top and top + side <= 7 and 0 <= left and left + side <= 10


def rmac_reference(fmap: torch.Tensor, regions, eps: float = 1e-6) -> torch.Tensor:
    """Tolias et al. eqs. (1)–(2), one image and one channel at a time: f_R,c = max_{p ∈ R} x_{c,p};
    R-MAC = Σ_R f_R / ‖f_R‖ over the whole map and the regions (cirtorch's sum)."""
    B, C, H, W = fmap.shape
    out = torch.zeros(B, C, dtype=torch.float64)
    for b in range(B):
        for top, left, side in [(0, 0, None)] + list(regions):
            rows = range(H) if side is None else range(top, top + side)
            cols = range(W) if side is None else range(left, left + side)
            f = [max(float(fmap[b, c, i, j]) for i in rows for j in cols) for c in range(C)]
            norm = sum(v * v for v in f) ** 0.5
            for c in range(C):
                out[b, c] += f[c] / max(norm, eps)
    return out


@pytest.mark.parametrize("shape", [(7, 7), (7, 10), (12, 5), (1, 1), (3, 3)])
def test_rmac_matches_the_reference(shape):
    torch.manual_seed(0)
    fmap = torch.randn(2, 6, *shape)
    got = RMAC()(fmap)
    want = rmac_reference(fmap, rmac_regions(*shape))
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_rmac_model_on_a_convnet():
    """``build_model(..., pooling="rmac")``: the l2-normalised R-MAC of the convnet's last map."""
    torch.manual_seed(0)
    model = build_model("resnet18", pooling="rmac").eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        fmap = model.backbone.forward_features(x)
        z = model(x)
    assert fmap.shape[-2:] == (3, 4)
    assert torch.allclose(z.double(), F.normalize(rmac_reference(fmap, rmac_regions(3, 4)), dim=1), atol=1e-5)
    with pytest.raises(ConfigError, match="pooling='rmac' pools a convnet's spatial map"):
        build_model("vit_tiny_patch16_224", pooling="rmac", img_size=32, patch_size=8)


def test_a_registered_pooling_builds_a_model(monkeypatch):
    """A new pooling is one builder and one registry line: config validation, ``build_model`` and
    ``model_from_config`` take it."""
    class MinPool(torch.nn.Module):
        def __init__(self, num_prefix):
            super().__init__()
            self.num_prefix = num_prefix

        def forward(self, x):
            return x[:, self.num_prefix:].amin(1)

    monkeypatch.setitem(POOLINGS, "toy_min", lambda num_prefix, has_dist, p, learnable_p: MinPool(num_prefix))
    cfg = ExperimentConfig(pooling="toy_min", img_size=32, patch_size=8)
    cfg.validate()
    torch.manual_seed(0)
    model = model_from_config(cfg).eval()
    assert isinstance(model.pool, MinPool)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = F.normalize(model.forward_tokens(x)[:, model.num_prefix:].amin(1), dim=-1)
        assert torch.allclose(model(x), want, atol=1e-6)


def test_an_unknown_pooling_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"pooling='mean' is invalid: expected one of cls, dist, avg, max, gem, rmac"):
        build_model("vit_tiny_patch16_224", pooling="mean", img_size=32, patch_size=8)
    with pytest.raises(ConfigError, match="pooling=''"):
        ExperimentConfig(pooling="").validate()
