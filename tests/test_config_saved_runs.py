"""Run directories saved by an older nbsrc (``tests/fixtures/config_33ea36a``: flat ``config.json`` files
written by 33ea36a, with what that version computed from each) load with the same fingerprint, the same
CLI run name, demo pretraining name and export fingerprint; a finished one is reused by today's config of
the same settings, and a partial one resumes to the same weights as an uninterrupted run."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from nbsrc.__main__ import build_parser, config_from_args, default_run_name, main
from nbsrc.config import ExperimentConfig
from nbsrc.experiment import run_experiment
from nbsrc.paper.demo import demo_config, pretrain_config
from nbsrc.presets import load_preset
from nbsrc.retrieval.export import config_fingerprint
from nbsrc.train.checkpoint import LATEST
from nbsrc.train.rundir import prepare_run_dir

FIXTURES = Path(__file__).parent / "fixtures" / "config_33ea36a"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


def cli(*args: str) -> ExperimentConfig:
    return config_from_args(build_parser().parse_args(["train", *args]))


# each case of the fixtures built anew with today's API, from the same settings
TODAY = {
    "default": lambda: ExperimentConfig(),
    "preset_dtop_a5_pitb_cls_sfm": lambda: load_preset("dtop_a5_pitb_cls_sfm"),
    "preset_dtop_full_vitb16_sfm": lambda: load_preset("dtop_full_vitb16_sfm", iterations=10, warmup_iters=2),
    "preset_irt_r_sfm_deits": lambda: load_preset("irt_r_sfm_deits", tuples_per_batch=4, eval_scales=[1, 0.5],
                                                  whitening="learned"),
    "preset_irt_r_sop_deits": lambda: load_preset("irt_r_sop_deits"),
    "demo_glyphs": lambda: demo_config("glyphs"),
    "demo_fashion_mnist": lambda: demo_config("fashion_mnist", name="irt_r", lam=0.3),
    "pretrain_glyphs": lambda: pretrain_config("glyphs"),
    "cli_flags": lambda: cli("--dataset", "digits", "--lr", "1e-4", "--ks", "1", "5", "--no-amp", "--dim", "8",
                             "--pooling", "gem", "--gem-p", "2.5", "--split", "0.5", "--evaluator", "recall"),
    "cli_dtop": lambda: cli("--dtop", "--k", "3", "--fusion", "sum", "--img-size", "32", "--patch-size", "8"),
}


def digest(cfg: ExperimentConfig) -> str:
    """The demo's pretraining digest (nbsrc.paper.demo.pretrain_config)."""
    return hashlib.sha256(json.dumps(cfg.changed_fingerprint(), sort_keys=True).encode()).hexdigest()[:8]


def assert_same_as_saved(cfg: ExperimentConfig, case: str) -> None:
    e = EXPECTED[case]
    assert cfg.fingerprint() == e["fingerprint"]
    assert cfg.changed_fingerprint() == e["changed_fingerprint"]
    assert default_run_name(cfg) == e["cli_name"] and digest(cfg) == e["demo_digest"]
    assert cfg.run.name == e["run_name"]


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_an_old_config_json_loads_with_the_fingerprint_and_names_it_had(case):
    path = FIXTURES / f"{case}.config.json"
    cfg = ExperimentConfig.load(path)
    assert_same_as_saved(cfg, case)
    assert config_fingerprint(json.loads(path.read_text())) == EXPECTED[case]["config_sha256"]
    assert config_fingerprint(cfg.to_dict()) == EXPECTED[case]["config_sha256"]


@pytest.mark.parametrize("case", sorted(TODAY))
def test_the_same_settings_today_give_the_same_fingerprint_and_names(case):
    assert_same_as_saved(TODAY[case](), case)


@pytest.mark.parametrize("case", ["default", "preset_irt_r_sfm_deits", "preset_dtop_a5_pitb_cls_sfm", "cli_dtop"])
def test_a_finished_old_run_is_reused(tmp_path, case):
    cfg = TODAY[case]().replace(runs_dir=str(tmp_path))
    run = tmp_path / cfg.run.name
    run.mkdir()
    shutil.copy(FIXTURES / f"{case}.config.json", run / "config.json")
    (run / "results.json").write_text("{}")
    assert prepare_run_dir(cfg.replace(device="cpu", num_workers=1), "reuse") == (run, "reuse")
    with pytest.raises(Exception, match="different config"):
        prepare_run_dir(cfg.replace(lr=cfg.optim.lr * 2), "reuse")


@pytest.mark.parametrize("case", ["tiny_digits", "tiny_dtop"])
def test_a_partial_old_run_resumes_to_the_uninterrupted_runs_weights(tmp_path, case):
    """A run stopped at its first checkpoint whose config.json is the old version's finishes, by
    ``nbsrc train --resume``, with the weights of the same run trained without a stop."""
    old = ExperimentConfig.load(FIXTURES / f"{case}.config.json")
    full = run_experiment(old.replace(runs_dir=str(tmp_path / "full")), mode="new")
    part = old.replace(runs_dir=str(tmp_path / "part"))
    run_experiment(part, mode="new", stop_after=old.run.ckpt_every)
    shutil.copy(FIXTURES / f"{case}.config.json", part.run_dir / "config.json")  # as the old version saved it
    assert main(["train", "--resume", "--name", old.run.name, "--runs-dir", str(tmp_path / "part")]) == 0
    a = torch.load(full.run_dir / LATEST, weights_only=False)["model"]
    b = torch.load(part.run_dir / LATEST, weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    scores = [{k: v for k, v in json.loads((r.run_dir / "results.json").read_text()).items() if k != "seconds"}
              for r in (full, part)]
    assert scores[0] == scores[1] and "R@1" in scores[0]
