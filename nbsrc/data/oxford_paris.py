"""Revisited Oxford and Paris (Radenović et al., CVPR 2018) and the +1M distractors: the readers.

``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` hold ``imlist`` (database image names), ``qimlist``
(query image names) and ``gnd``: per query a bounding box ``bbx = [x1, y1, x2, y2]`` and the
database indices ``easy``, ``hard`` and ``junk``. Images are ``<root>/jpg/<name>.jpg``. Each query
image is cropped to its box before it is embedded, as the protocol requires. The metric (mAP,
mP@k) is :mod:`nbsrc.eval.revisited_map`.

The original protocol (Philbin et al. 2007/2008; the Oxf5k and Par6k columns of DToP's tables) is read
from ``gnd_oxford5k.pkl`` / ``gnd_paris6k.pkl`` as cirtorch distributes them: the same ``imlist``,
``qimlist`` and images, and per query ``bbx`` with the database indices ``ok`` (the original
protocol's *good* ∪ *ok*, the positives) and ``junk`` (its *junk*, ignored).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nbsrc.data.datasets import RetrievalDataset, load_image
from nbsrc.data.files import read_pickle
from nbsrc.errors import ConfigError, DatasetError

REVISITED_NAMES = ("roxford5k", "rparis6k")
ORIGINAL_NAMES = ("oxford5k", "paris6k")  # the original protocol: positives ok (= good ∪ ok), junk
TWIN = {"oxford5k": "roxford5k", "paris6k": "rparis6k"}  # the same images under the revisited name
ORIGINAL_LAYOUT = "original layout: root/{gnd_<name>.pkl,jpg/<image>.jpg} with name oxford5k or paris6k"
ORIGINAL_GND_URL = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/<name>/gnd_<name>.pkl"
ORIGINAL_URL = (
    f"download {ORIGINAL_GND_URL} into the folder that holds the images (jpg/; the revisited dataset's folder "
    "will do: the images are the same)"
)
REVISITED_LAYOUT = "Revisited layout: root/{gnd_<name>.pkl,jpg/<image>.jpg} with name roxford5k or rparis6k"
REVISITED_URL = (
    "download gnd_<name>.pkl from http://cmp.felk.cvut.cz/revisitop/data/datasets/<name>/ and the images from "
    "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/ (Oxford) or /parisbuildings/ (Paris)"
)
DISTRACTORS_LAYOUT = "R1M layout: root/{revisitop1m.txt,jpg/<path listed>}"
DISTRACTORS_URL = (
    "download revisitop1m.txt and jpg/revisitop1m.<1..100>.tar.gz from http://ptak.felk.cvut.cz/revisitop/revisitop1m/"
)

# ----------------------------------------------------------------------------- ground truth and images
def load_revisited_gnd(path: str | Path) -> dict:
    """Read ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` and check its structure.

    Returns the pickle's dict: ``imlist``, ``qimlist`` and ``gnd`` (one dict per query with
    ``bbx`` and the ``easy``, ``hard``, ``junk`` index lists, as int64 arrays here).
    """
    path = Path(path)
    cfg = read_pickle(path, REVISITED_LAYOUT, REVISITED_URL)
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise DatasetError(f"{path} is not a revisited ground-truth file: expected a dict with imlist, qimlist and gnd")
    return {**cfg, "gnd": _checked_gnd(path, cfg, ("easy", "hard", "junk"))}


def load_original_gnd(path: str | Path) -> dict:
    """Read ``gnd_oxford5k.pkl`` / ``gnd_paris6k.pkl`` (cirtorch's files) and check their structure.

    Returns the pickle's dict: ``imlist``, ``qimlist`` and ``gnd`` (one dict per query with ``bbx``
    and the ``ok`` and ``junk`` index lists, as int64 arrays here).
    """
    path = Path(path)
    name = path.stem.removeprefix("gnd_")
    cfg = read_pickle(path, ORIGINAL_LAYOUT.replace("<name>", name), ORIGINAL_URL.replace("<name>", name))
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise DatasetError(f"{path} is not an Oxford/Paris ground-truth file: expected a dict with imlist, qimlist "
                           "and gnd")
    return {**cfg, "gnd": _checked_gnd(path, cfg, ("ok", "junk"))}


def _checked_gnd(path: Path, cfg: dict, lists: tuple[str, ...]) -> list[dict]:
    """``cfg["gnd"]`` with ``bbx`` as 4 floats and each of ``lists`` as int64 indices into ``imlist``."""
    n_db, n_q = len(cfg["imlist"]), len(cfg["qimlist"])
    if len(cfg["gnd"]) != n_q:
        raise DatasetError(f"{path}: {len(cfg['gnd'])} gnd entries for {n_q} queries; the file is corrupt")
    gnd = []
    for q, g in enumerate(cfg["gnd"]):
        missing = {"bbx", *lists} - set(g)
        if missing:
            raise DatasetError(f"{path}: query {q} has no {sorted(missing)[0]!r}; expected bbx, {', '.join(lists)}")
        entry = {"bbx": np.asarray(g["bbx"], dtype=np.float64).reshape(-1)}
        if entry["bbx"].shape != (4,):
            raise DatasetError(f"{path}: query {q} bbx has {entry['bbx'].size} values; expected [x1, y1, x2, y2]")
        for key in lists:
            idx = np.asarray(g[key], dtype=np.int64).reshape(-1)
            if len(idx) and (idx.min() < 0 or idx.max() >= n_db):
                raise DatasetError(f"{path}: query {q} {key} index out of range 0..{n_db - 1}; the file is corrupt")
            entry[key] = idx
        gnd.append(entry)
    return gnd


def crop_query(img: torch.Tensor, bbx: Sequence[float]) -> torch.Tensor:
    """Crop an image tensor (``[C,] H, W``) to ``bbx = [x1, y1, x2, y2]`` in pixels.

    Like ``PIL.Image.crop`` (which the protocol's code uses) the corners are rounded to integers and
    the crop is ``img[..., y1:y2, x1:x2]``; the box is clipped to the image.
    """
    x1, y1, x2, y2 = (int(round(float(v))) for v in bbx)
    h, w = img.shape[-2:]
    x1, x2 = max(0, x1), min(w, x2)
    y1, y2 = max(0, y1), min(h, y2)
    if x2 <= x1 or y2 <= y1:
        raise DatasetError(
            f"query box {list(bbx)} leaves nothing of a {w}x{h} image; the ground-truth file does not match the images"
        )
    return img[..., y1:y2, x1:x2]


class RevisitedQueries(RetrievalDataset):
    """The query images, each cropped to its bounding box before the transform. Labels are the
    query numbers (the protocol uses ``gnd``, not labels)."""

    def __init__(self, paths, bbxs, transform=None):
        super().__init__(np.asarray(paths, dtype=object), np.arange(len(paths)), transform)
        self.bbxs = [np.asarray(b, dtype=np.float64) for b in bbxs]

    def raw(self, i: int) -> torch.Tensor:
        return crop_query(load_image(self.images[i]), self.bbxs[i])

    def subset(self, indices: np.ndarray, transform: Callable | None = None) -> RevisitedQueries:
        indices = np.asarray(indices, dtype=np.int64)
        return RevisitedQueries([self.images[i] for i in indices], [self.bbxs[i] for i in indices],
                                transform or self.transform)

    def sizes(self) -> list[tuple[int, int]]:
        """``(h, w)`` of each query's crop (what :meth:`raw` returns), from the file headers."""
        from nbsrc.data.images import image_size

        out = []
        for path, bbx in zip(self.images, self.bbxs, strict=True):
            h, w = image_size(path)
            x1, y1, x2, y2 = (int(round(float(v))) for v in bbx)
            out.append((min(h, y2) - max(0, y1), min(w, x2) - max(0, x1)))
        return out


@dataclass
class RevisitedData:
    """Queries (cropped), database images and ground truth of one revisited dataset (``easy``, ``hard``,
    ``junk`` per query) or of one original one (``oxford5k`` / ``paris6k``: ``ok``, ``junk``)."""

    name: str
    query: RevisitedQueries
    database: RetrievalDataset
    gnd: list[dict]


def _check_files(paths: Sequence[str], layout: str, url: str) -> None:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DatasetError(f"expected {missing[0]} ({len(missing)} of {len(paths)} listed images missing); {layout}; "
                           f"{url}")


def build_revisited(root, name: str | None = None, transform: Callable | None = None,
                    query_transform: Callable | None = None) -> RevisitedData:
    """Queries and database of ``roxford5k``, ``rparis6k`` (revisited protocol), ``oxford5k`` or ``paris6k``
    (original protocol) under ``root`` (``name=None``: the one whose ``gnd_<name>.pkl`` is in ``root``).
    Database labels are image indices."""
    if root is None:
        raise DatasetError(
            f"the revisited benchmarks need data_root=<folder with gnd_<name>.pkl>; {REVISITED_LAYOUT}; {REVISITED_URL}"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data_root does not exist: expected the folder {root}; {REVISITED_LAYOUT}; {REVISITED_URL}")
    if name is None:
        found = [n for n in REVISITED_NAMES + ORIGINAL_NAMES if (root / f"gnd_{n}.pkl").is_file()]
        if len(found) != 1:
            names = ", ".join(f"{root}/gnd_{n}.pkl" for n in REVISITED_NAMES + ORIGINAL_NAMES)
            raise DatasetError(f"expected exactly one of {names} (found {len(found)}); pass name=...; "
                               f"{REVISITED_LAYOUT}; {REVISITED_URL}")
        name = found[0]
    if name not in REVISITED_NAMES + ORIGINAL_NAMES:
        raise ConfigError(f"unknown revisited dataset {name!r}; expected one of "
                          f"{', '.join(REVISITED_NAMES + ORIGINAL_NAMES)}")
    load = load_original_gnd if name in ORIGINAL_NAMES else load_revisited_gnd
    cfg = load(root / f"gnd_{name}.pkl")
    db_paths = [str(root / "jpg" / f"{im}.jpg") for im in cfg["imlist"]]
    q_paths = [str(root / "jpg" / f"{im}.jpg") for im in cfg["qimlist"]]
    _check_files(q_paths + db_paths, *((ORIGINAL_LAYOUT, ORIGINAL_URL) if name in ORIGINAL_NAMES
                                       else (REVISITED_LAYOUT, REVISITED_URL)))
    query = RevisitedQueries(q_paths, [g["bbx"] for g in cfg["gnd"]], query_transform or transform)
    database = RetrievalDataset(np.asarray(db_paths, dtype=object), np.arange(len(db_paths)), transform)
    return RevisitedData(name=name, query=query, database=database, gnd=cfg["gnd"])


def build_distractors(root, transform: Callable | None = None, check_images: bool = True) -> RetrievalDataset:
    """The R1M distractors: ``root/revisitop1m.txt`` lists paths relative to ``root/jpg`` (``.jpg`` is
    appended to a name without extension). Labels are image indices. ``check_images`` stats every
    file (a few seconds for 1M)."""
    if root is None:
        raise DatasetError(
            f"the +1M distractors need data_root=<revisitop1m folder>; {DISTRACTORS_LAYOUT}; {DISTRACTORS_URL}"
        )
    root = Path(root).expanduser()
    listing = root / "revisitop1m.txt"
    if not listing.is_file():
        raise DatasetError(f"expected {listing}; {DISTRACTORS_LAYOUT}; {DISTRACTORS_URL}")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    paths = [str(root / "jpg" / (n if Path(n).suffix else n + ".jpg")) for n in names]
    if check_images:
        _check_files(paths, DISTRACTORS_LAYOUT, DISTRACTORS_URL)
    return RetrievalDataset(np.asarray(paths, dtype=object), np.arange(len(paths)), transform)
