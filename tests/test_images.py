"""nbsrc.data.images: the one image reader (16-bit, EXIF, alpha, decompression bombs, damaged files),
the folder walk (symlink loops, links to '.'), and the check that stops a run before training."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from nbsrc.config import ExperimentConfig
from nbsrc.data import build_data
from nbsrc.data.images import (
    MAX_PIXELS,
    check_dataset_images,
    check_images,
    image_problem,
    image_size,
    list_images,
    load_image,
    scan_images,
)
from nbsrc.errors import DatasetError


def _save(path, array, mode=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, **kw) if mode else Image.fromarray(array).save(path, **kw)
    return path


def _truncated_jpeg(path):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


# ----------------------------------------------------------------------------- decoding
def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    a = np.linspace(0, 65535, 7 * 9).reshape(7, 9).astype(np.uint16)
    p = tmp_path / "gray16.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")  # really a 16-bit file
    x = load_image(p)
    assert x.dtype == torch.uint8 and x.shape == (3, 7, 9)
    expected = np.rint(a.astype(np.float64) * 255 / 65535).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(x[c].numpy(), expected)
    assert x.float().mean() < 140  # a mid-grey ramp, not the near-white of clipping at 255


def test_8bit_images_unchanged(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(_save(tmp_path / "rgb.png", rgb)).permute(1, 2, 0).numpy(), rgb)
    g = load_image(_save(tmp_path / "g.png", gray)).numpy()
    assert all(np.array_equal(g[c], gray) for c in range(3))


def test_alpha_is_composited_over_white(tmp_path):
    a = np.zeros((2, 2, 4), np.uint8)
    a[0, 0] = (10, 20, 30, 255)  # opaque
    a[0, 1] = (0, 0, 0, 0)  # fully transparent (black underneath)
    a[1, 0] = (0, 0, 0, 128)  # half transparent black -> mid grey
    x = load_image(_save(tmp_path / "rgba.png", a)).permute(1, 2, 0).numpy()
    assert tuple(x[0, 0]) == (10, 20, 30)
    assert tuple(x[0, 1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in x[1, 0])


def test_cmyk_and_one_pixel(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (4, 3), (0, 0, 0, 0)).save(p)
    x = load_image(p)
    assert x.shape == (3, 3, 4) and x.min() >= 250  # no ink = white
    one = load_image(_save(tmp_path / "one.png", np.full((1, 1, 3), 7, np.uint8)))
    assert one.shape == (3, 1, 1) and int(one[0, 0, 0]) == 7


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)  # stored 20 wide, 10 high; left half white
    a[:, :10] = 255
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / "rotated.jpg"
    im.save(p, exif=exif, quality=100)
    x = load_image(p)
    assert x.shape == (3, 20, 10)  # upright: 10 wide, 20 high
    assert image_size(p) == (20, 10)
    # rotating clockwise sends the stored left half to the top
    assert x[:, :8].float().mean() > 200 and x[:, 12:].float().mean() < 50


def test_decompression_bomb_is_a_one_line_error_naming_the_file(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("1", (14_000, 14_000)).save(p)  # a few kB on disk, 196 Mpx decoded
    assert p.stat().st_size < 1_000_000 and 14_000 * 14_000 > MAX_PIXELS
    for read in (load_image, image_size):
        with pytest.raises(DatasetError) as e:
            read(p)
        msg = str(e.value)
        assert "\n" not in msg and str(p) in msg and "14000 x 14000" in msg and "decompression-bomb" in msg
    assert "Mpx" in image_problem(p) and "Mpx" in image_problem(p, decode=False)


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "missing"])
def test_damaged_files_are_one_line_errors(tmp_path, kind):
    p = tmp_path / f"bad {kind} é.jpg"  # spaces and non-ASCII in the name
    if kind == "truncated":
        _truncated_jpeg(p)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("this is not a picture\n")
    with pytest.raises(DatasetError) as e:
        load_image(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and "remove or replace" in msg
    reason = image_problem(p)
    assert reason is not None and str(p) not in reason
    if kind == "truncated":
        assert "truncated" in reason
        assert image_problem(p, decode=False) is None  # the header is fine: only decoding finds it
    if kind == "empty":
        assert "empty" in reason


# ----------------------------------------------------------------------------- folder walk
def test_list_images_is_safe_against_links(tmp_path):
    root = tmp_path / "root"
    img = np.zeros((3, 3, 3), np.uint8)
    for rel in ["a/1.png", "a/deep/2.jpg", "b/3.PNG", "top.png", ".hidden/4.png", "b/.5.png"]:
        _save(root / rel, img)
    (root / "a" / "notes.txt").write_text("not an image")
    os.symlink(".", root / "self")  # link to '.'
    os.symlink(root / "a", root / "a" / "deep" / "loop")  # loop back up
    os.symlink(root / "b", root / "alias_of_b")  # a second name for b
    os.symlink(root / "nowhere", root / "broken_dir")  # broken link to a directory
    got = [p.relative_to(root).as_posix() for p in list_images(root)]
    assert got == ["a/1.png", "a/deep/2.jpg", "b/3.PNG", "top.png"]


def test_list_images_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="not a folder"):
        list_images(tmp_path / "f.png")


# ----------------------------------------------------------------------------- checks before work
def test_scan_images_lists_every_bad_file_in_order(tmp_path):
    good = [_save(tmp_path / f"g{i}.png", np.full((4, 4, 3), i, np.uint8)) for i in range(3)]
    trunc = _truncated_jpeg(tmp_path / "t.jpg")
    empty = tmp_path / "e.png"
    empty.write_bytes(b"")
    paths = [good[0], trunc, good[1], empty, good[2]]
    bad = scan_images(paths, workers=2)
    assert [p for p, _ in bad] == [trunc, empty]
    assert scan_images(good) == []
    with pytest.raises(DatasetError) as e:
        check_images(paths, "my folder")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("2 unreadable image(s) in my folder") and str(trunc) in msg
    check_images(good, "fine")  # no error


def test_folder_dataset_with_a_bad_image_stops_before_training(tmp_path):
    root = tmp_path / "photos"
    for c in "abc":
        for i in range(3):
            _save(root / c / f"{i}.png", np.full((6, 6, 3), 40 * i, np.uint8))
    cfg = ExperimentConfig(dataset="folder", data_root=str(root), train_classes="0", test_classes="1-2",
                           img_size=8, patch_size=4)
    assert len(build_data(cfg).train) == 3
    bad = _truncated_jpeg(root / "b" / "broken.jpg")
    with pytest.raises(DatasetError) as e:
        build_data(cfg)
    assert str(bad) in str(e.value) and "truncated" in str(e.value) and "\n" not in str(e.value)
    bad.unlink()
    os.symlink(".", root / "self")
    os.symlink(root, root / "a" / "loop")
    data = build_data(cfg)  # links to '.' and loops change nothing
    assert len(data.train) == 3 and len(data.query) == 6 and data.train.class_names == ["a", "b", "c"]


def test_check_dataset_images(tmp_path):
    from nbsrc.data import RetrievalDataset

    in_memory = RetrievalDataset(np.zeros((4, 5, 5), np.uint8), np.array([0, 0, 1, 1]))
    check_dataset_images(in_memory, "in memory")  # nothing to read
    p = [_save(tmp_path / f"{i}.png", np.zeros((5, 5, 3), np.uint8)) for i in range(2)]
    ok = RetrievalDataset(np.asarray(p, dtype=object), np.array([0, 0]))
    check_dataset_images(ok, "train")
    p[1].write_text("x")
    with pytest.raises(DatasetError, match=r"1 unreadable image\(s\) in train: .*1.png"):
        check_dataset_images(ok, "train")
