"""Class-disjoint retrieval splits, as CUB-200-2011 and SOP use them: train on some classes,
query and gallery on the unseen rest.

A class set is a list of ids or a string of ranges and ids (``"0-4"``, ``"0,2,5-9"``), or ``"all"``:
every class of the dataset that the *other* set does not name (``--train-classes 0-9 --test-classes
all`` tests on the rest). ``split`` (a fraction in (0, 1)) chooses both sets instead: the first
``round(split * n)`` classes in sorted order train, the others test (:func:`resolve_class_sets`).
"""

from __future__ import annotations

import sys

import numpy as np

from nbsrc.config import parse_classes
from nbsrc.errors import ConfigError, DatasetError

ALL = "all"


def fraction_split(classes, split: float) -> tuple[list[int], list[int]]:
    """``(train, test)``: the first ``round(split * n)`` of the sorted ``classes`` and the rest; each part
    gets at least one class. Our reading of "a fraction split" (no paper uses one): deterministic, by
    sorted class order (a folder's classes are its sorted sub-folder names), never shuffled."""
    classes = sorted(int(c) for c in classes)
    if not 0.0 < float(split) < 1.0:
        raise ConfigError(f"split={split!r} is invalid: expected the fraction of classes to train on, in (0, 1), "
                          "e.g. 0.5")
    if len(classes) < 2:
        raise ConfigError(f"split={split} needs at least 2 classes (one to train on, one to test on); "
                          f"the dataset has {len(classes)}")
    n_train = min(max(int(np.floor(split * len(classes) + 0.5)), 1), len(classes) - 1)
    return classes[:n_train], classes[n_train:]


def resolve_class_sets(classes, train_classes, test_classes, split: float | None = None) -> tuple[list[int], list[int]]:
    """The training and test class ids among ``classes`` (the dataset's): from ``split`` when given
    (:func:`fraction_split`), else from the two specs, where ``"all"`` is every class the other spec
    does not name (module docstring). Both ``"all"`` is a one-line error."""
    classes = sorted(int(c) for c in np.unique(np.asarray(classes)))
    if split is not None:
        return fraction_split(classes, split)
    is_all = [isinstance(s, str) and s.strip().lower() == ALL for s in (train_classes, test_classes)]
    if all(is_all):
        raise ConfigError("train_classes and test_classes are both 'all': a retrieval split is class-disjoint; "
                          "name one of them (e.g. --train-classes 0-9 --test-classes all) or use --split 0.5")
    if is_all[0]:
        te = parse_classes(test_classes)
        return [c for c in classes if c not in set(te)], te
    if is_all[1]:
        tr = parse_classes(train_classes)
        return tr, [c for c in classes if c not in set(tr)]
    return parse_classes(train_classes), parse_classes(test_classes)


def class_disjoint_split(
    labels: np.ndarray, train_classes, test_classes, split: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training samples and of the test (query = gallery) samples.

    ``train_classes`` and ``test_classes`` are lists or strings such as ``"0-4"`` or ``"all"``
    (:func:`resolve_class_sets`; ``split``: a fraction split instead). They must not overlap, and each
    class named must be present in ``labels``.
    """
    labels = np.asarray(labels)
    present = np.unique(labels)
    if len(present) < 2:
        raise DatasetError(
            f"the dataset has {len(present)} class{'' if len(present) == 1 else 'es'}; a class-disjoint split needs "
            "at least 2 (one to train on, one to test on): add classes (an image folder: one sub-folder per class)"
        )
    tr, te = resolve_class_sets(labels, train_classes, test_classes, split)
    for side, ids in (("train_classes", tr), ("test_classes", te)):
        if not ids:
            raise ConfigError(f"{side} is empty once 'all' leaves out the other set's classes; name fewer classes "
                              "on the other side")
    overlap = sorted(set(tr) & set(te))
    if overlap:
        raise ConfigError(
            f"train_classes and test_classes overlap in {overlap}; a retrieval split must be "
            "class-disjoint (e.g. train '0-4', test '5-9')"
        )
    present = set(np.unique(labels).tolist())
    absent = sorted((set(tr) | set(te)) - present)
    if absent:
        raise ConfigError(
            f"classes {absent} are not in the dataset (it has {len(present)} classes: "
            f"{min(present)}..{max(present)}); choose train_classes/test_classes among those"
        )
    return np.flatnonzero(np.isin(labels, tr)), np.flatnonzero(np.isin(labels, te))


def cap_per_class(indices: np.ndarray, labels: np.ndarray, per_class: int | None, seed: int = 0) -> np.ndarray:
    """Keep at most ``per_class`` indices of each class (a fixed random subset), in sorted order."""
    if per_class is None:
        return np.asarray(indices)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels[indices]):
        idx = indices[labels[indices] == c]
        keep.append(idx if len(idx) <= per_class else rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(keep))


def check_min_per_class(labels: np.ndarray, minimum: int = 2, what: str = "dataset") -> None:
    """Retrieval needs at least ``minimum`` samples per class (a query needs a positive)."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    small = classes[counts < minimum]
    if len(small):
        raise DatasetError(
            f"{what}: class {small[0]!r} has {counts[counts < minimum][0]} sample(s) but retrieval "
            f"needs at least {minimum} per class; add images or drop the class"
        )


def _names(ids, names) -> str:
    """``'a', 'b', ... (12 in all)``: at most 8 class names (or ids) for a one-line message."""
    shown = [repr(names[c]) if names is not None else str(c) for c in ids[:8]]
    return ", ".join(shown) + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "")


def warn_unused_classes(labels: np.ndarray, train: np.ndarray, test: np.ndarray, names=None,
                        what: str = "the dataset", stream=None) -> list[int]:
    """Say in one line (``warning: ...`` on stderr) which classes of ``labels`` are in neither the
    training nor the test samples (left out of the run), and return their ids. Silent when every
    class is used."""
    labels = np.asarray(labels)
    used = set(np.unique(labels[train]).tolist()) | set(np.unique(labels[test]).tolist())
    unused = [int(c) for c in np.unique(labels) if int(c) not in used]
    if unused:
        print(f"warning: {len(unused)} of the {len(np.unique(labels))} classes of {what} are in neither "
              f"train_classes nor test_classes and are left out: {_names(unused, names)}; use --test-classes all, "
              "--train-classes all or --split 0.5 to use them", file=stream or sys.stderr, flush=True)
    return unused


def check_eval_split(labels: np.ndarray, names=None, stream=None) -> np.ndarray:
    """The evaluation split (query = gallery) needs a positive for each query: a test class with a single
    image cannot give one. Such images stay in the gallery (a distractor for every other query) but are
    not queries: Recall@K is the mean over the other queries (:func:`nbsrc.eval.recall.recall_at_k` leaves
    out queries without a positive). Says so in one line (``note: ...`` on stderr) and returns the ids of
    those classes; no query with a positive at all is a one-line :class:`~nbsrc.errors.DatasetError`."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    single = classes[counts < 2]
    if len(single) == len(classes):
        raise DatasetError("evaluation split: every test class has a single image, so no query has a positive; "
                           "add images (at least 2 in some test class) or choose other test_classes")
    if len(single):
        n_queries = int(counts[counts >= 2].sum())
        print(f"note: {len(single)} test class(es) have a single image ({_names(single.tolist(), names)}): they stay "
              f"in the gallery but are not queries (no positive); Recall@K is over the other {n_queries} queries",
              file=stream or sys.stderr, flush=True)
    return single
