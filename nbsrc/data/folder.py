"""A generic image folder, ``root/<class>/<image>``, so the whole pipeline runs on your own photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nbsrc.data.datasets import RetrievalDataset
from nbsrc.data.splits import check_min_per_class
from nbsrc.errors import DatasetError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
LAYOUT = "root/<class_name>/<image>.jpg, one sub-folder per class"


def scan_image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Paths, integer labels (classes in sorted folder order) and class names of an image folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist; expected the layout {LAYOUT}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DatasetError(f"image folder {root} has no class sub-folders; expected the layout {LAYOUT}")
    paths, labels, names = [], [], []
    for c, d in enumerate(class_dirs):
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        names.append(d.name)
        if len(files) < 2:
            raise DatasetError(
                f"class folder {d} has {len(files)} image(s) but retrieval needs at least 2 per "
                "class; add images or remove the folder"
            )
        paths += files
        labels += [c] * len(files)
    labels_arr = np.asarray(labels, dtype=np.int64)
    check_min_per_class(labels_arr, 2, str(root))
    return paths, labels_arr, names


def image_folder_dataset(root: str | Path, transform=None) -> RetrievalDataset:
    paths, labels, names = scan_image_folder(root)
    return RetrievalDataset(paths, labels, transform, class_names=names)
