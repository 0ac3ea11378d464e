"""IRT §4.2 end to end: train on SfM-120k tuples, fit the PCA on SfM-120k, evaluate on Revisited
Oxford and Paris (IRT Tables 7-8; DToP Table A5).

:func:`run_sfm_experiment` is what :func:`nbsrc.experiment.run_experiment` calls for
``cfg.dataset == "sfm120k"``. It reads ``retrieval-SfM-120k.pkl`` and ``ims/`` from
``cfg.data_root`` and trains (unless ``cfg.iterations == 0``: the off-the-shelf model) in one of
two ways, ``cfg.sfm_training``:

- ``"tuples"`` (IRT): :func:`nbsrc.train.tuples.train_tuples`, tuples with hard negatives mined by
  the current model, contrastive loss;
- ``"classes"`` (DToP): every training image labelled by its 3D model (cluster), trained by the
  ordinary loop :func:`nbsrc.train.train` with any loss of the config (ArcFace for DToP), the
  m-per-class or group-size sampler and the cross-batch memory as configured.

It then fits the PCA to ``cfg.dim`` (paper: 128) on
embeddings of (a fixed subset of) the SfM-120k training images, and evaluates each Revisited
dataset with the protocol of :mod:`nbsrc.eval.revisited`: the query, cropped to its box, ranks the
database by decreasing ``<f(q), f(x)>``; mAP and mP@{1, 5, 10} in the Easy, Medium and Hard setups.
Images are resized to an ``img_size`` square, nothing cropped (IRT §4.2:
:func:`~nbsrc.data.transforms.particular_object_transform`). ``results.json`` holds ``{"roxford5k": {"easy": {"mAP": .., "mP@1": ..}, "medium":
.., "hard": ..}, "rparis6k": ...}`` in percent.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch

from nbsrc.config import ExperimentConfig
from nbsrc.data.datasets import RetrievalDataset
from nbsrc.data.sfm import SfMSplit, load_sfm120k_db
from nbsrc.data.transforms import RetrievalTransform, particular_object_transform
from nbsrc.errors import DatasetError
from nbsrc.eval.embed import extract_embeddings
from nbsrc.eval.particular import SINGLE_SCALE, evaluate_revisited_data, learn_sfm_whitening
from nbsrc.eval.revisited import REVISITED_LAYOUT, REVISITED_NAMES, build_revisited
from nbsrc.experiment import (EMBEDDINGS, MODEL, PCA_FIT_SAMPLES, RunResult, load_run, prepare_run_on_rank0,
                              seeded_model)
from nbsrc.train import distributed, prepare_run_dir, resolve_device, run_state, train
from nbsrc.train.rundir import RESULTS, write_json_atomic
from nbsrc.train.tuples import train_tuples

KAPPAS = (1, 5, 10)


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


def class_dataset(db: SfMSplit, transform) -> RetrievalDataset:
    """The training images of ``db`` labelled by their 3D model, for ``sfm_training="classes"``; a 3D
    model with a single image cannot give a positive pair and is left out."""
    ids, counts = np.unique(db.cluster, return_counts=True)
    keep = np.flatnonzero(np.isin(db.cluster, ids[counts >= 2]))
    if len(np.unique(db.cluster[keep])) < 2:
        raise DatasetError(
            f"SfM-120k training split has {len(np.unique(db.cluster[keep]))} 3D model(s) with at least 2 images; "
            "class training needs 2 or more: check retrieval-SfM-120k.pkl"
        )
    return db.images(transform).subset(keep)


def fit_pca_sfm(model: torch.nn.Module, db: SfMSplit, eval_tf, cfg: ExperimentConfig, device) -> None:
    """Fit the model's PCA (IRT ▷dim) on embeddings of up to ``PCA_FIT_SAMPLES`` SfM-120k training
    images, a subset drawn from ``cfg.seed``."""
    n = min(PCA_FIT_SAMPLES, len(db))
    keep = np.sort(np.random.default_rng([cfg.seed, 128]).permutation(len(db))[:n])
    z, _, _ = extract_embeddings(model, db.images(eval_tf).subset(keep), cfg.eval_batch_size, device,
                                 cfg.num_workers, progress=cfg.progress)
    model.pca.fit(z)


def evaluate_revisited(model: torch.nn.Module, root, eval_tf, cfg: ExperimentConfig, device,
                       name: str | None = None, whitening=None) -> tuple[str, dict, dict[str, np.ndarray]]:
    """``(name, {"easy"|"medium"|"hard": {"mAP", "mP@1", "mP@5", "mP@10"}}, embeddings)`` of the
    revisited dataset under ``root`` (percent), at ``cfg.eval_scales`` with ``whitening`` (DToP;
    :func:`nbsrc.eval.particular.evaluate_revisited_data`)."""
    data = build_revisited(root, name, eval_tf)
    res, emb = evaluate_revisited_data(model, data, cfg.eval_scales or SINGLE_SCALE, whitening=whitening,
                                       batch_size=cfg.eval_batch_size, device=device, kappas=KAPPAS,
                                       num_workers=cfg.num_workers)
    return data.name, res, emb


def run_sfm_experiment(cfg: ExperimentConfig, mode: str = "reuse", roxford_root=None, rparis_root=None,
                       stop_after: int | None = None) -> RunResult:
    """Train on SfM-120k tuples, fit the PCA on SfM-120k, evaluate on Revisited Oxford / Paris.

    ``roxford_root`` / ``rparis_root``: the folders holding ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl``
    and ``jpg/``; None looks beside ``cfg.data_root`` (:func:`find_revisited_root`) and skips a dataset
    that is not there; at least one must be found. ``mode`` as in
    :func:`nbsrc.experiment.run_experiment`. ``stop_after`` ends training early (no evaluation).
    """
    cfg.validate()
    dinfo = distributed.current()
    if mode == "reuse" and run_state(cfg.run_dir) == "done":  # a finished run needs no data
        prepare_run_dir(cfg, mode)  # checks that the saved config is the same
        print(f"reusing finished run {cfg.run_dir} (same config); nothing retrained")
        return load_run(cfg.run_dir)
    db = load_sfm120k_db(cfg.data_root, "train")  # first: a wrong data_root is named as such
    roots = {"roxford5k": roxford_root, "rparis6k": rparis_root}
    roots = {n: Path(r) if r is not None else find_revisited_root(cfg.data_root, n) for n, r in roots.items()}
    roots = {n: r for n, r in roots.items() if r is not None}
    if not roots:
        raise DatasetError(
            f"no Revisited dataset to evaluate on: pass roxford_root= and/or rparis_root=, or put "
            f"{' / '.join(REVISITED_NAMES)} beside data_root={cfg.data_root!r}; {REVISITED_LAYOUT}"
        )
    run_dir, action = prepare_run_on_rank0(cfg, mode)
    if action == "reuse":
        return load_run(run_dir)
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    model, norm = seeded_model(cfg)
    eval_tf = particular_object_transform(cfg.img_size, norm["mean"], norm["std"])  # IRT §4.2: squashed square
    if cfg.iterations > 0:
        if cfg.sfm_training == "classes":
            train_tf = RetrievalTransform(cfg.img_size, train=True, mean=norm["mean"], std=norm["std"])
            train(cfg, model, class_dataset(db, train_tf), run_dir, resume=action == "resume", stop_after=stop_after)
        else:
            train_tuples(cfg, model, db, run_dir, resume=action == "resume", progress=cfg.progress,
                         stop_after=stop_after)
        if stop_after is not None and stop_after < cfg.iterations:
            return RunResult(cfg, run_dir, {}, model=model)
    if not dinfo.is_main:  # PCA, evaluation and the run's files are rank 0's
        distributed.barrier()
        return RunResult(cfg, run_dir, {}, model=model)
    model.to(device).eval()
    if cfg.dim:
        fit_pca_sfm(model, db, eval_tf, cfg, device)
    whiten = (learn_sfm_whitening(model, db, eval_tf, cfg.eval_scales or SINGLE_SCALE, cfg.eval_batch_size, device)
              if cfg.whitening == "learned" else None)  # DToP: supervised whitening from SfM-120k's pairs
    results, arrays = {}, {}
    for name, root in roots.items():
        name, res, emb = evaluate_revisited(model, root, eval_tf, cfg, device, name, whiten)
        results[name] = res
        arrays.update({f"{name}_{k}": v for k, v in emb.items()})
        print(f"{cfg.name} {name}: mAP M {res['medium']['mAP']:.2f}  H {res['hard']['mAP']:.2f}")
    np.savez(run_dir / EMBEDDINGS, **arrays)
    torch.save(model.state_dict(), run_dir / MODEL)
    results.update({"n_train_images": len(db), "seconds": round(time.perf_counter() - t0, 1), "device": str(device),
                    "torch": torch.__version__, "python": platform.python_version()})
    write_json_atomic(run_dir / RESULTS, results)
    distributed.barrier()
    return RunResult(cfg, run_dir, results, model=model)
