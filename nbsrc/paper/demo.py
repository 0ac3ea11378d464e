"""The demo: its settings in one place, and ``make demo`` (the notebooks in order through papermill,
then the Recall@K table of IRT_O, IRT_L and IRT_R).

Every demo notebook (01-08) starts from :func:`demo_config`: the data of one demo (:data:`DEMO_DATA`)
and the training recipe (:data:`RECIPE`), with the notebook's ``overrides`` on top. A notebook's
parameters cell holds only what that notebook varies plus ``demo`` and ``overrides``; ``nbsrc
notebook NB -p lr 1e-4`` (or papermill's ``-p overrides '{"lr": 1e-4}'``) changes any config field
(:func:`nbsrc.paper.notebooks.fold_overrides`). Run names are the notebooks' own; run reuse across the
notebooks follows from their configs being built by the same function.

Never silent: each notebook is announced with a start line and an end line with its elapsed time, and
in between its cells' outputs, training progress included, are printed as plain lines (``  | ...``;
:func:`nbsrc.paper.notebooks.run_notebook` with ``show_progress``)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from nbsrc.config import EXECUTION_FIELDS, ExperimentConfig
from nbsrc.errors import ConfigError
from nbsrc.paper.notebooks import NOTEBOOKS_DIR, config_field_types, run_notebook

TABLE = Path("table3_irt.md")  # in the figures folder

# The data of each demo: a class-disjoint split (train on some classes, query = gallery on unseen ones), the
# input size, and the batches (m images of each class in every batch: 4 classes a batch of Fashion-MNIST's 5,
# 16 of the glyphs' 500).
DEMO_DATA: dict[str, dict[str, Any]] = {
    # Fashion-MNIST (Debian's dataset-fashion-mnist): train on classes 0-4, evaluate on the unseen 5-9
    # (300 images each); 28 px with 7-px patches (4 x 4 tokens); random init (no pretrained weights offline).
    "fashion_mnist": dict(dataset="fashion_mnist", train_classes="0-4", test_classes="5-9", eval_per_class=300,
                          img_size=28, patch_size=7, weights="none", batch_size=64, m_per_class=16),
    # The default. CJK glyphs (nbsrc.data.glyphs, `make glyphs`): 2,000 ideographs drawn by 59 font faces, 32 px.
    # Pretrain on classes 0-999 (PRETRAIN), fine-tune on 1000-1499, evaluate on the unseen 1500-1999 (8 images
    # each: 4,000 queries, query = gallery); 8-px patches (4 x 4 tokens); batches of 16 classes x 4 images.
    "glyphs": dict(dataset="glyphs", train_classes="train", test_classes="test", eval_per_class=8,
                   img_size=32, patch_size=8, weights="none", batch_size=64, m_per_class=4),
}

# The training recipe of every demo run (IRT_L / IRT_R on the training classes): IRT's contrastive loss with beta =
# 0.5 and lambda = 0.7 and AdamW with weight decay 5e-4 (IRT §4.2); a ViT-Tiny at the demo's size. Iterations and
# batch were set by the budget (`make demo` within 30 minutes on a 2-core CPU with three seeds, when they were
# chosen; it now trains one seed by default): 100 iterations of 64 images. The learning rate and the cross-batch
# memory were chosen on the glyphs' validation classes at that budget (notebooks/11_recipe_study.ipynb,
# figures/recipe_study.md; R@1 on train_val, from the pretrained model, off the shelf 84.3): lr 1e-4 86.3, 3e-4 85.5,
# 3e-5 85.3, 1e-3 72.8; at 1e-4 a 1,024-entry memory filled from step 0 reached 80.0 and from step 50 85.5, so the
# demo trains without memory (the papers' presets keep theirs, from step 0, as IRT does).
RECIPE: dict[str, Any] = dict(
    backbone="vit_tiny_patch16_224", pooling="cls", beta=0.5, lam=0.7, iterations=100, lr=1e-4,
    weight_decay=5e-4, memory_size=0, memory_start=0, warmup_iters=10,
)
# The demos whose model is pretrained here first, on classes disjoint from both of its splits (ImageNet -> SOP
# in miniature, IRT §4): the pretraining run's settings over DEMO_DATA and RECIPE. Its run is named after its
# config's hash, so the fine-tuning runs' ``weights`` (that run's directory) change when it does.
PRETRAIN: dict[str, dict[str, Any]] = {
    # Our reading (no ImageNet here): Scalable NCA (a softmax over the batch's neighbours) plus KoLeo (λ = 0.7,
    # eq. 5) on the 1,000 pretraining classes, evaluated on the validation classes. Chosen on those
    # (notebooks/11_recipe_study.ipynb, R@1 on train_val; 200 iterations of 128 images):
    # * SNCA alone (τ = 0.05) leaves a collapsed spectrum (90 % of the energy in 4 of 192 components) and
    #   fine-tunes badly: 57.8 off the shelf, 55.2 after the demo's 100 fine-tuning iterations (lr 1e-4; 53.9
    #   at 3e-4, 50.5 at 3e-5, 33.3 at 1e-3), below where it started; τ = 0.1: 49.8, 3 components;
    # * SNCA + KoLeo: 84.3 off the shelf with 27 components, 86.3 after fine-tuning (lr 1e-4). Its spectrum is
    #   wide, as an ImageNet model's is (IRT Fig. 2's premise).
    # Class-proxy classification (Normalized Softmax, 1,000 proxies, each seen ~0.1 times a batch) did not
    # leave ln(1000) in the budget: loss 7.2 -> 7.0 after 170 iterations of 128 images.
    "glyphs": dict(train_classes="pretrain", test_classes="train_val", eval_per_class=None, loss="snca",
                   temperature=0.05, lam=0.7, memory_size=0, memory_start=0, iterations=200, warmup_iters=20,
                   lr=5e-4, weight_decay=0.05, batch_size=128, m_per_class=4),
}
# Fields that a demo's ``overrides`` pass on to its pretraining run too: how it runs, the architecture
# (the weights must fit the fine-tuned model) and where the data are.
PRETRAIN_SHARED = EXECUTION_FIELDS | {"backbone", "img_size", "patch_size", "data_root"}
DEMOS = tuple(DEMO_DATA)
DEFAULT_DEMO = "glyphs"


def _check_demo(demo: str) -> None:
    if demo not in DEMO_DATA:
        raise ConfigError(f"demo={demo!r} is invalid: expected one of {', '.join(DEMOS)}")


def pretrain_config(demo: str, runs_dir: str = "runs", **overrides: Any) -> ExperimentConfig | None:
    """The pretraining run of ``demo`` (None when it has none): :data:`DEMO_DATA` and the architecture
    of :data:`RECIPE` with :data:`PRETRAIN` ``[demo]`` on top, then ``overrides``; named
    ``pretrain_<hash of its fingerprint>`` under ``<runs_dir>/<demo>``."""
    _check_demo(demo)
    if demo not in PRETRAIN:
        return None
    d = {**DEMO_DATA[demo], **{k: RECIPE[k] for k in ("backbone", "pooling")}, **PRETRAIN[demo],
         "runs_dir": str(Path(runs_dir) / demo), **overrides}
    cfg = ExperimentConfig.from_dict({**d, "name": "pretrain"})
    digest = hashlib.sha256(json.dumps(cfg.changed_fingerprint(), sort_keys=True).encode()).hexdigest()[:8]
    return cfg.replace(name=f"pretrain_{digest}")


def demo_config(demo: str = DEFAULT_DEMO, runs_dir: str = "runs", name: str = "irt",
                **overrides: Any) -> ExperimentConfig:
    """The demo's base config: :data:`DEMO_DATA` ``[demo]`` + :data:`RECIPE` + ``overrides`` (any
    config field; a notebook's ``overrides`` parameter), validated. The notebooks derive their runs
    from it (:func:`nbsrc.paper.grids.irt_variants`, the sweeps and grids)."""
    _check_demo(demo)
    d = {**DEMO_DATA[demo], **RECIPE}
    pre = pretrain_config(demo, runs_dir, **{k: v for k, v in overrides.items() if k in PRETRAIN_SHARED})
    if pre is not None:
        d["weights"] = str(pre.run_dir)  # fine-tune the model pretrained by prepare_demo
    runs_dir = str(Path(runs_dir) / demo)  # each demo's runs apart: the notebooks name runs alike
    d.update({"name": name, "runs_dir": runs_dir, **overrides})
    for key in ("warmup_iters", "memory_start"):  # the recipe's, shortened to fit fewer iterations
        if key not in overrides:
            d[key] = min(d[key], max(d["iterations"], 0))  # iterations < 0: its own error, not this field's
    return ExperimentConfig.from_dict(d)


def prepare_demo(demo: str = DEFAULT_DEMO, runs_dir: str = "runs", pretrain: dict | None = None,
                 **overrides: Any) -> ExperimentConfig:
    """:func:`demo_config`, after pretraining the demo's model when it has a pretraining step
    (:data:`PRETRAIN`): that run is trained once and reused while its config is unchanged (the
    usual run reuse). ``pretrain``: config fields over the pretraining run's (e.g. fewer iterations
    for a smoke run); ``overrides`` reach it only for :data:`PRETRAIN_SHARED` fields."""
    demo_config(demo, runs_dir, **overrides)  # a bad override is said now, not after the pretraining
    shared = {k: v for k, v in overrides.items() if k in PRETRAIN_SHARED}
    pre = pretrain_config(demo, runs_dir, **{**shared, **(pretrain or {})})
    if pre is not None:
        from nbsrc.experiment import run_experiment  # torch: only when a run is made (the CLI's --help stays fast)

        run_experiment(pre)
        overrides = {"weights": str(pre.run_dir), **overrides}
    return demo_config(demo, runs_dir, **overrides)


def recipe_study(runs_dir: str = "runs", pretrain: dict | None = None, iterations: int = RECIPE["iterations"],
                 lrs=(3e-5, 1e-4, 3e-4, 1e-3), memory_starts=None, memory_size: int = 1024,
                 memory_lr: float = RECIPE["lr"],
                 **overrides: Any) -> dict[str, ExperimentConfig]:
    """The search that chose :data:`RECIPE` (notebooks/11_recipe_study.ipynb): IRT_L (λ = 0) on the glyphs'
    ``train_fit`` classes, evaluated on ``train_val`` (100 training classes held out, all their images;
    never the test classes), with the demo's batches (:data:`DEMO_DATA`). ``{label: config}``:

    * off the shelf, random init and pretrained (:data:`PRETRAIN`);
    * fine-tuned from random init at lr 3e-4, without memory;
    * fine-tuned from the pretrained model at each lr of ``lrs``, without memory;
    * at ``memory_lr`` with a ``memory_size`` cross-batch memory from each iteration of ``memory_starts``
      (default: 0 and half the run). The notebook asks in two steps: the learning rates (``memory_starts=()``),
      then the memory at the chosen one (``lrs=[chosen]``, ``memory_lr=chosen``); runs both steps name are
      trained once.

    Runs go to ``<runs_dir>/glyphs/study_*``; the pretraining run is the demo's (trained by
    :func:`prepare_demo` if needed)."""
    if memory_starts is None:
        memory_starts = (0, iterations // 2)
    study = dict(name="study", train_classes="train_fit", test_classes="train_val", eval_per_class=None, lam=0.0,
                 memory_size=0, memory_start=0, iterations=iterations,
                 warmup_iters=min(RECIPE["warmup_iters"], iterations))
    base = prepare_demo("glyphs", runs_dir, pretrain, **{**study, **overrides})
    pre = base.model.weights

    def tag(x: float) -> str:
        return f"{x:.0e}".replace("e-0", "e-")  # 3e-4

    off = base.replace(iterations=0, warmup_iters=0)
    out = {"random init, off the shelf": off.replace(name="study_o_random", weights="none"),
           "pretrained, off the shelf": off.replace(name="study_o_pre"),
           "random init, lr 3e-4": base.replace(name="study_random_lr3e-4", weights="none", lr=3e-4)}
    for lr in lrs:
        out[f"pretrained, lr {tag(lr)}"] = base.replace(name=f"study_pre_lr{tag(lr)}", weights=pre, lr=lr)
    for start in memory_starts:
        start = min(int(start), iterations)
        out[f"pretrained, lr {tag(memory_lr)}, XBM {memory_size} from it. {start}"] = base.replace(
            name=f"study_pre_lr{tag(memory_lr)}_xbm{memory_size}_from{start}", lr=memory_lr,
            memory_size=memory_size, memory_start=start)
    return out


# Tiny parameters for the smoke run (CI): each notebook finishes in well under a minute.
QUICK = {
    "runs_dir": "runs/quick", "figures_dir": "runs/quick/figures", "iterations": 4, "eval_per_class": 20,
    "batch_size": 32, "m_per_class": 8, "memory_size": 64, "memory_start": 0, "warmup_iters": 0, "seeds": [0],
    "pretrain": {"iterations": 4, "warmup_iters": 0, "eval_per_class": 5, "batch_size": 32, "m_per_class": 4},
    # the grids at their smallest that still draw every figure and table (two values where a figure needs a line,
    # three margins for the gradient-noise claim C5); one seed: the claims' cells run, their verdicts are inconclusive
    "poolings": ["cls", "gem"], "betas": [0.3, 0.5, 0.7], "lams": [0.0, 0.7], "grid_lams": [0.0, 0.7],
    "objectives": ["contrastive", "snca"], "pe_values": ["none", "dpe"],
    "jobs": 1,  # runs of 4 iterations: starting worker processes would cost more than they save
}


def notebooks() -> list[Path]:
    return sorted(p for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


# Not part of `make demo`: the search that chose RECIPE (run it by name: `nbsrc demo --only 11_recipe_study.ipynb`).
STUDIES = ("11_recipe_study.ipynb",)
# Part of `make demo-full` (`nbsrc demo --full`) only: the grids, each many short runs over the seeds (04: C5's
# beta x lambda cells, 18 runs; 07: C7's poolings and Tables 4-6, 11 runs) and DToP's ablations (08). `make demo`
# runs the notebooks the main table and claims C1-C4 and C6 need; C5's and C7's verdicts stay those of the last
# full run (figures/claims/), and the demo says so when it prints them.
FULL_ONLY = ("04_gradient_noise.ipynb", "07_ablations.ipynb", "08_dtop.ipynb")


def demo_notebooks(full: bool = False, quick: bool = False, only: list[str] | None = None) -> list[Path]:
    """The notebooks a demo runs, in order: ``only`` (file names) when given, else 01-10 without
    :data:`FULL_ONLY` unless ``full`` or ``quick`` (the smoke run runs them all), never :data:`STUDIES`."""
    if only:
        return [nb for nb in notebooks() if nb.name in only]
    return [nb for nb in notebooks() if nb.name not in STUDIES and (full or quick or nb.name not in FULL_ONLY)]


def run_demo(quick: bool = False, notebooks_to_run: list[str] | None = None, out_dir: str | Path = "runs/notebooks",
             demo: str = DEFAULT_DEMO, seeds: list[int] | None = None, full: bool = False,
             fields: dict[str, Any] | None = None) -> None:
    """Run the demo notebooks (:func:`demo_notebooks`: 01-10 without the grids of :data:`FULL_ONLY` unless
    ``full``; 11 only when named in ``notebooks_to_run``) on ``demo`` and print the table and the claims'
    verdicts (:mod:`nbsrc.paper.claims`), each marked when it comes from an earlier run. Figures of a demo other
    than the default go to ``figures/<demo>/``. ``seeds``: the notebooks' ``seeds`` parameter (default:
    their own). ``fields``: config fields for every notebook that takes ``overrides`` (e.g. ``data_root``: the
    smoke run's small glyph set)."""
    from nbsrc.paper.notebooks import notebook_parameters

    _check_demo(demo)
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"seeds={list(seeds)}: give one or more distinct seeds, e.g. --seeds 0 1 2")
    figures = Path("figures") if demo == DEFAULT_DEMO else Path("figures") / demo
    if notebooks_to_run:
        unknown = sorted(set(notebooks_to_run) - {nb.name for nb in notebooks()})
        if unknown:
            raise ConfigError(f"--only {' '.join(unknown)}: no such notebook; expected file names such as "
                              f"{', '.join(nb.name for nb in notebooks()[:3])}, ...")
    t0, started = time.perf_counter(), time.time()
    for nb in demo_notebooks(full, quick, notebooks_to_run):
        declared = notebook_parameters(nb)
        takes = set(declared) | (set(config_field_types()) if "overrides" in declared else set())
        params = {k: v for k, v in QUICK.items() if k in takes} if quick else {}
        params |= {k: v for k, v in (fields or {}).items() if k in takes}
        if "demo" in declared:
            params["demo"] = demo
        if seeds is not None and "seeds" in declared:
            params["seeds"] = [int(x) for x in seeds]
        if "figures_dir" in declared and not quick:
            params["figures_dir"] = str(figures)
        t = time.perf_counter()
        print(f"== {nb.name}: started at {time.strftime('%H:%M:%S')}", flush=True)
        out = run_notebook(nb, params, Path(out_dir) / ("quick" if quick else "") / nb.name, show_progress=True)
        print(f"== {nb.name}: done in {time.perf_counter() - t:.0f} s -> {out}", flush=True)
    fig_dir = Path(QUICK["figures_dir"]) if quick else figures
    table = fig_dir / TABLE.name
    print(f"\nDemo finished in {(time.perf_counter() - t0) / 60:.1f} min. Recall@K (%) on the unseen classes:\n")
    print(table.read_text() if table.exists() else f"(no table: {table} was not written)")
    print_verdicts(fig_dir, started, seeds)
    if not quick and demo == DEFAULT_DEMO:
        print_study_verdicts(figures / "study")


def print_verdicts(fig_dir: Path, started: float, seeds: list[int] | None = None) -> None:
    """The claims' verdicts saved under ``fig_dir``, one line each, those judged before ``started`` (a
    time.time()) marked as coming from an earlier run (:func:`nbsrc.paper.claims.verdict_lines`). With fewer
    ``seeds`` than a verdict needs, a line first says that this run judged no claim."""
    from nbsrc.paper.claims import MIN_SEEDS, RULE, verdict_lines

    print(f"\nThe papers' claims (rule: {RULE})\n")
    if seeds is not None and len(seeds) < MIN_SEEDS:
        print(f"This demo trained {len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}): "
              f"a verdict needs at least {MIN_SEEDS}, so every claim it measured reads inconclusive; it is a smoke "
              f"test of the pipeline (`make demo DEMO_SEEDS=\"0 1 2\"` judges them). The evidence is the study's, "
              f"below.\n")
    print("\n".join(verdict_lines(fig_dir, judged_since=started)))


def print_study_verdicts(study_dir: Path) -> None:
    """The verdicts of the last ``make study`` saved under ``study_dir`` (``figures/study``), marked as the
    study's with the date and commit its ``verdicts.md`` records; not judged by the demo. Nothing when the
    study has not been run."""
    from nbsrc.paper.claims import load_claims

    saved, head = load_claims(study_dir), Path(study_dir) / "verdicts.md"
    if not saved or not head.exists():
        print(f"\nThe study's verdicts: none yet ({study_dir} holds no verdicts; `make study` judges the claims)")
        return
    meta = dict(line[2:].split(": ", 1) for line in head.read_text().splitlines()
                if line.startswith("- ") and ": " in line and line[2:].split(": ", 1)[0] in ("date", "commit"))
    print(f"\nThe study's verdicts (`make study`, {meta.get('date', 'date not recorded')[:10]}, commit "
          f"{meta.get('commit', 'not recorded')[:12]}; judged by the study, not by this demo; {head}):\n")
    print("\n".join(f"- {d['line']}" for d in sorted(saved, key=lambda d: int(d["id"][1:]))))
