"""Particular-object evaluation on Revisited Oxford / Paris, with DToP's additions as arguments.

IRT §4.2: "all the query and database images are resized into a square image with the same
resolution as used during the finetuning stage" (the transform is the caller's:
:func:`~nbsrc.data.transforms.particular_object_transform`), queries cropped to their box.

DToP (Tables A5, A7, A11): "applying supervised whitening [52] on multi-scale features [52]";
"a multi-scale image representation with 3 scales at inference by computing the output features
(12) for each scale of the input image and averaging the features over scales ... on both queries
and database". So, for scales ``S`` (``(1, 1/√2, 1/2)``) and a whitening ``(m, P)`` learned
from SfM-120k's matching pairs (Radenović et al.; :func:`learn_sfm_whitening`)::

    f(x) = normalize( P (normalize(Σ_{s∈S} f_s(x)) − m) )        (whitening None: no P, no m)

and the database is ranked by ``<f(q), f(x)>``; mAP and mP@k of the Easy / Medium / Hard setups
(:func:`~nbsrc.eval.revisited_map.revisited_map`). With ``scales=(1,)`` and no whitening this is the
plain IRT evaluation, embedding for embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from nbsrc.data.group_sampler import image_sizes
from nbsrc.data.oxford_paris import RevisitedData
from nbsrc.data.transforms import longer_side_size
from nbsrc.errors import ConfigError
from nbsrc.eval.multiscale import DEFAULT_SCALES, MultiScaleModel
from nbsrc.eval.recall_eval import extract_embeddings
from nbsrc.eval.revisited_map import protocol_map
from nbsrc.eval.whitening import apply_whitening, learn_whitening

SINGLE_SCALE = (1.0,)
__all__ = ["DEFAULT_SCALES", "SINGLE_SCALE", "embed_at_scales", "learn_sfm_whitening", "evaluate_revisited_data"]


def embed_at_scales(model: torch.nn.Module, dataset, scales: Sequence[float] = SINGLE_SCALE, batch_size: int = 256,
                    device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = False) -> np.ndarray:
    """``[len(dataset), D]`` float32 embeddings, averaged over ``scales`` and re-normalised
    (:func:`~nbsrc.eval.multiscale.multiscale_embed`); ``scales=(1,)`` is the model itself.

    A dataset whose transform keeps the aspect ratio (``keep_aspect``, DToP's test geometry) gives images
    of several sizes: the images of one size (known from the file headers, or the dataset's ``sizes()``)
    are embedded together, in batches of ``batch_size``, and the rows put back in the dataset's order."""
    scales = tuple(float(s) for s in scales)
    net = model if scales == SINGLE_SCALE else MultiScaleModel(model, scales)
    tf = dataset.transform
    if not (getattr(tf, "keep_aspect", False) and getattr(tf, "resize", True)):
        z, _, _ = extract_embeddings(net, dataset, batch_size, device, num_workers, progress)
        return z
    sizes = dataset.sizes() if hasattr(dataset, "sizes") else image_sizes(dataset)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        groups.setdefault(longer_side_size(h, w, tf.size), []).append(i)
    z = None
    for rows in groups.values():
        zi, _, _ = extract_embeddings(net, dataset.subset(np.asarray(rows)), batch_size, device, num_workers, progress)
        if z is None:
            z = np.empty((len(dataset), zi.shape[1]), dtype=np.float32)
        z[rows] = zi
    return z


def learn_sfm_whitening(model: torch.nn.Module, db, transform, scales: Sequence[float] = SINGLE_SCALE,
                        batch_size: int = 256, device: str | torch.device = "cpu", max_pairs: int | None = None,
                        seed: int = 0, shrinkage: float = 0.0, num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Supervised whitening ``(m, P)`` (:func:`~nbsrc.eval.whitening.learn_whitening`) from the
    matching pairs ``(qidxs[j], pidxs[j])`` of an SfM-120k split ``db``
    (:class:`~nbsrc.data.sfm.SfMSplit`), each image embedded once with ``transform`` at ``scales``.

    ``max_pairs`` keeps a random subset of the pairs (drawn from ``seed``; None: all). Learning
    needs more pairs than descriptor dimensions unless ``shrinkage > 0``.
    """
    q, p = np.asarray(db.qidxs, dtype=np.int64), np.asarray(db.pidxs, dtype=np.int64)
    if max_pairs is not None:
        if max_pairs < 1:
            raise ConfigError(f"max_pairs={max_pairs} must be a positive number of pairs, or None for all")
        keep = np.sort(np.random.default_rng([seed, 17]).permutation(len(q))[:max_pairs])
        q, p = q[keep], p[keep]
    used = np.unique(np.concatenate([q, p]))
    x = embed_at_scales(model, db.images(transform).subset(used), scales, batch_size, device, num_workers)
    pos = np.searchsorted(used, np.arange(len(db)))  # image index -> row of x (for the used ones)
    return learn_whitening(x, pos[q], pos[p], shrinkage=shrinkage)


def evaluate_revisited_data(model: torch.nn.Module, data: RevisitedData, scales: Sequence[float] = SINGLE_SCALE,
                            query_scales: Sequence[float] | None = None, whitening=None,
                            whitening_dim: int | None = None, batch_size: int = 256,
                            device: str | torch.device = "cpu", kappas=(1, 5, 10),
                            num_workers: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """``({"easy"|"medium"|"hard": {"mAP", "mP@1", ...}}, {"query": q, "database": x})`` on a
    :class:`~nbsrc.data.oxford_paris.RevisitedData`, in percent; for ``oxford5k`` / ``paris6k`` (the
    original protocol) the results are ``{"mAP", "mP@1", ...}`` (:func:`~nbsrc.eval.revisited_map.protocol_map`).

    ``scales``: the database's (and, unless ``query_scales`` is given, the queries') scales (DToP:
    ``DEFAULT_SCALES`` on both sides, Table A11). ``whitening``: ``(m, P)`` of
    :func:`learn_sfm_whitening` (or None), applied to both sides, keeping ``whitening_dim`` rows.
    """
    query_scales = scales if query_scales is None else query_scales
    q = embed_at_scales(model, data.query, query_scales, batch_size, device, num_workers)
    x = embed_at_scales(model, data.database, scales, batch_size, device, num_workers)
    if whitening is not None:
        m, p = whitening
        q, x = apply_whitening(q, m, p, whitening_dim), apply_whitening(x, m, p, whitening_dim)
    scores = q.astype(np.float64) @ x.astype(np.float64).T
    return protocol_map(data.name, scores, data.gnd, kappas), {"query": q, "database": x}
