"""The evaluators: what a run measures at the end (and, optionally, during training).

:data:`EVALUATORS` maps a name to a builder ``(cfg, EvalInputs) -> Evaluator`` (like the loss and pooling
registries); ``cfg.eval.evaluator`` picks one, None the dataset's own (``nbsrc.data.DATASETS[name].evaluator``):
``"recall"``, Recall@K on the test classes (:func:`nbsrc.eval.evaluate`), for datasets of classes, and
``"revisited"``, the mAP / mP@k of Revisited Oxford and Paris in the Easy, Medium and Hard setups
(:mod:`nbsrc.eval.revisited_map`, found beside ``cfg.data.data_root``: :func:`find_revisited_root`), and of the
original Oxford 5k and Paris 6k protocol where its ground truth is found (the Oxf5k and Par6k columns of DToP's
tables), for SfM-120k. A new evaluator is one function and one line in :data:`EVALUATORS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nbsrc.config import ExperimentConfig
from nbsrc.data import RetrievalData, dataset_spec
from nbsrc.data.oxford_paris import ORIGINAL_GND_URL, ORIGINAL_NAMES, TWIN
from nbsrc.data.sfm import SfMSplit
from nbsrc.data.transforms import RetrievalTransform, aspect_kept_transform, particular_object_transform
from nbsrc.errors import ConfigError, DatasetError
from nbsrc.eval.particular import SINGLE_SCALE, evaluate_revisited_data, learn_sfm_whitening
from nbsrc.eval.recall_eval import evaluate, extract_embeddings, recall_percent
from nbsrc.eval.revisited_map import REVISITED_LAYOUT, REVISITED_NAMES, build_revisited

KAPPAS = (1, 5, 10)  # mP@k of the Revisited protocol


def particular_eval_transform(cfg: ExperimentConfig, norm: dict) -> RetrievalTransform:
    """The test geometry of a particular-object (SfM-120k) run, for Revisited Oxford / Paris, the learned
    whitening and the PCA: IRT's square of side ``img_size`` (IRT §4.2,
    :func:`~nbsrc.data.transforms.particular_object_transform`); for a DToP run (``cfg.model.dtop``) the
    longer side ``img_size`` with the aspect ratio kept (our reading, as group-size sampling trains and
    [52] tests; :func:`~nbsrc.data.transforms.aspect_kept_transform`, docs/fidelity.md)."""
    make = aspect_kept_transform if cfg.model.dtop is not None else particular_object_transform
    return make(cfg.data.img_size, norm["mean"], norm["std"])


Evaluation = tuple[dict, dict[str, np.ndarray]]  # (results, embeddings to save)


def recall_evaluation(model: torch.nn.Module, data: RetrievalData, cfg: ExperimentConfig, device,
                      query_raw: np.ndarray | None = None) -> Evaluation:
    """Recall@K (%) of the test classes (:func:`nbsrc.eval.evaluate`), and the query (and gallery)
    embeddings with their labels and indices; ``query_raw``: the queries before the PCA."""
    bs, workers, progress = cfg.eval.eval_batch_size, cfg.run.num_workers, cfg.run.progress
    q, ql, qi = extract_embeddings(model, data.query, bs, device, workers, progress)  # once: scored and saved
    arrays = {"query": q, "query_labels": ql, "query_indices": qi}
    if query_raw is not None:
        arrays["query_raw"] = query_raw
    g = gl = None
    if data.gallery is not None:
        g, gl, gi = extract_embeddings(model, data.gallery, bs, device, workers, progress)
        arrays.update(gallery=g, gallery_labels=gl, gallery_indices=gi)
    results = recall_percent(q, ql, cfg.eval.ks, g, gl)
    print(f"{cfg.run.name}: " + "  ".join(f"{k}={v:.2f}" for k, v in results.items() if k.startswith("R@")))
    return {**results, "n_query": int(len(q))}, arrays


def evaluate_revisited(model: torch.nn.Module, root, eval_tf, cfg: ExperimentConfig, device,
                       name: str | None = None, whitening=None, scales=None,
                       query_scales=None) -> tuple[str, dict, dict[str, np.ndarray]]:
    """``(name, {"easy"|"medium"|"hard": {"mAP", "mP@1", "mP@5", "mP@10"}}, embeddings)`` of the
    revisited dataset under ``root`` (percent; ``{"mAP", ...}`` for the original ``oxford5k`` /
    ``paris6k``): the query, cropped to its box, ranks the database by decreasing ``<f(q), f(x)>``, the
    database at ``scales`` and the queries at ``query_scales`` (None: ``cfg.eval.eval_scales``, and the
    database's; DToP Table A11) with ``whitening`` (DToP; :func:`nbsrc.eval.particular.evaluate_revisited_data`)."""
    data = build_revisited(root, name, eval_tf)
    scales = scales or cfg.eval.eval_scales or SINGLE_SCALE
    res, emb = evaluate_revisited_data(model, data, scales, query_scales=query_scales, whitening=whitening,
                                       batch_size=cfg.eval.eval_batch_size, device=device, kappas=KAPPAS,
                                       num_workers=cfg.run.num_workers)
    return data.name, res, emb


def revisited_evaluation(model: torch.nn.Module, roots: dict[str, Path], eval_tf, cfg: ExperimentConfig,
                         device, db: SfMSplit | None = None, scales=None, query_scales=None,
                         whitening=None) -> Evaluation:
    """:func:`evaluate_revisited` on each dataset of ``roots``: ``{name: {setup: {metric: %}}}`` (the
    original protocol's ``{name: {metric: %}}``), the database at ``scales`` and the queries at
    ``query_scales`` (None: ``cfg.eval.eval_scales``). With ``cfg.eval.whitening == "learned"`` the
    whitening is first learned from the matching pairs of ``db`` (SfM-120k training; DToP §A.1,
    Radenović et al.), after the PCA, at ``cfg.eval.eval_scales`` (the multi-scale features) and with
    ``eval_tf``; ``whitening``: one learned before (``(m, P)``), used instead."""
    if whitening is None and cfg.eval.whitening == "learned":
        whitening = learn_sfm_whitening(model, db, eval_tf, cfg.eval.eval_scales or SINGLE_SCALE,
                                        cfg.eval.eval_batch_size, device)
    results, arrays = {}, {}
    for name, root in roots.items():
        name, res, emb = evaluate_revisited(model, root, eval_tf, cfg, device, name, whitening, scales, query_scales)
        results[name] = res
        arrays.update({f"{name}_{k}": v for k, v in emb.items()})
        if name in ORIGINAL_NAMES:
            print(f"{cfg.run.name} {name}: mAP {res['mAP']:.2f}")
        else:
            print(f"{cfg.run.name} {name}: mAP M {res['medium']['mAP']:.2f}  H {res['hard']['mAP']:.2f}")
    return results, arrays


# ----------------------------------------------------------------------------- the evaluator registry
@dataclass
class EvalInputs:
    """What an evaluator is built from: the model's input normalisation, the device, and what the
    dataset provides (a builder takes what it needs and says, in one line, what is missing)."""

    norm: dict  # the model's input mean and std (nbsrc.models.data_config)
    device: torch.device
    data: RetrievalData | None = None  # datasets of classes: train, query and gallery splits
    sfm: SfMSplit | None = None  # SfM-120k's training split (the learned whitening's pairs)
    roots: dict[str, Path | None] = field(default_factory=dict)  # Revisited folders given to run_experiment


@dataclass
class Evaluator:
    """The final evaluation of a run (``evaluate(model, device, query_raw) -> (results, embeddings)``)
    and, optionally, the one logged during training every ``cfg.eval.eval_every`` steps."""

    evaluate: Callable[[torch.nn.Module, torch.device, np.ndarray | None], Evaluation]
    during: Callable[[torch.nn.Module], dict] | None = None


def recall_evaluator(cfg: ExperimentConfig, inputs: EvalInputs) -> Evaluator:
    """Recall@K (%) of the test classes (:func:`recall_evaluation`), also during training."""
    data = inputs.data
    if data is None:
        raise ConfigError(f"evaluator='recall' needs a dataset of classes (query and gallery of the test classes); "
                          f"dataset={cfg.data.dataset!r} has none: use evaluator='revisited' or None")

    def during(m):
        return evaluate(m, data, cfg.eval.ks, cfg.eval.eval_batch_size, inputs.device, progress=False)

    return Evaluator(lambda m, dev, q_raw: recall_evaluation(m, data, cfg, dev, q_raw), during)


def revisited_roots(cfg: ExperimentConfig, given: dict) -> dict[str, Path]:
    """The folders of the datasets a particular-object run is evaluated on (see :func:`revisited_evaluator`):
    ``given`` (``{name: folder or None}``), else found beside ``cfg.data.data_root``."""
    given = {n: given.get(n) for n in REVISITED_NAMES + ORIGINAL_NAMES}
    roots = {n: Path(r) if r is not None else find_revisited_root(cfg.data.data_root, n) for n, r in given.items()}
    for name, twin in TWIN.items():
        if roots[name] is None and roots[twin] is not None and (roots[twin] / f"gnd_{name}.pkl").is_file():
            roots[name] = roots[twin]
    absent = [n for n in ORIGINAL_NAMES if roots[n] is None]
    roots = {n: r for n, r in roots.items() if r is not None}
    if absent and cfg.model.dtop is not None and any(n in roots for n in REVISITED_NAMES):
        print(f"{cfg.run.name}: no {', '.join(absent)} column (DToP's Oxf5k / Par6k): download "
              + "; ".join(f"{ORIGINAL_GND_URL.replace('<name>', n)} into {roots.get(TWIN[n], f'the {TWIN[n]} folder')}"
                          for n in absent))
    if not roots:
        raise DatasetError(
            f"no Revisited dataset to evaluate on: pass roxford_root= and/or rparis_root= (oxford_root=, paris_root=), "
            f"or put {' / '.join(REVISITED_NAMES)} beside data_root={cfg.data.data_root!r}; {REVISITED_LAYOUT}"
        )
    return roots


def revisited_evaluator(cfg: ExperimentConfig, inputs: EvalInputs) -> Evaluator:
    """mAP and mP@k of Revisited Oxford and Paris, and of the original Oxford 5k and Paris 6k protocol
    (:func:`revisited_evaluation`). The datasets are the
    folders given (``roxford_root`` / ``rparis_root`` / ``oxford_root`` / ``paris_root``), else those found
    beside ``cfg.data.data_root`` (:func:`find_revisited_root`); ``gnd_oxford5k.pkl`` / ``gnd_paris6k.pkl``
    are also looked for in the revisited twin's folder (the same images). At least one dataset
    must be found; a DToP run without the original ground truth says in one line what to download. The
    images are prepared by :func:`particular_eval_transform` (IRT: squashed square; DToP: aspect kept)."""
    roots = revisited_roots(cfg, inputs.roots)
    if cfg.eval.whitening == "learned" and inputs.sfm is None:
        raise ConfigError(f"whitening='learned' is learned from SfM-120k's training pairs, which "
                          f"dataset={cfg.data.dataset!r} has not: train on sfm120k, or set whitening=None")
    eval_tf = particular_eval_transform(cfg, inputs.norm)
    return Evaluator(lambda m, dev, q_raw: revisited_evaluation(m, roots, eval_tf, cfg, dev, inputs.sfm))


# name -> builder(cfg, EvalInputs) -> Evaluator; ``cfg.eval.evaluator`` picks one (None: the dataset's own,
# nbsrc.data.DATASETS[name].evaluator). A new evaluator is one function and one line here.
EVALUATORS: dict[str, Callable[[ExperimentConfig, EvalInputs], Evaluator]] = {
    "recall": recall_evaluator,  # Recall@K of the test classes (IRT Tables 2-4, 9)
    "revisited": revisited_evaluator,  # (Revisited) Oxford / Paris mAP, mP@k (IRT Tables 7-8; DToP A5, A7-A13)
}


def evaluator_name(cfg: ExperimentConfig) -> str:
    """``cfg.eval.evaluator``, or the dataset's own (:class:`nbsrc.data.DatasetSpec`) when it is None."""
    return cfg.eval.evaluator or dataset_spec(cfg.data.dataset).evaluator


def evaluator_builder(name: str) -> Callable[[ExperimentConfig, EvalInputs], Evaluator]:
    """The builder registered as ``name`` in :data:`EVALUATORS`; an unknown name is a one-line error."""
    if name not in EVALUATORS:
        raise ConfigError(f"evaluator={name!r} is invalid: expected one of {', '.join(EVALUATORS)} "
                          "(nbsrc.eval.evaluators.EVALUATORS), or None for the dataset's own")
    return EVALUATORS[name]


def find_revisited_root(data_root, name: str) -> Path | None:
    """``<name>`` beside the SfM-120k folder, or cirtorch's ``data/test/<name>`` when the SfM-120k
    folder is ``data/train/retrieval-SfM-120k``; None when neither holds ``gnd_<name>.pkl``."""
    if data_root is None:
        return None
    base = Path(data_root).expanduser()
    base = base.parent if base.suffix == ".pkl" else base
    for cand in (base / name, base.parent / name, base.parent.parent / "test" / name):
        if (cand / f"gnd_{name}.pkl").is_file():
            return cand
    return None
