"""A toy dataset, written as a new dataset's module would be: a reader that gives images and labels, and
a builder of :class:`~nbsrc.data.RetrievalData` from the config (``build`` of :class:`~nbsrc.data.DatasetSpec`).
Registered by one line (``DATASETS["toy"] = DatasetSpec(build)``) it trains and evaluates like any other."""

from __future__ import annotations

import numpy as np

from nbsrc.config import ExperimentConfig
from nbsrc.data import RetrievalData, split_by_class

N_CLASSES, PER_CLASS, SIDE = 8, 10, 8
NAMES = [f"stripe{c}" for c in range(N_CLASSES)]


def load_toy(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``PER_CLASS`` noisy ``SIDE`` x ``SIDE`` uint8 images of each class, class ``c`` a bright row ``c``."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    images = rng.integers(0, 60, size=(len(labels), SIDE, SIDE)).astype(np.uint8)
    images[np.arange(len(labels)), labels] = 255
    return images, labels


def build(cfg: ExperimentConfig, train_tf, eval_tf) -> RetrievalData:
    """The toy images split by class (``cfg.data.train_classes`` / ``test_classes``)."""
    images, labels = load_toy()
    return split_by_class(images, labels, cfg, train_tf, eval_tf, NAMES)
