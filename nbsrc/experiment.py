"""One experiment end to end: data -> model -> train -> PCA -> evaluate -> run directory.

The CLI (``python -m nbsrc train``) and the notebooks both call :func:`run_experiment`, so a
notebook figure and a command-line run of the same config are the same computation. In ``reuse``
mode (the notebooks' default) a finished run with the same config is loaded instead of retrained.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nbsrc.config import ExperimentConfig
from nbsrc.data import RetrievalData, build_data, cap_per_class
from nbsrc.errors import RunDirError
from nbsrc.eval import evaluate, extract_embeddings
from nbsrc.models import data_config, model_from_config
from nbsrc.train import load_results, prepare_run_dir, read_metrics, resolve_device, train
from nbsrc.train.rundir import RESULTS, write_json_atomic

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
    cfg = ExperimentConfig.load(run_dir / "config.json")
    res = RunResult(cfg, run_dir, load_results(run_dir), reused=True)
    if with_model:
        res.model = model_from_config(cfg.replace(weights="none"))
        state = torch.load(run_dir / MODEL, map_location="cpu", weights_only=True)
        if res.model.pca is not None:
            res.model.pca.fitted.fill_(True)
        res.model.load_state_dict(state)
        res.model.eval()
    return res


def fit_pca(model: torch.nn.Module, data: RetrievalData, cfg: ExperimentConfig, device) -> None:
    """Fit the model's PCA (IRT ▷dim) on embeddings of (a fixed subset of) the training classes."""
    train_eval = data.train.subset(np.arange(len(data.train)), transform=data.query.transform)
    per_class = max(1, PCA_FIT_SAMPLES // max(1, len(np.unique(train_eval.labels))))
    keep = cap_per_class(np.arange(len(train_eval)), train_eval.labels, per_class, seed=cfg.seed)
    z, _, _ = extract_embeddings(model, train_eval.subset(keep), cfg.eval_batch_size, device,
                                 cfg.num_workers, progress=cfg.progress)
    model.pca.fit(z)


def run_experiment(cfg: ExperimentConfig, mode: str = "reuse", data: RetrievalData | None = None,
                   stop_after: int | None = None) -> RunResult:
    """Train (unless ``cfg.iterations == 0``), fit the PCA, evaluate, and write the run directory.

    ``mode``: ``reuse`` (default), ``new``, ``resume`` or ``overwrite``; see
    :func:`nbsrc.train.prepare_run_dir`.
    """
    cfg.validate()
    run_dir, action = prepare_run_dir(cfg, mode)
    if action == "reuse":
        print(f"reusing finished run {run_dir} (same config); nothing retrained")
        return load_run(run_dir)
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)  # the initial weights are part of the experiment
    model = model_from_config(cfg)
    norm = data_config(model)
    data = data if data is not None else build_data(cfg, norm["mean"], norm["std"])

    def eval_fn(m):
        return evaluate(m, data, cfg.ks, cfg.eval_batch_size, device, progress=False)

    if cfg.iterations > 0:
        train(cfg, model, data.train, run_dir, resume=action == "resume", evaluate=eval_fn, stop_after=stop_after)
        if stop_after is not None and stop_after < cfg.iterations:
            return RunResult(cfg, run_dir, {}, model=model)
    model.to(device).eval()
    q_raw = None
    if cfg.dim:
        q_raw, _, _ = extract_embeddings(model, data.query, cfg.eval_batch_size, device, cfg.num_workers, False)
        fit_pca(model, data, cfg, device)
    results = evaluate(model, data, cfg.ks, cfg.eval_batch_size, device, progress=cfg.progress)
    q, ql, qi = extract_embeddings(model, data.query, cfg.eval_batch_size, device, cfg.num_workers, False)
    arrays = {"query": q, "query_labels": ql, "query_indices": qi}
    if q_raw is not None:
        arrays["query_raw"] = q_raw
    if data.gallery is not None:
        g, gl, gi = extract_embeddings(model, data.gallery, cfg.eval_batch_size, device, cfg.num_workers, False)
        arrays.update(gallery=g, gallery_labels=gl, gallery_indices=gi)
    np.savez(run_dir / EMBEDDINGS, **arrays)
    torch.save(model.state_dict(), run_dir / MODEL)
    results = {**results, "n_query": int(len(q)), "seconds": round(time.perf_counter() - t0, 1),
               "device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    write_json_atomic(run_dir / RESULTS, results)
    print(f"{cfg.name}: " + "  ".join(f"{k}={v:.2f}" for k, v in results.items() if k.startswith("R@")))
    return RunResult(cfg, run_dir, results, model=model)


def irt_variants(base: ExperimentConfig, prefix: str = "") -> dict[str, ExperimentConfig]:
    """The three methods of IRT Table 3 from one base config: IRT_O (off-the-shelf, no training),
    IRT_L (contrastive + memory, λ = 0) and IRT_R (IRT_L + λ·KoLeo, λ = ``base.lam``)."""
    p = f"{prefix}_" if prefix else ""
    return {
        "IRT_O": base.replace(name=f"{p}irt_o", iterations=0, warmup_iters=0, lam=0.0, memory_size=0, momentum=None),
        "IRT_L": base.replace(name=f"{p}irt_l", lam=0.0),
        "IRT_R": base.replace(name=f"{p}irt_r"),
    }


def lambda_sweep(base: ExperimentConfig, lams, prefix: str = "") -> dict[str, ExperimentConfig]:
    """IRT_L/IRT_R configs over λ (IRT Fig. 2, Table 6); λ = 0 and λ = ``base.lam`` share their run
    names with :func:`irt_variants`, so runs of notebook 02 are reused."""
    v = irt_variants(base, prefix)
    out = {}
    for lam in lams:
        if lam == 0:
            out[f"λ = {lam:g}"] = v["IRT_L"]
        elif lam == base.lam:
            out[f"λ = {lam:g}"] = v["IRT_R"]
        else:
            out[f"λ = {lam:g}"] = v["IRT_R"].replace(name=f"{v['IRT_R'].name}_lam{lam:g}", lam=lam)
    return out
