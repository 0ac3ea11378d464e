"""Generators of tiny fixture trees in the exact official layouts of the benchmarks (not a test).

The real datasets cannot be downloaded here, so each ``make_*`` writes a few tiny real images (PIL
JPEG/PNG) and the official split / ground-truth files into a temporary folder, and returns the
root a user would pass as ``data_root``. The tests derive every expected count from the arguments,
never from a run.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, seed: int, size: tuple[int, int] = (12, 10), fmt: str | None = None) -> Path:
    """A tiny real RGB image (width x height ``size``) whose pixels depend on ``seed``; the format
    follows the extension (``.jpg``/``.JPG`` -> JPEG, ``.png`` -> PNG) unless ``fmt`` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


# ----------------------------------------------------------------------------- CUB-200-2011
CUB_CLASS_IDS = (1, 2, 100, 101, 102, 200)  # both sides of the 100 / 101 boundary


def cub_class_name(c: int) -> str:
    return f"{c:03d}.Bird_{c}"


def make_cub(tmp: Path, class_ids=CUB_CLASS_IDS, per_class: int = 3, nested: bool = True) -> Path:
    """``<tmp>/CUB_200_2011/{images.txt, image_class_labels.txt, classes.txt, train_test_split.txt,
    images/<NNN.Name>/<Name>_<k>.jpg}``; returns ``tmp`` (the parent) when ``nested`` else the
    ``CUB_200_2011`` folder. Image ids are 1-based in class order, as in the release."""
    root = Path(tmp) / "CUB_200_2011"
    images, labels, split, image_id = [], [], [], 0
    for c in class_ids:
        for k in range(per_class):
            image_id += 1
            rel = f"{cub_class_name(c)}/Bird_{c}_{k:04d}.jpg"
            write_image(root / "images" / rel, image_id)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {k % 2}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{c} {cub_class_name(c)}" for c in class_ids) + "\n")
    return Path(tmp) if nested else root


# ----------------------------------------------------------------------------- SOP
SOP_CATEGORIES = ("bicycle", "chair")


def make_sop(tmp: Path, n_train: int = 4, n_test: int = 3, per_class: int = 2) -> Path:
    """``<tmp>/Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, Ebay_info.txt,
    <category>_final/<product>_<k>.JPG}``, with header ``image_id class_id super_class_id path``.
    Class ids 1..n_train train, n_train+1..n_train+n_test test; categories alternate. Returns the
    ``Stanford_Online_Products`` folder."""
    root = Path(tmp) / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path"
    lines = {"train": [header], "test": [header]}
    info = [header]
    image_id = 0
    for c in range(1, n_train + n_test + 1):
        split = "train" if c <= n_train else "test"
        s = (c - 1) % len(SOP_CATEGORIES)
        for k in range(per_class):
            image_id += 1
            rel = f"{SOP_CATEGORIES[s]}_final/{1000 + c}_{k}.JPG"
            write_image(root / rel, 10_000 + image_id)
            lines[split].append(f"{image_id} {c} {s + 1} {rel}")
            info.append(f"{image_id} {c} {s + 1} {rel}")
    for split, rows in lines.items():
        (root / f"Ebay_{split}.txt").write_text("\n".join(rows) + "\n")
    (root / "Ebay_info.txt").write_text("\n".join(info) + "\n")
    return root


# ----------------------------------------------------------------------------- In-Shop
def inshop_item(i: int) -> str:
    return f"id_{i:08d}"


def make_inshop(tmp: Path, n_train: int = 3, n_test: int = 4, per_item: int = 2,
                per_query: int = 1, official_archive: bool = False) -> Path:
    """``<tmp>/InShop/{list_eval_partition.txt, img/<GENDER>/<Category>/<item_id>/<k>_front.jpg}``.

    ``list_eval_partition.txt`` starts with the image count and the column names
    ``image_name item_id evaluation_status``. Train items get ``per_item`` train images; each test
    item gets ``per_query`` query and ``per_item`` gallery images. Item ids are written in shuffled
    order so the label mapping is not the file order. ``official_archive`` puts the file in
    ``Eval/`` and the images in ``Img/img/``, as in the DeepFashion download. Returns the root.
    """
    root = Path(tmp) / "InShop"
    img_base = root / "Img" if official_archive else root
    order = np.random.default_rng(0).permutation(n_train + n_test)
    rows = []
    for i in order:
        item = inshop_item(int(i) + 1)
        gender = "WOMEN" if i % 2 else "MEN"
        statuses = ["train"] * per_item if i < n_train else ["query"] * per_query + ["gallery"] * per_item
        for k, status in enumerate(statuses):
            rel = f"img/{gender}/Dresses/{item}/{k:02d}_{k + 1}_front.jpg"
            write_image(img_base / rel, 20_000 + 100 * int(i) + k)
            rows.append(f"{rel}  {item}  {status}")
    partition = root / "Eval" / "list_eval_partition.txt" if official_archive else root / "list_eval_partition.txt"
    partition.parent.mkdir(parents=True, exist_ok=True)
    partition.write_text(f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n")
    return root


# ----------------------------------------------------------------------------- Revisited Oxford/Paris
def make_revisited(tmp: Path, name: str = "roxford5k", n_db: int = 12, n_queries: int = 3,
                   size: tuple[int, int] = (20, 16)) -> Path:
    """``<tmp>/<name>/{gnd_<name>.pkl, jpg/<image>.jpg}`` as distributed by revisitop.

    The pickle holds ``imlist`` (database names, no extension), ``qimlist`` (query names; each a
    database image, as in the real files) and ``gnd``: per query ``bbx = [x1, y1, x2, y2]`` and
    the ``easy``, ``hard`` and ``junk`` lists of database indices (disjoint). Returns the
    ``<tmp>/<name>`` folder.
    """
    root = Path(tmp) / name
    rng = np.random.default_rng(1)
    imlist = [f"{name}_{i:03d}" for i in range(n_db)]
    for i, im in enumerate(imlist):
        write_image(root / "jpg" / f"{im}.jpg", 30_000 + i, size)
    gnd, qimlist = [], []
    for q in range(n_queries):
        qimlist.append(imlist[q])
        perm = rng.permutation(n_db).tolist()
        gnd.append({
            "bbx": [1.4 + q, 2.0, size[0] - 3.6, size[1] - 1.0 - q],
            "easy": perm[:3], "hard": perm[3:5], "junk": perm[5:6],
        })
    with open(root / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return root


def make_original(tmp: Path, name: str = "oxford5k", n_db: int = 12, n_queries: int = 3,
                  size: tuple[int, int] = (20, 16)) -> Path:
    """``<tmp>/<name>/{gnd_<name>.pkl, jpg/<image>.jpg}`` as cirtorch distributes the original Oxford 5k /
    Paris 6k ground truth: ``imlist``, ``qimlist`` and per query ``bbx`` with the lists ``ok`` (the
    original good ∪ ok) and ``junk`` (disjoint). Returns the ``<tmp>/<name>`` folder."""
    root = Path(tmp) / name
    rng = np.random.default_rng(2)
    imlist = [f"{name}_{i:03d}" for i in range(n_db)]
    for i, im in enumerate(imlist):
        write_image(root / "jpg" / f"{im}.jpg", 40_000 + i, size)
    gnd = []
    for q in range(n_queries):
        perm = rng.permutation(n_db).tolist()
        gnd.append({"bbx": [1.4 + q, 2.0, size[0] - 3.6, size[1] - 1.0 - q], "ok": perm[:4], "junk": perm[4:6]})
    with open(root / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": imlist[:n_queries], "gnd": gnd}, f)
    return root


# ----------------------------------------------------------------------------- SfM-120k
def sfm_cid(i: int) -> str:
    """A cid like the real ones (a 32-hex-digit hash), unique per image."""
    return f"{(i * 2654435761 + 12345) % 16 ** 32:032x}"


def make_sfm120k(tmp: Path, n_clusters: int = 8, per_cluster: int = 4, n_val_clusters: int = 3) -> Path:
    """``<tmp>/retrieval-SfM-120k/{retrieval-SfM-120k.pkl, ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>}``.

    The pickle is ``{'train': {...}, 'val': {...}}``, each with ``cids`` (image names), ``cluster``
    (3D-model id per image), and ``qidxs`` / ``pidxs`` (query / positive image indices of the
    positive pairs: within one cluster, image k paired with image k+1). Returns the folder.
    """
    root = Path(tmp) / "retrieval-SfM-120k"
    db, offset = {}, 0
    for split, n_c in (("train", n_clusters), ("val", n_val_clusters)):
        cids = [sfm_cid(offset + i) for i in range(n_c * per_cluster)]
        offset += len(cids)
        cluster = [i // per_cluster for i in range(len(cids))]
        qidxs, pidxs = [], []
        for c in range(n_c):
            for k in range(per_cluster - 1):
                qidxs.append(c * per_cluster + k)
                pidxs.append(c * per_cluster + k + 1)
        for i, cid in enumerate(cids):
            # SfM-120k files are JPEGs named by their cid, without an extension
            write_image(root / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid, 40_000 + offset + i, fmt="JPEG")
        db[split] = {"cids": cids, "cluster": cluster, "qidxs": qidxs, "pidxs": pidxs}
    with open(root / "retrieval-SfM-120k.pkl", "wb") as f:
        pickle.dump(db, f)
    return root


def assert_notebook_09_without_data(executed: Path, figures_dir: Path) -> None:
    """Notebook 09 run without any benchmark root (``executed``: the executed notebook) printed where to
    download each benchmark's files and evaluated nothing: no ``benchmarks_*`` table in ``figures_dir``.
    Checked by tests/test_presets.py and by the demo's smoke run (tests/test_spine.py), which runs 09 so."""
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells for o in c.get("outputs", []))
    for needle in ("images.txt", "Ebay_train.txt", "list_eval_partition.txt", "gnd_roxford5k.pkl", "gnd_rparis6k.pkl",
                   "gnd_oxford5k.pkl", "gnd_paris6k.pkl", "no benchmark evaluated"):
        assert needle in text, needle
    assert not list(Path(figures_dir).glob("benchmarks_*")), sorted(Path(figures_dir).glob("benchmarks_*"))
