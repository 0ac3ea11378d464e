"""The glyph dataset builder (nbsrc.data.glyphs) on a few always-present fonts (matplotlib's DejaVu)
and Latin characters, so that the tests need none of the CJK font packages."""

from pathlib import Path

import matplotlib
import numpy as np
import pytest

from nbsrc.data import glyphs
from nbsrc.data.glyphs import FontFace, build_glyphs
from nbsrc.errors import ConfigError, DatasetError

TTF = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
FONTS = tuple(FontFace("(matplotlib)", str(TTF / n)) for n in
              ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf"))
CHARS = list("ABCDEFGHJKLM")  # 12 classes
PARTS = (("pretrain", 4), ("train", 4), ("test", 4))


def small(tmp_path, fonts=FONTS, chars=CHARS, name="cache", **kw):
    return build_glyphs(fonts, parts=PARTS, chars=chars, cache_dir=tmp_path / name, val_classes=1,
                        progress=False, **kw)


def test_parts_are_class_disjoint_and_cover_every_class(tmp_path):
    g = small(tmp_path)
    assert g.parts == {"pretrain": (0, 3), "train": (4, 7), "test": (8, 11), "train_fit": (4, 6), "train_val": (7, 7)}
    sets = {k: set(range(a, b + 1)) for k, (a, b) in g.parts.items()}
    assert not sets["pretrain"] & sets["train"] and not sets["train"] & sets["test"]
    assert not sets["pretrain"] & sets["test"] and not sets["train_fit"] & sets["train_val"]
    assert sets["pretrain"] | sets["train"] | sets["test"] == set(range(12)) == set(np.unique(g.labels).tolist())
    assert sets["train_fit"] | sets["train_val"] == sets["train"]
    assert [n.split()[1] for n in g.class_names] == CHARS  # class c is the c-th character
    assert g.class_names[0] == "U+0041 A"


def test_part_names_resolve_to_ranges_and_typos_are_named():
    ranges = glyphs.part_ranges()
    assert glyphs.resolve_classes("pretrain", ranges) == "0-999"
    assert glyphs.resolve_classes("test", ranges) == "1500-1999"
    assert glyphs.resolve_classes("train_val", ranges) == "1400-1499"
    assert glyphs.resolve_classes("1000-1099", ranges) == "1000-1099"
    with pytest.raises(ConfigError, match="'pretrian' is not one of the glyph parts"):
        glyphs.resolve_classes("pretrian", ranges)
    assert glyphs.resolve_classes("all", ranges) == glyphs.resolve_classes(" ALL ", ranges) == "all"
    with pytest.raises(ConfigError) as err:  # the message lists every accepted name, 'all' included
        glyphs.resolve_classes("everything", ranges)
    msg = str(err.value)
    assert "\n" not in msg and "'all'" in msg and all(n in msg for n in ranges)
    assert {"pretrain", "train", "test", "train_fit", "train_val"} <= set(ranges)


def test_rendering_is_deterministic_bytes(tmp_path):
    a, b = small(tmp_path, name="a"), small(tmp_path, name="b")  # two independent builds
    assert a.images.tobytes() == b.images.tobytes()
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.faces, b.faces)
    assert a.meta["sha256"] == b.meta["sha256"] == glyphs.content_hash(b.images, b.labels, b.faces)
    f1, f2 = glyphs.load_face(FONTS[1]), glyphs.load_face(FONTS[1])
    assert glyphs.render_glyph(f1, "Q").tobytes() == glyphs.render_glyph(f2, "Q").tobytes()


def test_cache_is_reused_and_checked(tmp_path):
    a = small(tmp_path)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == sorted([a.path.name, a.path.with_suffix(".json").name])
    again = small(tmp_path)
    assert again.path == a.path and again.images.tobytes() == a.images.tobytes()
    other = small(tmp_path, size=24, font_size=20, ink=20)  # another spec: a new file, the old one kept
    assert other.path != a.path and a.path.exists() and other.images.shape[1:] == (24, 24)
    with np.load(a.path) as f:
        arrays = dict(f)
    arrays["images"] = arrays["images"].copy()
    arrays["images"][0, 0, 0] ^= 1
    with open(a.path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(DatasetError, match="does not match the SHA-256"):
        small(tmp_path)


def test_glyphs_are_centred_and_fit(tmp_path):
    g = small(tmp_path)
    assert g.images.dtype == np.uint8 and g.images.shape[1:] == (32, 32)
    for img in g.images:
        rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
        assert rows[-1] - rows[0] + 1 <= glyphs.INK and cols[-1] - cols[0] + 1 <= glyphs.INK
        top, bottom = rows[0], 31 - rows[-1]
        left, right = cols[0], 31 - cols[-1]
        assert abs(top - bottom) <= 1 and abs(left - right) <= 1


def test_exact_duplicates_within_a_class_are_removed(tmp_path):
    twin = FontFace("(matplotlib copy)", FONTS[0].path)  # the same face twice draws the same bitmaps
    g = small(tmp_path, fonts=(FONTS[0], twin, FONTS[1]))
    assert g.meta["counts"]["duplicates_within_class"] == len(CHARS)
    assert (g.faces == 1).sum() == 0 and (g.faces == 0).sum() == (g.faces == 2).sum() == len(CHARS)
    for c in range(len(CHARS)):
        imgs = g.images[g.labels == c]
        assert len({im.tobytes() for im in imgs}) == len(imgs) == 2


def test_remove_duplicates_drops_bitmaps_shared_by_classes():
    a, b, c = (np.full((2, 2), v, np.uint8) for v in (1, 2, 3))
    kept, counts = glyphs.remove_duplicates([[(0, a), (1, a.copy()), (2, b)], [(0, b.copy()), (1, c)]])
    assert counts == {"duplicates_within_class": 1, "shared_across_classes": 2}
    assert [[f for f, _ in items] for items in kept] == [[0], [1]]


def test_blank_drawings_are_dropped():
    assert glyphs.render_glyph(glyphs.load_face(FONTS[0]), " ") is None
    images, labels, faces, counts = glyphs.render_classes(FONTS, ["A", " ", "B"])  # a space draws nothing
    assert counts["blank"] == len(FONTS) and counts["rendered"] == 3 * len(FONTS)
    assert sorted(set(labels.tolist())) == [0, 2] and len(images) == len(labels) == len(faces) == 2 * len(FONTS)


def test_a_class_left_with_one_drawing_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="class 0 .* retrieval needs 2"):
        small(tmp_path, fonts=FONTS[:1])


def test_missing_font_package_is_named_with_the_apt_command(tmp_path):
    missing = FontFace("fonts-not-installed-here", str(tmp_path / "nowhere.ttf"))
    with pytest.raises(DatasetError) as e:
        small(tmp_path, fonts=(FONTS[0], missing))
    msg = str(e.value)
    assert "\n" not in msg
    assert "fonts-not-installed-here" in msg and "apt-get install -y fonts-not-installed-here" in msg
    assert not (tmp_path / "cache").exists()  # nothing written


def test_choose_characters_is_seeded_and_needs_enough_characters():
    block = (0x41, 0x5A)  # A-Z: every DejaVu face maps all 26
    a = glyphs.choose_characters(FONTS, 10, seed=3, block=block)
    assert a == glyphs.choose_characters(FONTS, 10, seed=3, block=block)
    assert a != glyphs.choose_characters(FONTS, 10, seed=4, block=block)
    assert len(set(a)) == 10 and all("A" <= ch <= "Z" for ch in a)
    with pytest.raises(DatasetError, match="only 26 characters"):
        glyphs.choose_characters(FONTS, 27, block=block)


def test_default_fonts_name_their_packages():
    pkgs = glyphs.font_packages()
    assert len(glyphs.CJK_FONTS) == len(set(glyphs.CJK_FONTS)) >= 50
    assert len(pkgs) == len(set(pkgs)) and all(p.startswith("fonts-") for p in pkgs)
    assert sum(n for _, n in glyphs.PARTS) >= 1000


def test_build_data_selects_parts_by_name(tmp_path, monkeypatch):
    from nbsrc.config import ExperimentConfig
    from nbsrc.data import build_data

    g = small(tmp_path)
    monkeypatch.setattr(glyphs, "load_glyphs", lambda cache_dir=None, progress=True: g)
    cfg = ExperimentConfig(dataset="glyphs", train_classes="pretrain", test_classes="train", img_size=32,
                           patch_size=4, progress=False)
    data = build_data(cfg)
    assert set(data.train.labels.tolist()) == {0, 1, 2, 3}
    assert set(data.query.labels.tolist()) == {4, 5, 6, 7}
    assert data.train[0][0].shape == (3, 32, 32)
    val = build_data(cfg.replace(train_classes="train_fit", test_classes="train_val"))
    assert set(val.train.labels.tolist()) == {4, 5, 6} and set(val.query.labels.tolist()) == {7}


def test_all_means_every_class_the_other_set_leaves_out_as_for_folders(tmp_path, monkeypatch):
    """``all`` on the glyph set means what it means for image folders (nbsrc.data.splits): every class
    the other set does not name, on either side; both ``all`` is the folders' one-line error."""
    from nbsrc.config import ExperimentConfig
    from nbsrc.data import build_data

    g = small(tmp_path)
    monkeypatch.setattr(glyphs, "load_glyphs", lambda cache_dir=None, progress=True: g)
    cfg = ExperimentConfig(dataset="glyphs", img_size=32, patch_size=8, progress=False)
    cases = [(("pretrain", "all"), ({0, 1, 2, 3}, set(range(4, 12)))),
             (("all", "test"), (set(range(8)), {8, 9, 10, 11})),
             (("all", "train_val"), ({0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11}, {7}))]
    for (tr, te), (want_tr, want_te) in cases:
        data = build_data(cfg.replace(train_classes=tr, test_classes=te))
        assert (set(data.train.labels.tolist()), set(data.query.labels.tolist())) == (want_tr, want_te)
    with pytest.raises(ConfigError, match="both 'all'"):
        build_data(cfg.replace(train_classes="all", test_classes="all"))
    with pytest.raises(ConfigError, match="'tset' is not one of the glyph parts"):
        build_data(cfg.replace(train_classes="pretrain", test_classes="tset"))


def test_a_built_set_loads_by_its_file_with_its_own_parts(tmp_path):
    """data_root may name a built set's file: a small set (here 12 classes) then serves any config."""
    from nbsrc.config import ExperimentConfig
    from nbsrc.data import build_data

    g = small(tmp_path)
    for path in (g.path, g.path.with_suffix(".json")):
        again = glyphs.load_glyphs(path)
        assert again.parts == g.parts and again.images.tobytes() == g.images.tobytes()
    data = build_data(ExperimentConfig(dataset="glyphs", data_root=str(g.path), train_classes="train_fit",
                                       test_classes="test", img_size=32, patch_size=8))
    assert set(np.unique(data.train.labels).tolist()) == {4, 5, 6}
    assert set(np.unique(data.query.labels).tolist()) == {8, 9, 10, 11}
    with pytest.raises(DatasetError, match="is not a built glyph set"):
        glyphs.load_glyphs(tmp_path / "nothing.npz")
