"""One experiment end to end: data -> model -> task -> fit -> PCA -> evaluate -> run directory.

The CLI (``python -m nbsrc train``) and the notebooks both call :func:`run_experiment`, so a
notebook figure and a command-line run of the same config are the same computation. Every dataset
goes through the same steps; what differs per dataset (its :class:`nbsrc.data.DatasetSpec`) is a
:class:`Setup` (:func:`build_setup`):

- datasets of classes (Fashion-MNIST, digits, image folders, CUB, SOP, In-Shop): a
  :class:`~nbsrc.train.pair_task.PairTask` on the training classes, the PCA fitted on (a fixed subset
  of) them;
- SfM-120k (IRT §4.2; DToP Table A5): a :class:`~nbsrc.train.tuple_task.TupleTask`
  (``sfm_training="tuples"``, IRT) or a PairTask on the images labelled by their 3D model
  (``"classes"``, DToP: any pair loss, ArcFace for DToP), the PCA fitted on SfM-120k training
  images.

**Evaluators.** What is measured at the end is the evaluator named by ``cfg.eval.evaluator``, a key of
:data:`nbsrc.eval.evaluators.EVALUATORS`; None picks the dataset's own (:class:`nbsrc.data.DatasetSpec`):
Recall@K on the test classes for datasets of classes, Revisited Oxford / Paris mAP for SfM-120k.

**Nothing is written until the run can start.** The config, the device, the model and its
weights, the data and its splits, the first training batch and a forward pass through the model
are all built and checked first; only then is the run directory created (atomically, see
:func:`nbsrc.train.rundir.prepare_run_dir`). A directory that holds no checkpoint and no results is
not a run: a later start under the same name replaces it (and says so). In ``reuse`` mode (the
notebooks' default) a finished run with the same config is loaded instead of retrained.

**Grids.** :func:`run_all` trains a ``{label: config}`` grid; the paper's grids (one per table or figure of IRT
and DToP) are built by :mod:`nbsrc.paper.grids`, on top of this runner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

from nbsrc import locking
from nbsrc.config import ExperimentConfig
from nbsrc.data import RetrievalData, RetrievalDataset, build_data, cap_per_class, check_data_root, dataset_spec
from nbsrc.data.group_sampler import training_sampler
from nbsrc.data.images import check_dataset_images, check_images
from nbsrc.data.sfm import SfMSplit, load_sfm120k_db
from nbsrc.data.transforms import training_transform
from nbsrc.errors import ConfigError, DatasetError, RunDirError
from nbsrc.eval import extract_embeddings
from nbsrc.eval.evaluators import (
    EvalInputs,
    Evaluator,
    evaluator_builder,
    evaluator_name,
    particular_eval_transform,
)
from nbsrc.eval.particular import SINGLE_SCALE, embed_at_scales
from nbsrc.models import data_config, model_from_config
from nbsrc.provenance import provenance
from nbsrc.safeload import load_model_file
from nbsrc.train import distributed, load_results, prepare_run_dir, read_metrics, resolve_device, run_state
from nbsrc.train.loop import TrainingTask, fit
from nbsrc.train.pair_task import PairTask
from nbsrc.train.rundir import (
    RESULTS,
    close_tensorboard,
    load_run_config,
    log_tensorboard,
    release_run_lock,
    write_json_atomic,
)
from nbsrc.train.tuple_task import TupleTask
from nbsrc.workers import auto_jobs, check_jobs, map_jobs

EMBEDDINGS, MODEL = "embeddings.npz", "model.pt"
PCA_FIT_SAMPLES = 5_000


@dataclass
class RunResult:
    """What a finished run left in its directory."""

    config: ExperimentConfig
    run_dir: Path
    results: dict
    reused: bool = False
    model: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def recall(self) -> dict[str, float]:
        return {k: v for k, v in self.results.items() if k.startswith("R@")}

    def metrics(self, kind: str | None = "train") -> list[dict]:
        return read_metrics(self.run_dir, kind)

    def embeddings(self) -> dict[str, np.ndarray]:
        return load_embeddings(self.run_dir)


def load_embeddings(run_dir: str | Path) -> dict[str, np.ndarray]:
    path = Path(run_dir) / EMBEDDINGS
    if not path.exists():
        raise RunDirError(f"run {run_dir} has no {EMBEDDINGS}: it does not exist or has not finished; train it first")
    with np.load(path) as f:
        return dict(f)


def load_run(run_dir: str | Path, with_model: bool = False) -> RunResult:
    """A finished run: config, results and (optionally) the final model."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise RunDirError(f"run {run_dir} does not exist (no config.json); train it first or check the name")
    cfg = load_run_config(run_dir / "config.json")
    res = RunResult(cfg, run_dir, load_results(run_dir), reused=True)
    if with_model:
        res.model = model_from_config(cfg.replace(weights="none"))
        state = load_model_file(run_dir / MODEL, "the run's nbsrc train command plus --resume (it evaluates again "
                                "from the final checkpoint), or --overwrite")
        if res.model.pca is not None:
            res.model.pca.fitted.fill_(True)
        try:
            res.model.load_state_dict(state)
        except RuntimeError as e:
            raise RunDirError(f"{run_dir / MODEL} does not fit the model of {run_dir / 'config.json'} "
                              f"({str(e).splitlines()[0]}); the run's files are mixed up: train it again") from None
        res.model.eval()
    return res


def fit_pca(model: torch.nn.Module, images: RetrievalDataset, keep: np.ndarray, cfg: ExperimentConfig,
            device) -> None:
    """Fit the model's PCA (IRT ▷dim) on the embeddings of ``images[keep]`` (training images,
    evaluation transform; a fixed subset of at most ``PCA_FIT_SAMPLES``, see :class:`Setup`)."""
    z = embed_at_scales(model, images.subset(keep), SINGLE_SCALE, cfg.eval.eval_batch_size, device, cfg.run.num_workers,
                        progress=cfg.run.progress)
    model.pca.fit(z)


def prepare_run_on_rank0(cfg: ExperimentConfig, mode: str) -> tuple[Path, str]:
    """:func:`nbsrc.train.prepare_run_dir` on rank 0 only; under torchrun the other ranks receive its
    ``(run_dir, action)``, so that one process alone creates, checks or moves the run directory."""
    prepared = prepare_run_dir(cfg, mode) if distributed.current().is_main else None
    return distributed.broadcast_object(prepared)


def seeded_model(cfg: ExperimentConfig) -> tuple[torch.nn.Module, dict]:
    """The config's model with its initial weights drawn from ``cfg.run.seed`` (part of the experiment),
    and its input normalisation (:func:`nbsrc.models.data_config`)."""
    torch.manual_seed(cfg.run.seed)
    model = model_from_config(cfg)
    return model, data_config(model)


# ----------------------------------------------------------------------------- what differs per dataset
@dataclass
class Setup:
    """What :func:`run_experiment` needs of a dataset: the training task, the images the PCA is
    fitted on (``pca_images[pca_keep]``), what the evaluator is built from (``inputs``), the evaluator
    (:func:`build_setup` adds it) and what goes into ``results.json`` besides the evaluation."""

    task: TrainingTask
    pca_images: RetrievalDataset
    pca_keep: np.ndarray
    inputs: EvalInputs
    evaluator: Evaluator | None = None
    summary: dict = field(default_factory=dict)
    query_raw: RetrievalDataset | None = None  # embedded before the PCA, saved as query_raw


def class_setup(cfg: ExperimentConfig, norm: dict, device, data: RetrievalData | None = None) -> Setup:
    """Datasets of classes: train on ``data.train`` (PairTask), PCA on up to ``PCA_FIT_SAMPLES``
    training images (an equal share per class, drawn from ``cfg.run.seed``)."""
    data = data if data is not None else build_data(cfg, norm["mean"], norm["std"])
    for part, what in ((data.train, "training set"), (data.query, "query set"), (data.gallery, "gallery")):
        if part is not None:
            check_dataset_images(part, what, decode=False)  # every file is an image (folders decode all when built)
    train_eval = data.train.subset(np.arange(len(data.train)), transform=data.query.transform)
    per_class = max(1, PCA_FIT_SAMPLES // max(1, len(np.unique(train_eval.labels))))
    keep = cap_per_class(np.arange(len(train_eval)), train_eval.labels, per_class, seed=cfg.run.seed)
    return Setup(PairTask(cfg, data.train), train_eval, keep, EvalInputs(norm, device, data=data),
                 query_raw=data.query)


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


def sfm_setup(cfg: ExperimentConfig, norm: dict, device, roxford_root=None, rparis_root=None, oxford_root=None,
              paris_root=None) -> Setup:
    """SfM-120k: tuples (IRT) or 3D models as classes (DToP), PCA on up to ``PCA_FIT_SAMPLES``
    SfM-120k training images (a subset drawn from ``cfg.run.seed``, prepared as in the evaluation,
    :func:`particular_eval_transform`). ``roxford_root`` / ``rparis_root`` (``oxford_root`` / ``paris_root``):
    the Revisited (original Oxford 5k / Paris 6k) folders for the evaluator
    (:func:`nbsrc.eval.evaluators.revisited_evaluator`; None: looked for beside ``cfg.data.data_root``)."""
    db = load_sfm120k_db(cfg.data.data_root, "train")  # first: a wrong data_root is named as such
    check_images(db.paths, "SfM-120k", decode=False)  # a missing or unreadable file, before anything is written
    eval_tf = particular_eval_transform(cfg, norm)  # IRT §4.2: squashed square; DToP: aspect kept (our reading)
    if cfg.data.sfm_training == "classes":
        train_tf = training_transform(cfg.data.img_size, norm["mean"], norm["std"], cfg.data.dtop_augmentation)
        task: TrainingTask = PairTask(cfg, class_dataset(db, train_tf))
    else:
        task = TupleTask(cfg, db)
    n = min(PCA_FIT_SAMPLES, len(db))
    keep = np.sort(np.random.default_rng([cfg.run.seed, 128]).permutation(len(db))[:n])
    inputs = EvalInputs(norm, device, sfm=db, roots={"roxford5k": roxford_root, "rparis6k": rparis_root,
                                                     "oxford5k": oxford_root, "paris6k": paris_root})
    return Setup(task, db.images(eval_tf), keep, inputs, summary={"n_train_images": len(db)})


def build_setup(cfg: ExperimentConfig, norm: dict, device, data: RetrievalData | None = None,
                roxford_root=None, rparis_root=None, oxford_root=None, paris_root=None) -> Setup:
    """The :class:`Setup` of ``cfg.data.dataset`` with the evaluator of ``cfg.eval.evaluator``
    (:data:`nbsrc.eval.evaluators.EVALUATORS`; its name is checked before the data is read): :func:`sfm_setup` for a
    particular-object dataset (:class:`nbsrc.data.DatasetSpec`), :func:`class_setup` for one of classes."""
    builder = evaluator_builder(evaluator_name(cfg))
    if dataset_spec(cfg.data.dataset).particular:
        setup = sfm_setup(cfg, norm, device, roxford_root, rparis_root, oxford_root, paris_root)
    else:
        setup = class_setup(cfg, norm, device, data)
        setup.inputs.roots = {"roxford5k": roxford_root, "rparis6k": rparis_root, "oxford5k": oxford_root,
                              "paris6k": paris_root}
    setup.evaluator = builder(cfg, setup.inputs)
    return setup


def check_can_start(cfg: ExperimentConfig, model: torch.nn.Module, setup: Setup) -> None:
    """What would fail later, checked before anything is written: enough training images for the
    PCA, the first training batch loads (its images decode) and passes through the model (eval
    mode: no RNG drawn, no statistics updated). (A ``dim`` larger than the embedding already failed
    when the model was built.)"""
    if cfg.model.dim and len(setup.pca_keep) < cfg.model.dim:
        raise ConfigError(f"dim={cfg.model.dim} is invalid: the PCA is fitted on {len(setup.pca_keep)} training "
                          f"images; choose dim <= {len(setup.pca_keep)} or None")
    train_ds = getattr(setup.task, "train_ds", None)  # a PairTask's; tuples are mined by the model itself
    if cfg.optim.iterations == 0 or train_ds is None:
        return
    sampler, ds, collate = training_sampler(cfg, train_ds, 0)
    keys = next(iter(sampler))
    x = (collate or default_collate)([ds[k] for k in keys[:2]])[0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    for k in keys[2:]:  # the rest of the first batch decodes
        ds[k]


def run_experiment(cfg: ExperimentConfig, mode: str = "reuse", data: RetrievalData | None = None,
                   stop_after: int | None = None, roxford_root=None, rparis_root=None, oxford_root=None,
                   paris_root=None) -> RunResult:
    """Train (unless ``cfg.optim.iterations == 0``: the off-the-shelf model), fit the PCA, evaluate, and
    write the run directory.

    ``mode``: ``reuse`` (default), ``new``, ``resume`` or ``overwrite``; see
    :func:`nbsrc.train.prepare_run_dir`. ``data`` (datasets of classes) is used instead of building
    it; ``roxford_root`` / ``rparis_root`` / ``oxford_root`` / ``paris_root`` (SfM-120k) see
    :func:`sfm_setup`. ``stop_after`` ends
    training early (no evaluation; to test resuming).

    One process per run directory: the run's lock (:func:`nbsrc.train.prepare_run_dir`, on rank 0) is
    held from the run directory's first write to its last and given back on return or error; a run
    that another live process is training is refused in one line, before the data is read.
    """
    try:
        return _run_experiment(cfg, mode, data, stop_after, roxford_root, rparis_root, oxford_root, paris_root)
    finally:
        release_run_lock(cfg.run_dir)


def _run_experiment(cfg: ExperimentConfig, mode: str, data: RetrievalData | None, stop_after: int | None,
                    roxford_root, rparis_root, oxford_root, paris_root) -> RunResult:
    cfg.validate()
    dinfo = distributed.current()
    if dinfo.is_main:
        locking.check_free(cfg.run_dir)  # a live run of this name: said now, not after minutes of building
    if mode == "reuse" and run_state(cfg.run_dir) == "done":  # a finished run needs no data
        run_dir, _ = prepare_run_on_rank0(cfg, mode)  # checks that the saved config is the same
        print(f"reusing finished run {run_dir} (same config); nothing retrained")
        return load_run(run_dir)
    device = resolve_device(cfg.run.device)
    t0 = time.perf_counter()
    if data is None:
        check_data_root(cfg)  # a missing data_root is said before pretrained weights are fetched
    model, norm = seeded_model(cfg)
    setup = build_setup(cfg, norm, device, data, roxford_root, rparis_root, oxford_root, paris_root)
    check_can_start(cfg, model, setup)
    run_dir, action = prepare_run_on_rank0(cfg, mode)  # the first write
    if action == "reuse":
        print(f"reusing finished run {run_dir} (same config); nothing retrained")
        return load_run(run_dir)
    if cfg.optim.iterations > 0:
        fit(cfg, model, setup.task, run_dir, resume=action == "resume", evaluate=setup.evaluator.during,
            stop_after=stop_after)
        if stop_after is not None and stop_after < cfg.optim.iterations:
            return RunResult(cfg, run_dir, {}, model=model)
    if not dinfo.is_main:  # PCA, evaluation and the run's files are rank 0's
        distributed.barrier()
        return RunResult(cfg, run_dir, {}, model=model)
    model.to(device).eval()
    q_raw = None
    if cfg.model.dim:
        if setup.query_raw is not None:
            q_raw, _, _ = extract_embeddings(model, setup.query_raw, cfg.eval.eval_batch_size, device,
                                             cfg.run.num_workers, False)
        fit_pca(model, setup.pca_images, setup.pca_keep, cfg, device)
    results, arrays = setup.evaluator.evaluate(model, device, q_raw)
    np.savez(run_dir / EMBEDDINGS, **arrays)
    torch.save(model.state_dict(), run_dir / MODEL)
    results = {**results, **setup.summary, "seconds": round(time.perf_counter() - t0, 1), "device": str(device),
               **provenance()}  # versions of torch, timm, faiss, numpy, nbsrc; git_commit; machine (CPU, GPU)
    write_json_atomic(run_dir / RESULTS, results)
    log_tensorboard(run_dir, {**results, "kind": "results", "iteration": cfg.optim.iterations})  # its numbers
    close_tensorboard(run_dir)
    distributed.barrier()
    return RunResult(cfg, run_dir, results, model=model)


def run_all(configs: dict[str, ExperimentConfig], mode: str = "reuse", data: RetrievalData | None = None,
            jobs: int | str = 1) -> dict[str, RunResult]:
    """:func:`run_experiment` on each config; ``{label: RunResult}`` with the same labels, in order.
    In ``reuse`` mode finished runs are loaded, not retrained, so a grid can be rerun or extended
    cell by cell. ``data`` is passed through (it must suit every config).

    ``jobs``: how many runs to train at once, each in its own process with ``cores // jobs`` threads
    (:func:`nbsrc.workers.map_jobs`; ``"auto"``: :func:`nbsrc.workers.auto_jobs`, 2 on a CPU with two
    or more cores, 1 on a GPU). Only the runs still to train go to the workers, and only when there are
    two or more of them; finished runs, off-the-shelf runs, a given ``data`` and torchrun stay in this
    process. A run's weights depend on its thread count in the last bits (see :mod:`nbsrc.workers`)."""
    jobs = check_jobs(jobs)
    configs = dict(configs)
    if jobs == "auto":
        jobs = auto_jobs(next(iter(configs.values())).run.device) if configs else 1
    to_train = {cfg.run_dir: cfg for cfg in configs.values()  # one job per run, however many labels name it
                if cfg.optim.iterations > 0 and not (mode == "reuse" and run_state(cfg.run_dir) == "done")}
    if jobs > 1 and len(to_train) > 1 and data is None and not distributed.current().enabled:
        for cfg in to_train.values():
            cfg.validate()  # a bad config is a one-line error here, before any worker starts
        map_jobs(_train_run, [(cfg.to_dict(), mode) for cfg in to_train.values()],
                 [cfg.run.name for cfg in to_train.values()], jobs)
    else:
        to_train = {}
    # the runs the workers trained are loaded; every other run is made here in the caller's mode
    return {label: run_experiment(cfg, "reuse" if cfg.run_dir in to_train else mode, data=data)
            for label, cfg in configs.items()}


def _train_run(item: tuple[dict, str]) -> None:
    """A worker's job for :func:`run_all`: one run, from its config as a dict."""
    cfg_dict, mode = item
    run_experiment(ExperimentConfig.from_dict(cfg_dict), mode)
