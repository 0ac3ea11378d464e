"""DToP on a distilled DeiT (Table A5's DeiT-B CLS and DIST rows): the dynamic position embedding
(eq. 2) keeps both prefix entries of the embedding ([CLS] and DIST) and resamples only the grid part,
and ``pooling='dist'`` forms the global branch (eq. 5) from the distillation tokens. DToP §A.2: "we
also evaluate multi-layer *distillation* features, replacing [CLS] by the distillation token where it
exists, i.e., PiT [26] and DeiT [28]". A tiny random-init ``deit_tiny_distilled_patch16_224`` built
with timm's own keyword arguments stands in for ``deit_base_distilled_patch16_384``."""

import copy

import pytest
import torch

from nbsrc.config import DToPConfig
from nbsrc.errors import ConfigError
from nbsrc.models import build_model
from nbsrc.models.position import dynamic_position_embedding
from nbsrc.presets import load_preset

DEIT_T = "deit_tiny_distilled_patch16_224"
TINY = dict(img_size=32, patch_size=8, k=2, head_dim=16)  # 4 x 4 patch grid at 32 px


def distilled(pooling="cls", **options):
    torch.manual_seed(0)
    return build_model(DEIT_T, pooling=pooling, dtop=True, **{**TINY, **options}).eval()


def images(h=32, w=32):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))


def test_native_grid_is_timms_own_distilled_forward():
    """At the native grid DPE is the identity: the backbone computes what timm's distilled DeiT
    computes with its own ``_pos_embed`` ([CLS], DIST, patches; embedding added over all three)."""
    m = distilled()
    assert m.num_prefix == 2 and m.backbone.pos_embed.shape[1] == 2 + 16
    plain = copy.deepcopy(m.backbone)
    del plain._pos_embed  # the instance attribute DToP set: back to VisionTransformerDistilled._pos_embed
    x = images()
    with torch.no_grad():
        assert torch.equal(m.forward_tokens(x), plain.forward_features(x))


def test_dpe_keeps_both_prefix_entries_on_another_grid():
    """On a 6 × 4 grid the tokens entering the encoder are [CLS + E_cls, DIST + E_dist, patches +
    bilinear(E_grid, 4×4 → 6×4)], written out here from eq. (2)."""
    m = distilled()
    vit = m.backbone
    x = images(48, 32)
    with torch.no_grad():
        patches = vit.patch_embed(x)  # [B, 6, 4, D] (dynamic_img_size)
        got = vit._pos_embed(patches)
        pos = vit.pos_embed
        grid = torch.nn.functional.interpolate(pos[:, 2:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(6, 4),
                                               mode="bilinear", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, 24, -1)
        want = torch.cat([vit.cls_token.expand(2, -1, -1) + pos[:, :1], vit.dist_token.expand(2, -1, -1) + pos[:, 1:2],
                          patches.reshape(2, 24, -1) + grid], dim=1)
    assert got.shape == (2, 26, vit.embed_dim)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(dynamic_position_embedding(pos, (4, 4), (6, 4), 2)[:, :2], pos[:, :2])
    with torch.no_grad():
        z = m(x)
    assert z.shape == (2, 16) and torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("pooling, index", [("cls", 0), ("dist", 1)])
def test_global_branch_takes_cls_or_dist(pooling, index):
    m = distilled(pooling, branch="global", elm=False)
    x = images()
    with torch.no_grad():
        b = m.branches(x)
        assert torch.allclose(b["cls"][:, -1], m.forward_tokens(x)[:, index], atol=1e-6)  # the last layer's token
        assert torch.allclose(b["features"], m.head(b["global"]), atol=1e-6)
    assert m.local_pool.kind == "gem"


def test_dist_needs_a_distilled_backbone():
    with pytest.raises(ConfigError, match="pooling='dist' needs a distilled DeiT"):
        build_model("vit_tiny_patch16_224", pooling="dist", dtop=True, **TINY)


@pytest.mark.parametrize("name, pooling", [("dtop_a5_deitb_cls_sfm", "cls"), ("dtop_a5_deitb_dist_sfm", "dist")])
def test_table_a5_deit_presets_build(name, pooling):
    """The presets' model, at a tiny size with random weights: one branch (global), no ELM, N = 768."""
    cfg = load_preset(name)
    assert cfg.model.backbone == "deit_base_distilled_patch16_384" and cfg.model.pooling == pooling
    assert cfg.model.dtop == DToPConfig(k=6, elm=False, fusion="none", head_dim=768, branch="global")
    torch.manual_seed(0)
    m = build_model(DEIT_T, pooling=cfg.model.pooling, img_size=32, patch_size=8, dtop=cfg.model.dtop).eval()
    with torch.no_grad():
        assert m(images(40, 32)).shape == (2, 768)
    assert m.global_index == (1 if pooling == "dist" else 0)
