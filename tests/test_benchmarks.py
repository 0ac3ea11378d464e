"""CUB-200-2011, SOP and In-Shop loaders on fixture trees generated in their official layouts."""

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_benchmarks import (
    CUB_CLASS_IDS,
    SOP_CATEGORIES,
    cub_class_name,
    inshop_item,
    make_cub,
    make_inshop,
    make_sop,
)

from nbsrc.data import RetrievalTransform
from nbsrc.data.benchmarks import RECALL_KS, build_benchmark, load_inshop
from nbsrc.errors import ConfigError, DatasetError

TRAIN_TF = RetrievalTransform(8, train=True)
EVAL_TF = RetrievalTransform(8, train=False)


def build(name, root, per_class=None, seed=0):
    return build_benchmark(name, root, TRAIN_TF, EVAL_TF, per_class, seed)


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- CUB
@pytest.mark.parametrize("nested", [True, False])
def test_cub_split_counts_labels_and_names(tmp_path, nested):
    root = make_cub(tmp_path, per_class=3, nested=nested)
    data = build("cub", root)
    train_ids = [c for c in CUB_CLASS_IDS if c <= 100]
    test_ids = [c for c in CUB_CLASS_IDS if c > 100]
    assert data.gallery is None
    assert len(data.train) == 3 * len(train_ids) and len(data.query) == 3 * len(test_ids)
    assert sorted(set(data.train.labels.tolist())) == [c - 1 for c in train_ids]
    assert sorted(set(data.query.labels.tolist())) == [c - 1 for c in test_ids]
    for ds in (data.train, data.query):
        for path, label in zip(ds.images, ds.labels, strict=True):
            # the label is the class id of the image's folder, minus one
            assert Path(path).parent.name == cub_class_name(label + 1) == ds.class_names[label]
            assert Path(path).is_file()
    assert data.train.transform is TRAIN_TF and data.query.transform is EVAL_TF


def test_cub_images_load_through_the_transforms(tmp_path):
    data = build("cub", make_cub(tmp_path))
    img, label, idx = data.query[1]
    assert img.shape == (3, 8, 8) and img.dtype == torch.float32
    assert label == data.query.labels[1] and idx == 1
    a, _, _ = data.train[(0, 5)]
    b, _, _ = data.train[(0, 5)]
    assert torch.equal(a, b)  # augmentation seeded per sample


def test_cub_eval_per_class_caps_only_the_evaluation_split(tmp_path):
    root = make_cub(tmp_path, per_class=4)
    data = build("cub", root, per_class=2, seed=3)
    _, counts = np.unique(data.query.labels, return_counts=True)
    assert (counts == 2).all()
    assert len(data.train) == 4 * sum(c <= 100 for c in CUB_CLASS_IDS)
    again = build("cub", root, per_class=2, seed=3)
    assert list(again.query.images) == list(data.query.images)


def test_cub_through_build_data(tmp_path):
    from nbsrc.config import ExperimentConfig
    from nbsrc.data import build_data

    cfg = ExperimentConfig(dataset="cub", data_root=str(make_cub(tmp_path)), img_size=8, patch_size=4)
    data = build_data(cfg)
    assert len(data.query) == 3 * sum(c > 100 for c in CUB_CLASS_IDS)
    assert data.query[0][0].shape == (3, 8, 8)


# ----------------------------------------------------------------------------- SOP
@pytest.mark.parametrize("parent", [False, True])
def test_sop_split_counts_labels_and_disjointness(tmp_path, parent):
    root = make_sop(tmp_path, n_train=4, n_test=3, per_class=2)
    data = build("sop", root.parent if parent else root)
    assert data.gallery is None
    assert len(data.train) == 8 and len(data.query) == 6
    assert sorted(set(data.train.labels.tolist())) == [0, 1, 2, 3]  # class ids 1..4, minus one
    assert sorted(set(data.query.labels.tolist())) == [4, 5, 6]
    assert not set(data.train.labels.tolist()) & set(data.query.labels.tolist())
    for ds in (data.train, data.query):
        for path, label in zip(ds.images, ds.labels, strict=True):
            category = SOP_CATEGORIES[label % len(SOP_CATEGORIES)]
            assert Path(path).parent.name == f"{category}_final"
            assert Path(path).name.startswith(f"{1000 + label + 1}_")
            assert ds.class_names[label] == f"{category}/{label + 1}"
    assert data.query[0][0].shape == (3, 8, 8)


# ----------------------------------------------------------------------------- In-Shop
@pytest.mark.parametrize("official_archive", [False, True])
def test_inshop_query_and_gallery_are_separate_with_shared_labels(tmp_path, official_archive):
    root = make_inshop(tmp_path, n_train=3, n_test=4, per_item=2, per_query=1, official_archive=official_archive)
    data = build("inshop", root)
    assert data.gallery is not None
    assert (len(data.train), len(data.query), len(data.gallery)) == (6, 4, 8)
    assert not set(data.query.images) & set(data.gallery.images)
    # every label is the item id of the image's folder, in query and gallery alike
    for ds in (data.train, data.query, data.gallery):
        for path, label in zip(ds.images, ds.labels, strict=True):
            assert Path(path).parent.name == ds.class_names[label]
            assert Path(path).is_file()
    assert set(data.query.labels.tolist()) == set(data.gallery.labels.tolist())
    assert not set(data.train.labels.tolist()) & set(data.query.labels.tolist())
    # the labels follow the sorted item ids, not the (shuffled) file order
    assert data.train.class_names == sorted(inshop_item(i) for i in range(1, 8))
    assert data.gallery.transform is EVAL_TF and data.query[0][0].shape == (3, 8, 8)


def test_inshop_partition_statuses(tmp_path):
    parts = load_inshop(make_inshop(tmp_path, n_train=2, n_test=3, per_item=3, per_query=2))
    assert [len(parts[s][0]) for s in ("train", "query", "gallery")] == [6, 6, 9]


def test_inshop_eval_per_class_caps_query_and_gallery(tmp_path):
    data = build("inshop", make_inshop(tmp_path, per_item=3, per_query=3), per_class=2)
    for ds in (data.query, data.gallery):
        assert (np.unique(ds.labels, return_counts=True)[1] == 2).all()


# ----------------------------------------------------------------------------- errors
def test_recall_ks_cover_every_benchmark():
    assert set(RECALL_KS) == {"cub", "sop", "inshop"}
    assert RECALL_KS["sop"] == (1, 10, 100, 1000)
    with pytest.raises(ConfigError, match="unknown benchmark"):
        build("oxford", "/nowhere")


@pytest.mark.parametrize("name,hint", [("cub", "caltech.edu"), ("sop", "stanford.edu"), ("inshop", "DeepFashion")])
def test_no_root_says_to_pass_data_root(name, hint):
    with pytest.raises(DatasetError) as e:
        build(name, None)
    msg = one_line_error(e)
    assert "data_root" in msg and hint in msg


@pytest.mark.parametrize("name", ["cub", "sop", "inshop"])
def test_missing_root_names_it(tmp_path, name):
    with pytest.raises(DatasetError) as e:
        build(name, tmp_path / "absent")
    assert str(tmp_path / "absent") in one_line_error(e)


@pytest.mark.parametrize("name,make,rel,layout", [
    ("cub", make_cub, "CUB_200_2011/image_class_labels.txt", "CUB layout"),
    ("cub", make_cub, "CUB_200_2011/images.txt", "CUB layout"),
    ("sop", make_sop, "Ebay_train.txt", "SOP layout: root/{Ebay_train.txt,Ebay_test.txt,<category>_final/...}"),
    ("sop", make_sop, "Ebay_test.txt", "SOP layout"),
    ("inshop", make_inshop, "list_eval_partition.txt", "In-Shop layout"),
])
def test_missing_split_file_names_file_and_layout(tmp_path, name, make, rel, layout):
    root = make(tmp_path)
    base = tmp_path if name == "cub" else root
    (base / rel).unlink()
    with pytest.raises(DatasetError) as e:
        build(name, root)
    msg = one_line_error(e)
    assert f"expected {base / rel}" in msg and layout in msg and "download" in msg


@pytest.mark.parametrize("name,make", [("cub", make_cub), ("sop", make_sop), ("inshop", make_inshop)])
def test_missing_listed_image_is_named(tmp_path, name, make):
    root = make(tmp_path)
    victim = sorted(p for p in tmp_path.rglob("*") if p.suffix.lower() == ".jpg")[-1]
    victim.unlink()
    with pytest.raises(DatasetError) as e:
        build(name, root)
    msg = one_line_error(e)
    assert str(victim) in msg and "1 of" in msg and "layout" in msg


def test_malformed_split_line_is_named(tmp_path):
    root = make_sop(tmp_path)
    with open(root / "Ebay_test.txt", "a") as f:
        f.write("99 7\n")
    with pytest.raises(DatasetError, match=r"Ebay_test.txt, line \d+: expected 4"):
        build("sop", root)


def test_sop_classes_in_both_splits_are_rejected(tmp_path):
    root = make_sop(tmp_path)
    first_test_row = (root / "Ebay_test.txt").read_text().splitlines()[1]
    with open(root / "Ebay_train.txt", "a") as f:
        f.write(first_test_row + "\n")
    with pytest.raises(DatasetError, match="class-disjoint"):
        build("sop", root)


def test_cub_image_without_class_is_rejected(tmp_path):
    root = make_cub(tmp_path)
    labels = tmp_path / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text("\n".join(labels.read_text().splitlines()[1:]) + "\n")
    with pytest.raises(DatasetError, match="image id 1 .* has no class"):
        build("cub", root)


def test_inshop_bad_status_and_missing_gallery(tmp_path):
    root = make_inshop(tmp_path)
    partition = root / "list_eval_partition.txt"
    text = partition.read_text()
    partition.write_text(text.replace("gallery", "galery", 1))
    with pytest.raises(DatasetError, match="'galery'"):
        build("inshop", root)
    # drop every gallery image of one query item
    lines = text.splitlines()
    item = next(line.split()[1] for line in lines[2:] if line.endswith("query"))
    partition.write_text("\n".join(ln for ln in lines if not (item in ln and ln.endswith("gallery"))) + "\n")
    with pytest.raises(DatasetError, match=f"item {item} has query images but no gallery image"):
        build("inshop", root)
