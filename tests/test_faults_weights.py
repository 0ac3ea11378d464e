"""The project's own outputs as starting weights.

A run directory, its ``model.pt`` and its ``checkpoint.pt`` all load into a new model of the same
kind (plain ViT, DToP, the hybrid ``effnet_lite0_vit``): every weight but the PCA is taken, and the
PCA starts unfitted (it is refitted by the new run; see ``load_start_weights``).
"""

from __future__ import annotations

import json

import pytest
import torch

from nbsrc.errors import ConfigError, WeightsError
from nbsrc.models import build_model
from nbsrc.train.checkpoint import rng_state, save_checkpoint

KINDS = {
    "plain": dict(backbone="vit_tiny_patch16_224", img_size=8, patch_size=4, dim=4, pooling="gem", gem_learnable=True),
    "dtop": dict(backbone="vit_tiny_patch16_224", img_size=16, patch_size=4, dim=4, dtop=True, k=2, head_dim=16),
    "hybrid": dict(backbone="effnet_lite0_vit", img_size=32, dim=4),
}
SOURCES = ("run directory", "unfinished run directory", "model.pt", "checkpoint.pt")


def _trained_like(kind: str) -> torch.nn.Module:
    """A model of ``kind`` whose every weight differs from a fresh build's, with a fitted PCA."""
    torch.manual_seed(1)
    m = build_model(**KINDS[kind])
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    m.pca.fit(torch.randn(16, m.feature_dim))
    return m.eval()


def _save_run(run_dir, model, kind: str, finished: bool) -> None:
    """What a run leaves: config.json, checkpoint.pt as the training loop writes it (RNG state with
    numpy arrays, optimizer), and model.pt once finished."""
    run_dir.mkdir(parents=True)
    cfg = {"backbone": KINDS[kind]["backbone"], "img_size": KINDS[kind]["img_size"]}
    (run_dir / "config.json").write_text(json.dumps(cfg))
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint({"iteration": 3, "config": cfg, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "rng": rng_state()}, run_dir)
    if finished:
        torch.save(model.state_dict(), run_dir / "model.pt")


def _source(tmp_path, source: str):
    run = tmp_path / "runs" / "old"
    return {"run directory": run, "unfinished run directory": run, "model.pt": run / "model.pt",
            "checkpoint.pt": run / "checkpoint.pt"}[source]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_own_outputs_load_as_starting_weights(tmp_path, kind, source):
    old = _trained_like(kind)
    _save_run(tmp_path / "runs" / "old", old, kind, finished=source != "unfinished run directory")
    torch.manual_seed(2)
    new = build_model(**KINDS[kind], weights=_source(tmp_path, source)).eval()
    theirs = old.state_dict()
    for k, v in new.state_dict().items():
        if not k.startswith("pca."):
            assert torch.equal(v, theirs[k]), k
    assert not bool(new.pca.fitted)  # the PCA is refitted by the new run, never taken
    x = torch.randn(2, 3, KINDS[kind]["img_size"], KINDS[kind]["img_size"])
    with torch.no_grad():
        assert torch.equal(new.forward_features(x), old.forward_features(x))


def test_a_plain_run_as_weights_for_dtop_takes_its_backbone(tmp_path, capsys):
    old = _trained_like("plain")
    _save_run(tmp_path / "runs" / "old", old, "plain", finished=True)
    new = build_model(**{**KINDS["dtop"], "img_size": 8}, weights=tmp_path / "runs" / "old")
    assert all(torch.equal(v, old.backbone.state_dict()[k]) for k, v in new.backbone.state_dict().items())
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"weights: took only the backbone from {tmp_path / 'runs' / 'old' / 'model.pt'}")
    assert "keep their initialisation: elm, head, layer_mix" in line


def test_a_bare_backbone_state_dict_still_loads(tmp_path):
    old = _trained_like("plain")
    torch.save(old.backbone.state_dict(), tmp_path / "vit.pt")
    new = build_model(**KINDS["plain"], weights=tmp_path / "vit.pt")
    assert all(torch.equal(v, old.backbone.state_dict()[k]) for k, v in new.backbone.state_dict().items())


def test_weights_that_do_not_fit_say_how_they_were_built(tmp_path):
    _save_run(tmp_path / "runs" / "old", _trained_like("plain"), "plain", finished=True)
    with pytest.raises(WeightsError) as err:
        build_model(**{**KINDS["plain"], "img_size": 16}, weights=tmp_path / "runs" / "old")
    msg = str(err.value)
    assert "\n" not in msg and "\t" not in msg
    assert f"weights in {tmp_path / 'runs' / 'old' / 'model.pt'} do not fit the model (" in msg
    assert "size mismatch for backbone.pos_embed" in msg
    assert "they come from a model built with backbone='vit_tiny_patch16_224', img_size=8" in msg


def test_unusable_weight_sources_are_one_line_errors(tmp_path):
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"is a directory without model\.pt or checkpoint\.pt"):
        build_model(**KINDS["plain"], weights=tmp_path / "empty_run")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"cannot read weights file .*junk\.pt \(UnpicklingError"):
        build_model(**KINDS["plain"], weights=tmp_path / "junk.pt")
    torch.save({"model": {"w": [1, 2]}}, tmp_path / "lists.pt")
    with pytest.raises(WeightsError, match="holds no state dict of tensors"):
        build_model(**KINDS["plain"], weights=tmp_path / "lists.pt")
    with pytest.raises(WeightsError, match="neither one of none, timm, efficientnet_lite0 nor an existing"):
        build_model(**KINDS["plain"], weights=tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- patches that do not tile
@pytest.mark.parametrize("options", [{}, {"dtop": True, "k": 1, "head_dim": 8}])
def test_a_patch_size_that_does_not_tile_the_image_is_an_error(options):
    with pytest.raises(ConfigError, match=r"patch_size=None \(vit_tiny_patch16_224's own 16-px patches\) does not "
                                          r"tile img_size=28: the last 12 px of each side would never be seen"):
        build_model("vit_tiny_patch16_224", img_size=28, patch_size=None, **options)
    with pytest.raises(ConfigError, match=r"patch_size=5 does not tile img_size=28: the last 3 px"):
        build_model("vit_tiny_patch16_224", img_size=28, patch_size=5, **options)
    assert build_model("vit_tiny_patch16_224", img_size=32, patch_size=None, **options) is not None


def test_a_hybrid_tiles_its_feature_map_not_the_image():
    build_model("vit_tiny_r_s16_p8_224", img_size=64)  # 16 x 16 map, 8-px patches: tiles
    with pytest.raises(ConfigError, match=r"'vit_tiny_r_s16_p8_224' at img_size=80: its patches do not tile the "
                                          r"CNN's feature map"):
        build_model("vit_tiny_r_s16_p8_224", img_size=80)  # 20 x 20 map
