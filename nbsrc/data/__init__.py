"""Data: the embedded Fashion-MNIST default, image folders, class-disjoint splits, transforms and
the m-per-class sampler. :data:`DATASETS` is the dataset registry (name -> :class:`DatasetSpec`: its reader
and its evaluation setup); :func:`build_data` turns an :class:`~nbsrc.config.ExperimentConfig` into
the train / query / gallery datasets every other layer uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nbsrc.config import ExperimentConfig
from nbsrc.data.datasets import RetrievalData, RetrievalDataset, load_image
from nbsrc.data.fashion_mnist import CLASS_NAMES as FASHION_MNIST_CLASSES
from nbsrc.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist, read_idx
from nbsrc.data.folder import image_folder_dataset, scan_image_folder
from nbsrc.data.images import check_dataset_images, check_images, list_images, scan_images
from nbsrc.data.samplers import MPerClassBatchSampler
from nbsrc.data.splits import (
    cap_per_class,
    check_eval_split,
    check_min_per_class,
    class_disjoint_split,
    warn_unused_classes,
)
from nbsrc.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RetrievalTransform, training_transform
from nbsrc.errors import ConfigError, DatasetError

__all__ = [
    "RetrievalData", "RetrievalDataset", "RetrievalTransform", "MPerClassBatchSampler", "build_data",
    "DATASETS", "DatasetSpec", "dataset_spec", "split_by_class", "check_data_root",
    "load_fashion_mnist", "find_fashion_mnist", "read_idx", "image_folder_dataset", "scan_image_folder",
    "class_disjoint_split", "cap_per_class", "check_min_per_class", "load_image", "load_digits_images",
    "list_images", "scan_images", "check_images", "check_dataset_images",
]


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (1,797 images, always available offline), as uint8 images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target.astype(np.int64)


def split_by_class(images, labels, cfg: ExperimentConfig, train_tf, eval_tf, names=None, classes=None,
                   warn_unused: str | None = None) -> RetrievalData:
    """Train / query (= gallery) by class (:func:`~nbsrc.data.splits.class_disjoint_split`, with
    ``cfg.data.split`` when set). ``warn_unused``: the dataset's name, to say which classes neither set uses
    (image folders, where that is easy to miss). A training class needs 2 images (a positive pair); a
    test class with one stays in the gallery but is no query (:func:`~nbsrc.data.splits.check_eval_split`)."""
    tr, te = class_disjoint_split(labels, *(classes or (cfg.data.train_classes, cfg.data.test_classes)),
                                  split=cfg.data.split)
    if warn_unused is not None:
        warn_unused_classes(labels, tr, te, names, warn_unused)
    ids, counts = np.unique(np.asarray(labels)[tr], return_counts=True)
    if (counts < 2).any():
        c = int(ids[counts < 2][0])
        raise DatasetError(f"training class {names[c] if names is not None else c!r} has a single image, but a "
                           "training class needs at least 2 (a positive pair); add images, or make it a test class")
    te = cap_per_class(te, labels, cfg.data.eval_per_class, seed=cfg.run.seed)
    full = RetrievalDataset(images, labels, None, names)
    query = full.subset(te, eval_tf)
    check_eval_split(query.labels, names)
    return RetrievalData(train=full.subset(tr, train_tf), query=query)


# ----------------------------------------------------------------------------- the dataset registry
Build = Callable[[ExperimentConfig, RetrievalTransform, RetrievalTransform], RetrievalData]


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset nbsrc trains and evaluates on: one entry of :data:`DATASETS`.

    ``build(cfg, train_tf, eval_tf) -> RetrievalData``: its train / query (/ gallery) splits with the given
    transforms (a dataset of classes read as images and labels: :func:`split_by_class`); None for a
    particular-object dataset, whose setup reads it itself (``nbsrc.experiment.sfm_setup``).
    ``evaluator``: the name of its evaluator in ``nbsrc.eval.evaluators.EVALUATORS`` when ``cfg.eval.evaluator``
    is None. ``particular``: particular-object retrieval (trained on SfM-120k, evaluated on Revisited
    Oxford / Paris) rather than category-level (class-disjoint train and test classes). ``evaluated_on``: what
    ``nbsrc eval`` says it was evaluated on (None: the test classes of ``cfg``). ``check_root(cfg)``: says in one
    line, before the model is built, that ``cfg.data.data_root`` is missing or wrong (None: nothing to check)."""

    build: Build | None
    evaluator: str = "recall"
    particular: bool = False
    evaluated_on: str | None = None
    check_root: Callable[[ExperimentConfig], None] | None = None


def _fashion_mnist(cfg: ExperimentConfig, train_tf, eval_tf) -> RetrievalData:
    images, labels = load_fashion_mnist(cfg.data.data_root)
    return split_by_class(images, labels, cfg, train_tf, eval_tf, FASHION_MNIST_CLASSES)


def _digits(cfg: ExperimentConfig, train_tf, eval_tf) -> RetrievalData:
    images, labels = load_digits_images()
    return split_by_class(images, labels, cfg, train_tf, eval_tf, [str(i) for i in range(10)])


def _glyphs(cfg: ExperimentConfig, train_tf, eval_tf) -> RetrievalData:
    """CJK glyphs; train/test_classes may name parts (``"pretrain"``, ``"train_val"``, ...)."""
    from nbsrc.data import glyphs

    g = glyphs.load_glyphs(cfg.data.data_root, progress=cfg.run.progress)
    classes = [glyphs.resolve_classes(s, g.parts) for s in (cfg.data.train_classes, cfg.data.test_classes)]
    return split_by_class(g.images, g.labels, cfg, train_tf, eval_tf, g.class_names, classes)


def _folder(cfg: ExperimentConfig, train_tf, eval_tf) -> RetrievalData:
    if cfg.data.data_root is None:
        raise ConfigError("dataset='folder' needs data_root=<folder with one sub-folder per class>")
    paths, labels, names = scan_image_folder(cfg.data.data_root, min_per_class=1)  # a 1-image test class: no query
    return split_by_class(np.asarray(paths, dtype=object), labels, cfg, train_tf, eval_tf, names,
                          warn_unused=f"image folder {cfg.data.data_root}")


def _check_folder_root(cfg: ExperimentConfig) -> None:
    from nbsrc.data.folder import LAYOUT

    if cfg.data.data_root is None:
        raise ConfigError("dataset='folder' needs data_root=<folder with one sub-folder per class>")
    if not Path(cfg.data.data_root).is_dir():
        raise DatasetError(f"image folder {cfg.data.data_root} does not exist; expected the layout {LAYOUT}")


def _benchmark(cfg: ExperimentConfig, train_tf, eval_tf) -> RetrievalData:
    """CUB-200-2011, SOP, In-Shop: their official split files (:mod:`nbsrc.data.benchmarks`, imported when used)."""
    from nbsrc.data import benchmarks

    return benchmarks.build_benchmark(cfg.data.dataset, cfg.data.data_root, train_tf, eval_tf, cfg.data.eval_per_class,
                                      cfg.run.seed)


def _check_benchmark_root(cfg: ExperimentConfig) -> None:
    from nbsrc.data import benchmarks

    name = cfg.data.dataset
    layout, url = {"cub": (benchmarks.CUB_LAYOUT, benchmarks.CUB_URL),
                   "sop": (benchmarks.SOP_LAYOUT, benchmarks.SOP_URL),
                   "inshop": (benchmarks.INSHOP_LAYOUT, benchmarks.INSHOP_URL)}[name]
    benchmarks._root(cfg.data.data_root, layout, url, name)


def _check_sfm_root(cfg: ExperimentConfig) -> None:
    from nbsrc.data.sfm import SFM_FILE, SFM_LAYOUT, SFM_URL

    root = cfg.data.data_root
    if root is None:
        raise DatasetError(f"SfM-120k needs data_root=<folder with {SFM_FILE}>; {SFM_LAYOUT}; {SFM_URL}")
    path = Path(root).expanduser()
    db_file = path / SFM_FILE if path.is_dir() or path.suffix != ".pkl" else path
    if not db_file.is_file():
        raise DatasetError(f"expected {db_file}; {SFM_LAYOUT}; {SFM_URL}")


# name -> DatasetSpec; ``cfg.data.dataset`` picks one. A new dataset is its reader's module and one line here.
DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(_fashion_mnist),  # the default: embedded, offline
    "digits": DatasetSpec(_digits),  # scikit-learn's 8x8 digits
    "glyphs": DatasetSpec(_glyphs),  # CJK glyph faces (nbsrc.data.glyphs)
    "folder": DatasetSpec(_folder, check_root=_check_folder_root),  # a folder of class folders
    "cub": DatasetSpec(_benchmark, check_root=_check_benchmark_root),  # IRT Table 2-4 (nbsrc.data.benchmarks)
    "sop": DatasetSpec(_benchmark, check_root=_check_benchmark_root),
    "inshop": DatasetSpec(_benchmark, check_root=_check_benchmark_root),
    "sfm120k": DatasetSpec(None, evaluator="revisited", particular=True, evaluated_on="Revisited Oxford/Paris",
                           check_root=_check_sfm_root),  # IRT §4.2, DToP Table A5 (nbsrc.data.sfm)
}


def dataset_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` registered as ``name`` in :data:`DATASETS`; an unknown name is a one-line error."""
    if name not in DATASETS:
        raise ConfigError(f"dataset={name!r} is invalid: expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


def check_data_root(cfg: ExperimentConfig) -> None:
    """The dataset is registered, and the folder of one that needs one (``folder``, ``cub``, ``sop``,
    ``inshop``, ``sfm120k``) is given and exists, or the loader's own one-line error: checked before the model
    is built, so that a missing ``data_root`` is said at once, not after pretrained weights are fetched."""
    spec = dataset_spec(cfg.data.dataset)
    if spec.check_root is not None:
        spec.check_root(cfg)


def build_data(cfg: ExperimentConfig, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> RetrievalData:
    """The datasets named by ``cfg.data.dataset`` (:data:`DATASETS`), with the paper's train and evaluation
    transforms; with ``cfg.data.size_variant == "mixed"``, their deterministic mixed-size variant (DToP
    Table A12)."""
    spec = dataset_spec(cfg.data.dataset)
    if spec.build is None:
        raise ConfigError(f"dataset={cfg.data.dataset!r} has no class splits to build: it is read by its run's "
                          "setup (nbsrc.experiment.build_setup)")
    train_tf = training_transform(cfg.data.img_size, mean, std, cfg.data.dtop_augmentation)
    eval_tf = RetrievalTransform(cfg.data.img_size, train=False, mean=mean, std=std)
    data = spec.build(cfg, train_tf, eval_tf)
    if cfg.data.size_variant == "mixed":
        from nbsrc.data.group_sampler import mixed_size_data

        data = mixed_size_data(data, long_side=cfg.data.img_size, multiple=cfg.model.patch_size or 16,
                               seed=cfg.run.seed)
    return data
