"""Fashion-MNIST, the embedded default dataset, read from the official gzipped IDX files.

The files are looked for, in this order, in:

1. an explicit ``root``;
2. ``$NBSRC_DATA`` (the files directly in it, or in ``$NBSRC_DATA/fashion-mnist``);
3. ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package);
4. a download of the official files into ``~/.cache/nbsrc/fashion-mnist``, where the network allows.
"""

from __future__ import annotations

import gzip
import os
import struct
import urllib.request
from pathlib import Path

import numpy as np

from nbsrc.errors import DatasetError

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
HOW_TO_GET = (
    "install it with `apt-get install dataset-fashion-mnist` (Debian) or put the four "
    "*-ubyte.gz files in a folder and pass it as root= or $NBSRC_DATA"
)
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one (optionally gzipped) IDX file into an array, checking its header against its size."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(
            f"cannot read IDX file {path} ({e}); the file is corrupt or truncated: delete it and "
            "get a fresh copy"
        ) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number); get a fresh copy")
    dtype, ndim = np.dtype(_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"IDX file {path} is truncated inside its header; get a fresh copy")
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(
            f"IDX file {path} is truncated or padded: {len(data)} bytes where its header "
            f"{tuple(shape)} needs {expected}; delete it and get a fresh copy"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _has_files(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES.values())


def _download(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
        target = dest / name
        if target.is_file():
            continue
        tmp = target.with_suffix(".part")
        urllib.request.urlretrieve(URL + name, tmp)  # noqa: S310 - fixed official URL
        os.replace(tmp, target)
    return dest


def find_fashion_mnist(root: str | Path | None = None, download: bool = True) -> Path:
    """Return the folder holding the four Fashion-MNIST files (see the module docstring for the order)."""
    if root is not None:
        root = Path(root)
        for cand in (root, root / "fashion-mnist"):
            if _has_files(cand):
                return cand
        missing = [n for n in FILES.values() if not (root / n).is_file()]
        raise DatasetError(
            f"Fashion-MNIST not found in {root}: missing {', '.join(missing)}; {HOW_TO_GET}"
        )
    env = os.environ.get("NBSRC_DATA")
    if env:
        for cand in (Path(env), Path(env) / "fashion-mnist"):
            if _has_files(cand):
                return cand
    if _has_files(DEBIAN_ROOT):
        return DEBIAN_ROOT
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nbsrc" / "fashion-mnist"
    if _has_files(cache):
        return cache
    if download:
        try:
            return _download(cache)
        except OSError:
            pass
    raise DatasetError(f"Fashion-MNIST not found (looked in $NBSRC_DATA, {DEBIAN_ROOT}, {cache}); {HOW_TO_GET}")


def load_fashion_mnist(root: str | Path | None = None, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 images (uint8, N x 28 x 28) and labels (int64): the train file, then t10k, read-only.
    Decompressed once per process and reused while the files are unchanged (same sizes and times).

    The retrieval split is by class (see :func:`nbsrc.data.splits.class_disjoint_split`), so the
    official train/test file boundary is not used.
    """
    folder = find_fashion_mnist(root, download)
    key = (str(folder.resolve()), tuple((st.st_size, st.st_mtime_ns) for st in
                                        (os.stat(folder / FILES[k]) for k in sorted(FILES))))
    if key in _LOADED:  # decompressed once per process (a notebook's runs, a test session): the files are unchanged
        return _LOADED[key]
    images = np.concatenate([read_idx(folder / FILES["train_images"]), read_idx(folder / FILES["test_images"])])
    labels = np.concatenate([read_idx(folder / FILES["train_labels"]), read_idx(folder / FILES["test_labels"])])
    if images.ndim != 3 or len(images) != len(labels):
        raise DatasetError(
            f"Fashion-MNIST files in {folder} disagree: {images.shape} images for {labels.shape} labels; "
            "get a fresh copy"
        )
    labels = labels.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False  # shared by every caller: read-only
    _LOADED.clear()  # one copy (55 MB) at most
    _LOADED[key] = (images, labels)
    return images, labels


# The last arrays loaded, keyed by the folder and its files' sizes and modification times.
_LOADED: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
