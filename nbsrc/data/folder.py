"""A generic image folder, ``root/<class>/<image>``, so the whole pipeline runs on your own photos.

Classes are the sub-folders of ``root`` (in sorted order); a class's images are all the images under
its folder, at any depth (:func:`nbsrc.data.images.list_images`: symlink loops and links to ``.`` are
harmless). Images directly in ``root`` belong to no class and are left out. Every image is checked
(decoded once) when the dataset is built, so an unreadable file stops the run before training with
the file named (the policy of :mod:`nbsrc.data.images`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nbsrc.data.datasets import RetrievalDataset
from nbsrc.data.images import IMAGE_EXTENSIONS, check_images, list_images
from nbsrc.data.splits import check_min_per_class
from nbsrc.errors import DatasetError

__all__ = ["IMAGE_EXTENSIONS", "LAYOUT", "scan_image_folder", "image_folder_dataset", "folder_classes"]

LAYOUT = "root/<class_name>/<image>.jpg, one sub-folder per class"


def folder_classes(root: str | Path, paths) -> tuple[np.ndarray, list[str]]:
    """The class of each of ``paths`` (files under ``root``): its first sub-folder below ``root``.
    Returns ``(labels [N] int64, class_names)``, classes in sorted order; a file directly in
    ``root`` has label -1."""
    root = Path(root)
    firsts = [Path(p).relative_to(root).parts for p in paths]
    names = sorted({parts[0] for parts in firsts if len(parts) > 1})
    index = {n: i for i, n in enumerate(names)}
    labels = np.asarray([index[parts[0]] if len(parts) > 1 else -1 for parts in firsts], dtype=np.int64)
    return labels, names


def scan_image_folder(root: str | Path, check: bool = True,
                      min_per_class: int = 2) -> tuple[list[Path], np.ndarray, list[str]]:
    """Paths, integer labels (classes in sorted folder order) and class names of an image folder.

    ``check``: decode every image first and stop with one :class:`~nbsrc.errors.DatasetError`
    naming the unreadable ones (:func:`nbsrc.data.images.check_images`). ``min_per_class``: fewer
    images in a class folder is such an error (2: every image has a positive; the training/test
    split, :func:`nbsrc.data.build_data`, passes 1 and decides per side)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist; expected the layout {LAYOUT}")
    paths = list_images(root)
    labels, names = folder_classes(root, paths)
    if not names:
        what = "no images" if not paths else "images but no class sub-folders"
        raise DatasetError(f"image folder {root} has {what}; expected the layout {LAYOUT}")
    keep = labels >= 0
    paths = [p for p, k in zip(paths, keep, strict=True) if k]
    labels = labels[keep]
    counts = np.bincount(labels, minlength=len(names))
    for c in np.flatnonzero(counts < min_per_class):
        raise DatasetError(
            f"class folder {root / names[c]} has {counts[c]} image(s) but retrieval needs at least {min_per_class} "
            "per class; add images or remove the folder"
        )
    check_min_per_class(labels, min_per_class, str(root))
    if check:
        check_images(paths, f"image folder {root}")
    return paths, labels, names


def image_folder_dataset(root: str | Path, transform=None, check: bool = True) -> RetrievalDataset:
    paths, labels, names = scan_image_folder(root, check=check)
    return RetrievalDataset(paths, labels, transform, class_names=names)
