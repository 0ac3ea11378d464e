"""An index checks itself: ``manifest.json``, ``images.json`` and ``model.pt`` edited or mixed from two
builds are refused in one line before any search; a build that could read no image leaves nothing in
``--out``; a full disk while writing ``model.pt`` is one line, leaves no ``.tmp`` file, and the same
command then finishes the index. The commands run through ``nbsrc.__main__.main`` in this process."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nbsrc.errors import DatasetError, RunDirError
from nbsrc.retrieval import Index, load_embedding_model


def _folder(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(3):
            a = np.clip(rng.normal(60 + 80 * c, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / f"c{c}" / f"{i}.png")
    return root


def _model(seed: int):
    torch.manual_seed(seed)
    return load_embedding_model("test_vit", weights="none", img_size=32)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """One folder indexed with two models (different random weights): indexes ``a`` and ``b``; the
    weights of ``a`` in ``a.pt`` for the command line (:func:`model_flags`)."""
    base = tmp_path_factory.mktemp("integrity")
    images = _folder(base / "images")
    built = {name: Index.build(_model(seed), images, base / name, num_workers=0, progress=False, log=None)
             for name, seed in (("a", 0), ("b", 1))}
    assert built["a"].manifest["model_fingerprint"] != built["b"].manifest["model_fingerprint"]
    torch.save(_model(0).model.state_dict(), base / "a.pt")
    return base


def model_flags(base: Path) -> list:
    """MODEL and its flags for ``nbsrc embed``: model ``a`` (the same weights at every call, so that a
    command run again continues its build)."""
    return ["test_vit", "--weights", base / "a.pt", "--img-size", "32"]


def _main(capsys, *args) -> tuple[int, str, str]:
    from nbsrc.__main__ import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line(rc: int, err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def _edit(path: Path, change) -> None:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


# ----------------------------------------------------------------------------- mixed or edited files
def test_an_intact_index_searches(two, capsys):
    rc, out, err = _main(capsys, "search", two / "a", two / "images/c1/0.png", "-k", "2")
    assert rc == 0, err
    assert out.splitlines()[1].endswith("c1/0.png  [c1]")  # itself, first


def test_an_edited_image_size_in_the_manifest_is_refused(two, tmp_path, capsys):
    idx = tmp_path / "idx"
    shutil.copytree(two / "a", idx)
    _edit(idx / "manifest.json", lambda m: m["preprocessing"].update(img_size=48))
    with pytest.raises(RunDirError, match="manifest.json and .*images.json name different preprocessings"):
        Index.load(idx)
    _one_line(*_main(capsys, "search", idx, two / "images/c0/0.png")[::2], "different preprocessings",
              "rebuild it with nbsrc embed")


def test_an_edited_model_reference_is_one_line(two, tmp_path, capsys):
    """The reference that rebuilds the network, edited (a ViT of another input size): one line, not
    timm's AssertionError nor a load_state_dict traceback."""
    idx = tmp_path / "idx"
    shutil.copytree(two / "a", idx)
    _edit(idx / "manifest.json", lambda m: m["model"]["build_model"].update(img_size=48))
    _one_line(*_main(capsys, "search", idx, two / "images/c0/0.png")[::2], "does not fit its model reference")


def test_manifest_and_model_of_another_index_are_refused(two, tmp_path, capsys):
    """Swapped in together they agree with each other; images.json still holds the fingerprint of
    the model that computed the embeddings."""
    idx = tmp_path / "idx"
    shutil.copytree(two / "a", idx)
    for name in ("manifest.json", "model.pt"):
        shutil.copy(two / "b" / name, idx / name)
    with pytest.raises(RunDirError, match="name different model fingerprints"):
        Index.load(idx)
    _one_line(*_main(capsys, "search", idx, two / "images/c0/0.png")[::2], "different model fingerprints")


def test_a_listing_of_another_build_is_refused(two, tmp_path):
    idx = tmp_path / "idx"
    shutil.copytree(two / "a", idx)
    _edit(idx / "images.json", lambda p: p["listing"]["paths"].pop())
    with pytest.raises(RunDirError, match="counts 6 images, .*images.json lists 5"):
        Index.load(idx)


def test_a_model_pt_of_another_index_alone_is_refused(two, tmp_path):
    idx = tmp_path / "idx"
    shutil.copytree(two / "a", idx)
    shutil.copy(two / "b" / "model.pt", idx / "model.pt")
    with pytest.raises(RunDirError, match="is not the model the index was built with"):
        Index.load(idx).search(two / "images/c0/0.png")


# ----------------------------------------------------------------------------- builds that fail
def _unreadable(root: Path) -> Path:
    (root / "c0").mkdir(parents=True)
    for i in range(3):
        (root / "c0" / f"{i}.jpg").write_bytes(b"not an image")
    return root


@pytest.mark.parametrize("out_exists", [False, True])
def test_a_build_that_read_no_image_leaves_nothing_and_the_corrected_command_runs(two, tmp_path, capsys, out_exists):
    out = tmp_path / "idx"
    if out_exists:
        out.mkdir()  # an empty folder the user made: kept, empty
    bad = _unreadable(tmp_path / "bad")
    with pytest.raises(DatasetError, match="none of the 3 images"):
        Index.build(_model(0), bad, out, num_workers=0, progress=False, log=None)
    assert (list(out.iterdir()) == []) if out_exists else not out.exists()
    _one_line(*_main(capsys, "embed", *model_flags(two), bad, "--out", out, "--workers", "0", "--no-progress")[::2],
              "none of the 3 images")
    assert (list(out.iterdir()) == []) if out_exists else not out.exists()
    rc, _, err = _main(capsys, "embed", *model_flags(two), two / "images", "--out", out, "--workers", "0",
                       "--no-progress")
    assert rc == 0, err
    assert len(Index.load(out)) == 6


def _disk_full_at_model_pt(monkeypatch) -> None:
    """``torch.save`` (the index writes only model.pt with it) writes half the file, then the disk is full."""
    import nbsrc.retrieval.index as index_module

    real = torch.save

    def save(obj, f, *a, **k):
        buf = io.BytesIO()
        real(obj, buf, *a, **k)
        Path(f).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(index_module.torch, "save", save)


def test_a_full_disk_while_writing_model_pt_is_one_line_and_the_same_command_finishes(two, tmp_path, capsys,
                                                                                       monkeypatch):
    out = tmp_path / "idx"
    argv = ("embed", *model_flags(two), two / "images", "--out", out, "--workers", "0", "--no-progress")
    _disk_full_at_model_pt(monkeypatch)
    _one_line(*_main(capsys, *argv)[::2], f"disk full while writing {out / 'model.pt'}",
              "run the same nbsrc embed command again")
    assert not (out / "model.pt.tmp").exists() and not (out / "model.pt").exists()
    assert not (out / "manifest.json").exists()
    with pytest.raises(RunDirError, match="disk full while writing"):  # the API says the same
        Index.build(_model(0), two / "images", out, num_workers=0, progress=False, log=None)
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []
    monkeypatch.undo()
    rc, stdout, err = _main(capsys, *argv)
    assert rc == 0 and "6 of 6 images already embedded" in stdout, stdout + err
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), np.load(two / "a" / "embeddings.npy"))
    assert Index.load(out).search(two / "images/c0/1.png", k=1).rows[0, 0] == 1


def test_other_write_errors_are_not_called_a_full_disk(two, tmp_path, monkeypatch):
    import nbsrc.retrieval.index as index_module

    def save(obj, f, *a, **k):
        Path(f).write_bytes(b"half")
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(index_module.torch, "save", save)
    with pytest.raises(OSError, match="Input/output error") as e:
        Index.build(_model(0), two / "images", tmp_path / "idx", num_workers=0, progress=False, log=None)
    assert not isinstance(e.value, RunDirError) and not (tmp_path / "idx" / "model.pt.tmp").exists()
