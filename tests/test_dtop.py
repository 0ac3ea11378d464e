"""DToP (Song et al.): multi-layer features (eqs. 5–6), dynamic position embedding (eq. 2) and its
baselines, the enhanced locality module (eqs. 9–11), the fusions (A14–A20), the output head
(eq. 12), hybrid backbones, the optimiser schedule (§A.1), and every ablation switch."""

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import HybridEmbed
from timm.models.vision_transformer import VisionTransformer

from nbsrc.config import DToPConfig
from nbsrc.errors import ConfigError, WeightsError
from nbsrc.models import PCAReduction, RetrievalModel, build_model, model_from_config
from nbsrc.models.dtop import DToPModel, LayerMix
from nbsrc.models.hybrid import create_effnet_lite0_vit
from nbsrc.models.locality import (
    ASPP,
    FUSIONS,
    EnhancedLocality,
    Fusion,
    InvertedResidual,
    WaveBlock,
    channel_shuffle,
    orthogonal_fusion,
)
from nbsrc.models.position import PositionGenerator, dynamic_position_embedding
from nbsrc.presets import load_preset

D = 192  # vit_tiny width
TINY = dict(img_size=32, patch_size=8)  # 4 x 4 patch grid


def dtop(**options):
    torch.manual_seed(0)
    return build_model("vit_tiny_patch16_224", dtop=True, **TINY, **options)


def images(b=2, h=32, w=32, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def hooked_blocks(model):
    return [i for i, blk in enumerate(model.backbone.blocks) for _ in blk._forward_hooks]


def manual_layers(model, x):
    """Reference for the hooks: run timm's modules one by one and normalise every block output."""
    vit = model.backbone
    t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    outs = []
    for blk in vit.blocks:
        t = blk(t)
        outs.append(vit.norm(t))
    return outs


# ----------------------------------------------------------------------------- whole model
def test_output_shape_norm_and_interface():
    m = dtop().eval()
    z = m(images())
    assert z.shape == (2, 1536) and torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)
    assert isinstance(m.backbone, VisionTransformer)
    assert m.pca is None and m.feature_dim == m.output_dim == 1536
    # any size and aspect ratio (dynamic position embedding)
    assert m(images(h=40, w=64)).shape == (2, 1536)
    assert m.branches(images(h=40, w=64))["Y"].shape == (2, D, 5, 8)
    assert m.branches(images(h=35, w=17))["Y"].shape == (2, D, 5, 3)  # padded to a multiple of 8


def test_defaults_are_the_papers():
    m = dtop()
    assert DToPConfig().k == 6 and DToPConfig().head_dim == 1536
    assert m.k == 6 and m.pos_embed_kind == "dpe" and m.pe_interp == "bilinear"
    assert m.fusion.kind == "orthogonal"
    assert all(p is not None for p in (m.elm.irb, m.elm.aspp, m.elm.wave))
    assert m.local_pool.kind == "gem" and m.feature_dim == 1536


def test_pca_reduction_like_retrieval_model():
    m = dtop(head_dim=32).eval()
    m2 = build_model("vit_tiny_patch16_224", dim=8, dtop=True, head_dim=32, **TINY).eval()
    assert m.pca is None and isinstance(m2.pca, PCAReduction) and m2.output_dim == 32
    with torch.no_grad():
        m2.pca.fit(m2(images(b=12)).numpy())
        z = m2(images())
    assert m2.output_dim == 8 and z.shape == (2, 8)
    assert torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)


def test_branches_shapes_and_head_input():
    m = dtop(k=3).eval()
    out = m.branches(images(h=32, w=48))
    assert out["cls"].shape == (2, 3, D) and out["patches"].shape == (2, 3, 24, D)
    assert out["Y"].shape == out["U"].shape == (2, D, 4, 6)
    assert out["global"].shape == (2, 3 * D) and out["local"].shape == (2, 2 * D)
    assert m.head.in_features == 3 * D + 2 * D
    expected = m.head(torch.cat([out["global"], out["local"]], 1))
    assert torch.allclose(out["features"], expected, atol=1e-6)  # eq. (12) before l2


# ----------------------------------------------------------------------------- multi-layer features
@pytest.mark.parametrize("k", [1, 3, 12])
def test_k_sets_the_hooked_layers(k):
    m = dtop(k=k)
    assert hooked_blocks(m) == list(range(12 - k, 12))
    assert m.global_dim == k * D and m.head.in_features == k * D + 2 * D


@pytest.mark.parametrize("k", [0, 13, 2.0, True])
def test_k_out_of_range(k):
    with pytest.raises(ConfigError, match="k="):
        dtop(k=k)


def test_collected_layers_equal_the_blocks_outputs():
    m = dtop(k=4).eval()
    x = images()
    with torch.no_grad():
        out = m.branches(x)
        ref = manual_layers(m, x)[-4:]
    for j, t in enumerate(ref):
        assert torch.allclose(out["cls"][:, j], t[:, 0], atol=1e-5)  # eq. (5)
        assert torch.allclose(out["patches"][:, j], t[:, 1:], atol=1e-5)  # eq. (6)
    assert torch.allclose(out["global"], torch.cat([t[:, 0] for t in ref], 1), atol=1e-5)
    # the last collected layer is the backbone's usual output
    assert torch.allclose(out["cls"][:, -1], m.forward_tokens(x)[:, 0], atol=1e-6)


def test_layer_mix_starts_as_the_mean_over_layers():
    m = dtop(k=3, elm=False).eval()
    with torch.no_grad():
        out = m.branches(images())
    y_tokens = out["Y"].flatten(2).transpose(1, 2)
    assert torch.allclose(y_tokens, out["patches"].mean(1), atol=1e-5)


def test_layer_mix_is_a_softmax_weighted_sum_of_the_layers():
    mix = LayerMix(3)
    with torch.no_grad():
        mix.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
    p = torch.randn(2, 3, 5, 4)
    w = [math.exp(a) for a in (0.5, -1.0, 2.0)]
    ref = sum(w[i] / sum(w) * p[:, i] for i in range(3))
    assert torch.allclose(mix(p), ref, atol=1e-6)


@pytest.mark.parametrize("preset", ["dtop_full_vitb16_sfm", "dtop_full_r50vitb16_sfm"])
def test_added_modules_fit_the_supplements_budget(preset):
    """§A.1: "The additional components of DToP have only 0.3M parameters". Everything the full model adds
    to its backbone except the final FC to N, counted at D = 768, k = 6 (built on the meta device), equals
    the count derived from the design (nbsrc.models.locality): 218,118 <= 300,000."""
    with torch.device("meta"):
        m = model_from_config(load_preset(preset, weights="none"))
    d, k, g = m.backbone.num_features, m.k, 32
    assert (d, k, m.fusion.kind, m.pos_embed_kind) == (768, 6, "orthogonal", "dpe")  # DPE, orthogonal: no parameters
    irb = d * 2 * d // g + 2 * 2 * d + 9 * 2 * d + 2 * 2 * d + 2 * d * d // g + 2 * d  # expand, BN, dw, BN, project, BN
    aspp = (d + 2 * d) + 3 * (9 * d + 2 * d) + 2 * d + 5 * d * d // g + 2 * d  # 1x1, 3 dilated, pool (w, b), fuse
    count = {name: sum(p.numel() for p in child.parameters())
             for name, child in m.named_children() if name not in ("backbone", "head")}
    assert count == {"layer_mix": k, "elm": irb + aspp, "fusion": 0, "local_pool": 0}
    total = sum(count.values())
    assert total == 218_118 and total <= 300_000


# ----------------------------------------------------------------------------- position encodings
def test_dpe_is_the_identity_at_the_native_grid():
    pos = torch.randn(1, 1 + 16, 8)
    assert dynamic_position_embedding(pos, (4, 4), (4, 4), 1) is pos


def test_dpe_model_is_bit_exact_to_timm_at_native_size():
    m = dtop().eval()
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY).eval()
    plain.load_state_dict(m.backbone.state_dict())
    x = images()
    with torch.no_grad():
        assert torch.equal(m.backbone.forward_features(x), plain.forward_features(x))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_dpe_resamples_the_grid_and_keeps_the_prefix(mode):
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 1 + 12, 5, generator=g)  # prefix + 3 x 4 grid
    out = dynamic_position_embedding(pos, (3, 4), (5, 2), 1, mode)
    assert out.shape == (1, 1 + 10, 5)
    assert torch.equal(out[:, :1], pos[:, :1])
    grid = pos[:, 1:].reshape(1, 3, 4, 5).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(5, 2), mode=mode, align_corners=False).permute(0, 2, 3, 1).reshape(1, 10, 5)
    assert torch.allclose(out[:, 1:], ref)
    const = torch.ones(1, 1 + 12, 5)
    assert torch.allclose(dynamic_position_embedding(const, (3, 4), (7, 9), 1, mode), torch.ones(1, 1 + 63, 5))


def test_pe_interp_changes_the_model_off_the_native_grid():
    a, b = dtop(pe_interp="bilinear").eval(), dtop(pe_interp="bicubic").eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(a(images()), b(images()))  # native grid: no interpolation at all
        assert not torch.allclose(a(images(h=48, w=40)), b(images(h=48, w=40)))


def test_pos_embed_none_adds_no_position():
    m = dtop(pos_embed="none").eval()
    vit = m.backbone
    with torch.no_grad():
        vit.pos_embed.normal_()  # a non-zero embedding that must not be added
        patches = vit.patch_embed(images())
        tokens = vit._pos_embed(patches)
    assert torch.equal(tokens[:, 1:], patches.reshape(2, 16, D))
    assert torch.equal(tokens[:, 0], vit.cls_token[0].expand(2, -1))
    assert not vit.pos_embed.requires_grad and m.peg is None


def _swap_two_patches(x, p=8):
    y = x.clone()
    y[..., 0:p, 0:p], y[..., 8:8 + p, 16:16 + p] = x[..., 8:8 + p, 16:16 + p], x[..., 0:p, 0:p]
    return y


def test_without_position_the_encoder_is_permutation_invariant():
    """No PE: swapping two image patches permutes the tokens, so [CLS] is unchanged; DPE breaks it."""
    x = images()
    for kind, invariant in (("none", True), ("dpe", False)):
        m = dtop(pos_embed=kind).eval()
        with torch.no_grad():
            m.backbone.pos_embed.normal_()
            a = m.forward_tokens(x)[:, 0]
            b = m.forward_tokens(_swap_two_patches(x))[:, 0]
        assert torch.allclose(a, b, atol=1e-5) == invariant, kind


def test_cpe_applies_a_position_generator_after_the_first_block():
    m = dtop(pos_embed="cpe", k=2).eval()
    assert isinstance(m.peg, PositionGenerator) and not m.backbone.pos_embed.requires_grad
    assert hooked_blocks(m) == [0, 10, 11]
    none = dtop(pos_embed="none", k=2).eval()
    none.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("peg.")})
    x = images()
    with torch.no_grad():
        assert not torch.allclose(m(x), none(x))
        m.peg.conv.weight.zero_()
        m.peg.conv.bias.zero_()  # a zero generator adds nothing: CPE reduces to no PE
        assert torch.allclose(m(x), none(x), atol=1e-6)


def test_position_generator_is_a_residual_depthwise_conv():
    peg = PositionGenerator(4)
    tokens = torch.randn(2, 6, 4)
    fmap = tokens.transpose(1, 2).reshape(2, 4, 2, 3)
    ref = tokens + peg.conv(fmap).flatten(2).transpose(1, 2)
    assert torch.allclose(peg(tokens, (2, 3)), ref) and peg.conv.groups == 4


@pytest.mark.parametrize("opt", [{"pos_embed": "sin"}, {"pe_interp": "nearest"}])
def test_position_options_are_checked(opt):
    with pytest.raises(ConfigError, match=next(iter(opt))):
        dtop(**opt)


# ----------------------------------------------------------------------------- ELM parts
def test_inverted_residual_shape_and_skip():
    irb = InvertedResidual(8).eval()
    x = torch.randn(2, 8, 3, 5)
    assert irb(x).shape == x.shape
    assert irb.expand[0].out_channels == 16 and irb.depthwise[0].groups == 16 and irb.expand[0].groups == 8
    with torch.no_grad():
        irb.project[1].weight.zero_()
        irb.project[1].bias.zero_()
    assert torch.equal(irb(x), x)  # the residual path alone


def test_channel_shuffle_interleaves_the_groups():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]


def test_inverted_residual_mixes_channels_across_its_groups():
    """Grouped 1x1 convolutions alone would keep channel 0 within its group; the shuffle spreads it."""
    irb = InvertedResidual(64).eval()  # 32 groups of 2 channels
    x = torch.randn(1, 64, 4, 4)
    dx = torch.zeros_like(x)
    dx[:, 0] = 1.0
    with torch.no_grad():
        changed = ((irb(x + dx) - irb(x)) - dx).abs().amax(dim=(0, 2, 3)) > 1e-6
    assert changed[2:].any()  # beyond group 0 (channels 0, 1)


def test_aspp_keeps_the_map_size_and_trains_on_one_image():
    aspp = ASPP(8)
    assert [b[0].dilation for b in aspp.branches] == [(1, 1), (6, 6), (12, 12), (18, 18)]
    assert all(b[0].groups == 8 for b in aspp.branches)  # depthwise
    for h, w in ((3, 5), (4, 4)):  # one training image: the pooled 1x1 branch has no BatchNorm
        assert aspp.train()(torch.randn(1, 8, h, w)).shape == (1, 8, h, w)
    assert aspp.eval()(torch.randn(1, 8, 1, 1)).shape == (1, 8, 1, 1)


def test_aspp_fusion_group_sees_every_branch_of_its_channels():
    """The branches are interleaved per channel before the grouped fusion: a change in input channel 0 reaches
    exactly the outputs of group 0 (channels 0, 1 of 64), through each branch."""
    aspp = ASPP(64).eval()
    x = torch.randn(1, 64, 5, 5)
    dx = torch.zeros_like(x)
    dx[:, 0] = 1.0
    with torch.no_grad():
        changed = (aspp(x + dx) - aspp(x)).abs().amax(dim=(0, 2, 3)) > 1e-6
    assert changed[:2].any() and not changed[2:].any()
    with torch.no_grad():
        base = aspp(x)
        for branch in aspp.branches:  # each branch feeds group 0
            branch[0].weight[0].add_(1.0)
            assert not torch.allclose(aspp(x), base)
            branch[0].weight[0].sub_(1.0)


def test_waveblock_keeps_one_band_and_scales_the_rest():
    wave = WaveBlock(band=0.3, factor=1.5)
    x = torch.rand(2, 3, 10, 4) + 0.5
    assert torch.equal(wave.eval()(x), x)
    torch.manual_seed(0)
    ratio = (wave.train()(x) / x)[0, 0, :, 0]
    kept = torch.isclose(ratio, torch.tensor(1.0))
    assert kept.sum() == 3 and torch.allclose(ratio[~kept], torch.tensor(1.5))
    first = int(kept.nonzero()[0])
    assert kept[first:first + 3].all()  # one contiguous band of round(0.3 * 10) rows
    torch.manual_seed(0)
    full = wave(x) / x  # the same band for every image, channel and column
    assert torch.allclose(full, ratio[None, None, :, None].expand_as(x))


def test_elm_runs_the_parts_in_order():
    elm = EnhancedLocality(8).eval()
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(elm(x), elm.wave(elm.aspp(elm.irb(x))))
    with pytest.raises(ConfigError, match="ELM empty"):
        EnhancedLocality(8, irb=False, aspp=False, wave=False)


@pytest.mark.parametrize("part", ["irb", "aspp", "wave"])
def test_each_elm_switch_removes_its_part(part):
    m = dtop(**{f"elm_{part}": False})
    for other in ("irb", "aspp", "wave"):
        assert (getattr(m.elm, other) is None) == (other == part)
    assert m(images()).shape == (2, 1536)


def test_elm_off_leaves_y_alone():
    m = dtop(elm=False).eval()
    assert m.elm is None and m.fusion.kind == "none" and m.local_dim == D
    with torch.no_grad():
        out = m.branches(images())
    assert out["U"] is None
    ref = m.local_pool(out["Y"].flatten(2).transpose(1, 2))
    assert torch.allclose(out["local"], ref, atol=1e-6)
    with pytest.raises(ConfigError, match="elm=False"):
        dtop(elm=False, fusion="sum")
    with pytest.raises(ConfigError, match="ELM empty"):
        dtop(elm_irb=False, elm_aspp=False, elm_wave=False)


# ----------------------------------------------------------------------------- fusions
def orthogonal_reference(y, u):
    """Eq. (A20) token by token: [y − ⟨y,u⟩/⟨u,u⟩ u ; u]."""
    out = torch.empty(*y.shape[:-1], 2 * y.shape[-1], dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in y.shape[:-1]]):
        yy, uu = y[tuple(idx)].double(), u[tuple(idx)].double()
        out[tuple(idx)] = torch.cat([yy - (yy @ uu) / (uu @ uu) * uu, uu])
    return out


def test_orthogonal_fusion_matches_reference_and_is_orthogonal():
    g = torch.Generator().manual_seed(0)
    y, u = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 6, generator=g)
    z = orthogonal_fusion(y, u)
    assert torch.allclose(z.double(), orthogonal_reference(y, u), atol=1e-5)
    assert (z[..., :6] * u).sum(-1).abs().max() < 1e-5
    assert torch.equal(z[..., 6:], u)


def test_orthogonal_fusion_is_finite_when_u_is_zero():
    y = torch.randn(3, 4, 6)
    u = torch.zeros_like(y)
    u[0, 0] = torch.randn(6)  # one non-zero token among zeros
    z = orthogonal_fusion(y, u)
    assert torch.isfinite(z).all()
    assert torch.equal(z[1:, :, :6], y[1:]) and torch.equal(z[..., 6:], u)


@pytest.mark.parametrize("kind", FUSIONS)
def test_each_fusion_output(kind):
    g = torch.Generator().manual_seed(1)
    y, u = torch.randn(2, 7, 6, generator=g), torch.randn(2, 7, 6, generator=g)
    f = Fusion(kind, elm=True)
    z = f(y, u)
    assert z.shape == (2, 7, f.out_dim(6)) and f.out_dim(6) == (12 if kind in ("concat", "orthogonal") else 6)
    expected = {
        "none": u, "sum": y + u, "hadamard": y * u, "concat": torch.cat([y, u], -1),
        "fast_norm": (y + u) / (1e-4 + 2.0), "orthogonal": orthogonal_reference(y, u).float(),
    }[kind]
    assert torch.allclose(z, expected, atol=1e-5)


def test_fast_norm_weights_are_non_negative_and_normalised():
    f = Fusion("fast_norm")
    y, u = torch.randn(4, 6), torch.randn(4, 6)
    with torch.no_grad():
        f.weight.copy_(torch.tensor([-3.0, 2.0]))  # ReLU: w = (0, 2)
    assert torch.allclose(f(y, u), 2.0 * u / (1e-4 + 2.0))
    f(y, u).sum().backward()
    assert f.weight.grad is not None


def test_fusion_none_without_elm_is_y():
    y = torch.randn(2, 3, 4)
    assert torch.equal(Fusion("none", elm=False)(y, None), y)
    with pytest.raises(ConfigError, match="fusion='orthogonal'"):
        Fusion("orthogonal", elm=False)
    with pytest.raises(ConfigError, match="fusion='mean'"):
        Fusion("mean")


@pytest.mark.parametrize("kind", FUSIONS)
def test_fusion_option_sets_the_model(kind):
    m = dtop(fusion=kind, k=1, head_dim=16).eval()
    assert m.fusion.kind == kind
    assert m.head.in_features == D + (2 * D if kind in ("concat", "orthogonal") else D)
    with torch.no_grad():
        out = m.branches(images())
        ref = m.local_pool(m.fusion(out["Y"].flatten(2).transpose(1, 2), out["U"].flatten(2).transpose(1, 2)))
    assert torch.allclose(out["local"], ref, atol=1e-6)


# ----------------------------------------------------------------------------- options and builder
def test_head_dim_option():
    m = dtop(head_dim=64).eval()
    assert m(images()).shape == (2, 64) and m.feature_dim == 64
    with pytest.raises(ConfigError, match="head_dim"):
        dtop(head_dim=0)


def test_unknown_option_names_it_and_the_valid_ones():
    with pytest.raises(ConfigError, match=r"'elm_iRB'.*valid options are k, pos_embed"):
        dtop(elm_iRB=False)


@pytest.mark.parametrize("opt", [{"elm": "yes"}, {"fusion": "add"}, {"elm_wave": 1}])
def test_option_values_are_checked(opt):
    with pytest.raises(ConfigError, match=next(iter(opt))):
        dtop(**opt)


def test_pooling_picks_the_local_pooling():
    assert dtop().local_pool.kind == "gem"  # the build_model default 'cls' means DToP's GeM
    assert build_model("vit_tiny_patch16_224", pooling="avg", dtop=True, **TINY).local_pool.kind == "avg"
    with pytest.raises(ConfigError, match="pooling='dist'"):
        build_model("vit_tiny_patch16_224", pooling="dist", dtop=True, **TINY)


def test_non_vit_backbone_is_refused():
    with pytest.raises(ConfigError, match="VisionTransformer"):
        build_model("resnet18", img_size=32, dtop=True)
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        build_model("vit_tiny_patch16_224", weights="efficientnet_lite0", dtop=True, **TINY)
    fixed_size = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY)
    with pytest.raises(ConfigError, match="dynamic_img_size"):
        DToPModel(fixed_size)


def test_checkpoint_weights_round_trip(tmp_path):
    m = dtop(k=2, head_dim=16).eval()
    torch.save(m.state_dict(), tmp_path / "dtop.pt")
    torch.save(m.backbone.state_dict(), tmp_path / "vit.pt")
    full = build_model("vit_tiny_patch16_224", weights=tmp_path / "dtop.pt", dtop=True, k=2, head_dim=16, **TINY)
    vit_only = build_model("vit_tiny_patch16_224", weights=tmp_path / "vit.pt", dtop=True, k=2, head_dim=16, **TINY)
    x = images()
    with torch.no_grad():
        assert torch.equal(full.eval()(x), m(x))
        assert torch.equal(vit_only.eval().forward_tokens(x), m.forward_tokens(x))
    torch.save({"something": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError):
        build_model("vit_tiny_patch16_224", weights=tmp_path / "bad.pt", dtop=True, **TINY)


def test_deepcopy_hooks_follow_the_copy():
    """The momentum encoder is a deepcopy: its hooks and position embedding must be its own."""
    m = dtop(k=2, head_dim=16, pos_embed="cpe").eval()
    c = copy.deepcopy(m)
    assert c.backbone._pos_embed.__self__ is c
    assert all(h.__self__ is c for blk in c.backbone.blocks for h in blk._forward_hooks.values())
    x = images()
    with torch.no_grad():
        assert torch.equal(c(x), m(x))
        c.peg.conv.weight.add_(1.0)
        assert not torch.allclose(c(x), m(x))


def test_training_step_reaches_every_part():
    m = dtop(k=2, head_dim=16).train()
    m(images(b=4))[:, 0].sum().backward()
    for name in ("layer_mix.weight", "elm.irb.expand.0.weight", "elm.aspp.fuse.0.weight", "head.weight",
                 "backbone.blocks.11.mlp.fc1.weight", "backbone.pos_embed", "backbone.cls_token"):
        assert m.get_parameter(name).grad is not None, name


# ----------------------------------------------------------------------------- hybrid backbones
def test_timm_hybrid_builds_and_takes_any_size():
    torch.manual_seed(0)
    m = build_model("vit_tiny_r_s16_p8_224", img_size=64, dtop=True, k=2, head_dim=32).eval()
    assert isinstance(m.backbone.patch_embed, HybridEmbed)
    with torch.no_grad():
        assert m(images(h=64, w=64)).shape == (2, 32)
        assert m.branches(images(h=64, w=96))["Y"].shape == (2, D, 2, 3)


def test_effnet_lite0_vit_loads_the_real_stem_weights():
    torch.manual_seed(0)
    m = build_model("effnet_lite0_vit", weights="efficientnet_lite0", img_size=64, dtop=True, k=2, head_dim=32).eval()
    embed = m.backbone.patch_embed
    assert isinstance(embed, HybridEmbed) and embed.feature_dim == 112 and embed.feature_ratio == (16, 16)
    from nbsrc.models.weights import load_efficientnet_lite0

    ref = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    load_efficientnet_lite0(ref)
    stem = embed.backbone
    assert torch.equal(stem[0].weight, ref.conv_stem.weight)
    assert torch.equal(stem[-1][0].conv_pw.weight, ref.blocks[4][0].conv_pw.weight)
    with torch.no_grad():
        assert m(images(h=64, w=48)).shape == (2, 32)
    random = create_effnet_lite0_vit(img_size=64)
    assert not torch.equal(random.patch_embed.backbone[0].weight, ref.conv_stem.weight)
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        create_effnet_lite0_vit(img_size=64, weights="timm")
    with pytest.raises(ConfigError, match="patch_size"):
        build_model("effnet_lite0_vit", img_size=64, patch_size=7, dtop=True)


def test_effnet_lite0_vit_without_dtop_is_a_retrieval_model(tmp_path):
    """What build_model('effnet_lite0_vit', ...) dispatches to."""
    torch.manual_seed(0)
    m = build_model("effnet_lite0_vit", pooling="cls", weights="efficientnet_lite0", img_size=64).eval()
    assert isinstance(m, RetrievalModel) and isinstance(m.backbone.patch_embed, HybridEmbed)
    with torch.no_grad():
        assert m(images(h=64, w=64)).shape == (2, D)
    torch.save(m.backbone.state_dict(), tmp_path / "hybrid.pt")
    again = build_model("effnet_lite0_vit", pooling="cls", weights=tmp_path / "hybrid.pt", img_size=64).eval()
    with torch.no_grad():
        assert torch.equal(again(images(h=64, w=64)), m(images(h=64, w=64)))
    assert isinstance(build_model("effnet_lite0_vit", img_size=64, dtop=True, k=1, head_dim=8), DToPModel)
    with pytest.raises(ConfigError, match="need dtop=True"):
        build_model("effnet_lite0_vit", img_size=64, k=2)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        m = dtop(k=2, head_dim=16, pos_embed="cpe").eval()  # eval: no WaveBlock randomness
        m.backbone.set_grad_checkpointing(ckpt)
        m(images())[:, 0].sum().backward()
        grads.append((m.head.weight.grad, m.backbone.blocks[0].attn.qkv.weight.grad, m.peg.conv.weight.grad))
        assert m._layers is None  # nothing collected outside the forward pass
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_bench_runs_and_reports_a_ratio():
    from bench.dtop import bench_dtop_vs_vit

    r = bench_dtop_vs_vit(img_size=16, patch_size=8, batch=2, steps=3, warmup=0, k=1, head_dim=8)
    assert r["ratio_of_medians"] == pytest.approx(r["dtop_step_s"] / r["vit_step_s"])
    assert 0 < r["ratio_ci95"][0] <= r["ratio"] <= r["ratio_ci95"][1]  # median of per-step ratios
    assert r["verdict"] in ("met", "not met", "within noise of the target")
    assert r["dtop_params"] > r["vit_params"]
    assert math.isfinite(r["vit_step_s"])
