"""The verdict rule of nbsrc.paper.claims against a loop written from its statement, the claims' files,
and the two measures added for them (effective rank, separation AUC) against references from their
formulas."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from nbsrc.analysis import effective_rank, separation_auc
from nbsrc.errors import ConfigError, DatasetError
from nbsrc.paper.claims import (
    CLAIMS,
    MIN_SEEDS,
    RULE,
    VERDICTS,
    Z,
    combine,
    compare,
    judge_claim,
    load_claims,
    not_improved,
    part_verdict,
    per_seed,
    write_verdicts,
)


# ----------------------------------------------------------------------------- the rule
def reference_verdict(diffs, expect):
    """From RULE's words: m = mean of d in the paper's direction, se = sd / sqrt(n), sd with n - 1."""
    n = len(diffs)
    if n < 3:
        return "inconclusive"
    sign = 1 if expect == "higher" else -1
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    m, se = sign * mean, sd / math.sqrt(n)
    if m > 2 * se:
        return "reproduced"
    if m < -2 * se:
        return "not reproduced"
    return "inconclusive"


@pytest.mark.parametrize("diffs, expect, verdict", [
    ([1.0, 2.0, 3.0], "higher", "reproduced"),  # mean 2 > 2 * 1/sqrt(3) = 1.15
    ([1.0, 2.0, 3.0], "lower", "not reproduced"),
    ([-1.0, -2.0, -3.0], "lower", "reproduced"),
    ([1.0, -1.0, 0.5], "higher", "inconclusive"),
    ([5.0, 6.0], "higher", "inconclusive"),  # two seeds: too few, whatever the numbers
    ([0.0, 0.0, 0.0], "higher", "inconclusive"),  # no difference at all
    ([0.5, 0.5, 0.5], "higher", "reproduced"),  # the same gain on every seed (se = 0)
    ([0.1, 3.0, 0.2], "higher", "inconclusive"),  # mean 1.1, se 0.95: 1.1 < 1.9
])
def test_part_verdict_hand_cases(diffs, expect, verdict):
    assert part_verdict(diffs, expect) == verdict == reference_verdict(diffs, expect)


def test_part_verdict_matches_the_rule_on_random_differences():
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(1, 7))
        diffs = list(rng.normal(rng.normal(0, 1), rng.uniform(0.1, 2), size=n))
        for expect in ("higher", "lower"):
            assert part_verdict(diffs, expect) == reference_verdict(diffs, expect)


def test_rule_constants_are_the_stated_ones():
    assert (Z, MIN_SEEDS) == (2.0, 3)
    assert "2·se" in RULE and "n < 3" in RULE


def test_combine():
    assert combine(["reproduced", "reproduced"]) == "reproduced"
    assert combine(["reproduced", "inconclusive"]) == "inconclusive"
    assert combine(["reproduced", "not reproduced", "inconclusive"]) == "not reproduced"
    with pytest.raises(ConfigError):
        combine([])


def test_compare_pairs_by_seed_and_rejects_bad_input():
    c = compare("R@1", {2: 50.0, 0: 40.0, 1: 45.0}, {1: 47.0, 0: 43.0, 2: 51.0}, "higher", ("O", "L"))
    assert c.seeds == [0, 1, 2]
    np.testing.assert_allclose(c.diffs, [3.0, 2.0, 1.0])
    s = c.stats()
    assert s["n"] == 3 and s["diff_mean"] == pytest.approx(2.0) and s["diff_sd"] == pytest.approx(1.0)
    assert s["baseline_mean"] == pytest.approx(45.0) and s["verdict"] == "reproduced"
    with pytest.raises(ConfigError, match="same seeds"):
        compare("R@1", {0: 1.0, 1: 2.0}, {0: 1.0}, "higher")
    with pytest.raises(ConfigError, match="NaN"):
        compare("R@1", {0: 1.0}, {0: float("nan")}, "higher")
    with pytest.raises(ConfigError, match="'higher' or 'lower'"):
        compare("R@1", {0: 1.0}, {0: 2.0}, "up")


def test_judge_claim_combines_its_comparisons():
    up = compare("a", {0: 0, 1: 0, 2: 0}, {0: 1, 1: 1.2, 2: 0.9})
    flat = compare("b", {0: 0, 1: 0, 2: 0}, {0: 1, 1: -1, 2: 0.1})
    down = compare("c", {0: 0, 1: 0, 2: 0}, {0: -1, 1: -1.2, 2: -0.9})
    assert judge_claim("C3", [up]).verdict == "reproduced"
    assert judge_claim("C3", [up, flat]).verdict == "inconclusive"
    assert judge_claim("C3", [up, flat, down]).verdict == "not reproduced"
    with pytest.raises(ConfigError, match="unknown"):
        judge_claim("C9", [up])
    with pytest.raises(ConfigError, match="at least one"):
        judge_claim("C1", [])


def test_a_model_its_fine_tuning_made_worse_makes_the_claim_untestable_never_not_reproduced(tmp_path):
    why = not_improved("EfficientNet-Lite0", {0: 59.2, 1: 59.2, 2: 59.2}, {0: 40.0, 1: 39.0, 2: 39.8})
    assert why == "EfficientNet-Lite0's fine-tuning lowers validation R@1 from 59.2 to 39.6"
    assert not_improved("ViT", 84.3, 84.3) == "ViT's fine-tuning leaves validation R@1 at 84.3"
    assert not_improved("ViT", 84.3, 84.4) == ""  # above its off-the-shelf state: testable
    down = compare("effective-rank ratio", {0: 2.0, 1: 2.1, 2: 1.9}, {0: 1.0, 1: 1.1, 2: 0.9})
    assert judge_claim("C4", [down]).verdict == "not reproduced"  # by the rule alone
    r = judge_claim("C4", [down], untestable=["", why])
    assert r.verdict == "untestable" == VERDICTS[-1] and r.untestable == why
    assert "**untestable** over 3 seeds" in r.line() and why in r.line()
    saved = json.loads(r.save(tmp_path).read_text())
    assert saved["verdict"] == "untestable" and saved["untestable"] == why
    assert saved["comparisons"][0]["verdict"] == "not reproduced"  # the numbers stay on record
    assert "**untestable**" in (tmp_path / "verdicts.md").read_text()
    assert judge_claim("C4", [down], untestable=["", ""]).verdict == "not reproduced"
    with pytest.raises(ConfigError, match="NaN"):
        not_improved("ViT", float("nan"), 1.0)


PAPER = Path(__file__).resolve().parents[1].parent / "shared" / "papers" / "irt_el-nouby_2021.txt"


def _words(text: str) -> str:
    """The text's words, without the extraction's LaTeX markup."""
    for mark in ("\\text", "\\mathcal", "\\", "$", "{", "}"):
        text = text.replace(mark, "")
    return " ".join(text.split())


def test_every_claim_quotes_its_paper():
    assert list(CLAIMS) == [f"C{i}" for i in range(1, 8)]
    for claim in CLAIMS.values():
        assert claim.quote and claim.measure and claim.notebook
    if not PAPER.exists():
        pytest.skip(f"{PAPER} is not beside the project")
    paper = _words(PAPER.read_text())
    for claim in CLAIMS.values():  # the quote is the paper's own words
        for sentence in claim.quote.split(". "):
            head = " ".join(_words(sentence).split()[:8])
            assert head in paper, (claim.id, head)


def test_save_load_and_the_verdicts_file(tmp_path):
    seeds = {0: 40.0, 1: 42.0, 2: 41.0}
    r = judge_claim("C1", [compare("R@1 (%): IRT_L − IRT_O", seeds, {s: v + 3 for s, v in seeds.items()},
                                   names=("IRT_O", "IRT_L"))], note="random init", context={"data": "digits"})
    path = r.save(tmp_path)
    saved = json.loads(path.read_text())
    assert saved["verdict"] == "reproduced" and saved["comparisons"][0]["treated"] == {"0": 43.0, "1": 45.0, "2": 44.0}
    assert saved["rule"] == RULE and saved["context"] == {"data": "digits"}
    assert (tmp_path / "claims" / "C1.md").read_text().startswith("**C1 fine-tuning")
    assert [d["id"] for d in load_claims(tmp_path)] == ["C1"]
    text = (tmp_path / "verdicts.md").read_text()
    assert "**C1 fine-tuning ≫ off-the-shelf** (IRT Table 3, §4.4): **reproduced** over 3 seeds" in text
    assert "+3.00 ± 0.0 (min–max +3.00 – +3.00)" in text, text and "random init" in text
    assert "C7 CLS pooling ≥ the others after training** (IRT Table 9, §4.4): not measured yet" in text
    one = judge_claim("C2", [compare("R@1", {0: 1.0}, {0: 2.0})])
    assert one.verdict == "inconclusive" and "over 1 seed " in one.line()
    assert one.table().loc["R@1", "se"] == "–"
    write_verdicts(tmp_path / "empty")  # a fresh folder: every claim "not measured yet"
    assert (tmp_path / "empty" / "verdicts.md").read_text().count("not measured yet") == 7


def test_numbers_keep_three_significant_digits():
    from nbsrc.paper.claims import _fmt, _pm

    assert [_fmt(x) for x in (74.87, 5.0, 682.3, 0.00567, 0.0, 1234.5)] == \
        ["74.9", "5.00", "682", "0.00567", "0.00", "1234"]
    assert _fmt(2.51, signed=True) == "+2.51" and _fmt(-0.486, signed=True) == "-0.486"
    assert _fmt(-5.47e-4) == "-0.000547"
    assert _fmt(4.2e-6) == "4.20e-06"
    assert _pm(5.0, 2.2, signed=True) == "+5.00 ± 2.2" and _pm(682.3, 7.61) == "682 ± 7.6"
    assert _pm(1.0, float("nan")) == "1.00"


def test_per_seed():
    class Run:
        def __init__(self, r1):
            self.recall = {"R@1": r1}

    runs = {("IRT_O", 0): Run(40), ("IRT_L", 0): Run(45), ("IRT_O", 1): Run(41), ("IRT_L", 1): Run(47)}
    assert per_seed(runs, lambda r: r.recall["R@1"]) == {"IRT_O": {0: 40.0, 1: 41.0}, "IRT_L": {0: 45.0, 1: 47.0}}
    with pytest.raises(ConfigError, match="keyed by"):
        per_seed({"IRT_O": Run(1)}, lambda r: 1)


# ----------------------------------------------------------------------------- the measures
def reference_effective_rank(Z):
    """exp(H(p)), p = σ / Σσ, σ the singular values of the centred Z, via the covariance's eigenvalues
    (σ_k² = N λ_k), written out."""
    Z = np.asarray(Z, dtype=np.float64)
    C = np.cov(Z, rowvar=False, bias=True)
    lam = np.clip(np.linalg.eigvalsh(C), 0, None)
    sig = np.sqrt(len(Z) * lam)
    sig = sig[sig > 1e-9 * sig.max()]
    p = sig / sig.sum()
    return math.exp(-sum(pk * math.log(pk) for pk in p))


def test_effective_rank_against_the_formula_and_exact_cases():
    rng = np.random.default_rng(1)
    for shape in ((50, 8), (30, 40), (200, 16)):
        Z = rng.normal(size=shape) * rng.uniform(0.1, 3, size=shape[1])
        assert effective_rank(Z) == pytest.approx(reference_effective_rank(Z), rel=1e-6)
    line = np.outer(rng.normal(size=100), rng.normal(size=6))
    assert effective_rank(line) == pytest.approx(1.0)
    # equal singular values in 4 orthogonal directions: erank 4
    Q = np.linalg.qr(rng.normal(size=(6, 4)))[0]
    signs = np.array([[a, b, c, d] for a in (1, -1) for b in (1, -1) for c in (1, -1) for d in (1, -1)])
    assert effective_rank(signs @ Q.T) == pytest.approx(4.0)
    with pytest.raises(ConfigError, match="zero variance"):
        effective_rank(np.ones((5, 3)))


def reference_auc(pos, neg):
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_separation_auc_against_the_double_sum_and_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    for _ in range(20):
        pos = np.round(rng.normal(0.3, 0.2, size=int(rng.integers(1, 40))), 1)  # rounded: ties
        neg = np.round(rng.normal(0.0, 0.2, size=int(rng.integers(1, 60))), 1)
        auc = separation_auc(pos, neg)
        assert auc == pytest.approx(reference_auc(pos, neg))
        assert auc == pytest.approx(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))
    assert separation_auc([0.9, 0.8], [0.1, 0.2, 0.3]) == 1.0
    assert separation_auc([0.1], [0.9]) == 0.0
    assert separation_auc([0.5, 0.5], [0.5]) == 0.5
    with pytest.raises(DatasetError, match="positive and negative"):
        separation_auc([], [0.1])
    with pytest.raises(DatasetError, match="NaN"):
        separation_auc([np.nan], [0.1])


def test_gradient_noise_claim_says_when_its_grid_cannot_test_it():
    from nbsrc.paper.claims import gradient_noise_claim, gradient_noise_untestable

    assert gradient_noise_untestable([0.3, 0.5, 0.7], [0, 0.7]) == ""
    for betas, lams in (([0.3, 0.5], [0, 0.7]), ([0.3, 0.5, 0.7], [0.3, 0.7]), ([0.3, 0.5, 0.7], [0])):
        why = gradient_noise_untestable(betas, lams)
        assert "three margins" in why and "\n" not in why
        with pytest.raises(ConfigError, match="three margins"):
            gradient_noise_claim({}, betas, lams, None)


def test_demo_with_repeated_seeds_stops_before_any_notebook(tmp_path, monkeypatch, capsys):
    from nbsrc.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--seeds", "0", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "distinct seeds" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written
