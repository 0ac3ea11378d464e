"""The paper's grids: each helper turns one base config into ``{label: config}``, the rows or cells of
one table or figure of IRT or DToP, every config being ``base`` with only the studied field(s) changed
and a run name derived from their values, so that a rerun (or another notebook asking for the same cell)
finds the finished run and reuses it. :func:`nbsrc.experiment.run_all` trains them.

- IRT: :func:`irt_variants` (Table 3), :func:`seed_variants` (any grid over seeds), :func:`lambda_sweep`
  (Fig. 2, Table 6), :func:`beta_lambda_grid` / :func:`beta_lambda_cell` (Table 5, Fig. 4),
  :func:`pooling_variants` (Table 9), :func:`objective_variants` (Table 4), :func:`ablation_base` (the
  short runs these ablations share);
- DToP: :func:`dtop_ablation_grid` (Tables A8, A9, A10, A12, A13; one row of :data:`DTOP_ABLATIONS` per
  table), :func:`dtop_multiscale_table` (Table A11, evaluation only) and :func:`paper_columns` (a Revisited
  evaluation's results as DToP's tables print them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nbsrc.config import DToPConfig, ExperimentConfig
from nbsrc.data import RetrievalData, build_data
from nbsrc.data.oxford_paris import ORIGINAL_NAMES
from nbsrc.data.sfm import load_sfm120k_db
from nbsrc.errors import ConfigError
from nbsrc.eval.evaluators import particular_eval_transform, revisited_evaluation, revisited_roots
from nbsrc.eval.particular import SINGLE_SCALE, learn_sfm_whitening
from nbsrc.experiment import RunResult, load_run
from nbsrc.models import data_config
from nbsrc.train import resolve_device


# ----------------------------------------------------------------------------- IRT
def irt_variants(base: ExperimentConfig, prefix: str = "") -> dict[str, ExperimentConfig]:
    """The three methods of IRT Table 3 from one base config: IRT_O (off-the-shelf, no training),
    IRT_L (contrastive + memory, λ = 0) and IRT_R (IRT_L + λ·KoLeo, λ = ``base.loss.lam``)."""
    p = f"{prefix}_" if prefix else ""
    return {
        "IRT_O": base.replace(name=f"{p}irt_o", iterations=0, warmup_iters=0, lam=0.0, memory_size=0, momentum=None),
        "IRT_L": base.replace(name=f"{p}irt_l", lam=0.0),
        "IRT_R": base.replace(name=f"{p}irt_r"),
    }


def seed_variants(cfgs: dict[str, ExperimentConfig], seeds) -> dict[tuple[str, int], ExperimentConfig]:
    """``{(label, seed): config}``: each config of ``cfgs`` with each seed (initial weights, batches,
    augmentations). The config's own seed keeps its run name, so existing runs are reused; another
    seed ``s`` gets ``<name>_seed<s>``."""
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={seeds}: give one or more distinct seeds, e.g. [0, 1, 2]")
    return {(label, s): cfg if s == cfg.run.seed else cfg.replace(name=f"{cfg.run.name}_seed{s}", seed=s)
            for label, cfg in cfgs.items() for s in seeds}


def lambda_sweep(base: ExperimentConfig, lams, prefix: str = "") -> dict[str, ExperimentConfig]:
    """IRT_L/IRT_R configs over λ (IRT Fig. 2, Table 6); λ = 0 and λ = ``base.loss.lam`` share their run
    names with :func:`irt_variants`, so runs of notebook 02 are reused."""
    v = irt_variants(base, prefix)
    out = {}
    for lam in lams:
        if lam == 0:
            out[f"λ = {lam:g}"] = v["IRT_L"]
        elif lam == base.loss.lam:
            out[f"λ = {lam:g}"] = v["IRT_R"]
        else:
            out[f"λ = {lam:g}"] = v["IRT_R"].replace(name=f"{v['IRT_R'].run.name}_lam{lam:g}", lam=lam)
    return out


# ----------------------------------------------------------------------------- IRT ablation grids
# Each helper returns {label: config}, every config being ``base`` with only the ablated field(s)
# changed and a run name derived from their values, so a rerun (or another notebook asking for the
# same cell) finds the finished run and reuses it. Grid sizes are arguments: the paper's 5 × 5 β × λ
# grid is ``beta_lambda_grid(base, (0.3, 0.4, 0.5, 0.6, 0.7), (0, 0.3, 0.5, 0.7, 1.0))``.
OBJECTIVE_LABELS = {"contrastive": "Contrastive", "nsoftmax": "Normalized Softmax", "snca": "Scalable NCA",
                    "arcface": "ArcFace"}


def _distinct(values, what: str) -> list:
    values = list(values)
    if not values:
        raise ConfigError(f"{what} is empty; give at least one value")
    if len(set(values)) != len(values):
        raise ConfigError(f"{what}={values!r} has repeated values; give each value once")
    return values


def beta_lambda_grid(base: ExperimentConfig, betas, lams) -> dict[str, ExperimentConfig]:
    """IRT Table 5 and Fig. 4: one config per (β, λ) of ``betas`` × ``lams`` (β outer), ``base`` with
    only ``beta`` (margin of eq. 1) and ``lam`` (KoLeo weight of eq. 5) changed. Labels are
    ``"β = 0.3, λ = 0"``; run names ``<base.run.name>_b<β>_lam<λ>`` (``%g`` numbers), the same whatever
    the base's own β and λ."""
    betas, lams = _distinct(betas, "betas"), _distinct(lams, "lams")
    return {f"β = {b:g}, λ = {lam:g}": beta_lambda_cell(base, b, lam) for b in betas for lam in lams}


def beta_lambda_cell(base: ExperimentConfig, beta: float, lam: float) -> ExperimentConfig:
    """The (β, λ) cell of :func:`beta_lambda_grid`: ``base`` with ``beta``, ``lam`` and the name
    ``<base.run.name>_b<β>_lam<λ>``; the starting point of the pooling and objective ablations, so
    their base run is the grid's."""
    return base.replace(name=f"{base.run.name}_b{beta:g}_lam{lam:g}", beta=float(beta), lam=float(lam))


def pooling_variants(base: ExperimentConfig, poolings=("cls", "avg", "max", "gem")) -> dict[str, ExperimentConfig]:
    """IRT Table 9 (pooling after training): one config per pooling (``cls``, ``avg``, ``max``,
    ``gem``, ``dist``), each trained. The base's own pooling keeps ``base.run.name`` (that run is shared
    with the grid it came from); the others are ``<base.run.name>_pool_<pooling>``."""
    poolings = _distinct(poolings, "poolings")
    return {p: base if p == base.model.pooling else base.replace(name=f"{base.run.name}_pool_{p}", pooling=p)
            for p in poolings}


def objective_variants(base: ExperimentConfig,
                       losses=("contrastive", "nsoftmax", "snca")) -> dict[str, ExperimentConfig]:
    """IRT Table 4: the same model and data trained with each objective of ``losses`` (contrastive
    eq. 1, Normalized Softmax, Scalable NCA; ArcFace also accepted), every other field, λ included,
    as in ``base``. Labels are the objectives' names; the base's own loss keeps ``base.run.name``, the
    others are ``<base.run.name>_<loss>``."""
    losses = _distinct(losses, "losses")
    return {OBJECTIVE_LABELS.get(loss, loss):
            base if loss == base.loss.name else base.replace(name=f"{base.run.name}_{loss}", loss=loss)
            for loss in losses}


def ablation_base(base: ExperimentConfig, iterations: int, name: str = "ablation") -> ExperimentConfig:
    """The short-run base shared by the IRT ablations (notebooks 04 and 07): ``base`` named
    ``<name>_it<iterations>``, trained for ``iterations`` (warm-up clipped to fit) and recording the
    gradient noise γ, so the β × λ cells of Fig. 4 and Table 5 are one set of runs, trained once.
    The length is in the name, so runs of another length sit beside them instead of clashing."""
    return base.replace(name=f"{name}_it{iterations}", iterations=iterations,
                        warmup_iters=min(base.optim.warmup_iters, iterations), record_grad_noise=True)

# ----------------------------------------------------------------------------- DToP ablations
ELM_PARTS = ("irb", "aspp", "wave")


@dataclass(frozen=True)
class DToPCell:
    """One cell of a DToP ablation grid: its label, the suffix of its run name, whether it is the
    base's own setting (then it keeps ``base.run.name``), the ``model.dtop`` fields it sets and the
    config fields it sets (A12)."""

    label: str
    slug: str
    same: bool
    dtop: dict
    fields: dict = dataclasses.field(default_factory=dict)


def k_cell(v, dtop: DToPConfig) -> DToPCell:
    """A8: the last ``k`` encoder layers (eqs. 5-6)."""
    return DToPCell(f"k = {v}", f"k{v}", v == dtop.k, {"k": v})


def pos_embed_cell(v, dtop: DToPConfig) -> DToPCell:
    """A9: the position encoding, none | dpe | cpe (eq. 2)."""
    return DToPCell(f"PE = {v}", f"pe_{v}", v == dtop.pos_embed, {"pos_embed": v})


def elm_cell(v, dtop: DToPConfig) -> DToPCell:
    """A10: a tuple of ELM parts from :data:`ELM_PARTS` (eqs. 9-11); ``()``: ELM off, fused 'none'."""
    parts = tuple(v)
    if any(p not in ELM_PARTS for p in parts):
        raise ConfigError(f"ELM part(s) {parts} unknown: A10 values are tuples of {ELM_PARTS}, () for no ELM")
    parts = tuple(p for p in ELM_PARTS if p in parts)
    base_parts = tuple(p for p in ELM_PARTS if dtop.elm and getattr(dtop, f"elm_{p}"))
    opts = {"elm": bool(parts), **{f"elm_{p}": (p in parts) or not parts for p in ELM_PARTS}}
    if not parts:
        opts["fusion"] = None
    label = "ELM = " + ("+".join(p.upper() if p != "wave" else "Wave" for p in parts) or "off")
    return DToPCell(label, "elm_" + ("_".join(parts) or "off"), parts == base_parts, opts)


def sampler_cell(v, dtop: DToPConfig) -> DToPCell:
    """A12: group-size vs fixed-size batches, both on the mixed-size variant of the data (never the base)."""
    return DToPCell(f"sampling = {v}", f"mixed_{v}", False, {}, {"sampler": v, "size_variant": "mixed"})


def fusion_cell(v, dtop: DToPConfig) -> DToPCell:
    """A13: the fusion of the ELM's input and output (A14-A20)."""
    return DToPCell(f"fusion = {v}", f"fusion_{v}", v == dtop.effective_fusion, {"fusion": v})


@dataclass(frozen=True)
class DToPAblation:
    """A DToP training ablation: the options it varies (``model.dtop`` fields, or config fields for
    A12) and the function that turns one of its values into a :class:`DToPCell`."""

    options: tuple[str, ...]
    cell: Callable[[Any, DToPConfig], DToPCell]


DTOP_ABLATIONS = {
    "A8": DToPAblation(("k",), k_cell),
    "A9": DToPAblation(("pos_embed",), pos_embed_cell),
    "A10": DToPAblation(("elm", "elm_irb", "elm_aspp", "elm_wave", "fusion"), elm_cell),
    "A12": DToPAblation(("sampler", "size_variant"), sampler_cell),
    "A13": DToPAblation(("fusion",), fusion_cell),
}
# The options each DToP ablation table varies (model.dtop fields, or config fields for A12).
DTOP_TABLES = {table: ablation.options for table, ablation in DTOP_ABLATIONS.items()}


def dtop_ablation_grid(base: ExperimentConfig, table: str, values) -> dict[str, ExperimentConfig]:
    """``{label: config}`` for DToP ablation ``table`` (``'A8'``, ``'A9'``, ``'A10'``, ``'A12'``,
    ``'A13'``; Table A11 is evaluation-only, see :func:`dtop_multiscale_table`) over ``values``. Every
    table is mAP on (Revisited) Oxford and Paris for an SfM-120k base, Recall@K for the demo's datasets.

    Each config is ``base`` with only the options of ``DTOP_TABLES[table]`` changed, as the table's row
    of :data:`DTOP_ABLATIONS` says: A8 ``k``; A9 ``pos_embed``; A10 a tuple of ELM parts from
    ``('irb', 'aspp', 'wave')`` (``()``: ELM off, fused 'none'); A12 ``sampler``; A13 ``fusion``. Names are
    ``<base.run.name>_<option>`` and stable; a value equal to the base's effective one (DToP defaults
    filled in) keeps ``base.run.name``, so that run is trained once and reused by every table. A12 runs
    train on the mixed-size variant of the data (``size_variant="mixed"``), so they always get their own
    names.
    """
    if table not in DTOP_ABLATIONS:
        raise ConfigError(f"table={table!r} is not a DToP training ablation; use one of {', '.join(DTOP_ABLATIONS)} "
                          "(A11 is evaluation-only: dtop_multiscale_table)")
    dtop = base.model.dtop
    if dtop is None:
        raise ConfigError("base.model.dtop is None: a DToP ablation grid needs a DToP model (dtop=DToPConfig())")
    values = list(values)
    if not values:
        raise ConfigError(f"values for table {table} is empty; give at least one value")
    out = {}
    for v in values:
        c = DTOP_ABLATIONS[table].cell(v, dtop)
        out[c.label] = base if c.same else base.replace(name=f"{base.run.name}_{c.slug}",
                                                        dtop=dataclasses.replace(dtop, **c.dtop), **c.fields)
    return out


def dtop_multiscale_table(run: RunResult, scale_pairs: dict, data: RetrievalData | None = None,
                          roots: dict | None = None):
    """DToP Table A11: ``run``'s model with queries and database embedded at the scales of each
    ``{label: (query_scales, database_scales)}``, one row per label.

    An SfM-120k run (the paper's table): mAP in percent through the Revisited evaluator
    (:func:`revisited_evaluation`: the run's test geometry, PCA and whitening, the whitening learned
    once at ``cfg.eval.eval_scales``), one column per ``(dataset, metric)`` as the paper prints them
    (``oxford5k``/``paris6k``: ``mAP``; ``roxford5k``/``rparis6k``: ``mAP M``, ``mAP H``); ``roots``:
    ``{name: folder}`` (None: found beside ``cfg.data.data_root``, :func:`revisited_roots`). A run on a
    dataset of classes (the demo's stand-in): Recall@K (:func:`nbsrc.eval.multiscale.evaluate_multiscale`),
    not the paper's metric."""
    import pandas as pd

    cfg = run.config
    model = run.model if run.model is not None else load_run(run.run_dir, with_model=True).model
    device = resolve_device(cfg.run.device)
    model.to(device).eval()
    if cfg.data.dataset == "sfm120k":
        rows = multiscale_revisited(model, cfg, scale_pairs, device, roots)
        df = pd.DataFrame.from_dict(rows, orient="index")
        df.columns = pd.MultiIndex.from_tuples(df.columns)
    else:
        from nbsrc.eval.multiscale import evaluate_multiscale

        if data is None:
            norm = data_config(model)
            data = build_data(cfg, norm["mean"], norm["std"])
        rows = {label: evaluate_multiscale(model, data, qs, ds, cfg.eval.ks, cfg.eval.eval_batch_size, device,
                                           progress=False) for label, (qs, ds) in scale_pairs.items()}
        df = pd.DataFrame.from_dict(rows, orient="index")
    df = df.round(2)
    df.index.name = "query / database scales"
    return df


PAPER_METRICS = {"medium": "mAP M", "hard": "mAP H"}  # revisited setup -> the column DToP's tables print


def paper_columns(results: dict) -> dict[tuple[str, str], float]:
    """``{(dataset, metric): mAP}`` of :func:`revisited_evaluation`'s results, as DToP's tables print
    them: Oxf5k and Par6k ``mAP``, ROxford and RParis ``mAP M`` and ``mAP H``."""
    out = {}
    for name, res in results.items():
        if name in ORIGINAL_NAMES:
            out[(name, "mAP")] = res["mAP"]
        else:
            out.update({(name, col): res[setup]["mAP"] for setup, col in PAPER_METRICS.items()})
    return out


def multiscale_revisited(model: torch.nn.Module, cfg: ExperimentConfig, scale_pairs: dict, device,
                         roots: dict | None = None) -> dict[str, dict[tuple[str, str], float]]:
    """``{label: paper_columns(...)}`` of :func:`revisited_evaluation` at each ``(query_scales,
    database_scales)`` of ``scale_pairs`` (DToP Table A11); the whitening (``cfg.eval.whitening ==
    "learned"``) is learned once from SfM-120k's training pairs under ``cfg.data.data_root``."""
    norm = data_config(model)
    eval_tf = particular_eval_transform(cfg, norm)
    found = revisited_roots(cfg, roots or {})
    whitening = None
    if cfg.eval.whitening == "learned":
        db = load_sfm120k_db(cfg.data.data_root, "train")
        whitening = learn_sfm_whitening(model, db, eval_tf, cfg.eval.eval_scales or SINGLE_SCALE,
                                        cfg.eval.eval_batch_size, device)
    rows = {}
    for label, (qs, ds) in scale_pairs.items():
        results, _ = revisited_evaluation(model, found, eval_tf, cfg, device, scales=tuple(ds), query_scales=tuple(qs),
                                          whitening=whitening)
        rows[label] = paper_columns(results)
    return rows
