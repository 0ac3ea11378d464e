"""The papers' claims, tested over seeds: each claim is one or more paired comparisons between two
sets of runs that differ in one thing (off-the-shelf vs fine-tuned, λ = 0 vs λ > 0, ...), and a
verdict that follows a rule fixed before the numbers are seen.

**The rule** (:data:`RULE`). For a comparison, every seed s gives a difference d_s = treated_s −
baseline_s (the two runs of a seed share their initial weights and data order, so the difference is
paired). Over the n seeds, with m the mean of d_s in the paper's direction (negated when the paper
says "lower") and se = sd(d) / √n (sample standard deviation, ddof 1):

* *reproduced*      when m > 2·se and n ≥ 3,
* *not reproduced*  when m < −2·se and n ≥ 3 (the opposite of the paper, beyond the noise),
* *inconclusive*    otherwise: the difference is within twice its standard error, or fewer than 3 seeds.

A claim with several comparisons (e.g. C3: the loss collapses the spectrum *and* KoLeo spreads it) is
reproduced when every comparison is, not reproduced when any comparison is, and inconclusive otherwise.

*untestable*, the fourth verdict, is decided before the rule: a claim that compares a fine-tuned model
is untestable when that fine-tuning did not improve the model, i.e. when its Recall@1 (mean over seeds) on
the validation classes, or on the test classes where the caller checks those too (the study does), is not
above the same model's off the shelf (:func:`not_improved`). The
claim's comparisons are still computed and shown, but they say nothing about the method (a damaged
model, or one that training left where it was), so never "not reproduced"; the reason names the
model and both numbers.
The rule is the same for every claim; no threshold was chosen per claim (never tune a setting or a
rule to make a claim come out).

**The claims** (:data:`CLAIMS`), stated from IRT (El-Nouby et al., 2021):

===  =======================================================  ================  ==========================
id   claim                                                    paper             measured by (per seed)
===  =======================================================  ================  ==========================
C1   fine-tuning ≫ off-the-shelf                              Table 3           Recall@1
C2   KoLeo improves Recall@1 at β = 0.5                       Tables 3, 5       Recall@1
C3   contrastive loss collapses the spectrum; KoLeo spreads   Fig. 2            effective rank
C4   the ViT collapses less than a convnet                    Fig. 3            effective-rank ratio
C5   γ higher at extreme β, lower with KoLeo                  Fig. 4            γ = ‖Cov(ĝ)‖_*
C6   fine-tuning separates pos/neg; KoLeo widens the spread   Fig. 5            AUC; sd of negatives
C7   CLS pooling ≥ the others after training                  Table 9           Recall@1
===  =======================================================  ================  ==========================

Each notebook that measures a claim states it and the rule in prose before its numbers, calls
:func:`judge_claim` with its comparisons (:func:`compare`), and writes the result with
:meth:`ClaimResult.save` (``<figures>/claims/<id>.json`` and ``.md``); ``<figures>/verdicts.md``
collects every saved claim (:func:`write_verdicts`), and ``make demo`` prints it.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from nbsrc.errors import ConfigError
from nbsrc.paper.reporting import write_text_atomic

Z = 2.0  # a difference counts when it exceeds Z standard errors of the mean paired difference
MIN_SEEDS = 3  # fewer seeds: inconclusive, whatever the numbers
VERDICTS = ("reproduced", "not reproduced", "inconclusive", "untestable")
RULE = (f"Over n seeds, d_s = treated − baseline for each seed s (paired: same initial weights and data order); "
        f"m = mean of d_s in the paper's direction, se = sd(d_s)/√n. Reproduced when m > {Z:g}·se, not reproduced "
        f"when m < −{Z:g}·se, inconclusive otherwise or when n < {MIN_SEEDS}. A claim with several comparisons is "
        "reproduced when all are, not reproduced when any is, inconclusive otherwise. Untestable, before the rule, "
        "when a fine-tuned model the claim compares is not above its off-the-shelf state in Recall@1 on the validation "
        "classes (the study: or on the test classes).")


@dataclass(frozen=True)
class Claim:
    id: str
    name: str  # the claim in a few words
    paper: str  # where the paper makes it
    quote: str  # the paper's words
    measure: str  # what is compared per seed (our reading where the paper reads a figure by eye)
    notebook: str


CLAIMS: dict[str, Claim] = {c.id: c for c in (
    Claim("C1", "fine-tuning ≫ off-the-shelf", "IRT Table 3, §4.4",
          "We observe that finetuning substantially improves performance over off-the-shelf features, especially "
          "for category-level retrieval.",
          "Recall@1 (%) of IRT_L against IRT_O (the same model before training)", "02_train"),
    Claim("C2", "KoLeo improves Recall@1 at β = 0.5", "IRT Tables 3, 5, §4.4",
          "Augmenting the contrastive loss with differential entropy regularization further improves the "
          "performance across all benchmarks.",
          "Recall@1 (%) of IRT_R (λ > 0) against IRT_L (λ = 0), same β", "02_train"),
    Claim("C3", "the contrastive loss collapses the spectrum, and KoLeo spreads it back", "IRT Fig. 2, §3.5",
          "The features have collapsed to few dimensions after training, but the collapse is reduced by entropy "
          "regularization.",
          "effective rank of the test embeddings (exp of the entropy of the normalised singular values; our "
          "reading of the cumulative-energy curves): IRT_L against IRT_O, and IRT_R against IRT_L", "03_pca_collapse"),
    Claim("C4", "the ViT collapses less than a convnet", "IRT Fig. 3, §3.5",
          "the transformer-based architecture is less impacted than convnets by the collapse",
          "the ratio of effective ranks after / before contrastive training (λ = 0): ViT against the convnet",
          "03_pca_collapse"),
    Claim("C5", "γ is higher at extreme β and lower with KoLeo", "IRT Fig. 4, §3.5",
          "The gradient signal is noisier for very high and very low margin values. The L_KoLeo regularization "
          "provides a more stable gradient signal",
          "γ = ‖Cov(ĝ)‖_* averaged over the logged iterations: each end of the β grid against its middle (λ = 0), "
          "and λ > 0 against λ = 0 (averaged over the β grid)", "04_gradient_noise"),
    Claim("C6", "fine-tuning separates positive from negative similarities, and KoLeo widens their spread",
          "IRT Fig. 5, §4.4",
          "finetuning strongly helps to make the positive and negative distributions more separable. The entropy "
          "regularization term spreads the similarity values across a wider range.",
          "separation = AUC of positive vs negative pair similarities (IRT_L against IRT_O); spread = standard "
          "deviation of the negative pairs' similarities (IRT_R against IRT_L); our reading of the histograms",
          "05_similarity_histograms"),
    Claim("C7", "CLS pooling ≥ the others after training", "IRT Table 9, §4.4",
          "utilizing the CLS token as the image-level descriptor provides the strongest performance (or at least "
          "on par) compared to other popular pooling methods",
          "Recall@1 (%) of CLS against each other pooling, each trained", "07_ablations"),
)}


def _check_direction(expect: str) -> None:
    if expect not in ("higher", "lower"):
        raise ConfigError(f"expect={expect!r} is invalid: expected 'higher' or 'lower' (the paper's direction of "
                          "treated − baseline)")


@dataclass
class Comparison:
    """One paired comparison over seeds: ``treated[s] − baseline[s]`` should be ``expect`` ("higher"
    or "lower") than 0 if the paper holds. Build it with :func:`compare`."""
    label: str
    baseline_name: str
    treated_name: str
    baseline: dict[int, float]
    treated: dict[int, float]
    expect: str = "higher"

    @property
    def seeds(self) -> list[int]:
        return sorted(self.baseline)

    @property
    def diffs(self) -> np.ndarray:
        return np.array([self.treated[s] - self.baseline[s] for s in self.seeds], dtype=np.float64)

    def stats(self) -> dict:
        """n, the mean, sample sd (ddof 1; NaN for one seed), standard error, min and max of the paired
        differences, the means and sds of both sides, and the verdict by :data:`RULE`."""
        d = self.diffs
        n = len(d)
        sd = float(d.std(ddof=1)) if n > 1 else math.nan
        se = sd / math.sqrt(n) if n > 1 else math.nan
        b, t = np.array([self.baseline[s] for s in self.seeds]), np.array([self.treated[s] for s in self.seeds])
        return {"n": n, "seeds": self.seeds, "diff_mean": float(d.mean()), "diff_sd": sd, "diff_se": se,
                "diff_min": float(d.min()), "diff_max": float(d.max()),
                "baseline_mean": float(b.mean()), "baseline_sd": float(b.std(ddof=1)) if n > 1 else math.nan,
                "treated_mean": float(t.mean()), "treated_sd": float(t.std(ddof=1)) if n > 1 else math.nan,
                "verdict": part_verdict(d, self.expect)}


def part_verdict(diffs, expect: str = "higher", z: float = Z, min_seeds: int = MIN_SEEDS) -> str:
    """The verdict of one comparison from its per-seed differences (treated − baseline), by :data:`RULE`."""
    _check_direction(expect)
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) < min_seeds:
        return "inconclusive"
    m = float(d.mean()) * (1 if expect == "higher" else -1)
    se = float(d.std(ddof=1)) / math.sqrt(len(d))
    if m > z * se:
        return "reproduced"
    if m < -z * se:
        return "not reproduced"
    return "inconclusive"


def combine(verdicts) -> str:
    """A claim's verdict from its comparisons': reproduced when all are, not reproduced when any is."""
    verdicts = list(verdicts)
    if not verdicts:
        raise ConfigError("a claim needs at least one comparison")
    if all(v == "reproduced" for v in verdicts):
        return "reproduced"
    if any(v == "not reproduced" for v in verdicts):
        return "not reproduced"
    return "inconclusive"


def compare(label: str, baseline: Mapping[int, float], treated: Mapping[int, float], expect: str = "higher",
            names: tuple[str, str] = ("baseline", "treated")) -> Comparison:
    """A :class:`Comparison` of ``treated`` against ``baseline`` (``{seed: value}`` each, the same seeds;
    :func:`per_seed` gives them from runs). ``expect``: the paper's direction of treated − baseline.
    ``names``: what the two sides are (for the tables), e.g. ``("IRT_O", "IRT_L")``."""
    _check_direction(expect)
    base = {int(s): float(v) for s, v in baseline.items()}
    treat = {int(s): float(v) for s, v in treated.items()}
    if set(base) != set(treat) or not base:
        raise ConfigError(f"{label}: the two sides must have the same seeds (baseline {sorted(base)}, treated "
                          f"{sorted(treat)}); train every run of the comparison with every seed")
    bad = [s for s in base if not (math.isfinite(base[s]) and math.isfinite(treat[s]))]
    if bad:
        raise ConfigError(f"{label}: seed(s) {bad} give a NaN or infinite value; check those runs")
    return Comparison(label, names[0], names[1], base, treat, expect)


def not_improved(model: str, off_the_shelf: float | Mapping[int, float], fine_tuned: float | Mapping[int, float],
                 where: str = "validation") -> str:
    """Why a claim that needs ``model`` fine-tuned is untestable, or "" when it can be tested: the
    fine-tuned Recall@1 (%) on ``where`` (a number, or ``{seed: value}``, whose mean is taken) is not above
    the off-the-shelf one. E.g. "EfficientNet-Lite0's fine-tuning lowers validation R@1 from 59.2 to 39.6"."""
    def mean(x) -> float:
        v = float(np.mean([float(y) for y in x.values()])) if isinstance(x, Mapping) else float(x)
        if not math.isfinite(v):
            raise ConfigError(f"{model}: a {where} Recall@1 of {v} (NaN or infinite); check its runs")
        return v
    before, after = mean(off_the_shelf), mean(fine_tuned)
    if after > before:
        return ""
    how = "leaves" if after == before else "lowers"
    return f"{model}'s fine-tuning {how} {where} R@1 {'at' if after == before else 'from'} {before:.1f}" + (
        "" if after == before else f" to {after:.1f}")


@dataclass
class ClaimResult:
    """A claim, its comparisons and its verdict; ``note`` says what limits the test (e.g. a premise of
    the paper that the demo does not meet); ``untestable``: why the claim cannot be judged (a fine-tuned
    model it compares was not improved by its training, :func:`not_improved`), "" when it can."""
    claim: Claim
    parts: list[Comparison]
    note: str = ""
    context: dict = field(default_factory=dict)  # what was run: data, backbone, iterations, ...
    untestable: str = ""

    @property
    def verdict(self) -> str:
        if self.untestable:
            return "untestable"
        return combine(p.stats()["verdict"] for p in self.parts)

    @property
    def n_seeds(self) -> int:
        return min(len(p.seeds) for p in self.parts)

    def table(self) -> pd.DataFrame:
        """One row per comparison: both sides' mean ± sd, the paired difference's mean ± sd, min–max,
        its standard error, n and the comparison's verdict."""
        rows = []
        for p in self.parts:
            s = p.stats()
            rows.append({"comparison": p.label, "expected": p.expect,
                         "baseline": f"{p.baseline_name} {_pm(s['baseline_mean'], s['baseline_sd'])}",
                         "treated": f"{p.treated_name} {_pm(s['treated_mean'], s['treated_sd'])}",
                         "difference": _pm(s["diff_mean"], s["diff_sd"], signed=True),
                         "min–max": f"{_fmt(s['diff_min'], 3, True)} – {_fmt(s['diff_max'], 3, True)}",
                         "se": _num(s["diff_se"]), "n": s["n"], "verdict": s["verdict"]})
        return pd.DataFrame(rows).set_index("comparison")

    def line(self) -> str:
        """The claim on one line: id, name, paper, verdict, and each comparison's difference."""
        parts = "; ".join(f"{p.label}: {_pm(p.stats()['diff_mean'], p.stats()['diff_sd'], signed=True)} "
                          f"(min–max {_fmt(p.stats()['diff_min'], 3, True)} – {_fmt(p.stats()['diff_max'], 3, True)})"
                          for p in self.parts)
        note = f" — {self.note}" if self.note else ""
        if self.untestable:
            note = f" — untestable: {self.untestable}{note}"
        return (f"**{self.claim.id} {self.claim.name}** ({self.claim.paper}): **{self.verdict}** over "
                f"{self.n_seeds} seed{'s' if self.n_seeds != 1 else ''} — {parts}{note}")

    def to_dict(self) -> dict:
        return {"id": self.claim.id, "name": self.claim.name, "paper": self.claim.paper, "quote": self.claim.quote,
                "measure": self.claim.measure, "notebook": self.claim.notebook, "rule": RULE,
                "verdict": self.verdict, "untestable": self.untestable, "note": self.note, "context": self.context,
                "line": self.line(),
                "comparisons": [{"label": p.label, "expect": p.expect, "baseline_name": p.baseline_name,
                                 "treated_name": p.treated_name,
                                 "baseline": {str(k): v for k, v in p.baseline.items()},
                                 "treated": {str(k): v for k, v in p.treated.items()},
                                 **{k: (None if isinstance(v, float) and math.isnan(v) else v)
                                    for k, v in p.stats().items()}} for p in self.parts]}

    def save(self, figures_dir: str | Path = "figures") -> Path:
        """Write ``<figures_dir>/claims/<id>.json`` (everything, per-seed values included, the UTC time
        it was judged, ``measured``, to the microsecond, and the git commit, ``commit``) and ``.md``
        (the line and the table), then rewrite ``<figures_dir>/verdicts.md``; returns the JSON path."""
        out = Path(figures_dir) / "claims"
        path = out / f"{self.claim.id}.json"
        measured = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")  # when judged
        from nbsrc.provenance import provenance

        commit = provenance().get("git_commit")
        text = json.dumps({**self.to_dict(), "measured": measured, "commit": commit}, indent=1, ensure_ascii=False)
        write_text_atomic(path, text + "\n")
        write_text_atomic(out / f"{self.claim.id}.md", self.line() + "\n\n" + self.table().to_markdown() + "\n")
        write_verdicts(figures_dir)
        return path


def judge_claim(claim_id: str, parts: list[Comparison], note: str = "", context: dict | None = None,
                untestable: str | list[str] = "") -> ClaimResult:
    """The :class:`ClaimResult` of claim ``claim_id`` (a key of :data:`CLAIMS`) from its comparisons.
    ``untestable``: the reason(s) it cannot be judged (:func:`not_improved` of each fine-tuned model it
    compares; empty ones are dropped); any makes the verdict "untestable"."""
    if claim_id not in CLAIMS:
        raise ConfigError(f"claim {claim_id!r} is unknown: expected one of {', '.join(CLAIMS)}")
    if not parts:
        raise ConfigError(f"claim {claim_id} needs at least one comparison")
    reasons = [untestable] if isinstance(untestable, str) else list(untestable)
    return ClaimResult(CLAIMS[claim_id], list(parts), note, dict(context or {}), "; ".join(r for r in reasons if r))


def per_seed(runs: Mapping, value: Callable) -> dict[str, dict[int, float]]:
    """``{label: {seed: value(run)}}`` from ``{(label, seed): run}`` (:func:`nbsrc.paper.grids.seed_variants`
    + ``run_all``), labels in their order."""
    out: dict = {}
    for key, run in runs.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ConfigError(f"per_seed expects runs keyed by (label, seed); got key {key!r}")
        label, seed = key
        out.setdefault(label, {})[int(seed)] = float(value(run))
    return out


# ----------------------------------------------------------------------------- the demo's claims from its runs
# Each function takes runs keyed by (label, seed) (nbsrc.paper.grids.seed_variants + run_all) and returns the
# judged claim(s); the notebook that trains the runs states the claim, calls it and saves the result.
def context_of(cfg) -> dict:
    """What a claim was measured on: the data, the model, its starting weights and the training length."""
    return {"dataset": cfg.data.dataset, "train_classes": cfg.data.train_classes, "test_classes": cfg.data.test_classes,
            "backbone": cfg.model.backbone, "img_size": cfg.data.img_size, "weights": cfg.model.weights,
            "iterations": cfg.optim.iterations, "lr": cfg.optim.lr, "beta": cfg.loss.beta, "lam": cfg.loss.lam,
            "memory_size": cfg.loss.memory_size}


def _recall1(run) -> float:
    return run.recall["R@1"]


def _random_init(cfg) -> bool:
    return cfg.model.weights in ("none", None)


def fine_tuning_claims(runs: Mapping, cfg, untestable: str | list[str] = "") -> list[ClaimResult]:
    """C1 (IRT_L vs IRT_O) and C2 (IRT_R vs IRT_L) from the Recall@1 of ``runs`` ``{(method, seed): run}``
    with methods ``IRT_O``, ``IRT_L``, ``IRT_R`` (:func:`nbsrc.paper.grids.irt_variants`); ``cfg`` the base."""
    r1 = per_seed(runs, _recall1)
    c1 = judge_claim("C1", [compare("R@1 (%): IRT_L − IRT_O", r1["IRT_O"], r1["IRT_L"], "higher", ("IRT_O", "IRT_L"))],
                     note="from a randomly initialised ViT (no pretraining in this demo)" if _random_init(cfg) else "",
                     context=context_of(cfg), untestable=untestable)
    c2 = judge_claim("C2", [compare(f"R@1 (%): IRT_R (λ = {cfg.loss.lam:g}) − IRT_L", r1["IRT_L"], r1["IRT_R"],
                                    "higher", ("IRT_L", "IRT_R"))],
                     note="" if cfg.loss.beta == 0.5 else f"at β = {cfg.loss.beta:g}, not the claim's 0.5",
                     context=context_of(cfg), untestable=untestable)
    return [c1, c2]


def spectrum_claim(runs: Mapping, cfg, model: str = "", untestable: str | list[str] = "") -> ClaimResult:
    """C3 from the effective rank of the query embeddings of ``{(method, seed): run}`` (methods ``IRT_O``,
    ``IRT_L``, ``IRT_R``) of one model (``model``: its name in the labels; ``cfg``: its config). IRT's
    Fig. 2 is drawn for an ImageNet-pretrained ResNet-50; with a randomly initialised model the note
    says that the premise is not met."""
    from nbsrc.analysis import effective_rank

    er = per_seed(runs, lambda r: effective_rank(r.embeddings()["query"]))
    on = f" ({model})" if model else ""
    note = ("IRT_O is a randomly initialised model, not a pretrained one: the paper's premise (collapse of a "
            "pretrained, wide spectrum) is not met" if _random_init(cfg) else
            f"on {model or cfg.model.backbone} with its pretrained weights ({cfg.model.weights}), as the paper's "
            "Fig. 2 (an ImageNet-pretrained ResNet-50)")
    return judge_claim("C3", [compare(f"effective rank{on}: IRT_L − IRT_O", er["IRT_O"], er["IRT_L"], "lower",
                                      ("IRT_O", "IRT_L")),
                              compare(f"effective rank{on}: IRT_R (λ = {cfg.loss.lam:g}) − IRT_L", er["IRT_L"],
                                      er["IRT_R"], "higher", ("IRT_L", "IRT_R"))],
                       note=note, context=context_of(cfg), untestable=untestable)


def backbone_collapse_claim(runs: Mapping, vit: str, convnet: str, cfg, before: str = "off-the-shelf",
                            after: str = "contrastive λ = 0", untestable: str | list[str] = "") -> ClaimResult:
    """C4 from ``{((model, state), seed): run}`` with models ``vit`` and ``convnet`` and states
    ``before`` / ``after``: the ratio erank(after) / erank(before) per seed, the ViT's against the convnet's."""
    from nbsrc.analysis import effective_rank

    er = per_seed(runs, lambda r: effective_rank(r.embeddings()["query"]))
    ratio = {m: {s: er[(m, after)][s] / er[(m, before)][s] for s in er[(m, after)]} for m in (vit, convnet)}
    note = ("a randomly initialised ViT against an ImageNet-pretrained convnet: architecture and pretraining are "
            "confounded" if _random_init(cfg) else
            "the ViT pretrained here, on classes disjoint from the test classes, against an ImageNet-pretrained "
            "convnet: the two were pretrained on different data")
    return judge_claim("C4", [compare("effective-rank ratio after/before training: ViT − convnet", ratio[convnet],
                                      ratio[vit], "higher", (convnet, vit))], note=note, context=context_of(cfg),
                       untestable=untestable)


def gradient_noise_untestable(betas, lams) -> str:
    """Why C5 cannot be tested on this grid ("" when it can): it needs three margins (two ends and a
    middle) and λ = 0 beside a λ > 0."""
    betas, lams = sorted(float(b) for b in betas), sorted(float(x) for x in lams)
    if len(betas) < 3 or not lams or lams[0] != 0 or len(lams) < 2:
        return (f"the gradient-noise claim C5 needs at least three margins and λ = 0 plus one λ > 0; got "
                f"betas={betas}, lams={lams}")
    return ""


def gradient_noise_claim(runs: Mapping, betas, lams, cfg, untestable: str | list[str] = "") -> ClaimResult:
    """C5 from the β × λ grid ``{(label, seed): run}`` (:func:`nbsrc.paper.grids.beta_lambda_grid` labels),
    each run trained with ``record_grad_noise``: γ at each end of the β grid against its middle (at
    λ = 0), and γ at the largest λ against λ = 0, averaged over the β grid."""
    from nbsrc.paper.reporting import mean_grad_noise

    why = gradient_noise_untestable(betas, lams)
    if why:
        raise ConfigError(why)
    betas, lams = sorted(float(b) for b in betas), sorted(float(x) for x in lams)
    g = per_seed(runs, lambda r: mean_grad_noise(r.metrics("train")))
    cell = lambda b, lam: g[f"β = {b:g}, λ = {lam:g}"]  # noqa: E731
    lo, mid, hi, top = betas[0], betas[len(betas) // 2], betas[-1], lams[-1]
    seeds = sorted(cell(lo, 0))
    mean_over_betas = lambda lam: {s: float(np.mean([cell(b, lam)[s] for b in betas])) for s in seeds}  # noqa: E731
    parts = [compare(f"γ (λ = 0): β = {lo:g} − β = {mid:g}", cell(mid, 0), cell(lo, 0), "higher",
                     (f"β = {mid:g}", f"β = {lo:g}")),
             compare(f"γ (λ = 0): β = {hi:g} − β = {mid:g}", cell(mid, 0), cell(hi, 0), "higher",
                     (f"β = {mid:g}", f"β = {hi:g}")),
             compare(f"γ (mean over β): λ = {top:g} − λ = 0", mean_over_betas(0.0), mean_over_betas(top), "lower",
                     ("λ = 0", f"λ = {top:g}"))]
    ctx = {**context_of(cfg), "betas": betas, "lams": lams}
    return judge_claim("C5", parts, note=f"short runs ({cfg.optim.iterations} iterations)", context=ctx,
                       untestable=untestable)


def similarity_claim(runs: Mapping, cfg, max_negatives: int | None = 200_000,
                     untestable: str | list[str] = "") -> ClaimResult:
    """C6 from ``{(method, seed): run}`` (methods ``IRT_O``, ``IRT_L``, ``IRT_R``): the AUC of positive vs
    negative pair similarities (IRT_L against IRT_O) and the standard deviation of the negative pairs'
    similarities (IRT_R against IRT_L), on the query set's class-label pairs."""
    from nbsrc.analysis import pair_similarities, separation_auc

    auc, spread = {}, {}
    for (method, seed), run in runs.items():
        e = run.embeddings()
        pos, neg, _ = pair_similarities(e["query"], e["query_labels"], max_negatives=max_negatives)
        auc.setdefault(method, {})[int(seed)] = separation_auc(pos, neg)
        spread.setdefault(method, {})[int(seed)] = float(np.std(neg))
    return judge_claim("C6", [compare("AUC(pos vs neg): IRT_L − IRT_O", auc["IRT_O"], auc["IRT_L"], "higher",
                                      ("IRT_O", "IRT_L")),
                              compare("sd of negative similarities: IRT_R − IRT_L", spread["IRT_L"], spread["IRT_R"],
                                      "higher", ("IRT_L", "IRT_R"))],
                       note="class-label pairs of the unseen classes (the paper: Revisited Paris query–database pairs)",
                       context=context_of(cfg), untestable=untestable)


def pooling_claim(runs: Mapping, cfg, untestable: str | list[str] = "", recipes: str = "") -> ClaimResult:
    """C7 from ``{(pooling, seed): run}`` (:func:`nbsrc.paper.grids.pooling_variants`), which must include
    ``cls``: Recall@1 of CLS against each other pooling. ``recipes``: how each pooling's recipe was set (the
    study: "learning rate chosen per pooling on train_val: ..."), added to the note."""
    r1 = per_seed(runs, _recall1)
    if "cls" not in r1 or len(r1) < 2:
        raise ConfigError(f"the pooling claim needs 'cls' and at least one other pooling; got {list(r1)}")
    parts = [compare(f"R@1 (%): CLS − {p}", r1[p], r1["cls"], "higher", (p, "cls")) for p in r1 if p != "cls"]
    note = f"short runs ({cfg.optim.iterations} iterations)" + (f"; {recipes}" if recipes else "")
    return judge_claim("C7", parts, note=note, context=context_of(cfg), untestable=untestable)


def load_claims(figures_dir: str | Path = "figures") -> list[dict]:
    """Every claim saved under ``<figures_dir>/claims/`` (as :meth:`ClaimResult.to_dict`), in id order."""
    folder = Path(figures_dir) / "claims"
    found = [json.loads(p.read_text()) for p in folder.glob("C*.json")] if folder.is_dir() else []
    return sorted(found, key=lambda d: int(d["id"][1:]) if d["id"][1:].isdigit() else 10**6)


def verdict_lines(figures_dir: str | Path = "figures", judged_since: float | None = None,
                  rerun: str = "notebook {notebook}, `make demo-full`") -> list[str]:
    """One markdown line per claim of :data:`CLAIMS`: its saved line (:func:`load_claims`), or "not
    measured yet". With ``judged_since`` (a ``time.time()``), a claim judged before it (by its UTC
    ``measured`` time: to the microsecond, so a claim judged in the second an invocation starts is not taken
    for one of its own; claims saved without one count as earlier) is marked as coming
    from an earlier run, with its date, its commit where saved, and ``rerun`` (what judges it again;
    ``{notebook}`` and ``{id}`` are filled in)."""
    saved = {d["id"]: d for d in load_claims(figures_dir)}
    lines = []
    for cid, claim in CLAIMS.items():
        if cid not in saved:
            lines.append(f"- **{cid} {claim.name}** ({claim.paper}): not measured yet (notebook {claim.notebook})")
            continue
        line, measured = saved[cid]["line"], saved[cid].get("measured")
        if judged_since is not None and (
                measured is None or datetime.datetime.fromisoformat(measured).timestamp() < judged_since):
            commit = saved[cid].get("commit")
            line += (f" [from an earlier run ({measured[:10] if measured else 'date not recorded'}"
                     f"{f', commit {commit[:7]}' if commit else ''}), not judged by this one: "
                     f"{rerun.format(notebook=claim.notebook, id=cid)}]")
        lines.append(f"- {line}")
    return lines


def write_verdicts(figures_dir: str | Path = "figures", judged_since: float | None = None,
                   rerun: str = "notebook {notebook}, `make demo-full`") -> Path:
    """``<figures_dir>/verdicts.md``: the rule, then :func:`verdict_lines`."""
    lines = ["# The papers' claims: verdicts over seeds", "", f"Rule (fixed before the numbers): {RULE}", "",
             *verdict_lines(figures_dir, judged_since, rerun)]
    return write_text_atomic(Path(figures_dir) / "verdicts.md", "\n".join(lines) + "\n")


def _fmt(x: float, digits: int = 3, signed: bool = False) -> str:
    """``x`` to ``digits`` significant digits in fixed notation, trailing zeros kept (74.9, 5.00, 0.00567,
    682, 0.000547); scientific below 1e-5."""
    sign = "+" if signed else ""
    if x == 0 or not math.isfinite(x):
        return f"{x:{sign}.{digits - 1}f}" if x == 0 else f"{x}"
    if abs(x) < 1e-5:
        return f"{x:{sign}.{digits - 1}e}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:{sign}.{decimals}f}"


def _pm(mean: float, sd: float, signed: bool = False) -> str:
    """``mean ± sd`` with 3 and 2 significant digits (``+5.00 ± 2.2``, ``682 ± 7.6``)."""
    m = _fmt(mean, 3, signed)
    return m if sd is None or (isinstance(sd, float) and math.isnan(sd)) else f"{m} ± {_fmt(sd, 2)}"


def _num(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2g}"
