"""Who retrieved what in a finished run: the top-k neighbours of each query of a run's evaluation
split, with the images behind them, and its worst queries (lowest average precision first).

:func:`load_retrieval` reads a run's ``embeddings.npz`` (nothing is recomputed from the model) and
rebuilds its evaluation images from its saved config; :func:`retrieval_for_query` gives one query
and its neighbours (images, labels, similarities, hits), ready to draw. The retrieval browser of
:mod:`nbsrc.widgets` and notebook 10 call these.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from nbsrc.analysis import average_precision_per_query, worst_queries
from nbsrc.data import RetrievalDataset, build_data
from nbsrc.errors import ConfigError, RunDirError
from nbsrc.eval.recall import RetrievalResults, retrieve
from nbsrc.experiment import EMBEDDINGS, RunResult
from nbsrc.plots import plot_retrieval_grid
from nbsrc.runlist import as_run

__all__ = ["RunRetrieval", "QueryRetrieval", "load_retrieval", "retrieval_for_query", "display_image",
           "export_split_images", "index_of_run"]


def display_image(img) -> np.ndarray:
    """A dataset image (uint8 tensor or array, H×W, 1×H×W or 3×H×W) as the uint8 H×W or H×W×3
    array that :func:`nbsrc.plots.plot_retrieval_grid` draws."""
    a = np.asarray(img.numpy() if hasattr(img, "numpy") else img)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        raise ConfigError(f"cannot display an image of dtype {a.dtype}: expected uint8 pixels (0-255)")
    return np.ascontiguousarray(a)


@dataclass
class RunRetrieval:
    """The top-``k`` neighbours of every query of a finished run, with the images behind them.

    Row ``q`` of the run's query embeddings is image ``query_indices[q]`` of ``query``; gallery
    row ``g`` is image ``gallery_indices[g]`` of ``gallery`` (the query set itself, with the query
    left out of its own neighbours, when the run has no separate gallery)."""

    run: RunResult
    query: RetrievalDataset
    gallery: RetrievalDataset
    query_indices: np.ndarray
    gallery_indices: np.ndarray
    results: RetrievalResults
    query_emb: np.ndarray
    gallery_emb: np.ndarray | None

    @property
    def n_queries(self) -> int:
        return len(self.query_indices)

    @cached_property
    def average_precision(self) -> np.ndarray:
        """[nq] average precision of each query over the whole gallery (computed on first use)."""
        if self.gallery_emb is None:
            return average_precision_per_query(self.query_emb, self.results.query_labels)
        return average_precision_per_query(self.query_emb, self.results.query_labels,
                                           self.gallery_emb, self.results.gallery_labels)

    def worst(self) -> np.ndarray:
        """Query rows ordered from the lowest average precision up (queries without positives left out)."""
        return worst_queries(self.average_precision, self.n_queries)


def _check_images(labels_emb: np.ndarray, ds: RetrievalDataset, indices: np.ndarray, run_dir, what: str) -> None:
    if len(indices) and (indices.min() < 0 or indices.max() >= len(ds)
                         or not np.array_equal(ds.labels[indices], labels_emb)):
        raise RunDirError(f"the {what} images of run {run_dir} no longer match its {EMBEDDINGS} (the dataset or "
                          "its split changed since the run); retrain the run with mode='overwrite'")


def load_retrieval(run, k: int = 8) -> RunRetrieval:
    """Load a finished run (a :class:`~nbsrc.experiment.RunResult`, a
    :class:`~nbsrc.runlist.RunSummary` or a run directory), rebuild its evaluation images from its config
    and retrieve the top ``k`` of every query (:func:`nbsrc.eval.retrieve`: inner product, ties by gallery
    index)."""
    run = as_run(run)
    e = run.embeddings()
    data = build_data(run.config)
    qi = e["query_indices"].astype(np.int64)
    _check_images(e["query_labels"], data.query, qi, run.run_dir, "query")
    if "gallery" in e:
        if data.gallery is None:
            raise RunDirError(f"run {run.run_dir} has gallery embeddings but its dataset now has no separate "
                              "gallery; retrain the run with mode='overwrite'")
        gi = e["gallery_indices"].astype(np.int64)
        _check_images(e["gallery_labels"], data.gallery, gi, run.run_dir, "gallery")
        results = retrieve(e["query"], e["query_labels"], e["gallery"], e["gallery_labels"], k=k)
        return RunRetrieval(run, data.query, data.gallery, qi, gi, results, e["query"], e["gallery"])
    results = retrieve(e["query"], e["query_labels"], k=k)
    return RunRetrieval(run, data.query, data.query, qi, qi, results, e["query"], None)


@dataclass
class QueryRetrieval:
    """One query and its top-k neighbours, best first; ``hits[j]``: neighbour ``j`` has the
    query's label."""

    run_name: str
    query_row: int
    query_image: np.ndarray
    query_label: int
    images: list[np.ndarray]
    labels: np.ndarray  # [k]
    sims: np.ndarray  # [k]
    gallery_rows: np.ndarray  # [k] rows of the gallery embeddings
    hits: np.ndarray  # [k] bool
    class_names: list[str] | None = None

    def _name(self, label) -> str:
        return str(self.class_names[int(label)]) if self.class_names is not None else str(label)

    def figure(self, title: str | None = None):
        """The query and its neighbours, hits framed green and misses red
        (:func:`nbsrc.plots.plot_retrieval_grid`)."""
        return plot_retrieval_grid(
            [self.query_image], [self.images], self.hits[None, :],
            query_titles=[f"q{self.query_row}: {self._name(self.query_label)}"],
            retrieved_titles=[[f"{self._name(lab)}\n{s:.2f}" for lab, s in zip(self.labels, self.sims, strict=True)]],
            title=title or f"{self.run_name}: query {self.query_row} and its top {len(self.hits)}")


def retrieval_for_query(run, query_row: int, k: int = 8) -> QueryRetrieval:
    """Query ``query_row`` (a row of the run's query embeddings) of ``run`` (a :class:`RunRetrieval`
    from :func:`load_retrieval`, or anything :func:`load_retrieval` takes) with its top ``k``
    neighbours: images, labels, similarities and hits."""
    rr = run if isinstance(run, RunRetrieval) else load_retrieval(run, k)
    if k > rr.results.k and rr.results.k < len(rr.results.gallery_labels) - int(rr.results.is_self_excluded):
        rr = load_retrieval(rr.run, k)
    if isinstance(query_row, bool) or not isinstance(query_row, (int, np.integer)) or not 0 <= query_row < rr.n_queries:
        raise ConfigError(f"query_row={query_row!r} is invalid: run {rr.run.run_dir.name} has {rr.n_queries} "
                          f"queries, so expected an integer in [0, {rr.n_queries - 1}]")
    q = int(query_row)
    rows = rr.results.indices[q, :k]
    return QueryRetrieval(
        run_name=rr.run.run_dir.name, query_row=q,
        query_image=display_image(rr.query.raw(int(rr.query_indices[q]))),
        query_label=int(rr.results.query_labels[q]),
        images=[display_image(rr.gallery.raw(int(rr.gallery_indices[g]))) for g in rows],
        labels=rr.results.gallery_labels[rows], sims=rr.results.sims[q, :k], gallery_rows=rows,
        hits=rr.results.hits[q, :k],
        class_names=list(rr.query.class_names) if rr.query.class_names is not None else None)


def _folder_name(name: str) -> str:
    """A class name as a folder name: path separators and leading dots replaced."""
    safe = "".join("_" if c in '/\\:*?"<>|' or ord(c) < 32 else c for c in str(name)).strip()
    return ("_" + safe[1:] if safe.startswith(".") else safe) or "_"


def export_split_images(run, out_dir: str | Path, split: str = "query", per_class: int | None = None) -> Path:
    """Write the evaluation images of a finished run (``split``: ``query`` or ``gallery``) as PNG
    files ``out_dir/<class>/<row>.png``, a folder :class:`nbsrc.retrieval.Index` can index, so the
    query-by-image path can be tried on the run's own data. ``per_class`` caps the images per class
    (the first ones). Files already there are kept as they are (nothing is overwritten); returns
    ``out_dir``."""
    from PIL import Image

    run = as_run(run)
    data = build_data(run.config)
    ds = data.query if split == "query" else data.gallery if split == "gallery" else None
    if ds is None:
        raise ConfigError(f"split={split!r} is invalid for run {run.run_dir}: expected 'query'"
                          + (" or 'gallery'" if data.gallery is not None else " (it has no separate gallery)"))
    names = list(ds.class_names) if ds.class_names is not None else None
    out = Path(out_dir)
    counts: dict[int, int] = {}
    for i in range(len(ds)):
        label = int(ds.labels[i])
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = out / _folder_name(names[label] if names is not None else str(label))
        path = folder / f"{i:06d}.png"
        if path.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{path.name}.tmp"  # hidden: never listed as an image if left behind
        Image.fromarray(display_image(ds.raw(i))).save(tmp, format="PNG")
        tmp.replace(path)
    return out


def index_of_run(run, out_dir: str | Path | None = None, split: str = "query", progress: bool = False):
    """An :class:`nbsrc.retrieval.Index` of a finished run's evaluation images, made the way a user
    indexes a folder: the images are written as PNG files (:func:`export_split_images`, into
    ``<out_dir>/images``) and embedded with the run's model (``nbsrc embed RUN FOLDER``, into
    ``<out_dir>/index``). ``out_dir`` defaults to ``<runs_dir>/<run name>.query_index``. A second
    call finds both and only opens the index."""
    from nbsrc.retrieval.index import Index

    run = as_run(run)
    out = Path(out_dir) if out_dir is not None else run.run_dir.parent / f"{run.run_dir.name}.{split}_index"
    folder = export_split_images(run, out / "images", split=split)
    return Index.build(run.run_dir, folder, out / "index", progress=progress, log=None)
