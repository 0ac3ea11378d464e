"""Class-disjoint retrieval splits, as CUB-200-2011 and SOP use them: train on some classes,
query and gallery on the unseen rest."""

from __future__ import annotations

import numpy as np

from nbsrc.config import parse_classes
from nbsrc.errors import ConfigError, DatasetError


def class_disjoint_split(
    labels: np.ndarray, train_classes, test_classes
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training samples and of the test (query = gallery) samples.

    ``train_classes`` and ``test_classes`` are lists or strings such as ``"0-4"``. They must not
    overlap, and each class named must be present in ``labels``.
    """
    labels = np.asarray(labels)
    tr, te = parse_classes(train_classes), parse_classes(test_classes)
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
