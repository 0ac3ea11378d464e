"""PiT as DToP's backbone (Table A5's PiT-B rows): :class:`nbsrc.models.pit.PiTTokens` computes what
timm's PiT computes at its own size, DPE (eq. 2) equals a timm PiT built for the other size with the
resampled position map, and DToP's global branch takes the last stage's [CLS] or DIST tokens.

PiT-Ti (timm ``pit_ti_224``, 4.8M parameters; PiT-B's three-stage layout, depths 2 / 6 / 4 against 3 / 6 / 4)
keeps the tests fast; the PiT-B presets themselves are built in tests/test_presets.py.
"""

import pytest
import timm
import torch
import torch.nn.functional as F

from nbsrc.errors import ConfigError
from nbsrc.models import build_model
from nbsrc.models.dtop import DToPModel
from nbsrc.models.pit import PiTTokens


def pit(name="pit_ti_224", **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0, **kw).eval()


def test_at_its_own_size_it_is_timms_pit():
    net = pit("pit_ti_distilled_224")
    tokens = PiTTokens(net).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = net.forward_features(x)  # timm: the normalised [CLS] and DIST of the last stage, [2, 2, 256]
        out = tokens.forward_features(x)
    assert tokens.grid == (7, 7) and out.shape == (2, 2 + 49, 256)
    assert torch.equal(out[:, :2], ref)  # bit for bit: DPE adds the map unchanged at the native grid
    assert set(tokens.state_dict()) == set(net.state_dict())  # timm's names, each weight once
    assert len(tokens.blocks) == 4 and tokens.num_features == 256 and tokens.num_prefix_tokens == 2


def test_dpe_is_the_resampled_position_map_on_timms_pit():
    """PiT-Ti's stem (16-px kernel, stride 8) maps 224 px to a 27 x 27 grid, 160 x 288 px to 19 x 35; a timm
    PiT built for that size, given the 27 x 27 map resampled bilinearly (align_corners=False), must compute
    the same tokens."""
    net = pit()
    tokens = PiTTokens(net).eval()
    x = torch.randn(1, 3, 160, 288)
    other = pit(img_size=(160, 288))
    assert net.pos_embed.shape[-2:] == (27, 27) and other.patch_embed.grid_size == (19, 35)
    state = net.state_dict()
    state["pos_embed"] = F.interpolate(state["pos_embed"], size=(19, 35), mode="bilinear", align_corners=False)
    other.load_state_dict(state)
    with torch.no_grad():
        ref = other.forward_features(x)
        out = tokens.forward_features(x)
    assert tokens.grid == (5, 9)  # 19 x 35 -> 10 x 18 -> 5 x 9 (stride-2 pooling twice)
    assert torch.allclose(out[:, :1], ref, atol=1e-5)
    tokens.set_position("none")
    with torch.no_grad():
        assert not torch.allclose(tokens.forward_features(x)[:, :1], ref, atol=1e-3)


@pytest.mark.parametrize("name, pooling, index", [("pit_ti_224", "cls", 0), ("pit_ti_distilled_224", "dist", 1)])
def test_global_branch_takes_the_last_stages_tokens(name, pooling, index):
    """Eq. (5) on PiT: the k = 4 last-stage [CLS] (or DIST) tokens through the final norm; the last of them
    is timm's output token. Eq. (6): the patch maps of that stage, on its grid."""
    net = pit(name)
    ref_net = pit(name)
    model = DToPModel(PiTTokens(net), k=4, elm=False, head_dim=768, branch="global",
                      global_token="dist" if pooling == "dist" else "cls").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        b = model.branches(x)
        ref = ref_net.forward_features(x)[:, index]
    assert b["cls"].shape == (2, 4, 256) and b["patches"].shape == (2, 4, 49, 256) and b["Y"].shape == (2, 256, 7, 7)
    assert torch.allclose(b["cls"][:, -1], ref, atol=1e-6)
    assert not torch.allclose(b["cls"][:, -2], ref, atol=1e-3)  # the earlier blocks of the stage differ
    assert model.head.in_features == 4 * 256


def test_any_size_trains_and_reaches_the_position_map():
    model = build_model("pit_ti_224", dtop=True, k=2, elm=True, head_dim=32, weights="none")
    assert isinstance(model.backbone, PiTTokens)
    z = model(torch.randn(2, 3, 96, 64))  # a group-size batch of portrait images
    assert z.shape == (2, 32) and torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)
    z.sum().backward()
    assert model.backbone.pos_embed.grad is not None and model.backbone.pos_embed.grad.abs().sum() > 0
    assert model.backbone.blocks[0].attn.qkv.weight.grad is not None


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"k=6 is out of range: this backbone has 4 encoder blocks in its last stage"):
        build_model("pit_ti_224", dtop=True, k=6, weights="none")
    with pytest.raises(ConfigError, match="pos_embed='cpe' is not offered for PiT"):
        build_model("pit_ti_224", dtop=True, k=2, pos_embed="cpe", weights="none")
    with pytest.raises(ConfigError, match="pooling='dist' needs a distilled"):
        build_model("pit_ti_224", dtop=True, k=2, pooling="dist", weights="none")
    with pytest.raises(ConfigError, match="patch_size=8 does not apply to 'pit_ti_224'"):
        build_model("pit_ti_224", dtop=True, k=2, patch_size=8, weights="none")
    model = build_model("pit_ti_224", dtop=True, k=2, weights="none").eval()
    with pytest.raises(ConfigError, match="PiT needs images of at least 16x16 px"):
        model(torch.randn(1, 3, 12, 64))


def test_the_pit_b_presets_protocol_trains_on_group_size_batches(tmp_path):
    """The protocol of ``dtop_a5_pitb_cls_sfm`` (ArcFace, SGD, group-size batches at mixed sizes, one branch,
    k = 4) through the ordinary loop, on PiT-Ti at 64 px: every step at its batch's own size, finite losses."""
    import numpy as np

    from nbsrc.data import RetrievalDataset, RetrievalTransform
    from nbsrc.data.group_sampler import mixed_size_variant
    from nbsrc.models import model_from_config
    from nbsrc.presets import load_preset
    from nbsrc.train import PairTask, fit
    from nbsrc.train.rundir import read_metrics

    cfg = load_preset("dtop_a5_pitb_cls_sfm", backbone="pit_ti_224", img_size=64, weights="none", device="cpu",
                      iterations=3, batch_size=8, m_per_class=2, log_every=1, ckpt_every=3, progress=False,
                      runs_dir=str(tmp_path))
    assert cfg.data.sampler == "group_size" and cfg.loss.name == "arcface" and cfg.model.dtop.k == 4
    cfg.run_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 64, 64), dtype=np.uint8)
    ds = mixed_size_variant(RetrievalDataset(images, np.arange(48) % 4, RetrievalTransform(64, train=True)))
    torch.manual_seed(0)
    model = model_from_config(cfg)
    assert isinstance(model.backbone, PiTTokens)
    shapes = []
    model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape[-2:])))
    before = model.backbone.pos_embed.detach().clone()
    fit(cfg, model, PairTask(cfg, ds), cfg.run_dir)
    assert len(shapes) == 3 and len(set(shapes)) > 1  # the batches' own aspect ratios, longer side 64
    assert all(max(s) == 64 and s[0] % 16 == 0 and s[1] % 16 == 0 for s in shapes)
    assert all(np.isfinite(r["total"]) for r in read_metrics(cfg.run_dir, "train"))
    assert not torch.equal(before, model.backbone.pos_embed)


def test_the_pit_b_preset_is_evaluated_the_dtop_way(tmp_path):
    """Notebook 09's Revisited path on the PiT-B DIST preset (PiT-Ti for speed): whitening learned from
    SfM-120k at the preset's three scales; the paper's column is empty (the DIST line is illegible)."""
    import numpy as np
    from fixtures_benchmarks import make_revisited, make_sfm120k

    from nbsrc.paper.reproduce import evaluate_benchmarks

    sfm, rev = make_sfm120k(tmp_path / "sfm", n_clusters=10, per_cluster=6), make_revisited(tmp_path / "rev")
    tiny = {"backbone": "pit_ti_distilled_224", "img_size": 48, "weights": "none", "device": "cpu", "progress": False,
            "model_options": {"dtop": True, "k": 4, "elm": False, "fusion": "none", "head_dim": 8, "branch": "global"}}
    torch.manual_seed(0)
    table = evaluate_benchmarks("dtop_a5_pitb_dist_sfm", {"roxford5k": rev}, overrides=tiny, sfm_root=sfm)
    assert table.attrs["revisited"].startswith("scales 1, 0.707, 0.5 on both sides; whitening learned from")
    assert 0 <= table.loc[("roxford5k", "mAP M"), "ours"] <= 100
    assert table.loc[("roxford5k", "mAP M"), "paper"] is None
    assert np.isnan(table.loc[("roxford5k", "mAP M"), "difference"])


@pytest.mark.parametrize("pooling, index", [("cls", 0), ("dist", 1)])
def test_irts_poolings_take_the_same_tokens(pooling, index):
    """Without DToP, ``build_model('pit_*', pooling)`` pools PiT's last-stage tokens as a ViT's: ``cls`` and
    ``dist`` are timm's output tokens, l2-normalised; ``avg`` averages the patch tokens."""
    model = build_model("pit_ti_distilled_224", pooling, weights="none").eval()
    net = pit("pit_ti_distilled_224")
    model.backbone.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), F.normalize(net.forward_features(x)[:, index], dim=-1), atol=1e-6)
        avg = build_model("pit_ti_distilled_224", "avg", weights="none").eval()
        avg.backbone.load_state_dict(net.state_dict())
        tokens = PiTTokens(net).forward_features(x)
        assert torch.allclose(avg(x), F.normalize(tokens[:, 2:].mean(1), dim=-1), atol=1e-6)


def test_export_takes_torchscript_and_refuses_safetensors_in_one_line(tmp_path):
    """A PiT model (DToP or plain) exports as TorchScript with the same embeddings; timm's PiT cannot give
    the tokens nbsrc pools, so safetensors is a one-line refusal before anything is written."""
    from nbsrc.retrieval.export import export_model
    from nbsrc.retrieval.models import EmbeddingModel, Preprocessing

    x = torch.randn(2, 3, 64, 48)
    for i, kw in enumerate([dict(dtop=True, k=2, head_dim=16), {}]):
        torch.manual_seed(0)
        net = build_model("pit_ti_224", pooling="cls", weights="none", **kw).eval()
        em = EmbeddingModel(net, Preprocessing(64), {"source": "run", "spec": "runs/pit", "config": {
            "backbone": "pit_ti_224", "model_options": {"dtop": bool(kw)}}})
        with pytest.raises(ConfigError, match="torchscript or onnx"):
            export_model(em, "safetensors", tmp_path / f"m{i}.safetensors", log=None)
        assert not (tmp_path / f"m{i}.safetensors").exists()
        done = export_model(em, "torchscript", tmp_path / f"m{i}.pt", log=None)
        assert done.meta["check"]["max_abs_diff"] <= 1e-5
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.load(str(tmp_path / f"m{i}.pt"))(x), net(x), atol=1e-5, rtol=0)
