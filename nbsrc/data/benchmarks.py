"""The category-level benchmarks of IRT Table 2, read from their official split files.

=================  =========================================  ==========================  ===========
dataset            split files                                train / evaluation          Recall@K
=================  =========================================  ==========================  ===========
CUB-200-2011       ``images.txt``, ``image_class_labels.txt``  classes 1-100 / 101-200     1, 2, 4, 8
Stanford Online    ``Ebay_train.txt``, ``Ebay_test.txt``       11,318 / 11,316 products    1, 10, 100,
Products (SOP)                                                                             1000
In-Shop Clothes    ``list_eval_partition.txt``                 3,997 items / 3,985 items,  1, 10, 20,
                                                               query and gallery apart     30
=================  =========================================  ==========================  ===========

Evaluation follows each dataset's protocol: on CUB and SOP every evaluation image is a query
searched against all the others (``RetrievalData.gallery is None``); on In-Shop the 14,218 query
images are searched against the 12,612 gallery images. The ``train_classes`` / ``test_classes`` of
the config do not apply here: the official split is always used.

Labels are integers: CUB ``class_id − 1`` (0..199), SOP ``class_id − 1`` (0..22633), In-Shop the
position of the item id in the sorted list of all item ids (the same label in query and gallery).
``class_names[label]`` gives the dataset's own name for a label.

Every layout problem (root missing, split file missing, a listed image missing) is a
:class:`~nbsrc.errors.DatasetError` whose one line names the missing file, the expected tree and
where to download the dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nbsrc.data.datasets import RetrievalDataset
from nbsrc.data.splits import cap_per_class, check_min_per_class
from nbsrc.errors import DatasetError

RECALL_KS = {"cub": (1, 2, 4, 8), "sop": (1, 10, 100, 1000), "inshop": (1, 10, 20, 30)}

CUB_LAYOUT = (
    "CUB layout: root/{images.txt,image_class_labels.txt,images/<class>/<image>.jpg} "
    "(root = CUB_200_2011 or its parent)"
)
CUB_URL = "download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/"
SOP_LAYOUT = "SOP layout: root/{Ebay_train.txt,Ebay_test.txt,<category>_final/...} (root = Stanford_Online_Products)"
SOP_URL = "download Stanford_Online_Products.zip from https://cvgl.stanford.edu/projects/lifted_struct/"
INSHOP_LAYOUT = (
    "In-Shop layout: root/{list_eval_partition.txt,img/<gender>/<category>/<item_id>/<image>.jpg} "
    "(list_eval_partition.txt may also be in root/Eval/, img/ in root/Img/)"
)
INSHOP_URL = (
    "download Eval/list_eval_partition.txt and Img/img.zip from "
    "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"
)
CUB_TRAIN_CLASSES = range(1, 101)  # the first 100 classes train, the last 100 evaluate


# ----------------------------------------------------------------------------- helpers
def _missing(path: Path, layout: str, url: str, what: str = "expected") -> DatasetError:
    return DatasetError(f"{what} {path}; {layout}; {url}")


def _root(root, layout: str, url: str, name: str) -> Path:
    if root is None:
        raise DatasetError(f"dataset={name!r} needs data_root=<dataset folder>; {layout}; {url}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise _missing(root, layout, url, "data_root does not exist: expected the folder")
    return root


def _read_rows(path: Path, n_cols: int, layout: str, url: str, skip: int = 0) -> list[list[str]]:
    """Whitespace-separated rows of a split file (after ``skip`` header lines), each with at least
    ``n_cols`` fields; a malformed line is an error that names the file and the line."""
    if not path.is_file():
        raise _missing(path, layout, url)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if lineno <= skip or not line.strip():
                continue
            fields = line.split()
            if len(fields) < n_cols:
                raise DatasetError(
                    f"{path}, line {lineno}: expected {n_cols} whitespace-separated fields, got {line.strip()!r}; "
                    f"the file is truncated or not the official one ({url})"
                )
            rows.append(fields)
    if not rows:
        raise DatasetError(f"{path} lists no images; the file is truncated or not the official one ({url})")
    return rows


def _int(value: str, path: Path, url: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{path}: {value!r} is not an integer id; the file is not the official one "
                           f"({url})") from None


def _check_images(paths: list[str], layout: str, url: str) -> None:
    """Every listed image must exist (one stat per image: about a second for SOP's 120k)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(
            f"expected {missing[0]} (listed in the split file; {len(missing)} of {len(paths)} listed images are "
            f"missing); {layout}; {url}"
        )


def _eval_set(paths, labels, names, tf, per_class, seed) -> RetrievalDataset:
    """An evaluation set with at most ``per_class`` images per label (a fixed random subset)."""
    paths, labels = np.asarray(paths, dtype=object), np.asarray(labels, dtype=np.int64)
    keep = cap_per_class(np.arange(len(labels)), labels, per_class, seed=seed)
    return RetrievalDataset(paths[keep], labels[keep], tf, names)


# ----------------------------------------------------------------------------- CUB-200-2011
def find_cub_root(root) -> Path:
    """The folder that holds ``images.txt``: ``root`` itself or ``root/CUB_200_2011``."""
    root = _root(root, CUB_LAYOUT, CUB_URL, "cub")
    if not (root / "images.txt").is_file() and (root / "CUB_200_2011").is_dir():
        return root / "CUB_200_2011"
    return root


def load_cub(root) -> tuple[list[str], np.ndarray, list[str]]:
    """All CUB-200-2011 images: ``(paths, labels = class_id − 1, class_names)``, in ``images.txt`` order.

    ``images.txt``: ``<image_id> <class_folder>/<file>.jpg``; ``image_class_labels.txt``:
    ``<image_id> <class_id>`` with class ids 1..200. The class name is the image's folder
    (``001.Black_footed_Albatross``).
    """
    root = find_cub_root(root)
    images = _read_rows(root / "images.txt", 2, CUB_LAYOUT, CUB_URL)
    classes = _read_rows(root / "image_class_labels.txt", 2, CUB_LAYOUT, CUB_URL)
    class_of = {_int(i, root / "image_class_labels.txt", CUB_URL): _int(c, root / "image_class_labels.txt", CUB_URL)
                for i, c, *_ in classes}
    paths, labels, names = [], [], {}
    for image_id, rel, *_ in images:
        iid = _int(image_id, root / "images.txt", CUB_URL)
        if iid not in class_of:
            raise DatasetError(
                f"image id {iid} ({rel}) of {root / 'images.txt'} has no class in {root / 'image_class_labels.txt'}; "
                f"the two files must come from the same release ({CUB_URL})"
            )
        c = class_of[iid]
        if not 1 <= c <= 200:
            raise DatasetError(f"{root / 'image_class_labels.txt'}: class id {c} of image {iid} is outside 1..200")
        paths.append(str(root / "images" / rel))
        labels.append(c - 1)
        names.setdefault(c - 1, rel.split("/")[0])
    _check_images(paths, CUB_LAYOUT, CUB_URL)
    class_names = [names.get(c, str(c + 1)) for c in range(200)]
    return paths, np.asarray(labels, dtype=np.int64), class_names


def build_cub(root, train_tf, eval_tf, eval_per_class=None, seed=0):
    """CUB-200-2011 with the standard split: classes 1-100 train, classes 101-200 evaluate."""
    from nbsrc.data.datasets import RetrievalData

    paths, labels, names = load_cub(root)
    is_train = labels < len(CUB_TRAIN_CLASSES)
    _require_both(is_train, find_cub_root(root) / "image_class_labels.txt", "classes 1-100", "classes 101-200")
    p = np.asarray(paths, dtype=object)
    train = RetrievalDataset(p[is_train], labels[is_train], train_tf, names)
    query = _eval_set(p[~is_train], labels[~is_train], names, eval_tf, eval_per_class, seed)
    check_min_per_class(query.labels, 2, "CUB-200-2011 evaluation split")
    return RetrievalData(train=train, query=query)


def _require_both(is_train: np.ndarray, path: Path, train: str, test: str) -> None:
    if not is_train.any() or is_train.all():
        empty = train if not is_train.any() else test
        raise DatasetError(f"{path} lists no image of the {empty}; the file is truncated or not the official one")


# ----------------------------------------------------------------------------- SOP
def find_sop_root(root) -> Path:
    """The folder that holds ``Ebay_train.txt``: ``root`` itself or ``root/Stanford_Online_Products``."""
    root = _root(root, SOP_LAYOUT, SOP_URL, "sop")
    if not (root / "Ebay_train.txt").is_file() and (root / "Stanford_Online_Products").is_dir():
        return root / "Stanford_Online_Products"
    return root


def load_sop_split(root, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``Ebay_<split>.txt`` (header ``image_id class_id super_class_id path``): ``(paths, labels =
    class_id − 1, super_class_id − 1)``."""
    root = find_sop_root(root)
    path = root / f"Ebay_{split}.txt"
    rows = _read_rows(path, 4, SOP_LAYOUT, SOP_URL, skip=1)
    paths = [str(root / r[3]) for r in rows]
    labels = np.asarray([_int(r[1], path, SOP_URL) - 1 for r in rows], dtype=np.int64)
    supers = np.asarray([_int(r[2], path, SOP_URL) - 1 for r in rows], dtype=np.int64)
    return paths, labels, supers


def build_sop(root, train_tf, eval_tf, eval_per_class=None, seed=0):
    """Stanford Online Products: ``Ebay_train.txt`` trains, ``Ebay_test.txt`` evaluates (query = gallery)."""
    from nbsrc.data.datasets import RetrievalData

    root = find_sop_root(root)
    # check both split files before the (slower) image check, so the first error is the file one
    for split in ("train", "test"):
        if not (root / f"Ebay_{split}.txt").is_file():
            raise _missing(root / f"Ebay_{split}.txt", SOP_LAYOUT, SOP_URL)
    tr_paths, tr_labels, tr_super = load_sop_split(root, "train")
    te_paths, te_labels, te_super = load_sop_split(root, "test")
    overlap = np.intersect1d(tr_labels, te_labels)
    if len(overlap):
        raise DatasetError(
            f"class id {int(overlap[0]) + 1} is in both Ebay_train.txt and Ebay_test.txt of {root}; the SOP split is "
            f"class-disjoint, so these are not the official files ({SOP_URL})"
        )
    _check_images(tr_paths + te_paths, SOP_LAYOUT, SOP_URL)
    n_classes = int(max(tr_labels.max(), te_labels.max())) + 1
    category = {}
    for paths, labels in ((tr_paths, tr_labels), (te_paths, te_labels)):
        for p, c in zip(paths, labels, strict=True):
            category.setdefault(int(c), Path(p).parent.name.removesuffix("_final"))
    names = [f"{category[c]}/{c + 1}" if c in category else str(c + 1) for c in range(n_classes)]
    train = RetrievalDataset(np.asarray(tr_paths, dtype=object), tr_labels, train_tf, names)
    query = _eval_set(te_paths, te_labels, names, eval_tf, eval_per_class, seed)
    check_min_per_class(query.labels, 2, "SOP evaluation split (Ebay_test.txt)")
    return RetrievalData(train=train, query=query)


# ----------------------------------------------------------------------------- In-Shop
def find_inshop_partition(root) -> Path:
    """``list_eval_partition.txt`` in ``root`` or ``root/Eval`` (the layout of the official download)."""
    root = _root(root, INSHOP_LAYOUT, INSHOP_URL, "inshop")
    for candidate in (root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt"):
        if candidate.is_file():
            return candidate
    raise _missing(root / "list_eval_partition.txt", INSHOP_LAYOUT, INSHOP_URL)


def load_inshop(root) -> dict[str, tuple[list[str], np.ndarray]]:
    """``{"train" | "query" | "gallery": (paths, labels)}`` and the item ids, from
    ``list_eval_partition.txt``.

    The file starts with two header lines (the image count, then ``image_name item_id
    evaluation_status``); each row is ``img/<...>/<item_id>/<file>.jpg <item_id> <status>`` with
    status ``train``, ``query`` or ``gallery``. Image names are relative to ``root`` (or to
    ``root/Img``, the official archive layout). The label of an item is its position among all item
    ids sorted, so a query and the gallery images of the same item share a label.
    """
    partition = find_inshop_partition(root)
    root = _root(root, INSHOP_LAYOUT, INSHOP_URL, "inshop")
    rows = _read_rows(partition, 3, INSHOP_LAYOUT, INSHOP_URL, skip=2)
    bad = [r for r in rows if r[2] not in ("train", "query", "gallery")]
    if bad:
        raise DatasetError(
            f"{partition}: evaluation_status {bad[0][2]!r} (image {bad[0][0]}) is not train, query or gallery; "
            f"the file is not the official one ({INSHOP_URL})"
        )
    base = root
    if not (root / rows[0][0]).is_file() and (root / "Img" / rows[0][0]).is_file():
        base = root / "Img"
    items = sorted({r[1] for r in rows})
    label_of = {item: i for i, item in enumerate(items)}
    out = {}
    for status in ("train", "query", "gallery"):
        sel = [r for r in rows if r[2] == status]
        if not sel:
            raise DatasetError(f"{partition} lists no {status} image; the file is truncated ({INSHOP_URL})")
        out[status] = ([str(base / r[0]) for r in sel], np.asarray([label_of[r[1]] for r in sel], dtype=np.int64))
    _check_images(out["train"][0] + out["query"][0] + out["gallery"][0], INSHOP_LAYOUT, INSHOP_URL)
    out["items"] = items
    return out


def build_inshop(root, train_tf, eval_tf, eval_per_class=None, seed=0):
    """In-Shop: train items train; queries are searched against a separate gallery.

    ``eval_per_class`` caps the images per item in the query and in the gallery separately.
    """
    from nbsrc.data.datasets import RetrievalData

    parts = load_inshop(root)
    names = parts["items"]
    train = RetrievalDataset(np.asarray(parts["train"][0], dtype=object), parts["train"][1], train_tf, names)
    query = _eval_set(*parts["query"], names, eval_tf, eval_per_class, seed)
    gallery = _eval_set(*parts["gallery"], names, eval_tf, eval_per_class, seed)
    absent = np.setdiff1d(query.labels, gallery.labels)
    if len(absent):
        raise DatasetError(
            f"In-Shop item {names[int(absent[0])]} has query images but no gallery image in "
            f"{find_inshop_partition(root)}; the file is truncated ({INSHOP_URL})"
        )
    return RetrievalData(train=train, query=query, gallery=gallery)


# ----------------------------------------------------------------------------- entry point
def build_benchmark(name: str, root, train_tf, eval_tf, eval_per_class: int | None = None, seed: int = 0):
    """The :class:`~nbsrc.data.RetrievalData` of benchmark ``name`` (``cub``, ``sop`` or ``inshop``)
    under ``root``; evaluate it with Recall@``RECALL_KS[name]``."""
    builders = {"cub": build_cub, "sop": build_sop, "inshop": build_inshop}
    if name not in builders:
        from nbsrc.errors import ConfigError

        raise ConfigError(f"unknown benchmark {name!r}; expected one of {', '.join(builders)}")
    return builders[name](root, train_tf, eval_tf, eval_per_class, seed)
