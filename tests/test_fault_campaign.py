"""A fault campaign through the command line: a hostile but realistic user's bad inputs.

Each case sets up a workspace (a runs directory, maybe a finished tiny run, damaged files, an image
folder with a bad file), runs ``python -m nbsrc ...`` on it and asserts:

* the exit code is not 0 (for the cases in ``SUCCEEDS`` it is 0, by design: a partial metrics line
  is dropped on resume, a run's own outputs are valid weights, a leftover of a failed start is
  replaced);
* stderr is exactly one line, ``error: ...``, without a traceback, and says what was wrong (a
  fragment naming the flag, file or parameter);
* nothing under the runs directory is new or changed, except the paths in the case's ``allowed``.

Speed: importing torch and timm costs 5-20 s of a loaded 2-core CPU, so 60 cold ``python -m nbsrc``
processes would take minutes. The cases therefore run in processes forked from one server that
imported nbsrc, torch and timm once and built the command line's parser once (its lazy imports,
matplotlib among them, and the flags' help read from config.py's source cost each child 2-6 s
otherwise); each child chdirs to its workspace, points fd 1 and 2 at files
and runs ``nbsrc.__main__.main(argv)`` the way ``python -m`` does (an uncaught exception prints its
traceback and exits 1; ``SystemExit`` exits with its code). ``test_forked_cases_match_real_processes``
runs a few cases as real ``python -m nbsrc`` processes too and checks that they give the same
exit code and stderr.

Every case, the failed starts included (nothing is written before a run can start),
must hold; none is expected to fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("fault_campaign")  # its tests share module-scoped fixtures: one worker

REPO = Path(__file__).resolve().parents[1]
# test_vit: timm's 0.3 M-parameter ViT (ViT-Tiny's checkpoints are 18x larger, and several cases train)
TINY = {"backbone": "test_vit", "dataset": "digits", "img-size": 8, "patch-size": 4, "iterations": 2, "batch-size": 16,
        "m-per-class": 4, "lr": 1e-3, "log-every": 1, "ckpt-every": 1, "eval-per-class": 10, "lam": 0.5,
        "memory-size": 0, "device": "cpu"}
FINISHED = "done"  # the one tiny finished run that the cases copy
# A runs directory that cannot be written: a read-only one, or for root (who may write anywhere)
# /sys, where even root may not create a directory.
ROOT = os.geteuid() == 0
READ_ONLY = "/sys/nbsrc-campaign" if ROOT else "runs"


def tiny_flags(name: str = "t", **over) -> list[str]:
    flags = {"name": name, "runs-dir": "runs", **TINY, **{k.replace("_", "-"): v for k, v in over.items()}}
    return [a for k, v in flags.items() for a in (f"--{k}", str(v))] + ["--no-progress"]


# ----------------------------------------------------------------------------- fork server
SERVER = textwrap.dedent('''
    import functools, json, os, sys, time, traceback
    import faiss, papermill, sklearn.datasets, timm, torch  # the expensive imports, once
    import nbsrc.__main__, nbsrc.data, nbsrc.eval, nbsrc.experiment, nbsrc.paper.notebooks  # noqa: F401
    # What main() imports when it builds the parser (matplotlib, nbsrc.retrieval, ...) once.
    nbsrc.__main__.build_parser()

    def child(case):
        os.chdir(case["cwd"])
        os.environ.update(case.get("env", {}))
        for fd, name in ((1, "stdout"), (2, "stderr")):
            f = os.open(os.path.join(case["out"], name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        code = 0
        try:  # what `python -m nbsrc` does with main()'s result and with an uncaught exception
            code = nbsrc.__main__.main(case["argv"])
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = 1
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    parallel = int(os.environ.get("CAMPAIGN_PARALLEL", "2"))
    for batch in sys.stdin:  # one JSON list of cases a line; one JSON dict of results a line back
        todo, running, done = json.loads(batch), {}, {}
        while todo or running:
            while todo and len(running) < parallel:
                case = todo.pop(0)
                pid = os.fork()
                if pid == 0:
                    child(case)
                running[pid] = case, time.monotonic()
            pid, status = os.wait()
            case, t0 = running.pop(pid)
            done[case["name"]] = {"rc": os.waitstatus_to_exitcode(status), "seconds": round(time.monotonic() - t0, 2)}
        print(json.dumps(done), flush=True)
''')


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg"}


class ForkServer:
    """One process that imported nbsrc, torch and timm; :meth:`run` forks a child per case."""

    def __init__(self, parallel: int = 2):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=REPO, env={**_env(), "CAMPAIGN_PARALLEL": str(parallel)})

    def run(self, cases: list[dict]) -> dict[str, dict]:
        """Run ``cases`` (``name``, ``argv``, ``cwd``, ``out``, ``env``), at most ``parallel`` at a
        time; ``{name: {"rc": exit code, "seconds": wall time}}``, each case's stdout and stderr in
        ``<out>/stdout`` and ``<out>/stderr``."""
        self.proc.stdin.write(json.dumps(cases) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the fork server died (exit {self.proc.wait()})"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


# ----------------------------------------------------------------------------- snapshots
def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, size and content hash (directories: kind only)."""
    out = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = ("file", p.stat().st_size, hashlib.sha1(p.read_bytes()).hexdigest())
    return out


# ----------------------------------------------------------------------------- fixtures on disk
def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` × ``height`` (a decompression bomb to PIL) and that holds
    no pixel data: PIL refuses it on open, before decoding anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def image_folder(root: Path, classes: int = 4, per_class: int = 8) -> Path:
    """``root/<class>/<image>.png``: small grey images that differ by class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            a = np.clip(rng.normal(40 * c + 40, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / f"c{c}" / f"{i}.png")
    return root


def folder_flags(root: Path, **over) -> list[str]:
    return tiny_flags(**{"dataset": "folder", "data-root": root, "train-classes": "0-1", "test-classes": "2-3",
                         "eval-per-class": 8, "batch-size": 8, **over})


# ----------------------------------------------------------------------------- the cases
@dataclass
class Case:
    argv: list[str]
    fragment: str  # what the one stderr line must say (the flag, file or parameter at fault)
    setup: object = None  # callable(ws: Path) -> None, run in the workspace before the command
    finished_run: bool = False  # copy the tiny finished run into runs/done first
    allowed: tuple[str, ...] = ()  # paths under runs/ (prefixes) that the case may create or change
    env: dict = field(default_factory=dict)


def _write(rel: str, text: str | bytes):
    def setup(ws: Path) -> None:
        p = ws / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def _do(*steps):
    def setup(ws: Path) -> None:
        for s in steps:
            s(ws)
    return setup


def _append(rel: str, text: str):
    def setup(ws: Path) -> None:
        with open(ws / rel, "a") as f:
            f.write(text)
    return setup


def _unlink(*rels: str):
    def setup(ws: Path) -> None:
        for rel in rels:
            (ws / rel).unlink()
    return setup


def _truncate(rel: str):
    def setup(ws: Path) -> None:
        p = ws / rel
        data = p.read_bytes()
        p.unlink()  # it may be a hard link to the finished run (see _link_copy)
        p.write_bytes(data[: len(data) // 2])
    return setup


def _folder(damage=None, **kw):
    def setup(ws: Path) -> None:
        root = image_folder(ws / "images", **kw)
        if damage is not None:
            damage(root)
    return setup


def _truncated_png(root: Path) -> None:
    p = root / "c0" / "3.png"
    p.write_bytes(p.read_bytes()[:60])


def _symlink_loop(root: Path) -> None:
    (root / "c0" / "loop").symlink_to(root / "c0", target_is_directory=True)
    (root / "c1" / "self.png").symlink_to(root / "c1" / "self.png")


def _done_resume(*flags: str) -> list[str]:
    return ["train", *tiny_flags(FINISHED, dim=8), *flags]


# The finished run made partial: a kill after its last checkpoint, before its results were written.
_PARTIAL = _unlink(f"runs/{FINISHED}/results.json", f"runs/{FINISHED}/model.pt", f"runs/{FINISHED}/embeddings.npz")
NB = str(REPO / "notebooks" / "02_train.ipynb")
NB_TINY = ["-p", "dataset", "digits", "-p", "img_size", "8", "-p", "iterations", "2", "-p", "batch_size", "16",
           "-p", "m_per_class", "4", "-p", "eval_per_class", "10", "-p", "memory_size", "0", "-p", "warmup_iters", "0",
           "-p", "device", "cpu", "-p", "runs_dir", "runs"]

CASES: dict[str, Case] = {
    # --- the command line itself
    "flag value not a number": Case(["train", "--iterations", "abc"],
                                    "argument --iterations: invalid int value: 'abc'"),
    "flag without its value": Case(["train", "--lr"], "argument --lr: expected one argument"),
    "unknown flag": Case(["train", "--learning-rate", "1"], "unrecognized arguments: --learning-rate"),
    "unknown command": Case(["fit"], "invalid choice: 'fit'"),
    "no command": Case([], "the following arguments are required: cmd"),
    "resume and overwrite together": Case(["train", "--resume", "--overwrite"], "not allowed with argument"),
    "DToP option not a number": Case(["train", "--dtop", "--k", "six"], "argument --k: invalid int value: 'six'"),
    "eval without a run": Case(["eval"], "the following arguments are required: runs"),
    # --- settings that cannot work (validation, before anything is built)
    "beta out of range": Case(["train", *tiny_flags(beta=2)], "beta=2.0 is invalid"),
    "negative lambda": Case(["train", *tiny_flags(lam=-1)], "lam=-1.0 is invalid"),
    "lambda nan": Case(["train", *tiny_flags(lam="nan")], "lam"),
    "lr nan": Case(["train", *tiny_flags(lr="nan")], "lr"),
    "lr inf": Case(["train", *tiny_flags(lr="inf")], "lr"),
    "batch not a multiple of m": Case(["train", *tiny_flags(**{"batch-size": 10})], "batch_size=10 is invalid"),
    "unknown dataset": Case(["train", *tiny_flags(dataset="imagenet")], "dataset='imagenet' is invalid"),
    "unknown pooling": Case(["train", *tiny_flags(pooling="mean")], "pooling='mean' is invalid"),
    "run name with a slash": Case(["train", *tiny_flags("a/b")], "name='a/b' is invalid"),
    "run name ..": Case(["train", *tiny_flags("..")], "name='..' is invalid"),
    "class list unparsable": Case(["train", *tiny_flags(**{"train-classes": "zero-four"})], "zero-four"),
    "patch size not dividing the image": Case(["train", *tiny_flags(**{"patch-size": 3})], "patch_size=3 is invalid"),
    "Recall@0": Case(["train", *tiny_flags(), "--ks", "0", "1"], "ks=(0, 1) is invalid"),
    "momentum without memory": Case(["train", *tiny_flags(momentum=0.9)], "momentum=0.9 is invalid"),
    "negative checkpoint interval": Case(["train", *tiny_flags(**{"ckpt-every": -1})], "ckpt_every=-1 is invalid"),
    "unknown preset": Case(["train", "--preset", "irt_r_sop_deit", *tiny_flags()], "irt_r_sop_deit"),
    "config file missing": Case(["train", "--config", "nope.json", *tiny_flags()],
                                "--config nope.json: cannot read it"),
    "config file malformed": Case(["train", "--config", "bad.json", *tiny_flags()],
                                  "--config bad.json is not valid JSON (line 1, column 12",
                                  setup=_write("bad.json", '{"lr": 0.1,')),
    "config file a list": Case(["train", "--config", "list.json", *tiny_flags()],
                               "--config list.json holds a JSON list", setup=_write("list.json", "[1, 2]")),
    "config file unknown key": Case(["train", "--config", "typo.json", *tiny_flags()],
                                    "--config typo.json: unknown parameter 'learning_rate'",
                                    setup=_write("typo.json", '{"learning_rate": 0.1}')),
    "runs dir read-only": Case(["train", *tiny_flags(), "--runs-dir", READ_ONLY], READ_ONLY,
                               setup=lambda ws: None if ROOT else (ws / "runs").chmod(0o555)),
    "runs dir under a file": Case(["train", *tiny_flags(), "--runs-dir", "afile/runs"], "afile/runs",
                                  setup=_write("afile", "not a directory")),
    # --- model, weights and device (after validation; the run must not start)
    "unknown backbone": Case(["train", *tiny_flags(backbone="vit_nope_patch16")], "vit_nope_patch16"),
    "patch size none at 28 px": Case(["train", *tiny_flags(**{"img-size": 28, "patch-size": "none"})],
                                     "patch_size=None (test_vit's own 16-px patches) does not tile img_size=28"),
    "PCA larger than the embedding": Case(["train", *tiny_flags(dim=500)], "dim=500"),
    "DToP option out of range": Case(["train", *tiny_flags(), "--dtop", "--k", "99"], "k=99"),
    "weights file missing": Case(["train", *tiny_flags(weights="missing.pt")], "missing.pt"),
    "weights file not a checkpoint": Case(["train", *tiny_flags(weights="junk.pt")], "junk.pt",
                                          setup=_write("junk.pt", b"PK\x03\x04 not really")),
    "weights of another image size": Case(["train", *tiny_flags(weights=f"runs/{FINISHED}", **{"img-size": 16})],
                                          f"runs/{FINISHED}/model.pt do not fit the model", finished_run=True),
    "weights from a run that never checkpointed": Case(["train", *tiny_flags(weights="runs/started")], "runs/started",
                                                       setup=_write("runs/started/config.json", "{}")),
    "device cuda without a GPU": Case(["train", *tiny_flags(device="cuda")], "cuda"),
    # --- data
    "data root missing": Case(["train", *folder_flags(Path("no_such_dir"))], "no_such_dir"),
    "data root empty": Case(["train", *folder_flags(Path("empty"))], "empty",
                            setup=lambda ws: (ws / "empty").mkdir()),
    "class out of range": Case(["train", *tiny_flags(**{"test-classes": "5-40"})], "40"),
    "folder: truncated PNG in a training class": Case(["train", *folder_flags(Path("images"))], "3.png",
                                                      setup=_folder(_truncated_png)),
    "folder: empty file named .jpg": Case(["train", *folder_flags(Path("images"))], "zero.jpg",
                                          setup=_folder(lambda r: (r / "c1" / "zero.jpg").write_bytes(b""))),
    "folder: text file named .png": Case(["train", *folder_flags(Path("images"))], "notes.png",
                                         setup=_folder(lambda r: (r / "c0" / "notes.png").write_text("hello"))),
    "folder: decompression bomb": Case(["train", *folder_flags(Path("images"))], "bomb.png",
                                       setup=_folder(lambda r: png_header_only(r / "c2" / "bomb.png", 14000, 14000))),
    "folder: symlink loop": Case(["train", *folder_flags(Path("images"))], "self.png", setup=_folder(_symlink_loop)),
    # --- run directories: existing, damaged, killed
    "new run over a finished one": Case(["train", *tiny_flags(FINISHED)], "already exists", finished_run=True),
    "resume of a run that does not exist": Case(["train", *tiny_flags("ghost"), "--resume"], "ghost"),
    "resume with another config": Case(_done_resume("--resume", "--lr", "0.5"), "--lr 0.5 cannot change a resumed run "
                                                                                "(it was made with lr=0.001)",
                                       finished_run=True),
    "resume with a damaged config.json": Case(_done_resume("--resume"), f"runs/{FINISHED}/config.json is damaged",
                                              finished_run=True,
                                              setup=_write(f"runs/{FINISHED}/config.json", '{"name": "done", ')),
    "resume with a damaged metrics line": Case(_done_resume("--resume"), f"runs/{FINISHED}/metrics.jsonl, line 1 is "
                                               "damaged", finished_run=True,
                                               setup=_do(_PARTIAL, _write(f"runs/{FINISHED}/metrics.jsonl",
                                                                          '{"kind": "tra\n{"kind": "train"}\n'))),
    "resume with both checkpoints truncated": Case(_done_resume("--resume"), "no usable checkpoint", finished_run=True,
                                                   setup=_do(_PARTIAL, _truncate(f"runs/{FINISHED}/checkpoint.pt"),
                                                             _truncate(f"runs/{FINISHED}/checkpoint.prev.pt"))),
    "eval of a run with damaged results.json": Case(["eval", f"runs/{FINISHED}"], f"runs/{FINISHED}/results.json is "
                                                    "damaged", finished_run=True,
                                                    setup=_write(f"runs/{FINISHED}/results.json", '{"R@1": 5')),
    "eval of a run with damaged config.json": Case(["eval", f"runs/{FINISHED}"], f"runs/{FINISHED}/config.json is "
                                                   "damaged", finished_run=True,
                                                   setup=_write(f"runs/{FINISHED}/config.json", "")),
    "eval of a run that does not exist": Case(["eval", "runs/ghost"], "runs/ghost"),
    # --- notebooks
    "notebook parameter of the wrong type": Case(["notebook", NB, "-p", "iterations", "abc"],
                                                 "parameter iterations='abc' of 02_train.ipynb is invalid"),
    "notebook parameter not finite": Case(["notebook", NB, "-p", "lr", "inf"], "parameter lr='inf'"),
    "notebook parameter misspelt": Case(["notebook", NB, "-p", "lams", "[0.3]"], "unknown parameter 'lams'"),
    "notebook parameter None where a number is needed": Case(["notebook", NB, "-p", "iterations", "none"],
                                                             "parameter iterations=None"),
    "notebook missing": Case(["notebook", "notebooks/99_nothing.ipynb"], "99_nothing.ipynb does not exist"),
    "notebook with patch_size none at 8 px": Case(["notebook", NB, *NB_TINY, "-p", "patch_size", "none"],
                                                  "02_train.ipynb stopped in cell", allowed=("notebooks",)),
}

STARTS_A_KERNEL = ("notebook with patch_size none at 8 px",)  # the case that runs a notebook (the slowest one)

# Cases whose exit code is 0 by design, each with what its stdout must say.
SUCCEEDS = {
    "resume after a partial metrics line": (
        Case(_done_resume("--resume"), "", finished_run=True, allowed=(FINISHED,),
             setup=_do(_PARTIAL, _append(f"runs/{FINISHED}/metrics.jsonl", '{"kind": "train", "iter'))),
        f"dropped the partial last line of runs/{FINISHED}/metrics.jsonl"),
    "weights from a run directory": (Case(["train", *tiny_flags("w1", weights=f"runs/{FINISHED}")], "",
                                          finished_run=True, allowed=("w1",)), "w1: R@1="),
    "weights from a model.pt": (Case(["train", *tiny_flags("w3", weights=f"runs/{FINISHED}/model.pt")], "",
                                     finished_run=True, allowed=("w3",)), "w3: R@1="),
    "weights from a checkpoint": (Case(["train", *tiny_flags("w2", weights=f"runs/{FINISHED}/checkpoint.pt")], "",
                                       finished_run=True, allowed=("w2",)), "w2: R@1="),
    "resume after a kill before the first checkpoint": (
        Case(["train", *tiny_flags("killed"), "--resume"], "", allowed=("killed",),
             finished_run=True, setup=lambda ws: _copy_config(ws, "killed")), "killed: R@1="),
    "the corrected command after a failed start": (
        Case(["train", *tiny_flags("failed")], "", allowed=("failed",),
             finished_run=True, setup=lambda ws: _copy_config(ws, "failed")), "failed: R@1="),
}

def _copy_config(ws: Path, name: str) -> None:
    """What a kill before the first checkpoint leaves (a failed start leaves nothing): the config
    alone (the copy of the finished run it is made from is removed)."""
    cfg = json.loads((ws / "runs" / FINISHED / "config.json").read_text())
    (ws / "runs" / name).mkdir(parents=True)
    cfg["run"]["name"] = name
    (ws / "runs" / name / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(ws / "runs" / FINISHED)


# ----------------------------------------------------------------------------- running them all once
def _link_copy(src: Path, dst: Path) -> None:
    """Copy a run: big binary files hard-linked (every write to them is an atomic replace, which
    breaks the link), small ones copied (metrics.jsonl is appended to in place)."""
    def copy(s, d):
        if Path(s).suffix in (".pt", ".npz"):
            os.link(s, d)
        else:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=copy)


def run_cases(server: ForkServer, jobs: list[dict], before: dict, state, slow_first: tuple = ()) -> dict:
    """Run every job on ``server`` and close it; ``{name: {rc, seconds, stdout, stderr, before, after, ws}}``
    with ``after = state(ws)``. Jobs named in the first of ``slow_first`` start first, then those in the
    second, ... (the longest first: a notebook kernel, then the cases that train), so that the short ones
    fill the other slot."""
    codes = server.run(sorted(jobs, key=lambda job: tuple(job["name"] not in names for names in slow_first)))
    server.close()
    results = {}
    for job in jobs:
        ws, name = Path(job["cwd"]), job["name"]
        results[name] = {**codes[name], "stdout": (ws / "out" / "stdout").read_text(),
                         "stderr": (ws / "out" / "stderr").read_text(), "before": before[name],
                         "after": state(ws), "ws": ws}
    return results


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    base = tmp_path_factory.mktemp("campaign")
    # one tiny finished run, made through the CLI; it is also the control case: the valid command works
    made = base / "made"
    (made / "out").mkdir(parents=True)
    server = ForkServer()
    rc = server.run([{"name": "control", "argv": ["train", *tiny_flags(FINISHED, dim=8)], "cwd": str(made),
                      "out": str(made / "out")}])["control"]["rc"]
    control = {"rc": rc, "stderr": (made / "out" / "stderr").read_text(),
               "stdout": (made / "out" / "stdout").read_text()}
    finished = made / "runs" / FINISHED
    assert rc == 0 and (finished / "results.json").exists(), control
    all_cases = {**CASES, **{k: v[0] for k, v in SUCCEEDS.items()}}
    jobs, before = [], {}
    for i, (name, case) in enumerate(all_cases.items()):
        ws = base / f"case{i:02d}"
        (ws / "out").mkdir(parents=True)
        (ws / "runs").mkdir()
        if case.finished_run:
            _link_copy(finished, ws / "runs" / FINISHED)
        if case.setup is not None:
            case.setup(ws)
        before[name] = snapshot(ws / "runs")
        jobs.append({"name": name, "argv": case.argv, "cwd": str(ws), "out": str(ws / "out"),
                     "env": {"NBSRC_KERNEL": os.environ.get("NBSRC_KERNEL", ""), **case.env}})
    for job in jobs:
        if not job["env"]["NBSRC_KERNEL"]:
            del job["env"]["NBSRC_KERNEL"]
    results = run_cases(server, jobs, before, lambda ws: snapshot(ws / "runs"), (STARTS_A_KERNEL, SUCCEEDS))
    for res in results.values():
        (res["ws"] / "runs").chmod(0o755)  # the read-only case, so that pytest can remove it
    if os.environ.get("NBSRC_CAMPAIGN_TIMINGS"):  # where to write each case's wall time, slowest first
        Path(os.environ["NBSRC_CAMPAIGN_TIMINGS"]).write_text("".join(
            f"{r['seconds']:7.2f} s  exit {r['rc']}  {name}\n"
            for name, r in sorted(results.items(), key=lambda kv: -kv[1]["seconds"])))
    return {"control": control, "results": results, "finished": finished}


def _changes(res: dict) -> set[str]:
    a, b = res["before"], res["after"]
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def _params(names):
    return list(names)


def test_the_valid_tiny_command_succeeds_quietly(campaign):
    c = campaign["control"]
    assert c["rc"] == 0 and "Traceback" not in c["stderr"], c
    assert f"{FINISHED}: R@1=" in c["stdout"]


@pytest.mark.parametrize("name", _params(CASES))
def test_a_bad_input_is_one_line_and_leaves_the_runs_untouched(campaign, name):
    res, case = campaign["results"][name], CASES[name]
    lines = res["stderr"].splitlines()
    assert res["rc"] != 0, f"exit 0; stdout: {res['stdout'][-500:]}"
    assert "Traceback" not in res["stderr"], res["stderr"][-3000:]
    assert len(lines) == 1, res["stderr"][-3000:]
    assert lines[0].startswith("error: ") and case.fragment in lines[0], lines[0]
    changed = {p for p in _changes(res) if not any(p == a or p.startswith(a + "/") for a in case.allowed)}
    assert not changed, f"changed under runs/: {sorted(changed)}"


@pytest.mark.parametrize("name", _params(SUCCEEDS))
def test_what_is_not_an_error_succeeds(campaign, name):
    res = campaign["results"][name]
    case, says = SUCCEEDS[name]
    assert res["rc"] == 0, res["stderr"][-3000:]
    assert "Traceback" not in res["stderr"] and says in res["stdout"], (res["stdout"][-2000:], res["stderr"][-2000:])
    changed = {p for p in _changes(res) if not any(p == a or p.startswith(a + "/") for a in case.allowed)}
    assert not changed, f"changed under runs/: {sorted(changed)}"


REAL = ("flag value not a number", "config file malformed", "eval of a run with damaged results.json")


def test_forked_cases_match_real_processes(campaign):
    """The fork server is faithful: a few cases rerun as real ``python -m nbsrc`` processes give the
    same exit code and stderr."""
    for name in REAL:
        res = campaign["results"][name]
        ws = res["ws"]
        real = subprocess.run([sys.executable, "-m", "nbsrc", *CASES[name].argv], cwd=ws, env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert (real.returncode, real.stderr) == (res["rc"], res["stderr"]), name
