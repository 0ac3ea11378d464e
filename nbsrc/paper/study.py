"""The study (``make study``, ``nbsrc study``): the claims C1–C7 judged where fine-tuning has done its work.

Its settings are in one place, :data:`STUDY`, each with the validation measurement it was chosen on (or
"to be chosen by the pilot" where none has been made). Its rules:

* **pretraining** (:data:`STUDY_PRETRAIN`, the candidates ``STUDY["pretrain"]``): a stand-in for ImageNet
  that presupposes no claim: no KoLeo or other spreading term, on other classes (0–999) and another look
  than the fine-tuning data (the print faces only, :mod:`nbsrc.data.glyph_faces`); fine-tuning and
  evaluation see every face. Chosen on ``train_val`` off the shelf (:func:`pretraining_choice`): the
  candidate with the highest R@1 among those above a randomly initialised ViT's in R@1 and not narrower
  in spectrum; when none is, the ViT is fine-tuned from random init and C3 (whose premise is a
  pretrained, wide spectrum) is *untestable*;
* **length**: a fine-tuning run trains until its validation Recall@1 has flattened (:func:`flattened`:
  less than ``STUDY["flat_gain"]`` R@1 gained over the last fifth of its iterations, evaluated every
  ``eval_every`` on ``train_val`` after training on ``train_fit``), at most ``max_iterations``; the
  length so found (:func:`chosen_length`) is each backbone's, and its learning curve is recorded;
* **recipe per backbone** (the ViT and the convnet apart): learning rate, BatchNorm in train or eval
  mode and input size chosen on ``train_val`` (:func:`recipe_candidates`, the best R@1);
* **seeds**: ``STUDY["seeds_main"]`` (≥ 5) for C1, C2 (and C3, C6 on the same runs), ``seeds_other``
  (≥ 3) for C4, C5 and C7, paired;
* **grids** (C5's β × λ, C7's poolings) at the chosen length, with γ averaged over every logged
  iteration (IRT §3.5 averages over all training iterations; ``log_every`` sets how many are logged);
* a claim whose fine-tuned model is not above its off-the-shelf state on ``train_val`` is *untestable*
  (:func:`nbsrc.paper.claims.not_improved`).

Every run is reused by its config (run names carry a hash of the config's fingerprint), so rerunning
:func:`run_study` after a kill continues: finished runs are loaded, a run killed mid-training resumes
from its checkpoint. Outputs go to ``<figures>/study/`` (:func:`run_study`)."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from nbsrc.config import ExperimentConfig
from nbsrc.data.glyph_faces import HAND_FACES
from nbsrc.errors import ConfigError
from nbsrc.paper.demo import DEMO_DATA, PRETRAIN, RECIPE
from nbsrc.train.loop import cpu_has_native_bf16

MAIN_CLAIMS = frozenset({"C1", "C2", "C3", "C6"})  # judged on IRT_O/L/R over seeds_main (table3_irt_seeds)

# The pretraining candidates for the study, each over DEMO_DATA["glyphs"] and the ViT of RECIPE. "faces":
# "print" pretrains on the print faces only (nbsrc.data.glyph_faces.HAND_FACES excluded), "all" on every face.

STUDY_PRETRAIN: dict[str, dict[str, Any]] = {
    # The demo's (nbsrc.paper.demo.PRETRAIN): SNCA + KoLeo on every face. Presupposes C3 (KoLeo has already spread the
    # spectrum); kept for comparison only.
    "snca_koleo_all": dict(faces="all", **PRETRAIN["glyphs"]),
    # Supervised classification, a linear head with cross-entropy over the 1,000 pretraining classes (DeiT's
    # ImageNet pretraining, without its distillation), on the print faces; no spreading term.
    "ce_print": dict(faces="print", train_classes="pretrain", test_classes="train_val", eval_per_class=None,
                     loss="linear_ce", lam=0.0, memory_size=0, memory_start=0, iterations=600, warmup_iters=60,
                     lr=1e-3, weight_decay=0.05, batch_size=128, m_per_class=2),
    # Distillation from the frozen ImageNet EfficientNet-Lite0 (nbsrc.models.teacher, DeiT's recipe: a convnet
    # teacher) of its pooled features on the print faces' images, labels unused (nbsrc.losses.distill); lr by
    # DeiT's scaling rule, 5e-4 x batch / 512.
    "distill_print": dict(faces="print", train_classes="pretrain", test_classes="train_val", eval_per_class=None,
                          loss="distill", lam=0.0, memory_size=0, memory_start=0, iterations=600, warmup_iters=60,
                          lr=1.25e-4, weight_decay=0.05, batch_size=128, m_per_class=2),
    # A metric loss without KoLeo: Scalable NCA alone (τ = 0.05), on the print faces.
    "snca_print": dict(faces="print", **{**PRETRAIN["glyphs"], "lam": 0.0}),
}


def _hash(cfg: ExperimentConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.changed_fingerprint(), sort_keys=True).encode()).hexdigest()[:8]


def glyph_data_root(faces: str, data_root: str | None = None, hand_faces=None) -> str | None:
    """The ``data_root`` of a run on ``faces`` ("all": ``data_root`` itself; "print": that set without
    ``hand_faces`` (default ``STUDY["hand_faces"]``), :func:`nbsrc.data.glyph_faces.face_subset`, written once)."""
    if faces == "all":
        return data_root
    if faces != "print":
        raise ConfigError(f"faces={faces!r} is invalid: expected 'all' or 'print'")
    from nbsrc.data.glyph_faces import face_subset
    from nbsrc.data.glyphs import load_glyphs

    exclude = STUDY["hand_faces"] if hand_faces is None else tuple(hand_faces)
    return str(face_subset(load_glyphs(data_root, progress=False), exclude))


def study_pretrain_config(candidate: str, runs_dir: str = "runs/study", data_root: str | None = None,
                          hand_faces=None, **overrides: Any) -> ExperimentConfig:
    """The pretraining run of ``candidate`` (a key of :data:`STUDY_PRETRAIN`): :data:`DEMO_DATA` ``["glyphs"]``,
    the ViT of :data:`RECIPE`, the candidate's fields, then ``overrides``; named ``pretrain_<candidate>_<hash>``
    under ``<runs_dir>/glyphs``. ``hand_faces``: the faces a "print" candidate leaves out (default
    ``STUDY["hand_faces"]``)."""
    if candidate not in STUDY_PRETRAIN:
        raise ConfigError(f"pretrain={candidate!r} is invalid: expected one of {', '.join(STUDY_PRETRAIN)}")
    fields = dict(STUDY_PRETRAIN[candidate])
    faces = fields.pop("faces")
    d = {**DEMO_DATA["glyphs"], **{k: RECIPE[k] for k in ("backbone", "pooling")}, **fields,
         "data_root": glyph_data_root(faces, data_root, hand_faces), "runs_dir": str(Path(runs_dir) / "glyphs"),
         **overrides}
    cfg = ExperimentConfig.from_dict({**d, "name": "pretrain"})
    return cfg.replace(name=f"pretrain_{candidate}_{_hash(cfg)}")


# The study's settings. Each says the validation measurement it was chosen on, or that the pilot of a later
# session (the first `make study`, whose selection phase measures it) still has to choose it.
STUDY: dict[str, Any] = dict(
    # The pretraining candidates (keys of STUDY_PRETRAIN, none with a spreading term), chosen by the study itself
    # on train_val (pretraining_choice). Measured so far (figures/recipe_study.md, 2026-12-06; train_val R@1 off the
    # shelf, every face; random init 55.0 with dim_90 10): ce_print at 100 iterations, lr 3e-4: 31.2, dim_90 1; at
    # lr 1e-3 (checkpoint of iteration 100): 21.6, dim_90 1; its loss had not left ln(1000) = 6.91 (6.87-7.11).
    # SNCA alone (on every face, 200 iterations): 57.8 with 4 components at 90 % (the demo's pilot). No usable
    # stand-in yet: ce_print's 600 iterations here are a guess, to be chosen by the pilot.
    pretrain=["distill_print"],
    hand_faces=HAND_FACES,  # the faces left out of the print-face pretraining (brush, handwriting, pen)
    # The length rule: each backbone's selection runs train on train_fit for max_iterations, evaluated on
    # train_val every eval_every; the length is the first evaluation at which less than flat_gain R@1 was
    # gained over the last fifth of the iterations (flattened), else max_iterations (not flattened: said so).
    # max_iterations: the demo's recipe was still rising at 1,000 iterations (91.3 -> 91.4 R@1 from 800 to
    # 1,000, figures/recipe_study.md); 2,000 (5.8 passes over the 22,141 images of train_fit) to be confirmed by
    # the pilot.
    max_iterations=1200, eval_every=200, flat_gain=0.5,
    # Each backbone's recipe: its candidates (config fields over the backbone's), chosen on train_val by the
    # highest R@1 at the end of the selection run (to be chosen by the pilot: no measurement yet on the new
    # pretraining). The ViT: the demo's 1e-4 (best of 3e-5..1e-3 at 100 iterations from the SNCA+KoLeo model,
    # 86.3 R@1) and 3e-4 (85.5 there).
    vit=dict(name="ViT-Tiny", backbone=RECIPE["backbone"], pooling="cls", weights="pretrain",
             candidates=[dict(lr=1e-4), dict(lr=3e-4)]),
    # The convnet (C4): EfficientNet-Lite0 with its ImageNet weights. Its demo recipe (lr 1e-4, BatchNorm in
    # train mode, 64 px, 33 iterations) lowered train_val R@1 from 59.2 to 39.6 (docs/results.md). The pilot
    # (backbone_choice, figures/recipe_study.md, 2026-12-06; 1,000 iterations, off the shelf 88.9): lr 1e-5 with
    # BatchNorm frozen 96.4, lr 3e-5 frozen 97.2, lr 3e-5 with BatchNorm training 90.5 (82.3 at 200), lr 3e-5
    # frozen at 96 px 97.7, flattened at 400 iterations. The study keeps its two best (64 and 96 px) and stops
    # their selection runs at 600 iterations, past the 400 where the pilot's flattened.
    convnet=dict(name="EfficientNet-Lite0", backbone="tf_efficientnet_lite0", weights="efficientnet_lite0",
                 pooling="avg", patch_size=None, img_size=64, max_iterations=600,
                 candidates=[dict(lr=3e-5, freeze_batchnorm=True), dict(lr=3e-5, freeze_batchnorm=True, img_size=96)]),
    # Seeds (paired): at least 5 for C1 and C2 (KoLeo's effect in IRT Table 3 is +0.5 to +1.2 R@1), whose runs
    # also give C3 and C6; at least 3 for C4, C5 and C7.
    seeds_main=[0, 1, 2, 3, 4], seeds_other=[0, 1, 2],
    # The grids at the ViT's chosen length: C5's beta x lambda (IRT Fig. 4: the ends and the middle of the
    # margins, lambda 0 and the paper's 0.7), gamma logged at every iteration (IRT §3.5: averaged over all
    # training iterations); C7's poolings (IRT Table 9, "IRT_L model"), each trained at beta 0.5, lambda 0.
    betas=[0.3, 0.5, 0.7], lams=[0.0, 0.7], grad_noise_log_every=1, poolings=["cls", "avg", "max", "gem"],
    # C7's recipe per pooling (our reading: IRT Table 9 does not say whether the recipe was tuned per pooling; one
    # tuned for CLS alone favours CLS): each pooling's learning rate chosen on train_val (pooling_choice), IRT_L
    # trained on train_fit for the grids' length, the highest R@1 at its end. The first study trained every
    # pooling at CLS's lr 1e-4, where max and GeM pooling fell below their off-the-shelf test R@1 (42.1 -> 22.8,
    # 36.2 -> 8.8). An empty list trains every pooling with the ViT's chosen recipe.
    pooling_candidates=[dict(lr=3e-5), dict(lr=1e-4), dict(lr=3e-4)],
    # The grids' length (issue: "at a length where their runs are above IRT_O on validation"): None trains them
    # at the ViT's chosen length (their beta = 0.5 cells are then IRT_L and IRT_R themselves, C7's CLS run IRT_L);
    # an int trains them that long, checked on the ViT's selection curve (above its off-the-shelf R@1 on
    # train_val, else C5 and C7 read untestable). 400: the first study's curve was 80.1 R@1 there against 55.0 off
    # the shelf (74.9 at 200) and 88.2 at its length of 1,200; a third of the length brings the grids' 30 runs
    # into a session (our reading: gamma is averaged over the grid run's own iterations, IRT 3.5).
    grid_iterations=400,
    # precision: fp32 everywhere (bf16 autocast is used only where a 3-seed check shows the validation numbers
    # do not move; no such check yet). Runs at once: 2 on a CPU with 2+ cores.
    jobs="auto",
    # the claims to judge: the ViT's IRT runs (C1, C2, C3, C6) are always trained; the convnet's selection and runs
    # only for C4, the grid only for C5, the poolings only for C7 (`nbsrc study --set claims '["C1", "C2"]'`)
    claims=["C1", "C2", "C3", "C6"],
    # config fields over every fine-tuning run and over the pretraining run (e.g. {"device": "cuda"}; the test's
    # tiny batches); empty in the study
    overrides={}, pretrain_overrides={},
)


def study_settings(**overrides: Any) -> dict[str, Any]:
    """:data:`STUDY` with ``overrides`` on top (``vit`` / ``convnet``: their fields merged, not replaced);
    an unknown key is a one-line error."""
    unknown = sorted(set(overrides) - set(STUDY))
    if unknown:
        raise ConfigError(f"study setting(s) {', '.join(unknown)} unknown: expected some of {', '.join(STUDY)}")
    out = {**STUDY, **overrides}
    for key in ("vit", "convnet"):
        if key in overrides:
            out[key] = {**STUDY[key], **overrides[key]}
    unknown = sorted(set(out["claims"]) - {f"C{i}" for i in range(1, 8)}) if isinstance(out["claims"], list) else True
    if unknown or not out["claims"]:
        raise ConfigError(f"claims={out['claims']!r} is invalid: expected a list of some of C1 ... C7")
    if len(out["seeds_main"]) < 1 or len(out["seeds_other"]) < 1:
        raise ConfigError("seeds_main and seeds_other need at least one seed each")
    g = out["grid_iterations"]
    if g is not None and (isinstance(g, bool) or not isinstance(g, int) or not 0 < g <= max_iterations(out, "vit")):
        raise ConfigError(f"grid_iterations={g!r} is invalid: expected null (the ViT's chosen length) or an integer "
                          f"from 1 to the ViT's selection length {max_iterations(out, 'vit')}")
    bad = [c for c in out["pretrain"] if c not in STUDY_PRETRAIN] if isinstance(out["pretrain"], list) else True
    if bad:
        raise ConfigError(f"pretrain={out['pretrain']!r} is invalid: expected a list of some of "
                          f"{', '.join(STUDY_PRETRAIN)} (an empty list: none tried, the ViT from random init)")
    pc = out["pooling_candidates"]
    if not isinstance(pc, list) or not all(isinstance(c, dict) and c for c in pc):
        raise ConfigError(f"pooling_candidates={pc!r} is invalid: expected a list of config fields, e.g. "
                          '[{"lr": 3e-05}, {"lr": 0.0001}] (an empty list: every pooling at the ViT\'s chosen recipe)')
    for c in pc:  # said now, not after the hours of pretraining and selection that come before C7's
        try:
            ExperimentConfig.from_dict({}).replace(**c)
        except ConfigError as e:
            raise ConfigError(f"pooling_candidates: {c!r}: {e}") from None
    spread = [c for c in out["pretrain"] if STUDY_PRETRAIN[c]["lam"] > 0]
    if spread:
        raise ConfigError(f"pretrain={out['pretrain']!r}: {', '.join(spread)} has a spreading term (KoLeo), which "
                          "presupposes claim C3; the study's stand-in must have none")
    return out


def flattened(curve, flat_gain: float) -> bool:
    """Whether a learning curve ``[(iteration, R@1), ...]`` (sorted, its last point the run's end) has
    flattened: R@1 at the end minus R@1 at 4/5 of the iterations (linearly interpolated) is below
    ``flat_gain``."""
    its, r1 = zip(*sorted(curve), strict=True)
    end = its[-1]
    return r1[-1] - _at(curve, 0.8 * end) < flat_gain


def _at(curve, it: float) -> float:
    import numpy as np

    its, r1 = zip(*sorted(curve), strict=True)
    return float(np.interp(it, its, r1))


def chosen_length(curve, flat_gain: float) -> tuple[int, bool]:
    """The length the rule picks on ``curve`` ``[(iteration, R@1), ...]`` (iteration 0 the off-the-shelf
    model): the first evaluated iteration T > 0 at which less than ``flat_gain`` R@1 was gained since
    0.8·T (:func:`flattened` of the curve up to T), and True; else the curve's last iteration and False (it
    had not flattened). Our reading: the curve is one run's, evaluated as it trains (its learning rate
    follows the schedule of the longer run)."""
    pts = sorted(curve)
    for k, (it, _) in enumerate(pts):
        if it > 0 and flattened(pts[:k + 1], flat_gain):
            return int(it), True
    return int(pts[-1][0]), False


def learning_curve(run, off_the_shelf: float) -> list[tuple[int, float]]:
    """``[(iteration, R@1)]`` of a run trained with ``eval_every``: ``(0, off_the_shelf)``, its logged
    evaluations, and its final one."""
    pts = {0: float(off_the_shelf)}
    for row in run.metrics("eval"):
        if row.get("R@1") is not None:
            pts[int(row["iteration"])] = float(row["R@1"])
    pts[int(run.config.optim.iterations)] = float(run.recall["R@1"])
    return sorted(pts.items())


def say(msg: str) -> None:
    """A progress line: ``[study HH:MM:SS] msg``."""
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _named(cfg: ExperimentConfig, prefix: str) -> ExperimentConfig:
    """``cfg`` named ``<prefix>_<hash of its fingerprint>``: another setting is another run, never a clash."""
    return cfg.replace(name=f"{prefix}_{_hash(cfg.replace(name='study'))}")


def max_iterations(settings: dict, which: str) -> int:
    """The length of backbone ``which``'s selection runs: its own ``max_iterations``, else the study's."""
    return int(settings[which].get("max_iterations", settings["max_iterations"]))


def study_plan(settings: dict, vit_length: int | None = None, convnet_length: int | None = None) -> pd.DataFrame:
    """What the study trains, phase by phase: runs and training images (iterations × batch), with the
    claims' runs at ``vit_length`` / ``convnet_length`` (default: their selection length, the most the rule
    can pick). Divide ``images`` by a measured img/s for an estimate of the training time."""
    s = settings
    vl, cl = vit_length or max_iterations(s, "vit"), convnet_length or max_iterations(s, "convnet")
    gl = s["grid_iterations"] or vl
    b = {**DEMO_DATA["glyphs"], **RECIPE, **s["overrides"]}["batch_size"]
    no = len(s["seeds_other"])
    rows = []
    for c in s["pretrain"]:
        f = {**STUDY_PRETRAIN[c], **s["pretrain_overrides"]}
        rows.append(("pretraining " + c, 1, f["iterations"] * f["batch_size"]))
    want = set(s["claims"])
    for which in ("vit", "convnet") if "C4" in want else ("vit",):
        n = len(s[which]["candidates"])
        rows.append((f"selection {s[which]['name']}", n, n * max_iterations(s, which) * b))
    labels, seeds = irt_runs_needed(s, vl)
    shared = grids_share_irt_runs(s, vl) and set(s["seeds_other"]) <= set(seeds)
    grid = len(s["betas"]) * len(s["lams"]) - (2 if shared else 0)
    pools = len(s["poolings"]) - (1 if shared else 0)
    trained = [k for k in labels if k != "IRT_O"]
    if trained:
        rows.append((f"claims ViT {'/'.join(trained)}", len(trained) * len(seeds), len(trained) * len(seeds) * vl * b))
    if "C4" in want:
        rows.append(("claims convnet IRT_L (C4)", no, no * cl * b))
    if "C5" in want:
        rows.append((f"claims β × λ grid (C5; {'its β = 0.5 cells are IRT_L/R' if shared else f'{gl} iterations'})",
                     grid * no, grid * no * gl * b))
    if "C7" in want and s["pooling_candidates"]:  # each pooling's recipe; CLS may then leave IRT_L's (at most all)
        n = len(s["poolings"]) * len(s["pooling_candidates"])
        rows.append(("selection poolings (C7)", n, n * gl * b))
        pools = len(s["poolings"])
    if "C7" in want:
        rows.append((f"claims poolings (C7; {'CLS is IRT_L' if shared else f'{gl} iterations'})", pools * no,
                     pools * no * gl * b))
    return pd.DataFrame(rows, columns=["phase", "runs", "images"]).set_index("phase")


def backbone_base(settings: dict, which: str, pretrained: str, runs_dir: str, data_root: str | None,
                  **overrides: Any) -> ExperimentConfig:
    """The fine-tuning config of backbone ``which`` ("vit" or "convnet"): the glyphs' data
    (:data:`DEMO_DATA`), :data:`RECIPE` (IRT's loss, AdamW), the backbone's fields of ``settings``
    (``weights="pretrain"``: the run dir ``pretrained``), then ``overrides``."""
    b = {k: v for k, v in settings[which].items() if k not in ("name", "candidates", "max_iterations")}
    if b.get("weights") == "pretrain":
        b["weights"] = pretrained
    d = {**DEMO_DATA["glyphs"], **RECIPE, **b, "data_root": data_root, "runs_dir": str(Path(runs_dir) / "glyphs"),
         "name": "study", **settings["overrides"], **overrides}
    d["warmup_iters"] = min(d["warmup_iters"], d["iterations"])
    return ExperimentConfig.from_dict(d)


def candidate_label(fields: dict) -> str:
    """A recipe candidate in a few words: ``{"lr": 3e-05, "freeze_batchnorm": True, "img_size": 96}`` →
    ``"lr 3e-05, BN eval, 96 px"``."""
    words = {"lr": lambda v: f"lr {v:g}", "freeze_batchnorm": lambda v: "BN eval" if v else "BN train",
             "img_size": lambda v: f"{v} px"}
    return ", ".join(words[k](v) if k in words else f"{k} {v}" for k, v in fields.items())


def selection_configs(settings: dict, which: str, pretrained: str, runs_dir: str, data_root: str | None,
                      **overrides: Any) -> dict[str, ExperimentConfig]:
    """The recipe and length selection of backbone ``which`` on the validation classes: ``{"off the
    shelf": ..., "<fields>": ...}``, IRT_L (λ = 0) trained on ``train_fit`` for ``max_iterations`` with
    each candidate's fields, evaluated on ``train_val`` every ``eval_every``."""
    val = dict(train_classes="train_fit", test_classes="train_val", eval_per_class=None, lam=0.0,
               iterations=max_iterations(settings, which), eval_every=settings["eval_every"])
    base = backbone_base(settings, which, pretrained, runs_dir, data_root, **{**val, **overrides})
    out = {"off the shelf": _named(base.replace(iterations=0, warmup_iters=0, eval_every=0), f"sel_{which}_o")}
    for cand in settings[which]["candidates"]:
        out[candidate_label(cand)] = _named(base.replace(**cand), f"sel_{which}")
    return out


def pooling_selection_configs(settings: dict, vit_fields: dict, iterations: int, pretrained: str, runs_dir: str,
                              data_root: str | None) -> dict[tuple[str, str], ExperimentConfig]:
    """C7's recipe per pooling on the validation classes: ``{(pooling, "off the shelf" | "<fields>"): config}``,
    the ViT with its chosen recipe ``vit_fields``, IRT_L (λ = 0) trained on ``train_fit`` for ``iterations``
    (the grids' length) with each of ``settings["pooling_candidates"]``, evaluated on ``train_val`` at its end."""
    val = dict(train_classes="train_fit", test_classes="train_val", eval_per_class=None, lam=0.0,
               iterations=iterations, eval_every=0)
    base = backbone_base(settings, "vit", pretrained, runs_dir, data_root, **{**vit_fields, **val})
    out = {}
    for p in settings["poolings"]:
        out[(p, "off the shelf")] = _named(base.replace(pooling=p, iterations=0, warmup_iters=0), "sel_pool_o")
        for cand in settings["pooling_candidates"]:
            out[(p, candidate_label(cand))] = _named(base.replace(pooling=p, **cand), "sel_pool")
    return out


def pooling_choice(settings: dict, vit_fields: dict, iterations: int, pretrained: str, runs_dir: str = "runs/study",
                   data_root: str | None = None, jobs: int | str = "auto") -> dict:
    """Train C7's selection runs (:func:`pooling_selection_configs`) and choose, per pooling, the candidate
    with the highest validation R@1. Returns ``{pooling: {"off_the_shelf_val_r1", "candidates": {label:
    R@1}, "chosen", "fields", "val_r1", "runs"}}``, the record the study saves."""
    from nbsrc.experiment import run_all

    runs = run_all(pooling_selection_configs(settings, vit_fields, iterations, pretrained, runs_dir, data_root),
                   jobs=jobs)
    labels = [candidate_label(c) for c in settings["pooling_candidates"]]
    out = {}
    for p in settings["poolings"]:
        r1 = {label: round(runs[(p, label)].recall["R@1"], 2) for label in labels}
        best = max(labels, key=lambda label: r1[label])
        out[p] = {"off_the_shelf_val_r1": round(runs[(p, "off the shelf")].recall["R@1"], 2), "candidates": r1,
                  "chosen": best, "fields": dict(settings["pooling_candidates"][labels.index(best)]),
                  "val_r1": r1[best], "iterations": iterations,
                  "runs": {label: str(runs[(p, label)].run_dir) for label in ["off the shelf", *labels]}}
    return out


def pooling_selection_table(choice: dict) -> pd.DataFrame:
    """One row per pooling and candidate of :func:`pooling_choice`: validation R@1 at the end of its run, the
    off-the-shelf model first, the chosen one marked."""
    rows = [{"pooling": p, "candidate": label, "val R@1 (end)": r1,
             "chosen": f"yes ({c['iterations']} iterations)" if label == c["chosen"] else ""}
            for p, c in choice.items()
            for label, r1 in [("off the shelf", c["off_the_shelf_val_r1"]), *c["candidates"].items()]]
    return pd.DataFrame(rows).set_index("pooling")


def with_recipe(cfg: ExperimentConfig, fields: dict) -> ExperimentConfig:
    """``cfg`` with ``fields``; named ``<its name>_<hash>`` where they change it (else ``cfg`` itself, its run
    shared: C7's CLS run stays IRT_L when CLS's chosen recipe is the ViT's)."""
    new = cfg.replace(**fields)
    if new.changed_fingerprint() == cfg.changed_fingerprint():
        return cfg
    return new.replace(name=f"{cfg.run.name}_{_hash(new.replace(name='study'))}")


def _val_config(settings: dict, runs_dir: str, data_root: str | None, weights: str) -> ExperimentConfig:
    """The ViT off the shelf with ``weights``, evaluated on ``train_val`` (every face)."""
    cfg = backbone_base(settings, "vit", weights, runs_dir, data_root, train_classes="train_fit",
                        test_classes="train_val", eval_per_class=None, iterations=0, warmup_iters=0, lam=0.0)
    return _named(cfg.replace(weights=weights), "sel_pretrain_o")


def pretraining_choice(settings: dict, runs_dir: str = "runs/study", data_root: str | None = None,
                       jobs: int | str = "auto") -> dict:
    """Train each pretraining candidate of ``settings["pretrain"]`` (:func:`study_pretrain_config`) and
    evaluate it off the shelf on ``train_val`` (every face), beside a randomly initialised ViT: R@1, the
    effective rank and the components at 90 % of the energy (dim_90). Usable: above random init in R@1
    and not narrower in dim_90 (our reading of IRT Fig. 2's premise, a pretrained model with a wide
    spectrum: a collapsed stand-in, as SNCA alone gives, cannot test C3 either). The choice: the highest
    R@1 among the usable candidates; None when none is. Returns the record the study saves (``table``: a
    DataFrame)."""
    from nbsrc.analysis import effective_rank
    from nbsrc.experiment import run_all
    from nbsrc.paper.reporting import energy_table

    s = settings
    pre = {c: study_pretrain_config(c, runs_dir, data_root, s["hand_faces"], **s["pretrain_overrides"])
           for c in s["pretrain"]}
    run_all(pre, jobs=jobs)
    evals = {"random init": _val_config(s, runs_dir, data_root, "none"),
             **{c: _val_config(s, runs_dir, data_root, str(cfg.run_dir)) for c, cfg in pre.items()}}
    runs = run_all(evals, jobs=jobs)
    table = energy_table(runs, ks=(1,))
    table["effective_rank"] = [round(effective_rank(runs[label].embeddings()["query"]), 1) for label in table.index]
    floor, floor_dim = table.loc["random init", "R@1"], table.loc["random init", "dim_90"]
    usable = [c for c in pre if table.loc[c, "R@1"] > floor and table.loc[c, "dim_90"] >= floor_dim]
    best = max(usable, key=lambda c: table.loc[c, "R@1"]) if usable else None
    table["chosen"] = ["yes" if label == best else "" for label in table.index]
    return {"chosen": best, "run": str(pre[best].run_dir) if best else "none", "random_init_val_r1": round(floor, 2),
            "random_init_dim_90": int(floor_dim),
            "candidates": {c: {"val_r1": round(float(table.loc[c, "R@1"]), 2), "dim_90": int(table.loc[c, "dim_90"]),
                               "effective_rank": float(table.loc[c, "effective_rank"]), "run": str(pre[c].run_dir)}
                           for c in pre},
            "table": table}


def choose(settings: dict, which: str, runs: dict) -> dict:
    """The choice for backbone ``which`` from its selection runs (:func:`selection_configs`, trained):
    the candidate with the highest final validation R@1, its learning curve and the length the rule
    picks on it (:func:`chosen_length`). Returns the record the study saves."""
    off = runs["off the shelf"].recall["R@1"]
    cands = {label: run for label, run in runs.items() if label != "off the shelf"}
    curves = {label: learning_curve(run, off) for label, run in cands.items()}
    best = max(cands, key=lambda label: cands[label].recall["R@1"])
    length, flat = chosen_length(curves[best], settings["flat_gain"])
    fields = dict(settings[which]["candidates"][list(cands).index(best)])
    return {"backbone": settings[which]["name"], "off_the_shelf_val_r1": round(off, 2),
            "candidates": {label: round(run.recall["R@1"], 2) for label, run in cands.items()},
            "chosen": best, "fields": fields, "length": length, "flattened": flat,
            "val_r1_at_length": round(_at(curves[best], length), 2), "curves": curves,
            "runs": {label: str(run.run_dir) for label, run in runs.items()}}


def backbone_choice(settings: dict, which: str, pretrained: str, runs_dir: str = "runs/study",
                    data_root: str | None = None, jobs: int | str = "auto") -> dict:
    """Train the selection runs of backbone ``which`` (:func:`selection_configs`) and :func:`choose`."""
    from nbsrc.experiment import run_all

    return choose(settings, which, run_all(selection_configs(settings, which, pretrained, runs_dir, data_root),
                                           jobs=jobs))


def selection_table(chosen: dict[str, dict]) -> pd.DataFrame:
    """One row per backbone and candidate of ``{which: choose(...)}``: validation R@1 at the end of its
    run, the off-the-shelf model first, the chosen one marked with its length; a choice an earlier
    invocation made (:func:`earlier_choices`) is marked with its date."""
    rows = [{"backbone": c["backbone"] + (f" (recorded {c['recorded'][:10]})" if "recorded" in c else ""),
             "candidate": label, "val R@1 (end)": r1,
             "chosen": f"yes: {c['length']} iterations ({'flattened' if c['flattened'] else 'not flattened'}), "
                       f"{c['val_r1_at_length']:.1f} there" if label == c["chosen"] else ""}
            for c in chosen.values()
            for label, r1 in [("off the shelf", c["off_the_shelf_val_r1"]), *c["candidates"].items()]]
    return pd.DataFrame(rows).set_index("backbone")


def learning_curves_figure(chosen: dict[str, dict]):
    """The validation R@1 of every selection run against its iteration (iteration 0: off the shelf)."""
    from nbsrc.plots import plot_training_curves

    curves = {}
    for c in chosen.values():  # one panel per backbone, a line per candidate
        for label, curve in c["curves"].items():
            name = label if label not in curves else f"{label} ({c['backbone']})"
            curves[name] = [{"iteration": it, c["backbone"]: r1} for it, r1 in curve]
    fig = plot_training_curves(curves, keys=tuple(c["backbone"] for c in chosen.values()),
                               title="Validation R@1 (%) on train_val while training")
    for ax in fig.axes:
        ax.set_ylabel("R@1 (%)")
    return fig


def run_study(runs_dir: str = "runs/study", figures_dir: str = "figures/study", data_root: str | None = None,
              **settings: Any) -> dict:
    """:func:`_run_study` (the contract) by one process per ``figures_dir``: it holds that folder's lock
    (:mod:`nbsrc.locking`, ``.<name>.lock`` beside it) from before its first write to its last, so a second
    study into the same ``figures_dir`` stops with the one-line :class:`~nbsrc.errors.RunDirError`
    ``<figures_dir> is being written by a study by process <PID>; wait for it or choose another
    --figures-dir`` and touches nothing. (Each writes ``choices.json`` and ``verdicts.md`` whole; two at
    once would leave the last one's. Their runs are locked one by one, :func:`nbsrc.train.prepare_run_dir`.)"""
    from nbsrc import locking

    s = study_settings(**settings)  # a nonsense setting is said before any lock or folder
    with locking.holding(figures_dir, "written by a study", "--figures-dir"):
        return _run_study(runs_dir, figures_dir, data_root, **s)


def _run_study(runs_dir: str, figures_dir: str, data_root: str | None, **settings: Any) -> dict:
    """The study, resumable (every run is reused by its config; a run killed mid-training resumes from its
    checkpoint), with a progress line per phase. ``settings``: over :data:`STUDY` (:func:`study_settings`).

    1. pretraining: the candidates ``settings["pretrain"]``, one chosen on ``train_val`` (:func:`pretraining_choice`);
    2. selection, per backbone (ViT, convnet): recipe and length on ``train_val`` (:func:`choose`);
    3. the claims' runs on ``train`` → ``test`` at the chosen recipes and lengths: IRT_O/L/R of the ViT over
       ``seeds_main`` (C1, C2, C3, C6), IRT_O/L of the convnet over ``seeds_other`` (C4), the β × λ grid
       (C5) and the poolings (C7) of the ViT over ``seeds_other``; only those of ``settings["claims"]``
       (the convnet's selection too only for C4);
    4. the verdicts, each *untestable* where a fine-tuned model it compares is not above its off-the-shelf
       state on ``train_val`` or on the test classes (:func:`nbsrc.paper.claims.not_improved`): every cell of
       C5's grid against IRT_O, and each of C7's poolings against the same ViT evaluated through that pooling.

    Writes ``<figures_dir>/``: ``choices.json`` (every choice with its validation numbers and learning
    curves), ``pretraining.md``, ``selection.md``, ``learning_curves.png``/``.pdf``, ``table3_irt_seeds.md``,
    ``convnet_seeds.md``, ``fig4_gradient_noise.md``, ``table9_pooling_seeds.md``,
    ``table9_pooling_off_the_shelf.md``, ``claims/C*.json``/``.md``
    and ``verdicts.md`` (with the date, commit and machine). Returns ``{claim id: verdict}``."""
    from nbsrc.experiment import run_all
    from nbsrc.paper import claims as cl
    from nbsrc.paper.grids import beta_lambda_grid, irt_variants, pooling_variants, seed_variants
    from nbsrc.paper.reporting import gradient_noise_table, recall_over_seeds, save_table, write_text_atomic
    from nbsrc.plots import save_figure

    s = study_settings(**settings)
    jobs, figs, t0, started = s["jobs"], Path(figures_dir), time.perf_counter(), time.time()
    figs.mkdir(parents=True, exist_ok=True)
    plan = study_plan(s)
    say(f"at most {plan['runs'].sum()} trained runs, {plan['images'].sum() / 1e6:.2f} M training images "
        f"(the claims' runs at the selection length; the rule may pick shorter):\n{plan.to_string()}")
    say(f"pretraining candidates {', '.join(s['pretrain'])} (no spreading term), chosen on train_val off the shelf; "
        f"figures -> {figs}, runs -> {runs_dir}")
    pretraining = pretraining_choice(s, runs_dir, data_root, jobs)
    save_table(pretraining.pop("table"), "pretraining", figs)
    pre_dir = pretraining["run"]
    from_scratch = "" if pretraining["chosen"] else ": the ViT is fine-tuned from random init, C3 and C4 untestable"
    say(f"pretraining: {pretraining['chosen'] or 'none usable'} ({json.dumps(pretraining['candidates'])}; random init "
        f"{pretraining['random_init_val_r1']:.1f} R@1){from_scratch}")
    chosen, want = {}, set(s["claims"])
    for which in ("vit", "convnet") if "C4" in want else ("vit",):
        say(f"selection of {s[which]['name']}'s recipe and length on train_val: {len(s[which]['candidates'])} "
            f"candidate(s), {max_iterations(s, which)} iterations each, evaluated every {s['eval_every']}")
        chosen[which] = backbone_choice(s, which, pre_dir, runs_dir, data_root, jobs)
        c = chosen[which]
        say(f"{c['backbone']}: chose {c['chosen']} ({c['candidates'][c['chosen']]:.1f} R@1 on train_val, off the "
            f"shelf {c['off_the_shelf_val_r1']:.1f}); length {c['length']} iterations "
            f"({'flattened' if c['flattened'] else 'NOT flattened within ' + str(max_iterations(s, which))})")
    selected = dict(chosen)
    if "C7" in want and s["pooling_candidates"]:
        gl = s["grid_iterations"] or chosen["vit"]["length"]
        say(f"selection of each pooling's recipe (C7) on train_val: {len(s['poolings'])} poolings x "
            f"{len(s['pooling_candidates'])} candidates, {gl} iterations each")
        selected["poolings"] = pooling_choice(s, chosen["vit"]["fields"], gl, pre_dir, runs_dir, data_root, jobs)
        save_table(pooling_selection_table(selected["poolings"]), "pooling_selection", figs)
        say("poolings: " + "; ".join(f"{p} {c['chosen']} ({c['val_r1']:.1f} R@1 on train_val, off the shelf "
                                     f"{c['off_the_shelf_val_r1']:.1f})" for p, c in selected["poolings"].items()))
    record = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
              "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "pretraining": pretraining, "precision": "fp32", **earlier_choices(figs, set(selected)), **selected}
    write_text_atomic(figs / "choices.json", json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    backbones = {k: record[k] for k in ("vit", "convnet") if k in record}  # an earlier invocation's marked so
    save_table(selection_table(backbones), "selection", figs)
    save_figure(learning_curves_figure(backbones), "learning_curves", figs)
    vname, cname = s["vit"]["name"], s["convnet"]["name"]

    def final(which: str, **extra: Any) -> ExperimentConfig:
        c = chosen[which]
        cfg = backbone_base(s, which, pre_dir, runs_dir, data_root,
                            **{**c["fields"], "iterations": c["length"], **extra})
        return _named(cfg, f"claims_{which}")

    # γ is logged on every ViT run, so at the same length the grid's β = 0.5 cells are IRT_L and IRT_R, and C7's CLS
    # run is IRT_L
    vit = final("vit", record_grad_noise=True, log_every=s["grad_noise_log_every"])
    irt = irt_variants(vit, vit.run.name)
    results = []

    def test_r1(runs: dict, label: str) -> dict:
        return {seed: run.recall["R@1"] for (lab, seed), run in runs.items() if lab == label}

    labels, seeds = irt_runs_needed(s, chosen["vit"]["length"])
    say(f"the claims' runs: ViT {'/'.join(labels)} x {len(seeds)} seeds")
    vit_runs = run_all(seed_variants({k: irt[k] for k in labels}, seeds), jobs=jobs)
    if "IRT_L" in labels:
        if want & MAIN_CLAIMS:  # Table 3's; C4 alone (seeds_other, no IRT_R) leaves the table as it is
            save_table(recall_over_seeds(vit_runs, ks=(1, 2, 4, 8)), "table3_irt_seeds", figs)
        why_vit = [cl.not_improved(vname, chosen["vit"]["off_the_shelf_val_r1"], chosen["vit"]["val_r1_at_length"]),
                   cl.not_improved(vname, test_r1(vit_runs, "IRT_O"), test_r1(vit_runs, "IRT_L"), "test")]
    if want & {"C1", "C2", "C6"}:
        results += [*cl.fine_tuning_claims(vit_runs, vit, untestable=why_vit),
                    cl.similarity_claim(vit_runs, vit, untestable=why_vit)]
    no_stand_in = "" if pretraining["chosen"] else "no pretraining candidate was tried (pretrain=[])" if not (
        pretraining["candidates"]) else (
        "no pretraining stand-in without a spreading term was above random init on train_val in R@1 with a "
        "spectrum as wide (" + ", ".join(f"{c} {v['val_r1']:.1f} R@1, dim_90 {v['dim_90']}"
                                        for c, v in pretraining["candidates"].items())
        + f"; random init {pretraining['random_init_val_r1']:.1f}, dim_90 {pretraining['random_init_dim_90']})")
    if "C3" in want:
        results.append(cl.spectrum_claim(vit_runs, vit, model=f"{vname} ({pretraining['chosen'] or 'random init'})",
                                         untestable=why_vit + [no_stand_in]))
    if "C4" in want:
        cnn = final("convnet")
        say(f"the claims' runs: convnet IRT_O/L x {len(s['seeds_other'])} seeds (C4)")
        cnn_cfgs = {k: v for k, v in irt_variants(cnn, cnn.run.name).items() if k != "IRT_R"}
        cnn_runs = run_all(seed_variants(cnn_cfgs, s["seeds_other"]), jobs=jobs)
        save_table(recall_over_seeds(cnn_runs, ks=(1, 2, 4, 8)), "convnet_seeds", figs)
        why_cnn = [cl.not_improved(cname, chosen["convnet"]["off_the_shelf_val_r1"],
                                   chosen["convnet"]["val_r1_at_length"]),
                   cl.not_improved(cname, test_r1(cnn_runs, "IRT_O"), test_r1(cnn_runs, "IRT_L"), "test")]
        state = {"IRT_O": "off-the-shelf", "IRT_L": "contrastive λ = 0"}
        fig3 = {((m, state[lab]), seed): run for m, rs in ((vname, vit_runs), (cname, cnn_runs))  # C4's runs
                for (lab, seed), run in rs.items() if lab in state and seed in s["seeds_other"]}
        # Fig. 3 compares how two pretrained models collapse; a ViT from random init has no pretrained spectrum to
        # collapse (C3's premise, missing for the ViT side of C4 too)
        premise = no_stand_in and f"the ViT starts from random init, no pretrained spectrum to collapse: {no_stand_in}"
        results.append(cl.backbone_collapse_claim(fig3, vname, cname, vit, untestable=why_vit + why_cnn + [premise]))
    if want & {"C5", "C7"}:
        gvit, girt, why_grid = grid_base(s, chosen["vit"], vit, irt, final, vname)
        say(f"the grids (C5, C7) at {gvit.optim.iterations} iterations")
    if "C5" in want:
        b0 = f"β = {gvit.loss.beta:g}"
        shared = {f"{b0}, λ = 0": girt["IRT_L"], f"{b0}, λ = {gvit.loss.lam:g}": girt["IRT_R"]}
        grid = {label: shared.get(label, cfg) for label, cfg in beta_lambda_grid(gvit, s["betas"], s["lams"]).items()}
        say(f"the claims' runs: β x λ grid, {len(grid)} cells x {len(s['seeds_other'])} seeds (C5)")
        grid_runs = run_all(seed_variants(grid, s["seeds_other"]), jobs=jobs)
        first = s["seeds_other"][0]
        save_table(gradient_noise_table({label: grid_runs[(label, first)] for label in grid}), "fig4_gradient_noise",
                   figs)
        # every cell C5 compares is a fine-tuned model: each must be above IRT_O on the test classes
        why = why_grid + [cl.not_improved(f"{vname} ({label}, {gvit.optim.iterations} iterations)",
                                          test_r1(vit_runs, "IRT_O"), test_r1(grid_runs, label), "test")
                          for label in grid]
        results.append(cl.gradient_noise_claim(grid_runs, s["betas"], s["lams"], gvit, untestable=why))
    if "C7" in want:
        pool = pooling_variants(girt["IRT_L"], s["poolings"])  # Table 9: "IRT_L model" (λ = 0)
        picked = selected.get("poolings", {})
        pool = {p: with_recipe(cfg, picked[p]["fields"]) if p in picked else cfg for p, cfg in pool.items()}
        say(f"the claims' runs: {len(pool)} poolings x {len(s['seeds_other'])} seeds (C7)")
        pool_runs = run_all(seed_variants(pool, s["seeds_other"]), jobs=jobs)
        save_table(recall_over_seeds(pool_runs, ks=(1,)), "table9_pooling_seeds", figs)
        # each pooling's off-the-shelf state (the same ViT, evaluated through that pooling; CLS's is IRT_O): every
        # pooled model C7 compares must be above its own, as each backbone of the other claims
        off = pooling_variants(irt["IRT_O"], s["poolings"])
        say(f"off the shelf: {len(off)} poolings x {len(s['seeds_other'])} seeds (C7; evaluation only)")
        off_runs = run_all(seed_variants(off, s["seeds_other"]), jobs=jobs)
        save_table(recall_over_seeds(off_runs, ks=(1,)), "table9_pooling_off_the_shelf", figs)
        why = why_grid + [cl.not_improved(f"{vname} ({p} pooling, {gvit.optim.iterations} iterations)",
                                          test_r1(off_runs, p), test_r1(pool_runs, p), "test") for p in pool]
        why += [cl.not_improved(f"{vname} ({p} pooling, {c['chosen']}, {c['iterations']} iterations)",
                                c["off_the_shelf_val_r1"], c["val_r1"]) for p, c in picked.items()]
        recipes = ("learning rate chosen per pooling on train_val: "
                   + ", ".join(f"{p} {c['chosen']}" for p, c in picked.items()) if picked else "")
        results.append(cl.pooling_claim(pool_runs, girt["IRT_L"], untestable=why, recipes=recipes))
    results = sorted((r for r in results if r.claim.id in want), key=lambda r: int(r.claim.id[1:]))
    for r in results:
        r.save(figs)
        say(r.line())
    write_study_verdicts(figs, record, time.perf_counter() - t0, started)
    say(f"done in {(time.perf_counter() - t0) / 60:.1f} min; verdicts in {figs / 'verdicts.md'}")
    return {r.claim.id: r.verdict for r in results}


def grids_share_irt_runs(settings: dict, vit_length: int) -> bool:
    """Whether C5's and C7's grids train at the ViT's chosen length ``vit_length`` (``grid_iterations`` None or
    equal to it), so that their β = 0.5 cells are the IRT_L and IRT_R runs themselves (and C7's CLS run is IRT_L)."""
    return settings["grid_iterations"] in (None, vit_length)


def irt_runs_needed(settings: dict, vit_length: int | None = None) -> tuple[list[str], list[int]]:
    """The ViT's IRT runs at its chosen length ``vit_length`` that the claims asked for need: ``(labels,
    seeds)``. C1, C2, C3 and C6: IRT_O, IRT_L and IRT_R over ``seeds_main``; otherwise over ``seeds_other``:
    IRT_O (the test classes' floor), IRT_L for C4, and when the grids share those runs (``grid_iterations``
    None or the length) IRT_L and IRT_R for C5 and IRT_L for C7 (Table 9's CLS row is IRT_L)."""
    want = set(settings["claims"])
    if want & MAIN_CLAIMS:
        return ["IRT_O", "IRT_L", "IRT_R"], list(settings["seeds_main"])
    shared = bool(want & {"C5", "C7"}) and grids_share_irt_runs(settings, vit_length)
    labels = ["IRT_O"] + (["IRT_L"] if "C4" in want or shared else []) + (["IRT_R"] if shared and "C5" in want else [])
    return labels, list(settings["seeds_other"])


def earlier_choices(figs: Path, selected: set[str]) -> dict:
    """The choice records (``"convnet"``, ``"vit"``, ``"poolings"``) of ``<figs>/choices.json`` that this
    invocation did not make again, each marked with the time of that file (``"recorded"``): a study of C5 alone
    keeps the convnet's choice that an earlier one made for C4."""
    path = figs / "choices.json"
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())  # when it was written: its own field (a clone's file times are the clone's)
    stamp = old.get("written") or datetime.datetime.fromtimestamp(
        path.stat().st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
    return {k: old[k] if "recorded" in old[k] else {"recorded": stamp, **old[k]}
            for k in ("vit", "convnet", "poolings") if k in old and k not in selected}


def grid_base(settings: dict, vit_choice: dict, vit: ExperimentConfig, irt: dict, final, vname: str):
    """The base of C5's and C7's grids at ``settings["grid_iterations"]``: ``(config, its IRT variants, why
    untestable)``. At the ViT's chosen length (None, or equal to it) they are the claims' ``vit`` and ``irt``
    (shared runs); otherwise ``final("vit", ...)`` at that length, untestable where the selection curve of
    the chosen ViT recipe is not above its off-the-shelf R@1 on ``train_val`` there."""
    from nbsrc.paper import claims as cl
    from nbsrc.paper.grids import irt_variants

    gl = settings["grid_iterations"]
    if grids_share_irt_runs(settings, vit.optim.iterations):
        return vit, irt, [cl.not_improved(vname, vit_choice["off_the_shelf_val_r1"], vit_choice["val_r1_at_length"])]
    gvit = final("vit", record_grad_noise=True, log_every=settings["grad_noise_log_every"], iterations=gl)
    girt = {k: v for k, v in irt_variants(gvit, gvit.run.name).items() if k != "IRT_O"}
    at = _at(vit_choice["curves"][vit_choice["chosen"]], gl)
    return gvit, girt, [cl.not_improved(f"{vname} ({gl} iterations)", vit_choice["off_the_shelf_val_r1"], at)]


def write_study_verdicts(figs: Path, record: dict, seconds: float, started: float | None = None) -> Path:
    """``<figs>/verdicts.md``: when, on which commit and machine (the CPU, whether it has native bf16,
    avx512_bf16 or amx_bf16), the choices in one line each, then the verdicts
    (:func:`nbsrc.paper.claims.write_verdicts`); a claim judged before ``started`` (a ``time.time()``) by an
    earlier invocation is marked so, with its date and commit."""
    from nbsrc.paper.claims import write_verdicts
    from nbsrc.paper.reporting import write_text_atomic
    from nbsrc.provenance import provenance

    prov, pre = provenance(), record["pretraining"]
    path = write_verdicts(figs, started, rerun="`python -m nbsrc study --set claims '[\"{id}\"]'`")
    head = ["# The study's verdicts (`make study`)", "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
            f"- commit: {prov['git_commit']}",
            (f"- machine: {prov['machine']['cpu']}, {os.cpu_count()} cores, native bf16 (avx512_bf16 or amx_bf16): "
             f"{'yes' if cpu_has_native_bf16() else 'no'}; GPU: {prov['machine']['gpu'] or 'none'}"),
            f"- wall time of this invocation: {seconds / 60:.1f} min (finished runs reused count as 0)",
            f"- precision: {record['precision']}; pretraining: "
            + (f"{pre['chosen'] or 'none usable'} ({pre['run']}; train_val R@1 off the shelf: "
               + ", ".join(f"{c} {v['val_r1']:.1f}" for c, v in pre["candidates"].items()) + ", "
               if pre["candidates"] else "none tried (pretrain=[]; ")
            + f"random init {pre['random_init_val_r1']:.1f})"]
    for which in ("vit", "convnet"):
        if which not in record:
            continue
        c = record[which]
        when = f" (recorded {c['recorded'][:10]})" if "recorded" in c else ""  # by an earlier invocation
        head.append(f"- {c['backbone']}{when}: {c['chosen']} chosen on train_val "
                    f"({c['candidates'][c['chosen']]:.1f} R@1; off the shelf {c['off_the_shelf_val_r1']:.1f}); "
                    f"{c['length']} iterations "
                    f"({'flattened' if c['flattened'] else 'not flattened'}; {c['val_r1_at_length']:.1f} R@1 there)")
    if "poolings" in record:
        pc = record["poolings"]
        head.append("- C7's poolings, learning rate chosen per pooling on train_val"
                    + (f" (recorded {pc['recorded'][:10]})" if "recorded" in pc else "") + ": "
                    + "; ".join(f"{p} {c['chosen']} ({c['val_r1']:.1f} R@1; off the shelf "
                                f"{c['off_the_shelf_val_r1']:.1f})" for p, c in pc.items() if p != "recorded"))
    st = record["settings"]
    if {"C5", "C7"} & set(st["claims"]):
        gl = st["grid_iterations"]
        head.append(f"- grids (C5, C7): {f'{gl} iterations' if gl else 'at the ViT chosen length'}, seeds "
                    f"{', '.join(map(str, st['seeds_other']))}")
    body = path.read_text().split("\n", 1)[1]
    return write_text_atomic(path, "\n".join(head) + "\n" + body)
