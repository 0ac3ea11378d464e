"""Files that ask to run code are refused wherever nbsrc reads them, and nothing in them runs.

A crafted file here is a pickle whose ``__reduce__`` calls ``os.system('touch SENTINEL')`` (or
``open(SENTINEL, 'w')``): read with plain ``pickle`` or ``torch.load(weights_only=False)``, it creates
the sentinel file (checked, so that these tests can fail). Put in place of a checkpoint, a run's or an
index's ``model.pt``, a ``--weights`` file or a benchmark's ``.pkl`` and read by the real command, it
must give exit code 2, one stderr line ``error: ...`` naming the file, and no sentinel. Real-shaped
pickles (dicts, lists, strings and numpy arrays, protocols 2, 4 and 5) and checkpoints written with
numpy RNG state still load, and a resume from one is exact.
"""

from __future__ import annotations

import collections
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_benchmarks import make_revisited, make_sfm120k
from PIL import Image

from nbsrc.errors import DatasetError, RunDirError, WeightsError
from nbsrc.safeload import load_pickle, load_torch, why_unreadable

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--backbone", "test_vit", "--img-size", "8", "--patch-size", "4", "--batch-size", "16", "--m-per-class", "4",
        "--lr", "1e-3", "--device", "cpu", "--no-progress"]
DIGITS = ["--dataset", "digits", "--iterations", "2", "--log-every", "1", "--ckpt-every", "1", "--eval-per-class", "10",
          "--lam", "0.5", "--memory-size", "0"]


class Touch:
    """Unpickled, runs ``touch PATH`` through ``os.system``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.path)}",)


class Opens(Touch):
    """Unpickled, creates ``PATH`` through the builtin ``open``."""

    def __reduce__(self):
        return open, (self.path, "w")


def craft_torch(path: Path, sentinel: Path, cls=Touch) -> None:
    """A ``torch.save`` file shaped like a checkpoint (``iteration``, ``model``) holding a call."""
    path.unlink(missing_ok=True)  # it may be a hard link into a shared fixture
    torch.save({"iteration": 1, "model": {"w": torch.zeros(2)}, "x": cls(sentinel)}, path)


def craft_pickle(path: Path, sentinel: Path, protocol: int = 2, cls=Touch) -> None:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"train": {"cids": ["a"], "run": cls(sentinel)}}, f, protocol=protocol)


# ----------------------------------------------------------------------------- the doors themselves
@pytest.mark.parametrize("cls", [Touch, Opens])
def test_the_crafted_files_do_run_code_when_read_the_unsafe_way(tmp_path, cls):
    """The control: what the tests below refuse would run, read with pickle or weights_only=False."""
    for i, (craft, read) in enumerate([(craft_pickle, lambda p: pickle.loads(p.read_bytes())),
                                       (craft_torch, lambda p: torch.load(p, weights_only=False))]):
        sentinel = tmp_path / f"ran{i}"
        craft(tmp_path / f"f{i}", sentinel, cls=cls)
        read(tmp_path / f"f{i}")
        assert sentinel.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("cls", [Touch, Opens])
def test_load_pickle_refuses_a_call_and_runs_nothing(tmp_path, protocol, cls):
    sentinel = tmp_path / "ran"
    craft_pickle(tmp_path / "f.pkl", sentinel, protocol, cls)
    with pytest.raises(pickle.UnpicklingError) as e:
        load_pickle(tmp_path / "f.pkl")
    assert not sentinel.exists()
    assert why_unreadable(e.value).startswith("it asks to call ") and "nothing was run" in why_unreadable(e.value)


@pytest.mark.parametrize("payload", [
    b"cbuiltins\neval\n(S'1'\ntR.",  # a builtin that is not a container
    b"cbuiltins\ngetattr\n(cbuiltins\ndict\nS'fromkeys'\ntR.",  # an attribute of an allowed class
    b"c_codecs\nencode\n(S'x'\nS'rot13'\ntR.",  # _codecs.encode is allowed for latin1 bytes only
    b"cnumpy\nload\n(S'x.npy'\ntR.",  # numpy, but not its array reconstruction
])
def test_load_pickle_refuses_other_globals(tmp_path, payload):
    (tmp_path / "f.pkl").write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError):
        load_pickle(tmp_path / "f.pkl")


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and \
            all(_equal(x, y) for x, y in zip(a.ravel().tolist(), b.ravel().tolist(), strict=True))
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_real_shaped_pickles_load_as_pickle_loads_them(tmp_path, protocol):
    """The shapes of cirtorch's files (gnd_*.pkl: imlist, qimlist, gnd with bbx and index arrays;
    retrieval-SfM-120k.pkl: cids, cluster, qidxs, pidxs) and the other data a pickle may hold."""
    rng = np.random.default_rng(0)
    obj = {
        "imlist": [f"all_souls_{i:06d}" for i in range(5)], "qimlist": ["all_souls_000013"],
        "gnd": [{"bbx": np.array([136.5, 34.1, 648.5, 955.2]), "easy": np.array([0, 3], dtype=np.int64),
                 "hard": np.array([1]), "junk": np.array([], dtype=np.int64)}],
        "train": {"cids": ["f" * 32, "e" * 32], "cluster": np.array([0, 0], dtype=np.int32), "qidxs": [0],
                  "pidxs": [1], "bbxs": [None, (1, 2, 3, 4)]},
        "float32": rng.normal(size=(3, 4)).astype(np.float32), "float16": np.ones(3, np.float16),
        "fortran": np.asfortranarray(rng.normal(size=(3, 2))), "strided": np.arange(10)[::3],
        "uint8": np.arange(5, dtype=np.uint8), "bool": np.array([True, False]), "unicode": np.array(["ab", "c"]),
        "object": np.array(["x", 1, None], dtype=object), "scalars": [np.int64(7), np.float64(2.5), np.bool_(True)],
        "bytes": b"\x00\xff", "empty_bytes": b"", "bytearray": bytearray(b"ab"), "set": {1, 2},
        "frozen": frozenset("a"),
        "ordered": collections.OrderedDict(a=1), "complex": 1 + 2j, "big": 2**70, "nested": ((1,), [[]], {}),
    }
    data = pickle.dumps(obj, protocol=protocol)
    (tmp_path / "f.pkl").write_bytes(data)
    assert _equal(load_pickle(tmp_path / "f.pkl"), pickle.loads(data))


def test_torch_files_with_numpy_arrays_load_and_calls_are_refused(tmp_path):
    state = {"rng": np.random.get_state(), "tuples": np.arange(12).reshape(3, 4), "x": np.float32(1.5),
             "w": torch.ones(2)}
    torch.save(state, tmp_path / "old.pt")
    got = load_torch(tmp_path / "old.pt")
    assert got["rng"][0] == "MT19937" and np.array_equal(got["rng"][1], state["rng"][1])
    assert np.array_equal(got["tuples"], state["tuples"]) and got["x"] == np.float32(1.5)
    craft_torch(tmp_path / "evil.pt", tmp_path / "ran")
    with pytest.raises(pickle.UnpicklingError) as e:
        load_torch(tmp_path / "evil.pt")
    assert "posix.system" in why_unreadable(e.value) and not (tmp_path / "ran").exists()


# ----------------------------------------------------------------------------- checkpoints hold no numpy
def test_rng_state_needs_no_allowed_globals_and_restores_exactly(tmp_path):
    import random

    from nbsrc.train.checkpoint import rng_state, set_rng_state

    np.random.normal(size=3)  # a cached Gaussian in numpy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "rng.pt") == []
    after = (torch.rand(3), np.random.normal(size=3), np.random.randint(0, 2**31, 3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # no allowed globals needed
    again = (torch.rand(3), np.random.normal(size=3), np.random.randint(0, 2**31, 3), random.random())
    assert torch.equal(after[0], again[0])
    assert all(np.array_equal(a, b) for a, b in zip(after[1:3], again[1:3], strict=True))
    assert after[3] == again[3]


def test_a_checkpoint_with_numpy_rng_state_resumes_exactly(tiny_cfg):
    """A checkpoint written before its numpy RNG state was a tensor (the tuple of
    ``np.random.get_state()``) resumes to the same weights as an uninterrupted run."""
    from nbsrc.experiment import run_experiment
    from nbsrc.train.checkpoint import LATEST

    cfg = tiny_cfg.replace(iterations=4, log_every=1, ckpt_every=2, device="cpu")  # the memory bank included
    full = run_experiment(cfg.replace(name="full"), mode="new", stop_after=4)
    part = cfg.replace(name="part")
    run_experiment(part, mode="new", stop_after=2)
    state = torch.load(part.run_dir / LATEST, weights_only=True)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(part.run_dir / LATEST) == []
    s = state["rng"]["numpy"]
    state["rng"]["numpy"] = (s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"])
    torch.save(state, part.run_dir / LATEST)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(part.run_dir / LATEST)  # the old form's numpy
    resumed = run_experiment(part, mode="resume", stop_after=4)
    a = torch.load(full.run_dir / LATEST, weights_only=True)
    b = torch.load(resumed.run_dir / LATEST, weights_only=True)
    assert a["iteration"] == b["iteration"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["memory"]["embeddings"], b["memory"]["embeddings"])


def test_a_tuple_tasks_saved_tuples_are_a_tensor_and_old_arrays_load():
    from nbsrc.train.tuple_task import TupleTask

    task = TupleTask.__new__(TupleTask)
    task.per_epoch, task.tuples = 2, np.arange(14, dtype=np.int64).reshape(2, 7)
    saved = task.state(3)
    assert isinstance(saved["tuples"], torch.Tensor) and saved["epoch"] == 1
    for form in (saved["tuples"], np.arange(14, dtype=np.int64).reshape(2, 7)):  # today's, and before
        task.tuples = None
        task.load_state({"epoch": 1, "tuples": form})
        assert isinstance(task.tuples, np.ndarray) and np.array_equal(task.tuples, np.arange(14).reshape(2, 7))


# ----------------------------------------------------------------------------- each file where it is read
def test_each_loader_refuses_a_crafted_file_in_one_line(tmp_path):
    """The functions behind the commands (below): checkpoints, model.pt, --weights, dataset pickles."""
    from nbsrc.data.files import read_pickle
    from nbsrc.models.weights import read_state_dict
    from nbsrc.safeload import load_model_file
    from nbsrc.train.checkpoint import LATEST, PREVIOUS, load_checkpoint

    sentinel = tmp_path / "ran"
    run = tmp_path / "run"
    run.mkdir()
    craft_torch(run / LATEST, sentinel)
    with pytest.raises(RunDirError, match=rf"checkpoint {run / LATEST} is not an nbsrc checkpoint \(it asks to "
                                          r"call posix.system.*restart with --overwrite") as e:
        load_checkpoint(run)
    torch.save({"iteration": 3}, run / PREVIOUS)  # a good previous one is named, never used silently
    with pytest.raises(RunDirError, match=rf"delete it to resume from {PREVIOUS}, or restart with --overwrite"):
        load_checkpoint(run)
    (run / LATEST).write_bytes(b"PK\x03\x04 truncated")
    craft_torch(run / PREVIOUS, sentinel)
    with pytest.raises(RunDirError, match=rf"checkpoint {run / PREVIOUS} is not an nbsrc checkpoint") as e2:
        load_checkpoint(run)
    craft_torch(tmp_path / "model.pt", sentinel)
    with pytest.raises(RunDirError, match=rf"{tmp_path / 'model.pt'} is damaged or is not an nbsrc file \(it asks "
                                          r"to call posix.system.*\); rebuild it with X") as e3:
        load_model_file(tmp_path / "model.pt", "X")
    with pytest.raises(WeightsError, match=r"cannot read weights file .*model.pt \(it asks to call posix.system") as e4:
        read_state_dict(tmp_path / "model.pt")
    craft_pickle(tmp_path / "db.pkl", sentinel)
    with pytest.raises(DatasetError, match=r"cannot read .*db.pkl \(it asks to call posix.system.*download it again") \
            as e5:
        read_pickle(tmp_path / "db.pkl", "layout", "URL")
    assert not sentinel.exists()
    assert all("\n" not in str(err.value) for err in (e, e2, e3, e4, e5))


def test_a_model_file_of_anything_but_tensors_is_refused(tmp_path):
    from nbsrc.safeload import load_model_file

    for i, obj in enumerate([[1, 2], {}, {"w": 3}, "text"]):
        torch.save(obj, tmp_path / f"m{i}.pt")
        with pytest.raises(RunDirError, match="is damaged or is not an nbsrc file .*not a state dict of tensors"):
            load_model_file(tmp_path / f"m{i}.pt", "X")


# ----------------------------------------------------------------------------- through the commands
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (``runs/d``), an image folder and an index built from the run."""
    from nbsrc.__main__ import main

    base = tmp_path_factory.mktemp("crafted")
    assert main(["train", "--name", "d", "--runs-dir", str(base / "runs"), *DIGITS, *TINY]) == 0
    rng = np.random.default_rng(0)
    for c in range(2):
        (base / "images" / f"c{c}").mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(base / "images" / f"c{c}" / f"{i}.png")
    assert main(["embed", str(base / "runs" / "d"), str(base / "images"), "--out", str(base / "index"),
                 "--workers", "0", "--no-progress"]) == 0
    return base


def _copy(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)


def _partial(ws: Path) -> None:  # killed after its last checkpoint, before its results
    for name in ("results.json", "model.pt", "embeddings.npz"):
        (ws / "runs" / "d" / name).unlink()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])


@dataclass
class Case:
    setup: object  # (ws, base, sentinel) -> None
    argv: object  # (ws, base) -> list of arguments
    fragment: str  # what the error line names


def _resume(ws: Path, base: Path) -> list[str]:
    return ["train", "--name", "d", "--runs-dir", str(ws / "runs"), *DIGITS, *TINY, "--resume"]


def _sfm(ws: Path, base: Path) -> list[str]:
    return ["train", "--name", "s", "--runs-dir", str(ws / "runs"), "--dataset", "sfm120k", "--data-root",
            str(ws / "sfm" / "retrieval-SfM-120k"), "--iterations", "0", *TINY]


def _sfm_data(ws: Path) -> None:
    make_sfm120k(ws / "sfm")
    make_revisited(ws / "sfm", "roxford5k")


CASES = {
    "checkpoint.pt of a finished run": Case(
        lambda ws, base, s: (_copy(base / "runs", ws / "runs"), craft_torch(ws / "runs/d/checkpoint.pt", s)),
        _resume, "runs/d/checkpoint.pt is not an nbsrc checkpoint (it asks to call posix.system"),
    "checkpoint.pt of a partial run": Case(
        lambda ws, base, s: (_copy(base / "runs", ws / "runs"), _partial(ws),
                             craft_torch(ws / "runs/d/checkpoint.pt", s)),
        _resume, "delete it to resume from checkpoint.prev.pt"),
    "checkpoint.prev.pt, checkpoint.pt truncated": Case(
        lambda ws, base, s: (_copy(base / "runs", ws / "runs"), _partial(ws), _truncate(ws / "runs/d/checkpoint.pt"),
                             craft_torch(ws / "runs/d/checkpoint.prev.pt", s)),
        _resume, "runs/d/checkpoint.prev.pt is not an nbsrc checkpoint (it asks to call posix.system"),
    "a run's model.pt, embed": Case(
        lambda ws, base, s: (_copy(base / "runs", ws / "runs"), craft_torch(ws / "runs/d/model.pt", s, Opens)),
        lambda ws, base: ["embed", str(ws / "runs/d"), str(base / "images"), "--out", str(ws / "idx"),
                          "--workers", "0"],
        "runs/d/model.pt is damaged or is not an nbsrc file (it asks to call io.open"),
    "a run's model.pt, export": Case(
        lambda ws, base, s: (_copy(base / "runs", ws / "runs"), craft_torch(ws / "runs/d/model.pt", s)),
        lambda ws, base: ["export", str(ws / "runs/d"), "--format", "torchscript", "--out", str(ws / "d.pt")],
        "runs/d/model.pt is damaged or is not an nbsrc file"),
    "an index's model.pt, search": Case(
        lambda ws, base, s: (_copy(base / "index", ws / "index"), craft_torch(ws / "index/model.pt", s)),
        lambda ws, base: ["search", str(ws / "index"), str(base / "images/c0/0.png")],
        "index/model.pt is damaged or is not an nbsrc file (it asks to call posix.system"),
    "a --weights file": Case(
        lambda ws, base, s: craft_torch(ws / "w.pt", s),
        lambda ws, base: ["train", "--name", "w", "--runs-dir", str(ws / "runs"), *DIGITS, *TINY,
                          "--weights", str(ws / "w.pt")],
        "w.pt (it asks to call posix.system"),
    "retrieval-SfM-120k.pkl": Case(
        lambda ws, base, s: (_sfm_data(ws), craft_pickle(ws / "sfm/retrieval-SfM-120k/retrieval-SfM-120k.pkl", s)),
        _sfm, "retrieval-SfM-120k.pkl (it asks to call posix.system"),
    "gnd_roxford5k.pkl": Case(
        lambda ws, base, s: (_sfm_data(ws), craft_pickle(ws / "sfm/roxford5k/gnd_roxford5k.pkl", s, protocol=4)),
        _sfm, "gnd_roxford5k.pkl (it asks to call posix.system"),
}


def _workspace(finished: Path, name: str, prefix: str = "") -> tuple[Path, Path]:
    ws = finished / "cases" / (prefix + name.replace(" ", "_").replace("'", ""))
    ws.mkdir(parents=True)
    sentinel = ws / "SENTINEL"
    CASES[name].setup(ws, finished, sentinel)
    return ws, sentinel


def _assert_refused(rc: int, err: str, fragment: str, sentinel: Path) -> None:
    assert not sentinel.exists(), "the crafted file ran code"
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_each_crafted_file_is_refused_by_its_command(finished, capsys, name):
    """``nbsrc.__main__.main`` in this process (what ``python -m nbsrc`` runs; see the slow test below)."""
    from nbsrc.__main__ import main

    ws, sentinel = _workspace(finished, name)
    capsys.readouterr()
    rc = main(CASES[name].argv(ws, finished))
    _assert_refused(rc, capsys.readouterr().err, CASES[name].fragment, sentinel)
    assert not (ws / "idx").exists() and not (ws / "d.pt").exists()  # nothing written by embed or export


@pytest.mark.slow  # a python -m nbsrc process per case (torch and timm imported each time)
def test_each_crafted_file_is_refused_by_a_real_process(finished):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name, case in CASES.items():
        ws, sentinel = _workspace(finished, name, prefix="process_")
        r = subprocess.run([sys.executable, "-m", "nbsrc", *case.argv(ws, finished)], capture_output=True,
                           text=True, env=env, cwd=ws, timeout=600, check=False)
        _assert_refused(r.returncode, r.stderr, case.fragment, sentinel)
