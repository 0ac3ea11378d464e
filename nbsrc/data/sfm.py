"""SfM-120k tuple training (Radenović et al., TPAMI 2018; IRT §4.2, used for Revisited Oxford/Paris).

**Database.** ``retrieval-SfM-120k.pkl`` is ``{'train': db, 'val': db}`` with, per split,
``cids`` (image names), ``cluster`` (the 3D model each image belongs to) and the positive pairs
``qidxs[j]``, ``pidxs[j]`` (query and positive image indices: two views of the same 3D model).
Image ``cid`` is stored at ``<root>/ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>`` (cirtorch's
``cid2filename``).

**Tuples.** A training tuple is ``(q, p, n_1, ..., n_5)``: a query, its positive and 5 hard
negatives; a batch holds 5 tuples. Each epoch (:class:`TupleSampler`):

1. draw ``n_pairs`` = 2,000 of the positive pairs and a pool of ``pool_size`` = 22,000 images of the
   split, uniformly without replacement;
2. embed the queries and the pool with the current model (``embed_fn``);
3. for each query q of cluster c_q, walk the pool by decreasing similarity ``s(q, x) = <f(q), f(x)>``
   (equal similarities: lower pool position first) and keep x when its cluster is neither c_q (those
   images may show the same building) nor the cluster of a negative already kept, until 5 are kept.

Step 3 is :func:`mine_hard_negatives`, computed without walking: the image a walk keeps for a cluster
is the cluster's most similar image (its *representative*), and the walk meets the clusters in the
order of their representatives, so the negatives are the representatives of the 5 clusters ≠ c_q with
the highest ``(s, −position)``. Training then minimises the contrastive loss with margin β = 0.85
(Adam, lr 5e-7, weight decay 1e-6, 100 epochs; IRT §4.2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from nbsrc.data.datasets import RetrievalDataset
from nbsrc.data.files import read_pickle
from nbsrc.errors import ConfigError, DatasetError

SFM_FILE = "retrieval-SfM-120k.pkl"
SFM_LAYOUT = f"SfM-120k layout: root/{{{SFM_FILE},ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>}}"
SFM_URL = (
    f"download {SFM_FILE} from http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/dbs/ and ims.tar.gz from "
    "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/ims/"
)
N_PAIRS, POOL_SIZE, N_NEG = 2000, 22000, 5


def cid2filename(cid: str, ims_root: str | Path) -> Path:
    """The path of SfM-120k image ``cid``: ``ims_root/cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid``."""
    return Path(ims_root) / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid


@dataclass
class SfMSplit:
    """One split of the SfM-120k database: image paths, their cluster (3D model) and the positive pairs."""

    paths: list[str]
    cluster: np.ndarray  # [n_images] int64
    qidxs: np.ndarray  # [n_pairs] int64 query image of each positive pair
    pidxs: np.ndarray  # [n_pairs] int64 positive image of each pair

    def __len__(self) -> int:
        return len(self.paths)

    def images(self, transform: Callable | None = None) -> RetrievalDataset:
        """All images of the split; the label of an image is its cluster."""
        return RetrievalDataset(np.asarray(self.paths, dtype=object), self.cluster, transform)


def load_sfm120k_db(path, split: str = "train", ims_root=None, check_images: bool = True) -> SfMSplit:
    """Read ``split`` (``train`` or ``val``) of ``retrieval-SfM-120k.pkl``.

    ``path`` is the ``.pkl`` file or the folder that holds it; images are looked up under ``ims_root``
    (default: ``ims/`` beside the file). ``check_images`` checks that every image exists.
    """
    if path is None:
        raise DatasetError(f"SfM-120k needs data_root=<folder with {SFM_FILE}>; {SFM_LAYOUT}; {SFM_URL}")
    path = Path(path).expanduser()
    db_file = path / SFM_FILE if path.is_dir() or path.suffix != ".pkl" else path
    db = read_pickle(db_file, SFM_LAYOUT, SFM_URL)
    if not isinstance(db, dict) or split not in db:
        have = sorted(db) if isinstance(db, dict) else type(db).__name__
        raise DatasetError(f"{db_file} has no split {split!r} (found {have}); expected {{'train': ..., 'val': ...}}")
    part = db[split]
    missing = [k for k in ("cids", "cluster", "qidxs", "pidxs") if k not in part]
    if missing:
        raise DatasetError(f"{db_file}[{split!r}] has no {missing[0]!r}; expected cids, cluster, qidxs and pidxs")
    cids = [str(c) for c in part["cids"]]
    cluster = np.asarray(part["cluster"], dtype=np.int64).reshape(-1)
    qidxs = np.asarray(part["qidxs"], dtype=np.int64).reshape(-1)
    pidxs = np.asarray(part["pidxs"], dtype=np.int64).reshape(-1)
    if len(cluster) != len(cids):
        raise DatasetError(f"{db_file}[{split!r}]: {len(cids)} cids but {len(cluster)} cluster ids; "
                           "the file is corrupt")
    if len(qidxs) != len(pidxs) or not len(qidxs):
        raise DatasetError(
            f"{db_file}[{split!r}]: {len(qidxs)} qidxs and {len(pidxs)} pidxs; expected equal, non-empty lists"
        )
    for name, idx in (("qidxs", qidxs), ("pidxs", pidxs)):
        if idx.min() < 0 or idx.max() >= len(cids):
            raise DatasetError(f"{db_file}[{split!r}]: {name} outside 0..{len(cids) - 1}; the file is corrupt")
    ims_root = Path(ims_root) if ims_root is not None else db_file.parent / "ims"
    paths = [str(cid2filename(c, ims_root)) for c in cids]
    if check_images:
        absent = [p for p in paths if not Path(p).is_file()]
        if absent:
            raise DatasetError(
                f"expected {absent[0]} ({len(absent)} of {len(paths)} images of {split!r} missing); {SFM_LAYOUT}; "
                f"{SFM_URL}"
            )
    return SfMSplit(paths=paths, cluster=cluster, qidxs=qidxs, pidxs=pidxs)


# ----------------------------------------------------------------------------- mining
def _as_matrix(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ConfigError(f"{name} must be [N, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ConfigError(f"{name} contain NaN or inf; the model produced non-finite embeddings")
    return x


def mine_hard_negatives(query_emb, pool_emb, query_clusters, pool_clusters, n_neg: int = N_NEG,
                        query_chunk: int = 256) -> np.ndarray:
    """Positions in the pool ``[nq, n_neg]`` of each query's hard negatives, hardest first.

    For query q (cluster c_q) the negatives are the representatives of the ``n_neg`` clusters
    c ≠ c_q present in the pool whose representative ranks highest, where the representative of c
    is ``argmax_{x ∈ pool, cluster(x) = c} s(q, x)`` with ``s(q, x) = <q, x>`` and ties broken by
    the lower pool position, and clusters are ranked by ``(s(q, rep), −position(rep))``. This is
    what walking the pool by decreasing similarity, keeping at most one image per cluster and none
    from c_q, selects. Vectorised over queries (``query_chunk`` at a time) with segment maxima over
    the pool sorted by cluster.
    """
    q, p = _as_matrix(query_emb, "query embeddings"), _as_matrix(pool_emb, "pool embeddings")
    qc = np.asarray(query_clusters, dtype=np.int64).reshape(-1)
    pc = np.asarray(pool_clusters, dtype=np.int64).reshape(-1)
    if q.shape[1] != p.shape[1] or len(qc) != len(q) or len(pc) != len(p):
        raise ConfigError(
            f"shapes do not match: queries {q.shape} with {len(qc)} clusters, pool {p.shape} with {len(pc)} clusters"
        )
    if n_neg < 1:
        raise ConfigError(f"n_neg={n_neg} must be >= 1")
    order = np.argsort(pc, kind="stable")  # pool grouped by cluster, positions ascending within a cluster
    clusters, starts, sizes = np.unique(pc[order], return_index=True, return_counts=True)
    own = np.searchsorted(clusters, qc)
    own_present = (own < len(clusters)) & (clusters[np.minimum(own, len(clusters) - 1)] == qc)
    available = len(clusters) - own_present
    if (available < n_neg).any():
        i = int(np.flatnonzero(available < n_neg)[0])
        raise DatasetError(
            f"the negative pool holds {int(available[i])} cluster(s) other than query {i}'s, but n_neg={n_neg} "
            "negatives from distinct clusters are needed; enlarge pool_size or lower n_neg"
        )
    p_sorted = p[order]
    arange = np.arange(len(p))
    out = np.empty((len(q), n_neg), dtype=np.int64)
    for s in range(0, len(q), query_chunk):
        sim = q[s : s + query_chunk] @ p_sorted.T  # [b, P], columns grouped by cluster
        seg_max = np.maximum.reduceat(sim, starts, axis=1)  # best similarity per cluster
        is_max = sim == np.repeat(seg_max, sizes, axis=1)
        first = np.minimum.reduceat(np.where(is_max, arange, len(p)), starts, axis=1)
        rep = order[first]  # pool position of each cluster's representative
        present, own_c = own_present[s : s + query_chunk], own[s : s + query_chunk]
        seg_max[np.flatnonzero(present), own_c[present]] = -np.inf  # never the query's own cluster
        by_pos = np.argsort(rep, axis=1, kind="stable")  # ties in similarity: lower position first
        by_sim = np.argsort(-np.take_along_axis(seg_max, by_pos, axis=1), axis=1, kind="stable")
        best = np.take_along_axis(by_pos, by_sim[:, :n_neg], axis=1)
        out[s : s + query_chunk] = np.take_along_axis(rep, best, axis=1)
    return out


class TupleSampler:
    """Draws an epoch's positive pairs and negative pool, and mines the hard negatives.

    ``epoch_tuples(epoch, embed_fn)`` returns ``[n_pairs, 2 + n_neg]`` image indices
    ``(q, p, n_1, ..., n_neg)`` of ``db``. ``embed_fn(indices) -> [len(indices), D]`` embeds images
    of ``db`` by index with the current model (l2-normalised), e.g.
    ``lambda idx: extract_embeddings(model, db.images(eval_tf).subset(idx))[0]``. The draw depends
    only on ``(seed, epoch)``, so a resumed run mines from the same pairs and pool.
    ``n_pairs`` and ``pool_size`` are capped at what the split holds.
    """

    def __init__(self, db: SfMSplit, n_pairs: int = N_PAIRS, pool_size: int = POOL_SIZE, n_neg: int = N_NEG,
                 seed: int = 0):
        for name, value in (("n_pairs", n_pairs), ("pool_size", pool_size), ("n_neg", n_neg)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        self.db, self.n_neg, self.seed = db, int(n_neg), int(seed)
        self.n_pairs = min(int(n_pairs), len(db.qidxs))
        self.pool_size = min(int(pool_size), len(db))

    def draw(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(pairs, pool)``: indices into the positive pairs, and image indices of the negative pool."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        pairs = rng.permutation(len(self.db.qidxs))[: self.n_pairs]
        pool = rng.permutation(len(self.db))[: self.pool_size]
        return pairs, pool

    def epoch_tuples(self, epoch: int, embed_fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        pairs, pool = self.draw(epoch)
        queries, positives = self.db.qidxs[pairs], self.db.pidxs[pairs]
        q_emb, p_emb = np.asarray(embed_fn(queries)), np.asarray(embed_fn(pool))
        if len(q_emb) != len(queries) or len(p_emb) != len(pool):
            raise ConfigError(
                f"embed_fn returned {len(q_emb)} and {len(p_emb)} embeddings for {len(queries)} and {len(pool)} "
                "images; it must return one row per index, in order"
            )
        neg = mine_hard_negatives(q_emb, p_emb, self.db.cluster[queries], self.db.cluster[pool], self.n_neg)
        return np.concatenate([queries[:, None], positives[:, None], pool[neg]], axis=1)


# ----------------------------------------------------------------------------- tuples as training data
TUPLE_TARGET = (-1, 1)  # cirtorch's per-image target in a tuple: -1 query, 1 positive, 0 negative


class TupleDataset(Dataset):
    """``dataset[t]`` = ``(images [2 + n_neg, C, H, W], clusters [2 + n_neg], image indices [2 + n_neg])``
    of tuple ``t``; the query and positive share a cluster, the negatives each have another one, so the
    clusters act as labels for the contrastive loss. ``dataset[(t, seed)]`` draws the augmentation of
    image j of the tuple from ``seed + j``. Call :meth:`set_tuples` each epoch."""

    def __init__(self, db: SfMSplit, transform: Callable | None = None, tuples: np.ndarray | None = None):
        self.images = db.images(transform)
        self.tuples = np.empty((0, 2 + N_NEG), dtype=np.int64)
        if tuples is not None:
            self.set_tuples(tuples)

    def set_tuples(self, tuples: np.ndarray) -> None:
        tuples = np.asarray(tuples, dtype=np.int64)
        if tuples.ndim != 2 or tuples.shape[1] < 3:
            raise ConfigError(f"tuples must be [n, 2 + n_neg] image indices, got shape {tuples.shape}")
        self.tuples = tuples

    def __len__(self) -> int:
        return len(self.tuples)

    def __getitem__(self, key):
        t, seed = key if isinstance(key, tuple) else (key, None)
        views = [self.images[(int(i), seed + j) if seed is not None else int(i)] for j, i in enumerate(self.tuples[t])]
        imgs = torch.stack([v[0] for v in views])
        labels = torch.tensor([v[1] for v in views], dtype=torch.int64)
        return imgs, labels, torch.as_tensor(self.tuples[t])


def collate_tuples(batch):
    """Stack ``B`` tuples into one batch of ``B · (2 + n_neg)`` images, labels and indices, tuple by tuple."""
    imgs, labels, idx = zip(*batch, strict=True)
    return torch.cat(imgs), torch.cat(labels), torch.cat(idx)

