"""A searchable index of your own images: :class:`Index` (``build``, ``load``, ``search``).

``Index.build(model, folder, out_dir)`` lists every image under ``folder`` (recursively,
:func:`nbsrc.data.images.list_images`; the first sub-folder of an image is its class when there are
sub-folders, none is required), embeds them with ``model`` streaming to disk
(:func:`nbsrc.eval.stream.embed_to_memmap`: an interrupted build resumes where it stopped when the
same command is run again), and writes ``out_dir``:

=========================  ====================================================================
``images.json``            the listing: root, relative paths, labels, class names (written first)
``embeddings.npy``         one row per listed image (float16, l2-normalised; bad rows are zeros)
``index.faiss``            exact inner-product index (``IndexIDMap(IndexFlatIP)``) of the good rows;
                           a faiss id is a row of ``images.json``
``model.pt``, manifest     the network's weights, and in ``manifest.json`` the reference that
                           rebuilds it and the preprocessing, so searching needs no run directory
``skipped.tsv``            the report of unreadable images: ``path<TAB>reason`` (header included)
``manifest.json``          written last: a directory without it is an unfinished build
=========================  ====================================================================

Bad images follow the policy of :mod:`nbsrc.data.images` for a user's folder: they are skipped and
listed in ``skipped.tsv``, never a crash halfway. Each file is decoded once, while embedding; one
that cannot be (a wrong format, too large, a truncated JPEG) is embedded as nothing and skipped.

Nothing is overwritten: building into a finished index with the same model and the same images
just opens it; anything else in ``out_dir`` is a one-line error. A build in which no image could be
read leaves no file of its own behind (the corrected command runs); a full disk is a one-line error
that leaves no temporary file, and the same command finishes the build.

An index checks itself when opened: ``manifest.json`` and ``images.json`` must name the same model
fingerprint and preprocessing, and ``model.pt`` (read with ``weights_only``, :mod:`nbsrc.safeload`)
must be the model of that fingerprint; files edited or mixed from two indexes are a one-line error.

Search scores are inner products of l2-normalised embeddings (cosine similarity), best first;
equal scores are ordered by listing row.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nbsrc import locking
from nbsrc.data.images import describe_bad_images, image_problem, list_images, load_image
from nbsrc.errors import ConfigError, DatasetError, RunDirError
from nbsrc.eval.stream import embed_to_memmap, model_fingerprint, recorded_batch_size, sidecar_path
from nbsrc.models.fold import inference_model
from nbsrc.provenance import provenance
from nbsrc.retrieval.models import EmbeddingModel, Preprocessing, load_embedding_model, rebuild_model
from nbsrc.safeload import load_model_file
from nbsrc.train.loop import resolve_device

FORMAT = "nbsrc-index"
VERSION = 1
MANIFEST, LISTING, EMBEDDINGS, FAISS, MODEL, REPORT = (
    "manifest.json", "images.json", "embeddings.npy", "index.faiss", "model.pt", "skipped.tsv")
_PARTIAL_SKIPS = "skipped.partial.jsonl"
_ADD_ROWS = 65536
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # no space left, quota exceeded
_REBUILD = "nbsrc embed MODEL FOLDER --out NEW_DIR"


def _write_atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``; a failure removes ``tmp``, and a full disk is a
    one-line :class:`~nbsrc.errors.RunDirError` (the same command resumes the build once there is space)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            free = shutil.disk_usage(path.parent).free / 2**20
            raise RunDirError(f"disk full while writing {path} ({free:.0f} MiB free, {os.strerror(e.errno)}); free "
                              "some space and run the same nbsrc embed command again to finish the index") from e
        raise
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _write_atomic(path, lambda t: t.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n"))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"cannot read {path} ({type(e).__name__}); the index is damaged: rebuild it "
                          "with nbsrc embed into a new folder") from None


def default_batch_size(device: torch.device) -> int:
    """256 images a batch on a GPU (inference, bf16), 32 on the CPU, where larger batches did not run
    faster (docs/speed.md) and delay the first progress line."""
    return 256 if device.type == "cuda" else 32


def default_workers(device: torch.device | None = None) -> int:
    """DataLoader workers for decoding: one per CPU core beyond the first, at most 8; none when the
    model runs on a CPU of at most 2 cores, where it already keeps every core busy and a decoding
    process only takes time from it (docs/speed.md)."""
    cores = os.cpu_count() or 1
    if device is not None and device.type == "cpu" and cores <= 2:
        return 0
    return max(0, min(8, cores - 1))


# ----------------------------------------------------------------------------- listing
@dataclass
class Listing:
    """The images of an index: ``root`` (None when built from a list of paths), their paths
    relative to ``root`` (absolute otherwise), labels (-1 = no class) and class names."""

    root: Path | None
    paths: list[str]
    labels: np.ndarray
    classes: list[str]

    def path(self, row: int) -> Path:
        p = Path(self.paths[row])
        return self.root / p if self.root is not None else p

    def to_dict(self) -> dict:
        return {"root": None if self.root is None else str(self.root), "paths": self.paths,
                "labels": self.labels.tolist(), "classes": self.classes}

    @classmethod
    def from_dict(cls, d: dict) -> Listing:
        return cls(None if d["root"] is None else Path(d["root"]), list(d["paths"]),
                   np.asarray(d["labels"], dtype=np.int64), list(d["classes"]))

    @classmethod
    def of(cls, images: str | Path | Sequence[str | Path]) -> Listing:
        if isinstance(images, (str, Path)):
            from nbsrc.data.folder import folder_classes

            root = Path(images).resolve() if Path(images).is_dir() else Path(images)
            paths = list_images(root)
            if not paths:
                raise DatasetError(f"no images under {images} (looked for .jpg, .png, .tif, .webp, ... at any "
                                   "depth); pass a folder that holds images")
            labels, classes = folder_classes(root, paths)
            return cls(root, [p.relative_to(root).as_posix() for p in paths], labels, classes)
        paths = [Path(p).resolve() for p in images]
        if not paths:
            raise DatasetError("no images given; pass a folder or a non-empty list of image paths")
        return cls(None, [str(p) for p in paths], np.full(len(paths), -1, dtype=np.int64), [])


class _ListedImages(torch.utils.data.Dataset):
    """Item ``i``: ``(image tensor, i, problem)``; an image that cannot be read gives a zero image
    and its reason instead of raising. (No header check runs before: decoding each file once finds
    every problem the check would, and checking first took 8% of a build of 2,000 small PNGs.)"""

    def __init__(self, listing: Listing, transform):
        self.listing, self.transform = listing, transform

    def __len__(self) -> int:
        return len(self.listing.paths)

    def __getitem__(self, i: int):
        zero = torch.zeros(3, self.transform.size, self.transform.size)
        try:
            return self.transform(load_image(self.listing.path(i), keep_gray=True)), i, ""
        except DatasetError:
            return zero, i, image_problem(self.listing.path(i)) or "cannot decode"


# ----------------------------------------------------------------------------- results
@dataclass
class SearchResults:
    """Row ``q``: the ``k`` nearest images of query ``q``, best first. ``rows`` are rows of the
    index's listing; ``labels`` -1 when the image has no class."""

    queries: list[str]
    rows: np.ndarray  # [nq, k] int64
    scores: np.ndarray  # [nq, k] float32 cosine similarities
    paths: list[list[Path]]
    labels: np.ndarray  # [nq, k] int64
    classes: list[str]
    query_labels: np.ndarray  # [nq] int64: the query's class when it lies in a class folder of the index

    def class_name(self, label: int) -> str | None:
        return self.classes[label] if label >= 0 else None

    def lines(self) -> list[str]:
        """What ``nbsrc search`` prints: per query, its hits as ``rank. score  path  [class]``."""
        out = []
        for q, name in enumerate(self.queries):
            qc = self.class_name(int(self.query_labels[q]))
            out.append(f"query {name}" + (f"  [{qc}]" if qc else ""))
            for j, (p, s, lab) in enumerate(zip(self.paths[q], self.scores[q], self.labels[q], strict=True)):
                c = self.class_name(int(lab))
                out.append(f"  {j + 1:>3}. {s:.4f}  {p}" + (f"  [{c}]" if c else ""))
        return out

    def figure(self, query_images=None, thumbnail: int = 160, title: str | None = None):
        """The queries and their hits (:func:`nbsrc.plots.plot_retrieval_grid`), class and score
        under each hit; frames green / red when the query's class is known, neutral otherwise.
        ``query_images``: uint8 H x W x 3 arrays (default: read from the query paths)."""
        from nbsrc.plots import plot_retrieval_grid

        if query_images is None:
            query_images = [thumbnail_of(q, thumbnail) for q in self.queries]
        else:
            query_images = [_shrink(np.asarray(a), thumbnail) for a in query_images]
        hits = None
        if (self.query_labels >= 0).all():
            hits = self.labels == self.query_labels[:, None]
        titles = [[(f"{self.class_name(int(lab))}\n" if lab >= 0 else "") + f"{s:.3f}"
                   for lab, s in zip(self.labels[q], self.scores[q], strict=True)] for q in range(len(self.queries))]
        qtitles = [_short(name) + (f"\n[{self.class_name(int(lab))}]" if lab >= 0 else "")
                   for name, lab in zip(self.queries, self.query_labels, strict=True)]
        return plot_retrieval_grid(query_images, [[thumbnail_of(p, thumbnail) for p in row] for row in self.paths],
                                   hits, query_titles=qtitles, retrieved_titles=titles,
                                   title=title or f"Queries and their top {self.rows.shape[1]}")


def _short(name: str, width: int = 18) -> str:
    name = Path(name).name if ("/" in name or "\\" in name) else name
    return name if len(name) <= width else name[: width - 1] + "…"


def _shrink(a: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    im = Image.fromarray(np.ascontiguousarray(a.astype(np.uint8)))
    im.thumbnail((size, size))
    return np.asarray(im.convert("RGB"))


def thumbnail_of(path, size: int = 160) -> np.ndarray:
    """The image at ``path`` (upright RGB, :func:`nbsrc.data.images.decode_image`) shrunk to fit
    ``size`` x ``size``, as a uint8 H x W x 3 array."""
    from nbsrc.data.images import decode_image

    im = decode_image(path)
    im.thumbnail((size, size))
    return np.asarray(im)


# ----------------------------------------------------------------------------- the index
class Index:
    """An image index on disk (module docstring). Build with :meth:`build`, open with :meth:`load`."""

    def __init__(self, path: Path, manifest: dict, listing: Listing, faiss_index, device=None):
        self.path, self.manifest, self.listing, self.faiss_index = path, manifest, listing, faiss_index
        self.preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
        self.device = resolve_device(device)
        self._model: torch.nn.Module | None = None
        self._net: torch.nn.Module | None = None  # the model as queries are embedded: BatchNorm folded, as the build

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def __repr__(self) -> str:
        return (f"Index({str(self.path)!r}: {len(self)} images, {self.dim}-d, model {self.manifest['model']['spec']}, "
                f"{self.manifest['n_skipped']} skipped)")

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def classes(self) -> list[str]:
        return self.listing.classes

    @property
    def indexed_rows(self) -> np.ndarray:
        """The listing rows held by the faiss index (every image but the skipped ones), sorted."""
        import faiss

        return np.sort(faiss.vector_to_array(self.faiss_index.id_map).astype(np.int64))

    @property
    def skipped(self) -> list[tuple[Path, str]]:
        """``[(path, reason)]`` of the images left out (``skipped.tsv``)."""
        lines = (self.path / REPORT).read_text().splitlines()[1:]
        return [(Path(p), r) for p, r in (line.split("\t", 1) for line in lines if line)]

    @property
    def model(self) -> torch.nn.Module:
        """The index's own network (rebuilt from ``model.pt`` on first use), on :attr:`device`."""
        if self._model is None:
            state = load_model_file(self.path / MODEL, f"{_REBUILD} (a new folder)")
            model = rebuild_model(self.manifest["model"], state)
            if model_fingerprint(model) != self.manifest["model_fingerprint"]:
                raise RunDirError(f"{self.path / MODEL} is not the model the index was built with (fingerprint "
                                  "differs); rebuild the index")
            self._model = model.to(self.device)
        return self._model

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, model: EmbeddingModel | str | Path, images: str | Path | Sequence[str | Path],
              out_dir: str | Path, **options) -> Index:
        """:meth:`_build` (the contract) by one process at a time: it holds the lock of ``out_dir``
        (:mod:`nbsrc.locking`, ``.<name>.lock`` beside it) from before its first write to its last; a
        build into an ``out_dir`` that another live process is building stops with the one-line
        :class:`~nbsrc.errors.RunDirError` ``<out_dir> is being built by process <PID>; wait for it or
        choose another --out`` and touches nothing."""
        with locking.holding(out_dir, "built", "--out") as out:
            return cls._build(model, images, out, **options)

    @classmethod
    def _build(cls, model: EmbeddingModel | str | Path, images: str | Path | Sequence[str | Path],
               out_dir: str | Path, *, weights: str | None = None, batch_size: int | None = None,
               device: str | torch.device | None = "auto", num_workers: int | None = None,
               progress: bool = True, log=print) -> Index:
        """Embed ``images`` (a folder, listed recursively, or a list of paths) with ``model`` (an
        :class:`~nbsrc.retrieval.models.EmbeddingModel`, or a spec for
        :func:`~nbsrc.retrieval.models.load_embedding_model`: run directory, preset, timm name)
        into the index directory ``out_dir`` (module docstring) and open it.

        Interrupted, the same call resumes (rows already on disk are not recomputed). Called on a
        finished index built from the same model and images, it only opens it. ``batch_size``
        (default: :func:`default_batch_size`) and ``num_workers`` (default: :func:`default_workers`)
        change speed only; a resumed build keeps the batch size it started with.
        ``log``: where the one-line notes go (``None``: nowhere)."""
        log = log or (lambda *_: None)
        out = Path(out_dir)
        if not isinstance(model, EmbeddingModel):
            model = load_embedding_model(model, weights=weights)
        elif weights is not None:
            raise ConfigError("weights= applies to a model given by name; this EmbeddingModel has its own")
        listing = Listing.of(images)
        dev = resolve_device(device)
        if batch_size is None:  # a resumed build keeps the batch size it started with
            batch_size = recorded_batch_size(out / EMBEDDINGS) or default_batch_size(dev)
        num_workers = default_workers(dev) if num_workers is None else num_workers
        fingerprint = model_fingerprint(model.model)
        plan = {"listing": listing.to_dict(), "model_fingerprint": fingerprint,
                "preprocessing": model.preprocessing.to_dict()}
        if (out / MANIFEST).exists():
            return cls._reopen(out, plan, dev, log)
        created = not out.exists()
        cls._claim(out, plan)
        skips_path = out / _PARTIAL_SKIPS

        def record(first_row: int, batch) -> None:
            _, rows, problems = batch
            bad = [{"row": int(r), "reason": p} for r, p in zip(rows.tolist(), problems, strict=True) if p]
            if bad:
                with open(skips_path, "a") as f:
                    f.writelines(json.dumps(b) + "\n" for b in bad)

        net = model.model.to(dev)
        done = _rows_done(out)
        if done:
            log(f"resuming the index build in {out}: {done} of {len(listing.paths)} images already embedded")
        emb = embed_to_memmap(net, _ListedImages(listing, model.preprocessing.transform()),
                              out / EMBEDDINGS, batch_size=batch_size, device=dev, progress=progress,
                              num_workers=num_workers, on_batch=record)
        reasons: dict[int, str] = {}
        if skips_path.exists():
            for line in skips_path.read_text().splitlines():
                if line.strip():
                    b = json.loads(line)
                    reasons.setdefault(int(b["row"]), b["reason"])
        finite = np.ones(len(emb), dtype=bool)
        for s in range(0, len(emb), _ADD_ROWS):
            finite[s : s + _ADD_ROWS] = np.isfinite(np.asarray(emb[s : s + _ADD_ROWS], dtype=np.float32)).all(1)
        for i in np.flatnonzero(~finite):
            reasons.setdefault(int(i), "the model returned NaN or inf for this image")
        good = np.setdiff1d(np.arange(len(emb)), np.fromiter(reasons, dtype=np.int64, count=len(reasons)))
        if len(good) == 0:
            n = len(emb)
            del emb
            _remove_build(out, created)  # nothing to keep: the corrected command must find a new or empty folder
            raise DatasetError(f"none of the {n} images under {images} could be read "
                               f"({describe_bad_images(sorted((listing.path(i), r) for i, r in reasons.items()), 'it')}"
                               ")")
        index = _faiss_index(emb, good)
        _write_atomic(out / FAISS, lambda t: _faiss_write(index, t))
        _write_atomic(out / MODEL, lambda t: torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, t))
        skipped = sorted((int(i), r) for i, r in reasons.items())
        _write_atomic(out / REPORT, lambda t: t.write_text(
            "path\treason\n" + "".join(f"{listing.path(i)}\t{r}\n" for i, r in skipped)))
        manifest = {
            "format": FORMAT, "version": VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": None if listing.root is None else str(listing.root),
            "n_listed": len(listing.paths), "n_images": int(len(good)), "n_skipped": len(skipped),
            "dim": int(emb.shape[1]), "metric": "inner product of l2-normalised embeddings (cosine similarity)",
            "model": model.reference, "model_fingerprint": fingerprint,
            "preprocessing": model.preprocessing.to_dict(), "embeddings_dtype": str(emb.dtype),
            **provenance(),  # versions (torch, timm, faiss, numpy, nbsrc), git_commit, machine
        }
        _write_json(out / MANIFEST, manifest)
        skips_path.unlink(missing_ok=True)
        return cls.load(out, device=device)

    @staticmethod
    def _claim(out: Path, plan: dict) -> None:
        """Start a new build in ``out`` (empty or new) or check that an unfinished one is this build."""
        listing_path = out / LISTING
        if listing_path.exists():
            saved = _read_json(listing_path)
            for key, what in (("listing", "images (the folder changed since)"),
                              ("model_fingerprint", "model weights"), ("preprocessing", "preprocessing")):
                if saved.get(key) != plan[key]:
                    raise RunDirError(f"{out} holds an unfinished index build with other {what}; run the original "
                                      f"command again to finish it, or choose another --out")
            return
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            what = "a file" if not out.is_dir() else "a folder that is not empty and not an index"
            raise RunDirError(f"{out} is {what}; choose a new or empty folder for the index (nothing is overwritten)")
        out.mkdir(parents=True, exist_ok=True)
        _write_json(listing_path, plan)

    @classmethod
    def _reopen(cls, out: Path, plan: dict, device, log) -> Index:
        index = cls.load(out, device=device)
        saved = _read_json(out / LISTING)
        if saved.get("listing") != plan["listing"] or index.manifest["model_fingerprint"] != plan["model_fingerprint"] \
                or saved.get("preprocessing") != plan["preprocessing"]:
            raise RunDirError(f"{out} already holds an index of other images or another model; choose another "
                              "--out (nothing is overwritten)")
        log(f"{out} already holds this index (same model, same images); nothing to do")
        return index

    # ------------------------------------------------------------------ load
    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = "auto") -> Index:
        """Open an index directory written by :meth:`build`; a directory that is not one, or whose
        build did not finish, is a one-line :class:`~nbsrc.errors.RunDirError`."""
        import faiss

        path = Path(path)
        if not path.is_dir():
            raise RunDirError(f"{path} is not an index directory (it does not exist); build one with "
                              "python -m nbsrc embed MODEL FOLDER --out DIR")
        if not (path / MANIFEST).exists():
            if (path / LISTING).exists():
                raise RunDirError(f"the index build in {path} did not finish (no {MANIFEST}); run the same "
                                  "nbsrc embed command again to resume it")
            raise RunDirError(f"{path} is not an index directory (no {MANIFEST}); build one with "
                              "python -m nbsrc embed MODEL FOLDER --out DIR")
        manifest = _read_json(path / MANIFEST)
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise RunDirError(f"{path / MANIFEST} is not an {FORMAT} version {VERSION} manifest; rebuild the index")
        missing = [f for f in (LISTING, FAISS, MODEL, REPORT) if not (path / f).exists()]
        if missing:
            raise RunDirError(f"index {path} is incomplete (missing {', '.join(missing)}); "
                              "rebuild it into a new folder")
        saved = _read_json(path / LISTING)
        for key, what in (("model_fingerprint", "model fingerprint"), ("preprocessing", "preprocessing")):
            if saved.get(key) != manifest.get(key):
                raise RunDirError(f"{path / MANIFEST} and {path / LISTING} name different {what}s: the index's files "
                                  f"were edited or come from two builds; rebuild it with {_REBUILD} (a new folder)")
        listing = Listing.from_dict(saved["listing"])
        if len(listing.paths) != manifest.get("n_listed"):
            raise RunDirError(f"{path / MANIFEST} counts {manifest.get('n_listed')} images, {path / LISTING} "
                              f"lists {len(listing.paths)}: the index's files come from two builds; rebuild it with "
                              f"{_REBUILD} (a new folder)")
        try:
            index = faiss.read_index(str(path / FAISS))
        except RuntimeError:
            raise RunDirError(f"cannot read {path / FAISS}: the file is damaged; rebuild the index") from None
        if index.ntotal != manifest["n_images"] or index.d != manifest["dim"]:
            raise RunDirError(f"{path / FAISS} holds {index.ntotal} vectors of dimension {index.d} but the manifest "
                              f"says {manifest['n_images']} of {manifest['dim']}; rebuild the index")
        return cls(path, manifest, listing, index, device)

    # ------------------------------------------------------------------ search
    @torch.inference_mode()
    def embed(self, images, batch_size: int = 32) -> np.ndarray:
        """float32 ``[n, dim]`` embeddings of ``images`` (paths, PIL images, uint8 arrays/tensors
        ``H x W x 3`` or ``3 x H x W``, or encoded bytes) with the index's model and preprocessing,
        its BatchNorms folded as when the index was built (:mod:`nbsrc.models.fold`)."""
        tf = self.preprocessing.transform()
        tensors = [tf(_as_tensor(x)) for x in images]
        out = []
        for s in range(0, len(tensors), batch_size):
            x = torch.stack(tensors[s : s + batch_size]).to(self.device)
            if self._net is None:  # folded once, on the first query batch
                self._net = inference_model(self.model.eval(), x[:2])
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                out.append(self._net(x).float().cpu())
        return torch.cat(out).numpy()

    def search(self, images, k: int = 10, model: torch.nn.Module | None = None) -> SearchResults:
        """The ``k`` nearest indexed images of each of ``images`` (see :meth:`embed`; one image or
        a list), best first; ``k`` is capped at the index size. ``model``: only to check that it is
        the index's own (a different one is a one-line error); the index always embeds with its own."""
        from PIL import Image

        if isinstance(images, (str, Path, bytes, Image.Image)) or (hasattr(images, "ndim") and images.ndim == 3):
            images = [images]
        images = list(images)
        if not images:
            raise ConfigError("no query images given; pass one or more image paths")
        if model is not None and model_fingerprint(model) != self.manifest["model_fingerprint"]:
            raise ConfigError(f"this model is not the one index {self.path} was built with "
                              f"({self.manifest['model']['spec']}); search with the index's own model (model=None) "
                              "or rebuild the index with nbsrc embed")
        names = [_query_name(x, i) for i, x in enumerate(images)]
        return self.search_embeddings(self.embed(images), k, names, [_query_label(self.listing, x) for x in images])

    def search_embeddings(self, embeddings: np.ndarray, k: int = 10, names: Sequence[str] | None = None,
                          query_labels: Sequence[int] | None = None) -> SearchResults:
        """:meth:`search` for embeddings already computed (with this index's model)."""
        z = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ConfigError(f"query embeddings of shape {z.shape} do not fit index {self.path} ({self.dim}-d, "
                              f"model {self.manifest['model']['spec']}); embed the queries with the index's model")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k={k!r} is invalid: expected the number of results per query, an integer >= 1")
        k = min(int(k), len(self))
        scores, rows = self.faiss_index.search(z, k)
        order = np.lexsort((rows, -scores), axis=-1)  # best first, equal scores by listing row
        scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
        names = list(names) if names is not None else [f"query {i}" for i in range(len(z))]
        ql = np.asarray(query_labels if query_labels is not None else [-1] * len(z), dtype=np.int64)
        return SearchResults(names, rows.astype(np.int64), scores.astype(np.float32),
                             [[self.listing.path(int(r)) for r in row] for row in rows],
                             self.listing.labels[rows], self.listing.classes, ql)


def search_image(index: Index, image, k: int = 8, name: str | None = None, thumbnail: int = 160):
    """One query (a path, encoded bytes such as an upload, a PIL image or a uint8 array) searched in
    ``index``: ``(SearchResults, figure of the query and its top k)``. What the notebook's
    "query with your own image" widget shows."""
    results = index.search([image], k)
    if name is not None:
        results.queries = [name]
    shown = thumbnail_of(image, thumbnail) if isinstance(image, (str, Path)) else _shrink(
        np.asarray(_as_tensor(image)), thumbnail)
    return results, results.figure([shown], thumbnail=thumbnail)


def _faiss_index(emb: np.ndarray, good: np.ndarray):
    import faiss

    index = faiss.IndexIDMap(faiss.IndexFlatIP(int(emb.shape[1])))
    for s in range(0, len(good), _ADD_ROWS):
        rows = good[s : s + _ADD_ROWS]
        index.add_with_ids(np.ascontiguousarray(np.asarray(emb[rows], dtype=np.float32)), rows.astype(np.int64))
    return index


def _faiss_write(index, path: Path) -> None:
    import faiss

    faiss.write_index(index, str(path))


def _remove_build(out: Path, created: bool) -> None:
    """Remove the files of an unfinished build from ``out`` (and ``out`` itself when the build created it)."""
    for name in (LISTING, EMBEDDINGS, sidecar_path(out / EMBEDDINGS).name, _PARTIAL_SKIPS):
        (out / name).unlink(missing_ok=True)
        (out / (name + ".tmp")).unlink(missing_ok=True)
    if created and not any(out.iterdir()):
        out.rmdir()


def _rows_done(out: Path) -> int:
    side = sidecar_path(out / EMBEDDINGS)
    try:
        return int(json.loads(side.read_text()).get("rows_done", 0)) if side.exists() else 0
    except (OSError, ValueError):
        return 0


def _as_tensor(x) -> torch.Tensor:
    import io

    if isinstance(x, (str, Path)):
        if not Path(x).is_file():
            raise DatasetError(f"query image {x} does not exist or is not a file; check the path")
        return load_image(x)
    if isinstance(x, (bytes, bytearray, memoryview)):
        return load_image(io.BytesIO(bytes(x)), name="the uploaded image")
    from PIL import Image

    if isinstance(x, Image.Image):
        from nbsrc.data.images import to_rgb

        return torch.from_numpy(np.asarray(to_rgb(x), dtype=np.uint8).copy()).permute(2, 0, 1)
    t = torch.as_tensor(np.asarray(x))
    if t.dtype != torch.uint8:
        raise ConfigError(f"a query image array must be uint8 (0-255), got {t.dtype}")
    if t.ndim == 2:
        return t.unsqueeze(0).expand(3, -1, -1)
    if t.ndim == 3 and t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3, 4):
        t = t.permute(2, 0, 1)
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
        raise ConfigError(f"a query image array must be H x W, H x W x 3 or 3 x H x W, got shape {tuple(t.shape)}")
    return t.expand(3, -1, -1) if t.shape[0] == 1 else t[:3]


def _query_name(x, i: int) -> str:
    if isinstance(x, (str, Path)):
        return str(x)
    return getattr(x, "filename", None) or f"query {i}"


def _query_label(listing: Listing, x) -> int:
    """The class of a query that lies in a class folder of the indexed folder, else -1."""
    if listing.root is None or not isinstance(x, (str, Path)):
        return -1
    try:
        parts = Path(x).resolve().relative_to(listing.root).parts
    except ValueError:
        return -1
    return listing.classes.index(parts[0]) if len(parts) > 1 and parts[0] in listing.classes else -1
