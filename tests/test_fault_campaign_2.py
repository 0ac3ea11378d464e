"""The fault campaign, continued: ``--device``, ``runs --csv``, the hint of a read-only or full output,
presets without data, one-class folders, empty ``--preset``, class lists that start with ``-``, notebook
parameters, and the bad inputs of ``embed``, ``search`` and ``export``.

The cases run as in :mod:`test_fault_campaign` (processes forked from one server that imported nbsrc,
torch and timm once; that module's ``test_forked_cases_match_real_processes`` checks the server is
faithful), and each asserts the same: exit code not 0 (0 for ``SUCCEEDS``), stderr one line
``error: ...`` without a traceback that says what was wrong (and, for an output that cannot be written,
names the command's own flag, not another's), and nothing in the workspace new or changed outside the
case's ``allowed`` paths.

Cases that need real processes are elsewhere: the concurrency cases (two starts, a start during a run,
two ``--overwrite``, SIGKILL, two ``embed`` into one ``--out``) in ``test_run_lock.py``, and weights
offline (a fresh hub cache and hub settings need a fresh interpreter) below, as subprocesses.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_fault_campaign import (
    FINISHED,
    NB,
    ROOT,
    ForkServer,
    _env,
    _link_copy,
    folder_flags,
    image_folder,
    run_cases,
    snapshot,
    tiny_flags,
)

REPO = Path(__file__).resolve().parents[1]
# An output folder that cannot be written: read-only for a user; for root (who may write anywhere), /sys.
RO = "/sys/nbsrc-campaign" if ROOT else "ro"
IDX = "idx"  # the tiny run's index of images/, copied into a case that asks for it
QUERY = "images/c0/0.png"


@dataclass
class Case:
    argv: list[str]
    fragment: str  # what the one stderr line must say
    setup: object = None  # callable(ws: Path) -> None, run in the workspace before the command
    finished_run: bool = False  # runs/done: the tiny finished run
    index: bool = False  # idx/: an index of images/ built with it
    images: bool = False  # images/: 4 classes of 8 small images
    allowed: tuple[str, ...] = ()  # workspace paths (prefixes) the case may create or change
    absent: str | None = None  # what the line must not say (another command's flag)


def _write(rel: str, text: str):
    def setup(ws: Path) -> None:
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text(text)
    return setup


def _mkdir(rel: str):
    return lambda ws: (ws / rel).mkdir(parents=True)


def _read_only(ws: Path) -> None:
    if not ROOT:
        (ws / RO).mkdir()
        (ws / RO).chmod(0o555)


def _one_class(ws: Path) -> None:
    image_folder(ws / "one", classes=1, per_class=8)


def _no_manifest(ws: Path) -> None:
    (ws / IDX / "manifest.json").unlink()


FOLDER = ["--dataset", "folder", "--data-root"]
EMBED = ["embed", f"runs/{FINISHED}", "images"]
NB_FLAGS = ["-p", "dataset", "digits", "-p", "img_size", "8", "-p", "batch_size", "16", "-p", "m_per_class", "4",
            "-p", "device", "cpu", "-p", "runs_dir", "runs", "--out", "nbout/02.ipynb"]

CASES: dict[str, Case] = {
    # --- --device: one of its choices, checked before anything is built
    "train --device gpu": Case(["train", *tiny_flags(device="gpu")], "device='gpu' is invalid: expected one of auto"),
    "train --device CUDA": Case(["train", *tiny_flags(device="CUDA")], "device='CUDA' is invalid"),
    "train --device cuda:one": Case(["train", *tiny_flags(device="cuda:one")], "device='cuda:one' is invalid"),
    "train --device empty": Case(["train", *tiny_flags(device="")], "device='' is invalid"),
    "embed --device gpu": Case([*EMBED, "--out", "i2", "--device", "gpu"], "--device='gpu' is invalid",
                               finished_run=True, images=True),
    "search --device gpu": Case(["search", IDX, QUERY, "--device", "gpu"], "--device='gpu' is invalid", index=True,
                                images=True),
    "search --device cuda:-1": Case(["search", IDX, QUERY, "--device", "cuda:-1"], "--device='cuda:-1' is invalid",
                                    index=True, images=True),
    # --- runs --csv
    "runs --csv under a file": Case(["runs", "runs", "--csv", "afile/runs.csv"], "--csv afile/runs.csv",
                                    finished_run=True,
                                    setup=_write("afile", "a file")),
    "runs --csv is a folder": Case(["runs", "runs", "--csv", "reports"], "--csv reports is a folder", finished_run=True,
                                   setup=_mkdir("reports")),
    # --- an output that cannot be written: the hint names the command's own flag
    "embed --out read-only": Case([*EMBED, "--out", f"{RO}/idx"], "choose another --out", finished_run=True,
                                  images=True, setup=_read_only, absent="--runs-dir"),
    "embed --out under a file": Case([*EMBED, "--out", "afile/idx"], "choose another --out", finished_run=True,
                                     images=True, setup=_write("afile", "a file"), absent="--runs-dir"),
    "search --grid read-only": Case(["search", IDX, QUERY, "--grid", f"{RO}/hits.png"], "choose another --grid",
                                    index=True, images=True, setup=_read_only, absent="--runs-dir"),
    "export --out read-only": Case(["export", f"runs/{FINISHED}", "--format", "torchscript", "--out", f"{RO}/m.pt"],
                                   "choose another --out", finished_run=True, setup=_read_only, absent="--runs-dir"),
    "runs --csv read-only": Case(["runs", "runs", "--csv", f"{RO}/runs.csv"], "choose another --csv", finished_run=True,
                                 setup=_read_only, absent="--runs-dir"),
    "train --runs-dir read-only says --runs-dir": Case(["train", *tiny_flags(), "--runs-dir", f"{RO}/runs"],
                                                       "choose another --runs-dir", setup=_read_only),
    # --- folders of one class: a split needs two
    "one-class folder": Case(["train", *folder_flags(Path("one"))], "the dataset has 1 class; a class-disjoint split "
                             "needs at least 2", setup=_one_class),
    "one-class folder, test classes all": Case(["train", *folder_flags(Path("one"), **{"train-classes": "0",
                                                                                      "test-classes": "all"})],
                                               "needs at least 2 (one to train on, one to test on)", setup=_one_class),
    "one-class folder, --split": Case(["train", *tiny_flags(**{"dataset": "folder", "data-root": "one", "split": 0.5,
                                                               "batch-size": 8})],
                                      "needs at least 2", setup=_one_class),
    # --- presets and data roots: the data is checked before any weights are fetched
    "preset empty": Case(["train", "--preset", "", *tiny_flags()], "--preset is empty"),
    "preset blank": Case(["train", "--preset", "  ", *tiny_flags()], "--preset is empty"),
    "preset empty with --resume": Case(["train", "--resume", "--preset", "", *tiny_flags(FINISHED)],
                                       "--preset cannot be combined with --resume", finished_run=True),
    "config empty": Case(["train", "--config", "", *tiny_flags()], "--config : cannot read it"),
    "preset without data root": Case(["train", "--preset", "irt_r_sop_deits"], "dataset='sop' needs data_root"),
    "preset of SfM-120k without data root": Case(["train", "--preset", "dtop_full_vitb16_sfm"],
                                                 "SfM-120k needs data_root"),
    "preset with a missing data root": Case(["train", "--preset", "irt_r_cub_deits", "--data-root", "nowhere"],
                                            "data_root does not exist: expected the folder nowhere"),
    "preset of SfM-120k, folder without the pickle": Case(["train", "--preset", "dtop_full_vitb16_sfm", "--data-root",
                                                           "empty"], "expected empty/retrieval-SfM-120k.pkl",
                                                          setup=_mkdir("empty")),
    "folder missing with timm weights": Case(["train", *folder_flags(Path("nowhere"), weights="timm")],
                                             "image folder nowhere does not exist"),
    # --- a value that starts with '-'
    "train classes -1-3": Case(["train", "--train-classes", "-1-3"], "is written --train-classes=VALUE"),
    "test classes -2-3": Case(["train", "--test-classes", "-2-3"], "is written --test-classes=VALUE"),
    "test classes -2 (a number to argparse)": Case(["train", *tiny_flags(), "--test-classes", "-2"],
                                                   "class list '-2' is invalid"),
    "name -x": Case(["train", "--name", "-x"], "is written --name=VALUE"),
    # --- notebooks: the error names the parameter given
    "notebook iterations negative": Case(["notebook", NB, *NB_FLAGS, "-p", "iterations", "-5"],
                                         "iterations=-5 is invalid", absent="memory_start", allowed=("nbout", "runs")),
    # --- embed, search, export
    "embed folder missing": Case(["embed", f"runs/{FINISHED}", "nope", "--out", "i2"],
                                 "image folder nope does not exist",
                                 finished_run=True),
    "embed --out is a file": Case([*EMBED, "--out", "afile"], "afile is a file", finished_run=True, images=True,
                                  setup=_write("afile", "a file")),
    "embed --out not empty": Case([*EMBED, "--out", "busy"], "busy is a folder that is not empty and not an index",
                                  finished_run=True, images=True, setup=_write("busy/thesis.tex", "keep me")),
    "embed --batch-size 0": Case([*EMBED, "--out", "i2", "--batch-size", "0"], "--batch-size 0 is invalid",
                                 finished_run=True, images=True),
    "embed --img-size 0": Case([*EMBED, "--out", "i2", "--img-size", "0"], "--img-size 0 is invalid",
                               finished_run=True, images=True),
    "embed --workers -1": Case([*EMBED, "--out", "i2", "--workers", "-1"], "--workers -1 is invalid",
                               finished_run=True, images=True),
    "embed an unknown model": Case(["embed", "vit_nope", "images", "--out", "i2"], "unknown model 'vit_nope'",
                                   images=True),
    "embed a run that does not exist": Case(["embed", "runs/ghost", "images", "--out", "i2"],
                                            "runs/ghost does not exist",
                                            images=True),
    "search an index that does not exist": Case(["search", "noidx", QUERY], "noidx is not an index directory",
                                                images=True),
    "search an unfinished index": Case(["search", IDX, QUERY], "did not finish", index=True, images=True,
                                       setup=_no_manifest),
    "search -k 0": Case(["search", IDX, QUERY, "-k", "0"], "-k 0 is invalid", index=True, images=True),
    "search --grid not an image": Case(["search", IDX, QUERY, "--grid", "hits.txt"], "--grid hits.txt", index=True,
                                       images=True),
    "search a query that does not exist": Case(["search", IDX, "nope.png"], "query image nope.png does not exist",
                                               index=True),
    "export an unknown format": Case(["export", f"runs/{FINISHED}", "--format", "tflite"], "invalid choice: 'tflite'",
                                     finished_run=True),
    "export a run that does not exist": Case(["export", "runs/ghost", "--format", "onnx"], "runs/ghost",
                                             finished_run=True),
    "export over an existing file": Case(["export", f"runs/{FINISHED}", "--format", "torchscript", "--out", "m.pt"],
                                         "m.pt already exists; choose another --out", finished_run=True,
                                         setup=_write("m.pt", "mine")),
}

# Cases whose exit code is 0 by design, each with what its stdout must say and a file it must have made.
SUCCEEDS = {
    "runs --csv into a missing folder": (Case(["runs", "runs", "--csv", "reports/2026/runs.csv"], "", finished_run=True,
                                              allowed=("reports",)), "wrote reports/2026/runs.csv",
                                         "reports/2026/runs.csv"),
    "a class list written with =": (Case(["train", *tiny_flags("eq"), "--train-classes=0-4"], "", allowed=("runs",)),
                                    "eq: R@1=", "runs/eq/results.json"),
    "search --grid into a missing folder": (Case(["search", IDX, QUERY, "--grid", "grids/a/hits.png"], "", index=True,
                                                 images=True, allowed=("grids",)),
                                            f"query {QUERY}", "grids/a/hits.png"),
}
STARTS_A_KERNEL = ("notebook iterations negative",)


# ----------------------------------------------------------------------------- running them all once
@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    base = tmp_path_factory.mktemp("campaign2")
    made = base / "made"
    (made / "out").mkdir(parents=True)
    image_folder(made / "images")
    server = ForkServer()
    control = [{"name": "run", "argv": ["train", *tiny_flags(FINISHED, dim=8)], "cwd": str(made),
                "out": str(made / "out")}]
    assert server.run(control)["run"]["rc"] == 0, (made / "out" / "stderr").read_text()
    index = [{"name": "index", "argv": [*EMBED, "--out", IDX, "--no-progress", "--workers", "0"], "cwd": str(made),
              "out": str(made / "out")}]
    assert server.run(index)["index"]["rc"] == 0, (made / "out" / "stderr").read_text()
    all_cases = {**CASES, **{k: v[0] for k, v in SUCCEEDS.items()}}
    jobs, before = [], {}
    for i, (name, case) in enumerate(all_cases.items()):
        ws = base / f"case{i:02d}"
        (ws / "out").mkdir(parents=True)
        if case.finished_run:
            _link_copy(made / "runs" / FINISHED, ws / "runs" / FINISHED)
        if case.index:
            shutil.copytree(made / IDX, ws / IDX)
        if case.images:
            shutil.copytree(made / "images", ws / "images")
        if case.setup is not None:
            case.setup(ws)
        before[name] = _state(ws)
        jobs.append({"name": name, "argv": case.argv, "cwd": str(ws), "out": str(ws / "out"), "env": {}})
    results = run_cases(server, jobs, before, _state, (STARTS_A_KERNEL, SUCCEEDS))
    for res in results.values():
        if (res["ws"] / RO).exists() and not ROOT:
            (res["ws"] / RO).chmod(0o755)  # so that pytest can remove it
    return results


def _state(ws: Path) -> dict:
    return {k: v for k, v in snapshot(ws).items() if k != "out" and not k.startswith("out/")}


def _changed(res: dict, allowed: tuple[str, ...]) -> set[str]:
    a, b = res["before"], res["after"]
    changed = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    return {p for p in changed if not any(p == x or p.startswith(x + "/") for x in allowed)}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_one_line_and_leaves_the_workspace_untouched(campaign, name):
    res, case = campaign[name], CASES[name]
    lines = res["stderr"].splitlines()
    assert res["rc"] != 0, f"exit 0; stdout: {res['stdout'][-500:]}"
    assert "Traceback" not in res["stderr"], res["stderr"][-3000:]
    assert len(lines) == 1, res["stderr"][-3000:]
    assert lines[0].startswith("error: ") and case.fragment in lines[0], lines[0]
    assert case.absent is None or case.absent not in lines[0], lines[0]
    assert not _changed(res, case.allowed), f"changed: {sorted(_changed(res, case.allowed))}"


@pytest.mark.parametrize("name", list(SUCCEEDS))
def test_what_is_not_an_error_succeeds(campaign, name):
    res = campaign[name]
    case, says, made = SUCCEEDS[name]
    assert res["rc"] == 0 and "Traceback" not in res["stderr"], res["stderr"][-3000:]
    assert says in res["stdout"], res["stdout"][-2000:]
    assert (res["ws"] / made).is_file()
    assert not _changed(res, case.allowed), f"changed: {sorted(_changed(res, case.allowed))}"


# ----------------------------------------------------------------------------- weights offline (real processes)
OFFLINE = {
    # HF_HUB_OFFLINE set: the hub is not asked at all
    "train --weights timm, HF_HUB_OFFLINE": (["train", *tiny_flags(weights="timm")], {"HF_HUB_OFFLINE": "1"},
                                             "HF_HUB_OFFLINE is set"),
    # a hub that refuses connections (a closed local port): one attempt, not the client's retries
    "train --weights timm, hub unreachable": (["train", *tiny_flags(weights="timm")],
                                              {"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot connect to 127.0.0.1:9"),
    "embed a timm name, hub unreachable": (["embed", "test_vit", "images", "--out", "i2"],
                                           {"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot connect to 127.0.0.1:9"),
    "preset with its data, hub unreachable": (["train", "--preset", "irt_r_cub_deits", "--data-root", "images"],
                                              {"HF_ENDPOINT": "http://127.0.0.1:9"}, "deit_small_patch16_224"),
}


@pytest.mark.parametrize("name", list(OFFLINE))
def test_weights_offline_are_one_whole_line_at_once(tmp_path, name):
    """No network for timm's hub: the error comes at once (no retries: well under the 51 s of the hub
    client's five retries per file), on one line that ends with what to do (never cut short)."""
    argv, env, says = OFFLINE[name]
    image_folder(tmp_path / "images")
    hub = {k: v for k, v in _env().items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))
           and k.lower() not in ("https_proxy", "all_proxy")}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "nbsrc", *argv], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**hub, "HF_HOME": str(tmp_path / "hf"), **env})  # an empty hub cache
    seconds = time.monotonic() - t0
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: could not fetch pretrained weights") and says in lines[0], lines[0]
    assert lines[0].endswith("pass weights=<checkpoint path>, or use weights='none'"), lines[0]
    assert seconds < 45, f"{seconds:.0f} s"  # interpreter start and imports included; the retries alone took 51 s
    assert {p.name for p in tmp_path.iterdir()} <= {"hf", "images"}  # nothing written: no run, no index
