"""Image folders as datasets: ``train_classes`` / ``test_classes`` accept ``all``, a range, a
list, and ``split`` a fraction; classes neither set uses are named in one warning; a test class with a
single image stays in the gallery, is no query, and Recall@K over the other queries equals a brute-force
count written from the formula."""

import json

import numpy as np
import pytest
from fixtures_photos import make_drawn_folder

from nbsrc.__main__ import main
from nbsrc.config import ExperimentConfig
from nbsrc.data import build_data
from nbsrc.data.splits import class_disjoint_split, fraction_split, resolve_class_sets
from nbsrc.errors import ConfigError, DatasetError

LABELS = np.repeat(np.arange(20), 3)
TINY = ["--dataset", "folder", "--img-size", "16", "--patch-size", "4", "--batch-size", "8", "--m-per-class", "2",
        "--no-progress", "--device", "cpu", "--lam", "0", "--pooling", "avg"]


@pytest.mark.parametrize("train, test, want_train, want_test", [
    ("0-4", "5-9", range(0, 5), range(5, 10)),
    ("0-4", "all", range(0, 5), range(5, 20)),  # all: every class the other set leaves
    ("all", "15-19", range(0, 15), range(15, 20)),
    ("0,2,4", "1,3,5-7", [0, 2, 4], [1, 3, 5, 6, 7]),
    ([1, 0], "ALL", [0, 1], range(2, 20)),
])
def test_class_sets(train, test, want_train, want_test):
    assert resolve_class_sets(LABELS, train, test) == (list(want_train), list(want_test))


@pytest.mark.parametrize("n, split, n_train", [(20, 0.5, 10), (5, 0.5, 3), (7, 0.3, 2), (2, 0.01, 1), (2, 0.99, 1),
                                               (10, 0.8, 8)])
def test_fraction_split_takes_the_first_sorted_classes(n, split, n_train):
    classes = list(np.random.default_rng(n).permutation(n))  # order given does not matter: sorted ids
    tr, te = fraction_split(classes, split)
    assert tr == list(range(n_train)) and te == list(range(n_train, n))  # round half up, >= 1 class each side
    assert fraction_split(classes, split) == (tr, te)  # deterministic


def test_fraction_split_overrides_the_class_specs_and_is_checked():
    tr, te = class_disjoint_split(LABELS, "0-4", "5-9", split=0.25)
    assert set(LABELS[tr]) == set(range(5)) and set(LABELS[te]) == set(range(5, 20))
    with pytest.raises(ConfigError, match="both 'all'"):
        resolve_class_sets(LABELS, "all", "all")
    with pytest.raises(ConfigError, match="test_classes is empty"):
        class_disjoint_split(LABELS, "0-19", "all")
    with pytest.raises(ConfigError, match=r"split=1.5 is invalid"):
        ExperimentConfig(split=1.5).validate()
    with pytest.raises(ConfigError, match="chooses the training and test classes itself; drop test_classes='all'"):
        ExperimentConfig(split=0.5, test_classes="all").validate()
    with pytest.raises(ConfigError, match="at least 2 classes"):
        fraction_split([3], 0.5)


def _folder_cfg(root, **kw):
    return ExperimentConfig(dataset="folder", data_root=str(root), img_size=16, patch_size=4, **kw)


def test_classes_outside_both_sets_are_one_warning_naming_them(tmp_path, capsys):
    names = make_drawn_folder(tmp_path / "f", n_classes=20, per_class=2)
    data = build_data(_folder_cfg(tmp_path / "f"))  # the defaults, 0-4 and 5-9: 10 classes left out
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: 10 of the 20 classes of image folder")
    assert all(repr(n) in err for n in names[10:18]) and "(10 in all)" in err and repr(names[9]) not in err
    assert "--test-classes all" in err
    assert len(data.train) == 10 and len(data.query) == 10
    data = build_data(_folder_cfg(tmp_path / "f", test_classes="all"))
    assert capsys.readouterr().err == "" and len(data.query) == 30
    data = build_data(_folder_cfg(tmp_path / "f", split=0.5))
    assert capsys.readouterr().err == ""
    assert sorted(set(data.train.labels.tolist())) == list(range(10))
    assert sorted(set(data.query.labels.tolist())) == list(range(10, 20))


def test_single_image_training_class_is_a_one_line_error(tmp_path):
    make_drawn_folder(tmp_path / "f", n_classes=4, per_class=3, singles=(1,))
    with pytest.raises(DatasetError, match="training class 'c01' has a single image"):
        build_data(_folder_cfg(tmp_path / "f", train_classes="0-1", test_classes="2-3"))
    make_drawn_folder(tmp_path / "g", n_classes=4, per_class=3, singles=(2, 3))
    with pytest.raises(DatasetError, match="every test class has a single image"):
        build_data(_folder_cfg(tmp_path / "g", train_classes="0-1", test_classes="2-3"))


def brute_force_recall(z: np.ndarray, labels: np.ndarray, ks) -> dict[int, float]:
    """R@K from the formula: over the queries with a positive among the other images, the fraction
    whose K most similar other images (ties: lower index first) hold one of their class."""
    hits = {k: [] for k in ks}
    for q in range(len(z)):
        others = [g for g in range(len(z)) if g != q]
        if not any(labels[g] == labels[q] for g in others):
            continue  # no positive: not a query
        sims = [(-float(np.dot(z[q].astype(np.float64), z[g].astype(np.float64))), g) for g in others]
        ranked = [g for _, g in sorted(sims)]
        for k in ks:
            hits[k].append(any(labels[g] == labels[q] for g in ranked[:k]))
    return {k: float(np.mean(v)) for k, v in hits.items()}


def test_single_image_test_class_stays_in_the_gallery_and_is_no_query(tmp_path, capsys):
    """Through the CLI: a note in one line; R@K over the other queries equals the brute-force count on
    the run's own embeddings, and the single image is in those embeddings (the gallery)."""
    names = make_drawn_folder(tmp_path / "f", n_classes=8, per_class=3, singles=(5, 7))
    args = ["train", "--name", "s", "--runs-dir", str(tmp_path / "runs"), "--data-root", str(tmp_path / "f"),
            "--train-classes", "0-3", "--test-classes", "all", "--iterations", "0", "--ks", "1", "2", "4", *TINY]
    assert main(args) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "single image" in line]
    assert notes == [f"note: 2 test class(es) have a single image ({names[5]!r}, {names[7]!r}): they stay in the "
                     "gallery but are not queries (no positive); Recall@K is over the other 6 queries"]
    assert "warning" not in err and "UserWarning" not in err
    run = tmp_path / "runs" / "s"
    with np.load(run / "embeddings.npz") as f:
        z, labels = f["query"], f["query_labels"]
    assert len(z) == 8 and sorted(np.unique(labels, return_counts=True)[1].tolist()) == [1, 1, 3, 3]
    results = json.loads((run / "results.json").read_text())
    want = brute_force_recall(z, labels, (1, 2, 4))
    for k in (1, 2, 4):
        assert results[f"R@{k}"] == pytest.approx(100 * want[k], abs=1e-9)
