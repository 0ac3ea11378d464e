"""Running the papers' presets: the ablation grids recorded around a preset as configs
(:func:`preset_grid`), and a model evaluated on the benchmarks beside the paper's row
(:func:`evaluate_benchmarks`, notebook 09; :func:`download_instructions` says what to download when
no data is given).

The paper's application, on top of :mod:`nbsrc.experiment` (the runner) and :mod:`nbsrc.paper.grids` (the grid
helpers), whose evaluations it calls;
:mod:`nbsrc.presets` only loads and describes the presets (their configs and the paper's numbers)::

    grid = preset_grid("irt_r_sop_deits", "5")              # {label: {"config", "paper"}}, IRT Table 5
    table = evaluate_benchmarks("irt_o_cub_deits", {"cub": "/data/CUB_200_2011"})
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from nbsrc.config import EXECUTION_FIELDS, ExperimentConfig
from nbsrc.data.benchmarks import (
    CUB_LAYOUT,
    CUB_URL,
    INSHOP_LAYOUT,
    INSHOP_URL,
    RECALL_KS,
    SOP_LAYOUT,
    SOP_URL,
    build_benchmark,
)
from nbsrc.data.oxford_paris import ORIGINAL_LAYOUT, ORIGINAL_URL, REVISITED_LAYOUT, REVISITED_URL
from nbsrc.data.sfm import SFM_LAYOUT, SFM_URL, load_sfm120k_db
from nbsrc.data.transforms import RetrievalTransform
from nbsrc.errors import ConfigError
from nbsrc.eval import evaluate
from nbsrc.eval.evaluators import particular_eval_transform, revisited_evaluation
from nbsrc.experiment import load_run
from nbsrc.models import data_config, model_from_config
from nbsrc.paper.grids import (
    beta_lambda_grid,
    dtop_ablation_grid,
    dtop_multiscale_table,
    lambda_sweep,
    paper_columns,
    pooling_variants,
)
from nbsrc.presets import load_preset, preset_paper
from nbsrc.train import resolve_device

CATEGORY_BENCHMARKS = ("cub", "sop", "inshop")  # Recall@K, nbsrc.data.benchmarks
# mAP Medium / Hard (roxford5k, rparis6k) and the original protocol's mAP (oxford5k, paris6k), nbsrc.eval.revisited_map
REVISITED_BENCHMARKS = ("roxford5k", "rparis6k", "oxford5k", "paris6k")
BENCHMARKS = CATEGORY_BENCHMARKS + REVISITED_BENCHMARKS


# ----------------------------------------------------------------------------- the paper's grids
def preset_grid(name: str, table: str, /, **overrides: Any) -> dict[str, dict[str, Any]]:
    """The paper's ablation ``table`` around preset ``name``: ``{label: {"config": ExperimentConfig,
    "paper": {benchmark: {metric: value}}, ...}}``, one entry per row or cell the paper prints.

    The configs come from the grid helpers of :mod:`nbsrc.paper.grids` applied to
    ``load_preset(name, **overrides)`` (``beta_lambda_grid`` for IRT Table 5, ``lambda_sweep`` for
    Table 6, ``pooling_variants`` for Table 9, ``dtop_ablation_grid`` for DToP A8 and A10), or are
    the preset with the row's fields changed (``"overrides"``: A7, A9, A12, A13; run names
    ``<preset>_<slug of the label>``); an evaluation-only grid (A11) gives the preset itself with the
    entry's ``query_scales`` and ``database_scales``.
    """
    grids = {g["table"]: g for g in preset_paper(name).get("grids", [])}
    if table not in grids:
        raise ConfigError(f"preset {name!r} records no grid for table {table!r}; it records "
                          f"{', '.join(grids) or 'none'}")
    g, base = grids[table], load_preset(name, **overrides)
    helper, args = g["helper"], g.get("args", {})
    if helper == "overrides":
        configs = {}
        for label, fields in args["overrides"].items():
            row = base.replace(**fields)  # a DToP field (head_dim) changes the preset's DToP model
            slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
            configs[label] = (base if _effective(row) == _effective(base)
                              else row.replace(name=f"{base.run.name}_{slug}"))
    elif helper == "evaluation":
        return {label: {"config": base, "paper": g["results"][label], **sc} for label, sc in args["scales"].items()}
    elif helper == "dtop_ablation_grid":
        configs = dtop_ablation_grid(base, table, args["values"])
    elif helper == "beta_lambda_grid":
        configs = beta_lambda_grid(base, args["betas"], args["lams"])
    elif helper == "lambda_sweep":
        configs = lambda_sweep(base, args["lams"], prefix=base.run.name)
    elif helper == "pooling_variants":
        configs = pooling_variants(base, args["poolings"])
    else:
        raise ConfigError(f"preset {name!r}, table {table}: unknown grid helper {helper!r}")
    missing = sorted(set(g["results"]) - set(configs))
    if missing:
        raise ConfigError(f"preset {name!r}, table {table}: the paper's rows {missing} have no config; "
                          f"the helper gave {sorted(configs)}")
    return {label: {"config": configs[label], "paper": g["results"][label]} for label in g["results"]}


def _effective(cfg: ExperimentConfig) -> dict[str, Any]:
    """The saved form without the name, DToP's ``fusion`` resolved (None: orthogonal with the ELM), so
    that a row that restates the defaults is the preset itself (its run trained once)."""
    d = cfg.to_dict()
    d["run"].pop("name")
    if cfg.model.dtop is not None:
        d["model"]["dtop"]["fusion"] = cfg.model.dtop.effective_fusion
    return d


# ----------------------------------------------------------------------------- the benchmarks (notebook 09)
def download_instructions(benchmarks=BENCHMARKS) -> str:
    """What to download for each benchmark and the directory tree its loader expects (the same text
    as the loaders' errors)."""
    text = {
        "cub": ("cub_root", CUB_URL, CUB_LAYOUT),
        "sop": ("sop_root", SOP_URL, SOP_LAYOUT),
        "inshop": ("inshop_root", INSHOP_URL, INSHOP_LAYOUT),
        "roxford5k": ("roxford_root", REVISITED_URL.replace("<name>", "roxford5k"),
                      REVISITED_LAYOUT.replace("<name>", "roxford5k")),
        "rparis6k": ("rparis_root", REVISITED_URL.replace("<name>", "rparis6k"),
                     REVISITED_LAYOUT.replace("<name>", "rparis6k")),
        "oxford5k": ("oxford_root", ORIGINAL_URL.replace("<name>", "oxford5k"),
                     ORIGINAL_LAYOUT.replace("<name>", "oxford5k")),
        "paris6k": ("paris_root", ORIGINAL_URL.replace("<name>", "paris6k"),
                    ORIGINAL_LAYOUT.replace("<name>", "paris6k")),
        "sfm120k": ("data_root (training only)", SFM_URL, SFM_LAYOUT),
    }
    out = []
    for bench in benchmarks:
        param, url, layout = text[bench]
        out.append(f"{bench} ({param}):\n    {url}\n    {layout}")
    return "\n".join(out)


def _paper_value(preset: str | None, bench: str, metric: str):
    if preset is None:
        return None
    return preset_paper(preset)["results"].get(bench, {}).get(metric)


def evaluate_benchmarks(preset: str | None, roots: dict[str, str | None], run_dir: str | Path | None = None,
                        overrides: dict | None = None, eval_per_class: int | None = None, runs_dir: str | Path = "runs",
                        sfm_root: str | Path | None = None):
    """Evaluate a model on each benchmark of ``roots`` (``{"cub"|"sop"|"inshop"|"roxford5k"|"rparis6k"|
    "oxford5k"|"paris6k": folder or None}``; None entries are skipped) and put the paper's number beside ours.

    The model is the finished run in ``run_dir`` (a folder, or a run name under ``runs_dir``; its
    config and PCA; ``overrides`` may then change only execution settings such as ``device``), or else the untrained
    (off-the-shelf, IRT_O) model of ``load_preset(preset, **overrides)``, whose descriptor is the
    full embedding (no PCA: fitting one needs training data). Category-level benchmarks use the
    official evaluation split and Recall@``RECALL_KS[benchmark]`` (IRT Table 2); the revisited ones
    the mAP of the Medium and Hard setups (IRT Tables 7-8), Oxford 5k and Paris 6k the original protocol's
    mAP (DToP's Oxf5k and Par6k columns), evaluated as the SfM-120k run evaluates
    (:func:`nbsrc.eval.evaluators.revisited_evaluation`, in the run's test geometry,
    :func:`nbsrc.eval.evaluators.particular_eval_transform`): at the config's ``eval_scales`` on both sides, and,
    where the config has ``whitening="learned"`` (the DToP presets; DToP Table A7 "Using supervised
    whitening"), with the whitening learned from the matching pairs of SfM-120k's training split under
    ``sfm_root`` — a one-line error names ``sfm_root`` when it is missing (or evaluate a preset without
    whitening, ``overrides={"whitening": None}``, knowing that the paper's row used it). ``table.attrs
    ["revisited"]`` says how the revisited rows were evaluated. The paper column holds ``preset``'s
    reported number for that benchmark (None where the preset's row has none, e.g. a benchmark it was
    not trained for). ``eval_per_class`` caps the evaluation images per class (None: the full
    protocol). Returns a DataFrame indexed by ``(benchmark, metric)`` with columns ``ours, paper,
    difference`` (ours − paper in points; NaN where the paper prints no number).
    """
    unknown = [k for k in roots if k not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"unknown benchmark {unknown[0]!r} in roots; expected keys among {', '.join(BENCHMARKS)}")
    roots = {k: v for k, v in roots.items() if v is not None}
    if not roots:
        raise ConfigError("no benchmark root given; pass at least one of " + ", ".join(BENCHMARKS))
    if run_dir is not None:
        if not Path(run_dir).is_dir() and (Path(runs_dir) / run_dir).is_dir():
            run_dir = Path(runs_dir) / run_dir
        run = load_run(run_dir, with_model=True)
        cfg, model = run.config, run.model
        changed = sorted(set(overrides or {}) - EXECUTION_FIELDS)
        if changed:
            raise ConfigError(f"overrides {changed} would change what the run in {run_dir} computes; with a run_dir "
                              f"only execution settings apply ({', '.join(sorted(EXECUTION_FIELDS))})")
        cfg = cfg.replace(**(overrides or {}))
    else:
        if preset is None:
            raise ConfigError("pass a preset (the off-the-shelf model to evaluate) or a run_dir")
        cfg = load_preset(preset, **(overrides or {}))
        model = model_from_config(cfg)
    device = resolve_device(cfg.run.device)
    model.to(device).eval()
    norm = data_config(model)
    eval_tf = RetrievalTransform(cfg.data.img_size, train=False, mean=norm["mean"], std=norm["std"])
    revisited = {b: Path(r) for b, r in roots.items() if b not in CATEGORY_BENCHMARKS}
    db = None
    if revisited and cfg.eval.whitening == "learned":
        if sfm_root is None:
            raise ConfigError(
                f"{cfg.run.name} evaluates Revisited Oxford/Paris with whitening learned on SfM-120k "
                "(whitening='learned', "
                "DToP Table A7); pass sfm_root= (the SfM-120k folder, notebook 09's sfm_root), or for a preset "
                "overrides={'whitening': None} to evaluate without it")
        db = load_sfm120k_db(sfm_root, "train")
    rows = []
    for bench, root in roots.items():
        if bench in CATEGORY_BENCHMARKS:
            data = build_benchmark(bench, root, eval_tf, eval_tf, eval_per_class, cfg.run.seed)
            ours = evaluate(model, data, RECALL_KS[bench], cfg.eval.eval_batch_size, device, progress=False)
            rows += [(bench, m, v, _paper_value(preset, bench, m)) for m, v in ours.items()]
    if revisited:  # the SfM-120k run's own evaluation: eval_scales, whitening learned once from SfM-120k
        eval_tf = particular_eval_transform(cfg, norm)  # IRT §4.2: square; DToP: aspect kept (our reading)
        results, _ = revisited_evaluation(model, revisited, eval_tf, cfg, device, db)
        rows += [(bench, m, v, _paper_value(preset, bench, m)) for (bench, m), v in paper_columns(results).items()]
    table = pd.DataFrame(rows, columns=["benchmark", "metric", "ours", "paper"]).set_index(["benchmark", "metric"])
    table["difference"] = table["ours"] - table["paper"].astype(float)  # ours − paper, in points
    scales = ", ".join(f"{s:.3g}" for s in (cfg.eval.eval_scales or [1.0]))
    table.attrs["revisited"] = (f"scales {scales} on both sides; whitening " +
                                (f"learned from {len(db.qidxs)} SfM-120k training pairs" if db is not None else "none"))
    return table


def evaluate_scale_grid(preset: str, run_dir: str | Path, roots: dict[str, str | None] | None = None,
                        runs_dir: str | Path = "runs", table: str = "A11"):
    """DToP Table A11 for a finished SfM-120k run: each cell of ``preset``'s evaluation-only grid
    (``preset_grid(preset, table)``: query scales × database scales) evaluated through the Revisited
    evaluator (:func:`nbsrc.paper.grids.dtop_multiscale_table`), beside the paper's number. ``roots``:
    ``{"roxford5k"|"rparis6k"|"oxford5k"|"paris6k": folder}`` (None: found beside the run's data_root).
    Returns a DataFrame indexed by ``(cell, benchmark, metric)`` with columns ``ours, paper, difference``."""
    grid = preset_grid(preset, table)
    if any("query_scales" not in e for e in grid.values()):
        raise ConfigError(f"preset {preset!r}, table {table} is not an evaluation-only grid of scales (DToP A11)")
    if not Path(run_dir).is_dir() and (Path(runs_dir) / run_dir).is_dir():
        run_dir = Path(runs_dir) / run_dir
    run = load_run(run_dir, with_model=True)
    pairs = {label: (e["query_scales"], e["database_scales"]) for label, e in grid.items()}
    ours = dtop_multiscale_table(run, pairs, roots={k: v for k, v in (roots or {}).items() if v is not None})
    rows = [(label, bench, metric, ours.loc[label, (bench, metric)],
             grid[label]["paper"].get(bench, {}).get(metric)) for label in pairs for bench, metric in ours.columns]
    out = pd.DataFrame(rows, columns=["cell", "benchmark", "metric", "ours", "paper"]).set_index(
        ["cell", "benchmark", "metric"])
    out["difference"] = out["ours"] - out["paper"].astype(float)
    return out
