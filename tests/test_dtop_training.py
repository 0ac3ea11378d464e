"""DToP trains through the ordinary loop with group-size batches at mixed sizes (Table A12), and the
ablation grids of notebook 08 change only the option they name."""

import dataclasses

import numpy as np
import pytest
import torch

from nbsrc.config import ExperimentConfig
from nbsrc.data import RetrievalDataset, RetrievalTransform
from nbsrc.data.group_sampler import image_sizes, mixed_size_variant
from nbsrc.errors import ConfigError
from nbsrc.models import build_model
from nbsrc.train import PairTask, fit
from nbsrc.train.rundir import read_metrics

DTOP = {"k": 2, "head_dim": 32}


def mixed_train_set(n=48, classes=4):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return mixed_size_variant(RetrievalDataset(images, np.arange(n) % classes, RetrievalTransform(28, train=True)))


def cfg_for(tmp_path, **kw):
    base = dict(name="dtop", runs_dir=str(tmp_path), img_size=28, patch_size=7, sampler="group_size",
                batch_size=8, m_per_class=2, iterations=4, log_every=1, ckpt_every=2, progress=False,
                lam=0.0, memory_size=0, dtop=DTOP, device="cpu")
    cfg = ExperimentConfig(**{**base, **kw})
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    return cfg


def dtop_model(cfg):
    torch.manual_seed(0)
    return build_model(cfg.model.backbone, img_size=cfg.data.img_size, patch_size=cfg.model.patch_size,
                       dtop=cfg.model.dtop)


@pytest.mark.parametrize("loss,optimizer", [("arcface", "sgd"), ("contrastive", "adamw")])
def test_dtop_with_dpe_trains_on_group_size_batches_of_mixed_sizes(tmp_path, loss, optimizer):
    cfg = cfg_for(tmp_path, loss=loss, optimizer=optimizer, lr=1e-3, warmup_iters=1)
    ds = mixed_train_set()
    model = dtop_model(cfg)
    assert model.pos_embed_kind == "dpe"
    shapes = []
    model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape[-2:])))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(cfg, model, PairTask(cfg, ds), cfg.run_dir)
    assert len(shapes) == cfg.optim.iterations
    assert set(shapes) <= set(image_sizes(ds)) and len(set(shapes)) > 1  # own sizes, several of them
    rows = read_metrics(cfg.run_dir, "train")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["total"]) for r in rows)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_group_size_training_resumes_to_the_same_weights(tmp_path):
    from nbsrc.train.checkpoint import load_checkpoint

    ds = mixed_train_set()
    full = cfg_for(tmp_path, name="full", loss="contrastive")
    fit(full, dtop_model(full), PairTask(full, ds), full.run_dir)
    part = cfg_for(tmp_path, name="part", loss="contrastive")
    fit(part, dtop_model(part), PairTask(part, ds), part.run_dir, stop_after=2)
    fit(part, dtop_model(part), PairTask(part, ds), part.run_dir, resume=True)
    a, b = load_checkpoint(full.run_dir)["model"], load_checkpoint(part.run_dir)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- ablation grids
def test_ablation_grid_changes_only_the_named_option():
    from nbsrc.paper.grids import DTOP_TABLES, dtop_ablation_grid

    base = ExperimentConfig(name="dtop", dtop=True)
    cases = {"A8": [1, 6, 3], "A9": ["none", "dpe", "cpe"], "A10": [(), ("irb",), ("irb", "aspp", "wave")],
             "A12": ["m_per_class", "group_size"], "A13": ["orthogonal", "sum", "concat"]}
    assert set(cases) == set(DTOP_TABLES)
    names = set()
    for table, values in cases.items():
        grid = dtop_ablation_grid(base, table, values)
        assert len(grid) == len(values)
        again = dtop_ablation_grid(base, table, values)
        assert {k: c.run.name for k, c in grid.items()} == {k: c.run.name for k, c in again.items()}  # stable names
        for cfg in grid.values():
            d, b = cfg.fingerprint(), base.fingerprint()
            changed = {k for k in d if d[k] != b[k]} - {"name", "model_options"}  # the DToP fields: just below
            dd, bd = dataclasses.asdict(cfg.model.dtop), dataclasses.asdict(base.model.dtop)
            opts = {k for k in dd if dd[k] != bd[k]}
            assert changed | opts <= set(DTOP_TABLES[table]), (table, changed, opts)
        names |= {c.run.name for c in grid.values()}
    # the base point of every table is the base run itself (reused), every other point has its own name
    assert dtop_ablation_grid(base, "A8", [6])["k = 6"].run.name == "dtop"
    assert len(names) == 1 + 2 + 2 + 2 + 2 + 2


def test_ablation_grid_values_reach_the_model():
    from nbsrc.paper.grids import dtop_ablation_grid

    base = ExperimentConfig(name="d", dtop={"k": 2, "head_dim": 16}, img_size=28, patch_size=7)
    k1 = next(iter(dtop_ablation_grid(base, "A8", [1]).values()))
    assert dtop_model(k1).k == 1
    cpe = next(iter(dtop_ablation_grid(base, "A9", ["cpe"]).values()))
    assert dtop_model(cpe).peg is not None
    irb = next(iter(dtop_ablation_grid(base, "A10", [("irb",)]).values()))
    m = dtop_model(irb)
    assert m.elm.irb is not None and m.elm.aspp is None and m.elm.wave is None
    none = next(iter(dtop_ablation_grid(base, "A10", [()]).values()))
    assert dtop_model(none).elm is None
    assert next(iter(dtop_ablation_grid(base, "A13", ["sum"]).values())).model.dtop.fusion == "sum"
    assert next(iter(dtop_ablation_grid(base, "A12", ["group_size"]).values())).data.sampler == "group_size"


def test_ablation_grid_bad_input():
    from nbsrc.paper.grids import dtop_ablation_grid

    base = ExperimentConfig(dtop=True)
    with pytest.raises(ConfigError, match="table='A7'.*A8"):
        dtop_ablation_grid(base, "A7", [1])
    with pytest.raises(ConfigError, match="ELM part"):
        dtop_ablation_grid(base, "A10", [("irb", "bogus")])
    with pytest.raises(ConfigError, match="dtop"):
        dtop_ablation_grid(ExperimentConfig(), "A8", [1])
    with pytest.raises(ConfigError, match="values"):
        dtop_ablation_grid(base, "A8", [])


def test_size_variant_mixed_is_recorded_in_the_config_and_applied_by_build_data(tiny_cfg):
    """A12 trains on the mixed-size variant; the config says so, so a saved run can be rebuilt."""
    from nbsrc.config import ExperimentConfig
    from nbsrc.data import build_data
    from nbsrc.errors import ConfigError
    from nbsrc.paper.grids import dtop_ablation_grid

    cfg = tiny_cfg.replace(img_size=8, patch_size=4)
    square, mixed = build_data(cfg), build_data(cfg.replace(size_variant="mixed"))
    assert set(image_sizes(square.train)) == {(8, 8)}
    sizes = image_sizes(mixed.train)
    assert len(set(sizes)) > 1 and all(max(h, w) == 8 and h % 4 == 0 and w % 4 == 0 for h, w in sizes)
    assert np.array_equal(square.train.labels, mixed.train.labels)
    assert image_sizes(build_data(cfg.replace(size_variant="mixed")).train) == sizes  # deterministic
    for c in dtop_ablation_grid(cfg.replace(dtop=True), "A12", ["m_per_class", "group_size"]).values():
        assert c.data.size_variant == "mixed" and ExperimentConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="size_variant"):
        cfg.replace(size_variant="wide")
