"""The one door to a backbone (:func:`nbsrc.models.backbones.create_backbone`): a backbone of nbsrc's own is
one line in ``OWN_BACKBONES`` and reaches the plain model and DToP alike; a weight source is one line in
``WEIGHT_SOURCES`` and fits only the backbones it names."""

import pytest
import timm
import torch

from nbsrc.errors import ConfigError
from nbsrc.models import OWN_BACKBONES, WEIGHT_SOURCES, build_model
from nbsrc.models.backbones import create_backbone
from nbsrc.models.weights import WeightSource
from nbsrc.retrieval.models import shortcuts

TINY = dict(img_size=32, patch_size=8)


def toy_vit(calls):
    def build(name, weights, img_size, patch_size, dynamic):
        calls.append((name, weights, img_size, patch_size, dynamic))
        extra = dict(dynamic_img_size=True, dynamic_img_pad=True) if dynamic else {}
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=3, img_size=img_size,
                                 patch_size=patch_size, **extra)
    return build


def test_an_own_backbone_is_one_registry_line_for_the_plain_model_and_dtop(monkeypatch):
    calls = []
    monkeypatch.setitem(OWN_BACKBONES, "toy_vit*", toy_vit(calls))
    x = torch.randn(2, 3, 32, 32)
    plain = build_model("toy_vit_3", "cls", **TINY).eval()
    dtop = build_model("toy_vit_3", dtop=True, k=2, head_dim=16, **TINY).eval()
    with torch.no_grad():
        assert plain(x).shape == (2, 192) and dtop(x).shape == (2, 16)
        assert dtop(torch.randn(1, 3, 40, 24)).shape == (1, 16)  # DToP's backbone takes any size
    assert calls == [("toy_vit_3", "none", 32, 8, False), ("toy_vit_3", "none", 32, 8, True)]
    assert dtop.backbone.grid == (5, 3)  # the token grid it reports, of its latest forward


def test_a_weight_source_fits_only_the_backbones_it_names():
    lite0 = "weights='efficientnet_lite0' loads only into backbone='tf_efficientnet_lite0'"
    with pytest.raises(ConfigError, match=lite0):
        build_model("resnet18", "gem", weights="efficientnet_lite0")
    with pytest.raises(ConfigError, match="weights='efficientnet_lite0' loads only into"):
        build_model("vit_tiny_patch16_224", weights="efficientnet_lite0", dtop=True, **TINY)
    with pytest.raises(ConfigError, match="'pit_ti_224' takes weights='timm' or 'none', not 'efficientnet_lite0'"):
        create_backbone("pit_ti_224", "efficientnet_lite0")


def test_a_new_weight_source_is_one_registry_line_and_its_name_alone_is_a_model(monkeypatch):
    def zeros(net):
        for p in net.parameters():
            p.data.zero_()

    monkeypatch.setitem(WEIGHT_SOURCES, "zeros", WeightSource(load=zeros, into=("resnet18",), backbone="resnet18"))
    net = build_model("resnet18", "gem", weights="zeros")
    assert all(not p.any() for p in net.backbone.parameters())
    assert shortcuts()["zeros"] == ("resnet18", "zeros")
    assert shortcuts()["efficientnet_lite0"] == ("tf_efficientnet_lite0", "efficientnet_lite0")
    with pytest.raises(ConfigError, match="loads only into backbone='resnet18'"):
        build_model("resnet34", "gem", weights="zeros")


def test_a_dtop_model_on_timms_vit_pickles_whole_with_its_own_position_hook(tmp_path):
    m = build_model("vit_tiny_patch16_224", dtop=True, k=2, head_dim=16, **TINY).eval()
    torch.save(m, tmp_path / "m.pt")
    c = torch.load(tmp_path / "m.pt", weights_only=False)
    assert c.backbone.positions.vit is c.backbone and c.backbone._pos_embed.__self__ is c
    x = torch.randn(2, 3, 40, 32)
    with torch.no_grad():
        assert torch.equal(c(x), m(x)) and c.backbone.grid == (5, 4)


@pytest.mark.parametrize("name, grid", [("vit_tiny_patch16_224", True), ("deit_tiny_distilled_patch16_224", True),
                                        ("pit_ti_224", True), ("effnet_lite0_vit", True),
                                        ("efficientnet_lite0", False), ("resnet18", False)])
def test_has_patch_grid_asks_the_built_backbone_not_its_name(name, grid):
    from nbsrc.models import has_patch_grid

    assert has_patch_grid(name) is grid  # the name: built on the meta device and asked
    net = create_backbone(name, "none")
    assert has_patch_grid(net) is grid
    model = build_model(name, "cls" if grid else "gem")
    assert has_patch_grid(model) is grid  # a retrieval model is asked of its backbone


def test_has_patch_grid_of_a_model_whose_name_says_nothing(monkeypatch):
    from nbsrc.models import has_patch_grid

    calls = []
    monkeypatch.setitem(OWN_BACKBONES, "plain_name*", toy_vit(calls))
    assert has_patch_grid(build_model("plain_name", dtop=True, k=2, head_dim=16, **TINY))
