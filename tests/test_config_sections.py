"""The config in sections: the flat-name table, every input form (flat, sections, mixed, old
``model_options``), the typed DToP and tuple sections, cross-section checks, and compatibility with
run directories saved before the sections (``tests/fixtures/config_925e020``: config.json files,
fingerprints and CLI run names written by nbsrc 925e020, the last flat version)."""

import dataclasses
import json
from pathlib import Path

import pytest

from nbsrc.__main__ import default_run_name
from nbsrc.config import (EXECUTION_FIELDS, FLAT_FIELDS, SECTIONS, DToPConfig, ExperimentConfig, LossConfig,
                          OptimConfig, TupleConfig, dtop_from_options, flat_fields)
from nbsrc.errors import ConfigError
from nbsrc.presets import load_preset, preset_dict
from nbsrc.train.rundir import prepare_run_dir

FIXTURES = Path(__file__).parent / "fixtures" / "config_925e020"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


# ----------------------------------------------------------------------------- the table
def test_flat_table_names_every_section_field_exactly_once():
    paths = list(FLAT_FIELDS.values())
    assert len(paths) == len(set(paths))
    fields = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(paths) == fields
    # a field keeps its flat name in its section, except loss.name and model.dtop
    renamed = {flat: path for flat, path in FLAT_FIELDS.items() if path.split(".")[1] != flat}
    assert renamed == {"loss": "loss.name", "model_options": "model.dtop"}
    assert EXECUTION_FIELDS <= set(FLAT_FIELDS)
    assert [f.name for f in flat_fields()] == list(FLAT_FIELDS)


# fields added since the fixtures were written (925e020), each with a default that leaves old runs unchanged
ADDED_SINCE = {"split": None, "dtop_augmentation": False, "evaluator": None}


def without_added(flat: dict) -> dict:
    """``flat`` without the fields added since the fixtures, after checking they hold their defaults
    (the value that leaves a run saved before them unchanged)."""
    assert {k: flat[k] for k in ADDED_SINCE if k in flat} == {k: v for k, v in ADDED_SINCE.items() if k in flat}
    return {k: v for k, v in flat.items() if k not in ADDED_SINCE}


def test_the_flat_form_has_the_keys_of_the_flat_version():
    saved = json.loads((FIXTURES / "default.config.json").read_text())
    now = ExperimentConfig().to_dict()
    assert set(now) == set(FLAT_FIELDS) == set(saved) | set(ADDED_SINCE)
    assert {k: now[k] for k in ADDED_SINCE} == ADDED_SINCE


# ----------------------------------------------------------------------------- input forms
def test_flat_sectioned_and_mixed_inputs_give_the_same_config():
    flat = {"name": "x", "lr": 1e-3, "loss": "snca", "dataset": "digits", "img_size": 16, "patch_size": 4,
            "ks": [1, 5], "model_options": {"dtop": True, "k": 2}}
    cfg = ExperimentConfig.from_dict(flat)
    assert (cfg.optim.lr, cfg.loss.name, cfg.data.dataset, cfg.eval.ks, cfg.model.dtop.k) == (1e-3, "snca", "digits",
                                                                                                 (1, 5), 2)
    assert ExperimentConfig.from_dict(dataclasses.asdict(cfg)) == cfg  # the sectioned dict
    assert ExperimentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # the flat JSON form
    mixed = ExperimentConfig(name="x", optim=OptimConfig(lr=1e-3), loss={"name": "snca"}, dataset="digits",
                             img_size=16, patch_size=4, ks=(1, 5), dtop=DToPConfig(k=2))
    assert mixed == cfg
    assert cfg.replace(lr=3e-5) == ExperimentConfig.from_dict({**flat, "lr": 3e-5})
    assert cfg.replace(optim=OptimConfig()).optim == OptimConfig()  # a whole section replaces its fields
    assert cfg.replace(loss=LossConfig(lam=0.0)).loss == LossConfig(lam=0.0)
    assert cfg.replace(dtop=None).model.dtop is None and cfg.replace(model_options={}).model.dtop is None


def test_unknown_keys_are_one_line_errors_with_the_closest_name():
    with pytest.raises(ConfigError, match=r"unknown parameter 'lrr' \(did you mean 'lr'\?\)"):
        ExperimentConfig.from_dict({"lrr": 1})
    with pytest.raises(ConfigError, match=r"unknown parameter 'optim\.lrr' \(did you mean 'lr'\?\)"):
        ExperimentConfig.from_dict({"optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"unknown DToP option 'head_dimm' in model_options \(did you mean 'head_dim'"):
        ExperimentConfig.from_dict({"model_options": {"dtop": True, "head_dimm": 8}})
    with pytest.raises(ConfigError, match="needs 'dtop': True"):
        ExperimentConfig.from_dict({"model_options": {"k": 2}})
    with pytest.raises(ConfigError, match="lr is given twice"):
        ExperimentConfig.from_dict({"lr": 1e-3, "optim": {"lr": 1e-4}})
    for bad in ({"lrr": 1}, {"model_options": {"dtop": True, "kk": 1}}):
        with pytest.raises(ConfigError) as e:
            ExperimentConfig.from_dict(bad)
        assert "\n" not in str(e.value)


def test_model_options_map_to_the_typed_dtop_section():
    assert dtop_from_options({}) is None and dtop_from_options({"dtop": False}) is None
    assert dtop_from_options({"dtop": True}) == DToPConfig()
    d = dtop_from_options({"dtop": True, "k": 3, "fusion": "sum", "branch": "global"})
    assert (d.k, d.fusion, d.branch, d.head_dim) == (3, "sum", "global", 1536)
    # the flat form keeps only what differs from the paper's defaults, under "dtop": True
    cfg = ExperimentConfig(dtop=d)
    assert cfg.to_dict()["model_options"] == {"dtop": True, "k": 3, "fusion": "sum", "branch": "global"}
    assert ExperimentConfig(model_options={"dtop": True, "k": 6}).to_dict()["model_options"] == {"dtop": True}
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
    assert four.tuples.tuples_per_batch == 4 and four.to_dict()["tuples_per_batch"] == 4
    assert ExperimentConfig().to_dict()["tuples_per_batch"] == TupleConfig().tuples_per_batch  # flat form: defaults
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


def test_save_and_load_round_trip(tmp_path):
    for cfg in (ExperimentConfig(), load_preset("dtop_full_r50vitb16_sfm"), load_preset("irt_r_sfm_deits"),
                load_preset("irt_r_sfm_deits").replace(tuples_per_batch=3, eval_scales=[1, 0.5])):
        cfg.save(tmp_path / "config.json")
        assert ExperimentConfig.load(tmp_path / "config.json") == cfg


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
            assert dtop_from_options(new[k]) == dtop_from_options(old[k])
            assert {o: v for o, v in old[k].items() if o != "dtop" and v != getattr(DToPConfig(), o)} == \
                   {o: v for o, v in new[k].items() if o != "dtop"}
        else:
            assert new[k] == old[k], k
    if old["model_options"] == new["model_options"]:  # every config but a DToP one restating a default
        assert new == old
        # the CLI's name hashes the non-default fields only (since the fields of 2026-11-29 were added)
        assert default_run_name(cfg).rsplit("_", 1)[0] == EXPECTED[case]["cli_name"].rsplit("_", 1)[0]
        assert without_added(cfg.to_dict()) == saved


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
        d = {**preset_dict(case), "runs_dir": str(tmp_path)}
        if case == "irt_r_sfm_deits":
            d.update(tuples_per_batch=4, eval_scales=[1, 0.5], whitening="learned")
        else:  # saved before DToP's augmentation existed; the preset now turns it on (another run, rightly refused)
            d.update(dtop_augmentation=False)
        cfg = ExperimentConfig.from_dict(d)
    else:
        cfg = ExperimentConfig.from_dict({**saved, "runs_dir": str(tmp_path)})
    if cfg.model.dtop is not None:  # built from sections, the DToP options written out in full
        cfg = cfg.replace(dtop=dataclasses.replace(cfg.model.dtop))
    assert prepare_run_dir(cfg.replace(device="cpu", num_workers=1), "reuse") == (run, "reuse")
    with pytest.raises(Exception, match="different config"):
        prepare_run_dir(cfg.replace(lr=cfg.optim.lr * 2), "reuse")
