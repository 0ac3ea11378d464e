"""The config in sections: fields by name (unique across the sections), every input form (by name,
sections, mixed, the older ``model_options``), the typed DToP and tuple sections, cross-section checks,
``replace`` changing only what it names, the saved form by section with its format, and compatibility with
run directories saved before the sections (``tests/fixtures/config_925e020``: config.json files,
fingerprints and CLI run names written by nbsrc 925e020, the last version before the sections)."""

import dataclasses
import json
from pathlib import Path

import pytest

from nbsrc.__main__ import default_run_name
from nbsrc.config import (
    CONFIG_FORMAT,
    EXECUTION_FIELDS,
    SECTIONS,
    DToPConfig,
    ExperimentConfig,
    LossConfig,
    OptimConfig,
    TupleConfig,
    as_dtop,
    config_fields,
    upgrade,
)
from nbsrc.errors import ConfigError
from nbsrc.presets import PRESETS_DIR, list_presets, load_preset, preset_dict, upgrade_preset
from nbsrc.train.rundir import prepare_run_dir

FIXTURES = Path(__file__).parent / "fixtures" / "config_925e020"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


# ----------------------------------------------------------------------------- the names
def test_every_field_has_one_name_and_its_help():
    fields = config_fields()
    names = [f.name for f in fields]
    assert len(names) == len(set(names)) == sum(len(dataclasses.fields(c)) for c in (*SECTIONS.values(), DToPConfig))
    # a field is named as in its section, except loss.name
    assert {f.name: f"{f.section}.{f.field}" for f in fields if f.name != f.field} == {"loss": "loss.name"}
    assert {f.section for f in fields if f.field in ("k", "head_dim", "fusion")} == {"model.dtop"}
    assert EXECUTION_FIELDS <= set(names) and all(f.help for f in fields)
    assert {f.name for f in fields if f.execution} == EXECUTION_FIELDS
    assert not set(EXECUTION_FIELDS) & {"amp", "cpu_bf16", "seed", "lr"}


def test_a_field_is_read_by_its_name():
    cfg = ExperimentConfig(lr=1e-3, loss="snca", dtop={"k": 2})
    assert (cfg.value("lr"), cfg.value("loss"), cfg.value("k"), cfg.value("negative_pool")) == (1e-3, "snca", 2, None)
    assert ExperimentConfig().value("k") is None
    with pytest.raises(ConfigError, match=r"unknown parameter 'lrr' \(did you mean 'lr'\?\)"):
        cfg.value("lrr")


# fields added since the fixtures were written (925e020), each with a default that leaves old runs unchanged
ADDED_SINCE = {"split": None, "dtop_augmentation": False, "evaluator": None}


def without_added(flat: dict) -> dict:
    """``flat`` without the fields added since the fixtures, after checking they hold their defaults
    (the value that leaves a run saved before them unchanged)."""
    assert {k: flat[k] for k in ADDED_SINCE if k in flat} == {k: v for k, v in ADDED_SINCE.items() if k in flat}
    return {k: v for k, v in flat.items() if k not in ADDED_SINCE}


def dtop_of(options: dict):
    """The DToP model of an older config's ``model_options``."""
    return as_dtop({k: v for k, v in options.items() if k != "dtop"}) if options.get("dtop") else None


# ----------------------------------------------------------------------------- input forms
def test_by_name_sectioned_saved_and_mixed_inputs_give_the_same_config():
    by_name = {"name": "x", "lr": 1e-3, "loss": "snca", "dataset": "digits", "img_size": 16, "patch_size": 4,
               "ks": [1, 5], "dtop": {"k": 2}}
    cfg = ExperimentConfig.from_dict(by_name)
    assert (cfg.optim.lr, cfg.loss.name, cfg.data.dataset, cfg.eval.ks, cfg.model.dtop.k) == (1e-3, "snca", "digits",
                                                                                                 (1, 5), 2)
    assert ExperimentConfig.from_dict(dataclasses.asdict(cfg)) == cfg  # the sectioned dict
    assert ExperimentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # the saved JSON form
    old = {k: v for k, v in by_name.items() if k != "dtop"} | {"model_options": {"dtop": True, "k": 2}}
    assert ExperimentConfig.from_dict(old) == cfg  # the flat form of older versions
    mixed = ExperimentConfig(name="x", optim=OptimConfig(lr=1e-3), loss={"name": "snca"}, dataset="digits",
                             img_size=16, patch_size=4, ks=(1, 5), dtop=DToPConfig(k=2))
    assert mixed == cfg
    assert cfg.replace(lr=3e-5) == ExperimentConfig.from_dict({**by_name, "lr": 3e-5})
    assert cfg.replace(optim=OptimConfig()).optim == OptimConfig()  # a dataclass is the whole section
    assert cfg.replace(loss=LossConfig(lam=0.0)).loss == LossConfig(lam=0.0)
    assert cfg.replace(optim={"batch_size": 32}).optim == dataclasses.replace(cfg.optim, batch_size=32)  # its fields
    assert cfg.replace(dtop=None).model.dtop is None and cfg.replace(dtop=False).model.dtop is None
    assert cfg.replace(k=3).model.dtop == DToPConfig(k=3) and cfg.replace(dtop={"head_dim": 8}).model.dtop.k == 2
    assert cfg.replace(dtop=True) == cfg and ExperimentConfig(dtop=True).model.dtop == DToPConfig()  # True: on


def test_replace_changes_only_the_sections_it_names():
    cfg = load_preset("irt_r_sfm_deits")
    new = cfg.replace(lr=1e-4)
    assert new.optim.lr == 1e-4 and cfg.optim.lr != 1e-4  # a copy
    assert new.optim is not cfg.optim and all(getattr(new, s) is getattr(cfg, s) for s in SECTIONS if s != "optim")
    with pytest.raises(ConfigError, match=r"lr=-1.0 is invalid"):
        cfg.replace(lr=-1.0)
    with pytest.raises(ConfigError, match=r"patch_size=5 is invalid: expected a divisor of img_size=224"):
        cfg.replace(patch_size=5)  # the checks across sections run too


def test_unknown_keys_are_one_line_errors_with_the_closest_name():
    with pytest.raises(ConfigError, match=r"unknown parameter 'lrr' \(did you mean 'lr'\?\)"):
        ExperimentConfig.from_dict({"lrr": 1})
    with pytest.raises(ConfigError, match=r"unknown parameter 'optim\.lrr' \(did you mean 'lr'\?\)"):
        ExperimentConfig.from_dict({"optim": {"lrr": 1}})
    with pytest.raises(ConfigError,
                       match=r"unknown DToP option 'head_dimm' in model_options \(did you mean 'head_dim'"):
        ExperimentConfig.from_dict({"model_options": {"dtop": True, "head_dimm": 8}})
    with pytest.raises(ConfigError, match=r"unknown DToP option 'head_dimm' in dtop \(did you mean 'head_dim'"):
        ExperimentConfig.from_dict({"dtop": {"head_dimm": 8}})
    with pytest.raises(ConfigError, match="needs 'dtop': True"):
        ExperimentConfig.from_dict({"model_options": {"k": 2}})
    with pytest.raises(ConfigError, match="k=2 is a setting of the DToP model, which is off; turn it on with dtop="):
        ExperimentConfig.from_dict({"k": 2})
    with pytest.raises(ConfigError, match="lr is given twice"):
        ExperimentConfig.from_dict({"lr": 1e-3, "optim": {"lr": 1e-4}})
    with pytest.raises(ConfigError, match="config format 3 is not one this nbsrc reads"):
        ExperimentConfig.from_dict({**ExperimentConfig().to_dict(), "format": 3})
    for bad in ({"lrr": 1}, {"model_options": {"dtop": True, "kk": 1}}):
        with pytest.raises(ConfigError) as e:
            ExperimentConfig.from_dict(bad)
        assert "\n" not in str(e.value)


def test_the_dtop_section_and_its_older_model_options():
    assert as_dtop(None) is None and as_dtop(False) is None and as_dtop(True) == DToPConfig()
    d = as_dtop({"k": 3, "fusion": "sum", "branch": "global"})
    assert (d.k, d.fusion, d.branch, d.head_dim) == (3, "sum", "global", 1536)
    # an older config's model_options is the whole DToP model
    assert upgrade({"model_options": {"dtop": True, "k": 3}})["model"]["dtop"] == dataclasses.asdict(DToPConfig(k=3))
    assert "model" not in upgrade({"model_options": {}}) and "model" not in upgrade({"model_options": {"dtop": False}})
    # the fingerprint keeps only what differs from the paper's defaults, under "dtop": True
    assert ExperimentConfig(dtop=d).fingerprint()["model_options"] == {"dtop": True, "k": 3, "fusion": "sum",
                                                                       "branch": "global"}
    assert ExperimentConfig(dtop={"k": 6}).fingerprint()["model_options"] == {"dtop": True}
    assert ExperimentConfig().fingerprint()["model_options"] == {}
    assert DToPConfig(elm=False).effective_fusion == "none" and DToPConfig().effective_fusion == "orthogonal"
    with pytest.raises(ConfigError, match="k=0 is invalid"):
        ExperimentConfig.from_dict({"model_options": {"dtop": True, "k": 0}})
    with pytest.raises(ConfigError, match="elm='yes' is invalid"):
        ExperimentConfig.from_dict({"dtop": {"elm": "yes"}})


def test_tuples_section_only_for_sfm120k_tuple_training():
    assert ExperimentConfig().tuples is None
    sfm = ExperimentConfig.from_dict({"dataset": "sfm120k"})
    assert sfm.tuples == TupleConfig()
    assert ExperimentConfig.from_dict({"dataset": "sfm120k", "sfm_training": "classes"}).tuples is None
    four = sfm.replace(tuples_per_batch=4)
    assert four.tuples.tuples_per_batch == 4 and four.to_dict()["tuples"]["tuples_per_batch"] == 4
    assert ExperimentConfig().to_dict()["tuples"] is None
    assert ExperimentConfig().fingerprint()["tuples_per_batch"] == TupleConfig().tuples_per_batch  # older: defaults
    assert ExperimentConfig.from_dict({"tuples_per_batch": 5}).tuples is None  # at its default: ignored
    assert sfm.replace(dataset="cub").tuples is None and four.replace(sfm_training="tuples").tuples == four.tuples
    with pytest.raises(ConfigError, match=r"tuples_per_batch=4 applies only to SfM-120k tuple training"):
        ExperimentConfig.from_dict({"tuples_per_batch": 4})
    with pytest.raises(ConfigError, match=r"tuples=None is invalid"):
        ExperimentConfig.from_dict({"dataset": "sfm120k", "tuples": None})
    with pytest.raises(ConfigError, match=r"tuples=TupleConfig.* is invalid: expected None unless"):
        ExperimentConfig.from_dict({"tuples": TupleConfig()})
    with pytest.raises(ConfigError, match="negative_pool=0 is invalid"):
        sfm.replace(negative_pool=0)


def test_cross_section_checks_name_the_field():
    with pytest.raises(ConfigError, match=r"patch_size=5 is invalid: expected a divisor of img_size=28"):
        ExperimentConfig.from_dict({"patch_size": 5})
    with pytest.raises(ConfigError, match=r"momentum=0.9 is invalid: expected None unless memory_size > 0"):
        ExperimentConfig.from_dict({"momentum": 0.9})
    with pytest.raises(ConfigError, match=r"gem_p=nan is invalid: expected a finite number"):
        ExperimentConfig.from_dict({"gem_p": float("nan")})
    with pytest.raises(ConfigError, match=r"loss=''"):
        ExperimentConfig.from_dict({"loss": ""})


def test_save_and_load_round_trip_in_sections(tmp_path):
    for cfg in (ExperimentConfig(), load_preset("dtop_full_r50vitb16_sfm"), load_preset("irt_r_sfm_deits"),
                load_preset("irt_r_sfm_deits").replace(tuples_per_batch=3, eval_scales=[1, 0.5])):
        cfg.save(tmp_path / "config.json")
        saved = json.loads((tmp_path / "config.json").read_text())
        assert saved["format"] == CONFIG_FORMAT and set(saved) == {"format", *SECTIONS}
        assert saved["optim"]["lr"] == cfg.optim.lr and saved["loss"]["name"] == cfg.loss.name
        assert (saved["model"]["dtop"] is None) == (cfg.model.dtop is None)
        assert upgrade(saved) == saved
        assert ExperimentConfig.load(tmp_path / "config.json") == cfg


# ----------------------------------------------------------------------------- presets
OLD_PRESET = Path(__file__).parent / "fixtures" / "config_33ea36a" / "dtop_full_r50vitb16_sfm.preset.json"


def test_every_preset_is_saved_in_sections():
    for name in list_presets():
        raw = json.loads((PRESETS_DIR / f"{name}.json").read_text())
        assert raw["format"] == CONFIG_FORMAT and "model_options" not in json.dumps(raw), name
        assert upgrade_preset(raw) == raw, name  # in today's form already


def test_a_flat_preset_still_loads_and_the_script_rewrites_it_in_sections(tmp_path, monkeypatch):
    """A preset in the flat form (a branch made before the sections) loads as the same config, its grid
    rows' ``model_options`` included; ``python -m nbsrc.presets.rewrite`` rewrites it as it is committed."""
    import nbsrc.presets
    import nbsrc.presets.rewrite
    from nbsrc.paper.reproduce import preset_grid

    name = "dtop_full_r50vitb16_sfm"
    old = json.loads(OLD_PRESET.read_text())
    assert "format" not in old and "model_options" in OLD_PRESET.read_text()
    committed = json.loads((PRESETS_DIR / f"{name}.json").read_text())
    assert upgrade_preset(old) == committed
    grids = {t: preset_grid(name, t) for t in ("A7", "A13")}
    today = load_preset(name)
    monkeypatch.setattr(nbsrc.presets, "PRESETS_DIR", tmp_path)
    monkeypatch.setattr(nbsrc.presets.rewrite, "PRESETS_DIR", tmp_path)
    (tmp_path / f"{name}.json").write_text(OLD_PRESET.read_text())
    assert load_preset(name) == today and preset_dict(name) == {k: v for k, v in committed.items() if k != "paper"} \
        | {"run": {"name": name}}
    for table, grid in grids.items():
        again = preset_grid(name, table)
        assert {k: r["config"] for k, r in again.items()} == {k: r["config"] for k, r in grid.items()}, table
    assert nbsrc.presets.rewrite.main() == 0
    assert json.loads((tmp_path / f"{name}.json").read_text()) == committed


# ----------------------------------------------------------------------------- runs saved by the flat version
@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_config_saved_by_the_flat_version_loads_with_the_same_fingerprint(case):
    saved = json.loads((FIXTURES / f"{case}.config.json").read_text())
    cfg = ExperimentConfig.from_dict(saved)
    old = EXPECTED[case]["fingerprint"]
    new = without_added(cfg.fingerprint())
    assert set(new) == set(old)
    for k in old:
        if k == "model_options":  # a DToP option spelled at its paper default ("k": 6) is dropped
            assert dtop_of(new[k]) == dtop_of(old[k])
            assert {o: v for o, v in old[k].items() if o != "dtop" and v != getattr(DToPConfig(), o)} == \
                   {o: v for o, v in new[k].items() if o != "dtop"}
        else:
            assert new[k] == old[k], k
    if old["model_options"] == new["model_options"]:  # every config but a DToP one restating a default
        assert new == old
        # the CLI's name hashes the non-default fields only (since the fields of 2026-11-29 were added)
        assert default_run_name(cfg).rsplit("_", 1)[0] == EXPECTED[case]["cli_name"].rsplit("_", 1)[0]
        flat = {**cfg.fingerprint(), **{k: cfg.value(k) for k in EXECUTION_FIELDS}}  # the older saved form
        assert without_added(flat) == saved


def test_fingerprint_equal_to_the_flat_versions_for_every_non_dtop_preset_and_the_demo():
    same = [c for c, e in EXPECTED.items() if not e["fingerprint"]["model_options"] or c == "dtop_small"]
    assert {"default", "irt_r_demo", "irt_r_sfm_deits", "irt_l_sop_deits", "dtop_small"} <= set(same)
    for case in same:
        cfg = ExperimentConfig.load(FIXTURES / f"{case}.config.json")
        assert without_added(cfg.fingerprint()) == EXPECTED[case]["fingerprint"]


@pytest.mark.parametrize("case", ["irt_r_demo", "dtop_full_r50vitb16_sfm", "dtop_a5_vitb16_cls_sfm", "irt_r_sfm_deits"])
def test_a_run_saved_by_the_flat_version_is_reused(tmp_path, case):
    """A finished run whose config.json the flat version wrote is found and reused by today's config
    of the same settings (built anew, from sections), and refused for another setting."""
    saved = json.loads((FIXTURES / f"{case}.config.json").read_text())
    run = tmp_path / saved["name"]
    run.mkdir()
    (run / "config.json").write_text((FIXTURES / f"{case}.config.json").read_text())
    (run / "results.json").write_text("{}")
    if case in ("dtop_full_r50vitb16_sfm", "dtop_a5_vitb16_cls_sfm", "irt_r_sfm_deits"):
        d = {"runs_dir": str(tmp_path)}
        if case == "irt_r_sfm_deits":
            d.update(tuples_per_batch=4, eval_scales=[1, 0.5], whitening="learned")
        else:  # saved before DToP's augmentation existed; the preset now turns it on (another run, rightly refused)
            d.update(dtop_augmentation=False)
        cfg = load_preset(case, **d)
    else:
        cfg = ExperimentConfig.from_dict({**saved, "runs_dir": str(tmp_path)})
    if cfg.model.dtop is not None:  # built from sections, the DToP options written out in full
        cfg = cfg.replace(dtop=dataclasses.replace(cfg.model.dtop))
    assert prepare_run_dir(cfg.replace(device="cpu", num_workers=1), "reuse") == (run, "reuse")
    with pytest.raises(Exception, match="different config"):
        prepare_run_dir(cfg.replace(lr=cfg.optim.lr * 2), "reuse")
