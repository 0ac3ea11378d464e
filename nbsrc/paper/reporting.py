"""Tables for the notebooks and the demo: Recall@K in the format of IRT Table 3, the ablation
tables (config fields beside Recall@K: IRT Tables 4, 5, 6, 9) and the gradient noise of IRT Fig. 4."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def recall_table(runs: dict, ks=None) -> pd.DataFrame:
    """One row per method (``{label: RunResult}``), one column per Recall@K, in percent."""
    rows = {}
    for label, run in runs.items():
        rec = run.recall if hasattr(run, "recall") else run
        rows[label] = {k: round(float(v), 2) for k, v in rec.items() if ks is None or k in {f"R@{x}" for x in ks}}
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "method"
    return df


def recall_over_seeds(runs: dict, ks=None) -> pd.DataFrame:
    """Recall@K (%) over seeds from ``{(label, seed): RunResult}``: per label and K the mean, the
    sample standard deviation (ddof 1; NaN for one seed), the minimum and maximum, and ``n`` seeds.
    Columns ``R@k mean``, ``R@k std``, ``R@k min``, ``R@k max``, then ``n``; labels keep their order."""
    per = recall_table({key: run for key, run in runs.items()}, ks)
    per.index = pd.MultiIndex.from_tuples(per.index, names=["method", "seed"])
    labels = list(dict.fromkeys(label for label, _ in runs))
    g = per.groupby(level="method", sort=False)
    out = pd.DataFrame(index=pd.Index(labels, name="method"))
    for col in per.columns:
        out[f"{col} mean"] = g[col].mean().round(2)
        out[f"{col} std"] = g[col].std(ddof=1).round(2)
        out[f"{col} min"] = g[col].min()
        out[f"{col} max"] = g[col].max()
    out["n"] = g.size()
    return out


def save_table(df: pd.DataFrame, name: str, out_dir: str | Path = "figures") -> list[Path]:
    """Write ``<name>.csv`` and ``<name>.md`` atomically; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in ((".csv", df.to_csv()), (".md", df.to_markdown() + "\n")):
        paths.append(write_text_atomic(out_dir / f"{name}{suffix}", text))
    return paths


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a hidden temporary file beside it and a rename, so a reader
    never sees half a file and an interrupted write leaves the old one; the folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def config_table(runs: dict, fields, ks=None) -> pd.DataFrame:
    """One row per run (``{label: RunResult}``): the config ``fields`` (by name, ``cfg.value(name)``)
    that the ablation varies (e.g. ``("beta", "lam")`` for IRT Table 5, ``("pooling",)`` for Table 9), then
    each Recall@K in percent. Pivot a two-field table into a grid with
    ``df.pivot(index=..., columns=..., values="R@1")``."""
    fields = [fields] if isinstance(fields, str) else list(fields)
    recall = recall_table(runs, ks)
    cols = {f: [run.config.value(f) for run in runs.values()] for f in fields}  # by name: 'lam', 'loss'
    df = pd.concat([pd.DataFrame(cols, index=recall.index), recall], axis=1)
    df.index.name = "method"
    return df


def mean_grad_noise(rows) -> float:
    """γ averaged over training (IRT Fig. 4): the mean of ``grad_noise`` over the logged training
    rows of a run's ``metrics.jsonl`` (``run.metrics("train")``), NaN values (batches with fewer
    than two active samples) left out; NaN if every logged value is NaN."""
    import math

    from nbsrc.errors import ConfigError

    values = [float(r["grad_noise"]) for r in rows if r.get("grad_noise") is not None]
    if not values:
        raise ConfigError("no grad_noise in these metrics: train the run with record_grad_noise=True "
                          "(it is logged every log_every iterations)")
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def grad_noise_se(rows) -> float:
    """Standard error of :func:`mean_grad_noise`: the sample standard deviation (ddof 1) of the
    finite logged ``grad_noise`` values over the square root of their count; NaN below two values.
    It measures how far the average over these few batches would move with other batches, not the
    spread over seeds."""
    import math

    finite = [float(r["grad_noise"]) for r in rows
              if r.get("grad_noise") is not None and not math.isnan(float(r["grad_noise"]))]
    if len(finite) < 2:
        return float("nan")
    mean = sum(finite) / len(finite)
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return math.sqrt(var / len(finite))


def gradient_noise_table(runs: dict, fields=("beta", "lam"), ks=(1,)) -> pd.DataFrame:
    """:func:`config_table` plus ``gamma`` (:func:`mean_grad_noise`, 4 decimals), ``gamma_se`` (its
    standard error, :func:`grad_noise_se`) and ``gamma_logged`` (how many iterations it averages) for
    runs trained with ``record_grad_noise=True``."""
    fields = [fields] if isinstance(fields, str) else list(fields)
    df = config_table(runs, fields, ks)
    rows = [run.metrics("train") for run in runs.values()]
    df.insert(len(fields), "gamma", [round(mean_grad_noise(r), 4) for r in rows])
    df.insert(len(fields) + 1, "gamma_se", [round(grad_noise_se(r), 4) for r in rows])
    df.insert(len(fields) + 2, "gamma_logged", [sum(x.get("grad_noise") is not None for x in r) for r in rows])
    return df


def change_word(a: float, b: float, se_a: float, se_b: float, z: float = 2.0) -> str:
    """How ``b`` compares with ``a`` given their standard errors: "rises" / "falls" when
    ``|b - a| > z · sqrt(se_a² + se_b²)``, else "shows no clear change" (also when an error is NaN)."""
    import math

    bound = z * math.sqrt(se_a**2 + se_b**2)
    if math.isnan(bound) or abs(b - a) <= bound:
        return "shows no clear change"
    return "rises" if b > a else "falls"


def energy_table(runs: dict, threshold: float = 0.9, ks=(1,)) -> pd.DataFrame:
    """IRT Figs. 2–3 as numbers: per run (``{label: RunResult}``) its Recall@K, the number of
    principal components of its query embeddings that reach ``threshold`` of the energy
    (:func:`nbsrc.analysis.effective_dim`), and the embedding dimension."""
    from nbsrc.analysis import effective_dim

    df = recall_table(runs, ks)
    z = {label: run.embeddings()["query"] for label, run in runs.items()}
    df[f"dim_{round(100 * threshold)}"] = [effective_dim(z[label], threshold) for label in df.index]
    df["embedding_dim"] = [z[label].shape[1] for label in df.index]
    return df
