"""The paper's figures, drawn from arrays (computed by :mod:`nbsrc.analysis` / :mod:`nbsrc.eval`).

Each function returns a ``matplotlib.figure.Figure`` (not registered with pyplot, so a notebook
shows it once, as the cell's value, and tests do not accumulate open figures), drawn in the style
of :mod:`nbsrc.plots.style`, with labelled axes, a legend wherever there are several series, and a
title naming the figure or table of the paper it corresponds to. Save it with
:func:`nbsrc.plots.style.save_figure`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from nbsrc.analysis.spectrum import dim_at_energy
from nbsrc.errors import ConfigError
from nbsrc.plots.style import (
    DOUBLE_COLUMN,
    HIT_COLOR,
    MISS_COLOR,
    PALETTE,
    QUERY_COLOR,
    SINGLE_COLUMN,
    STYLE,
    colors_for,
)

UNKNOWN_COLOR = "0.6"  # a neighbour whose correctness is unknown (the query has no class)


def _styled(draw):
    """Draw inside the house style, and lay the figure out before leaving it (ticks are created
    lazily, so they would otherwise take the global rcParams)."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with mpl.rc_context(STYLE):
            fig = draw(*args, **kwargs)
            fig.draw_without_rendering()
        return fig

    return wrapper


def _grid(n_panels: int, max_cols: int = 3, panel_height: float = 2.3, width: float | None = None, **kw):
    cols = min(n_panels, max_cols)
    rows = math.ceil(n_panels / cols)
    width = width or (SINGLE_COLUMN if cols == 1 else DOUBLE_COLUMN)
    fig = Figure(figsize=(width, panel_height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _nonempty(d, what: str):
    if not isinstance(d, Mapping) or not d:
        raise ConfigError(f"{what} must be a non-empty dict {{name: data}}, got {type(d).__name__} {d!r:.60}")


def _curve(values, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ConfigError(f"{what} must be a non-empty 1-D array, got shape {v.shape}")
    return v


# ----------------------------------------------------------------------------- IRT Figures 2 and 3
@_styled
def plot_cumulative_energy(curves: Mapping[str, np.ndarray], threshold: float = 0.9,
                           max_components: int | None = None, logx: bool = False,
                           title: str = "Cumulative PCA energy of the embeddings (IRT Fig. 2)") -> Figure:
    """One line per model: x = number of principal components k, y = cumulative energy E(k)
    (:func:`nbsrc.analysis.cumulative_energy`), with a dashed line at ``threshold``; the legend
    gives each model's effective dimension (the k where E reaches ``threshold``)."""
    _nonempty(curves, "curves")
    fig = Figure(figsize=(SINGLE_COLUMN, SINGLE_COLUMN * 0.8), layout="constrained")
    ax = fig.add_subplot()
    colors = colors_for([str(name) for name in curves])
    for name, curve in curves.items():
        e = _curve(curve, f"curves[{name!r}]")
        k = dim_at_energy(e, threshold)
        label = f"{name} ({threshold:.0%} at {k})" if k else str(name)
        ax.plot(np.arange(1, len(e) + 1), e, color=colors[str(name)], label=label)
    ax.axhline(threshold, color="0.4", linestyle="--", linewidth=0.8, label=f"{threshold:.0%} of the energy")
    if logx:
        ax.set_xscale("log")
    ax.set_xlim(1, max_components or max(len(np.asarray(c)) for c in curves.values()))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("number of principal components")
    ax.set_ylabel("cumulative energy")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return fig


@_styled
def plot_energy_by_backbone(curves: Mapping[str, Mapping[str, np.ndarray]], threshold: float = 0.9,
                            logx: bool = True, title: str = "ViT vs convnet, same loss (IRT Fig. 3)") -> Figure:
    """Cumulative energy E(k) of several backbones, each in several states (e.g. off-the-shelf and
    trained with the contrastive loss): ``curves = {backbone: {state: E}}``. One colour per backbone,
    one line style per state (in the order of the first backbone's states: solid, dashed, dotted, …),
    a dashed grey line at ``threshold``; the legend gives each curve's k at the threshold. The x axis
    is logarithmic by default, since backbones differ in embedding size."""
    _nonempty(curves, "curves")
    styles = ["-", "--", ":", "-."]
    states: list[str] = []
    fig = Figure(figsize=(SINGLE_COLUMN, SINGLE_COLUMN * 0.85), layout="constrained")
    ax = fig.add_subplot()
    longest = 1
    for i, (backbone, by_state) in enumerate(curves.items()):
        _nonempty(by_state, f"curves[{backbone!r}]")
        for state, curve in by_state.items():
            if state not in states:
                states.append(state)
            e = _curve(curve, f"curves[{backbone!r}][{state!r}]")
            longest = max(longest, len(e))
            k = dim_at_energy(e, threshold)
            label = f"{backbone}, {state}" + (f" ({threshold:.0%} at {k})" if k else "")
            ax.plot(np.arange(1, len(e) + 1), e, color=PALETTE[i % len(PALETTE)],
                    linestyle=styles[states.index(state) % len(styles)], label=label)
    ax.axhline(threshold, color="0.4", linestyle="--", linewidth=0.8)
    if logx:
        ax.set_xscale("log")
    ax.set_xlim(1, longest)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("number of principal components")
    ax.set_ylabel("cumulative energy")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=6)
    return fig


# ----------------------------------------------------------------------------- IRT Figure 4
@_styled
def plot_gradient_noise(betas: Sequence[float], gammas: Mapping[str, Sequence[float]],
                        title: str = "Gradient noise vs margin (IRT Fig. 4)",
                        errors: Mapping[str, Sequence[float]] | None = None) -> Figure:
    """γ = ‖Cov(ĝ)‖_* (averaged over training) against the margin β, one line per setting
    (e.g. ``{"λ = 0": [...], "λ = 0.7": [...]}``), each list aligned with ``betas``; ``errors``
    (same keys and lengths, e.g. the standard errors ``gamma_se``) draws ± error bars."""
    _nonempty(gammas, "gammas")
    x = _curve(betas, "betas")
    fig = Figure(figsize=(SINGLE_COLUMN, SINGLE_COLUMN * 0.8), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, values) in enumerate(gammas.items()):
        y = _curve(values, f"gammas[{label!r}]")
        if len(y) != len(x):
            raise ConfigError(f"gammas[{label!r}] has {len(y)} values but there are {len(x)} betas; "
                              "give one γ per β (NaN where a run is missing)")
        err = None
        if errors is not None:
            if label not in errors or len(errors[label]) != len(x):
                raise ConfigError(f"errors must give one value per β for every line; {label!r} is missing or "
                                  f"has the wrong length")
            err = _curve(errors[label], f"errors[{label!r}]")
        ax.errorbar(x, y, yerr=err, marker="o", capsize=2, color=PALETTE[i % len(PALETTE)], label=str(label))
    ax.set_xlabel("margin β")
    ax.set_ylabel("gradient noise γ = ‖Cov(ĝ)‖$_*$")
    ax.set_title(title)
    ax.legend()
    return fig


# ----------------------------------------------------------------------------- IRT Figure 5
@_styled
def plot_similarity_histograms(sims: Mapping[str, tuple], bins: int = 60,
                               title: str = "Cosine similarity of positive and negative pairs (IRT Fig. 5)") -> Figure:
    """One panel per model: density histograms (seaborn ``histplot``) of the positive and the
    negative pair similarities ``(pos, neg)`` from :func:`nbsrc.analysis.pair_similarities`, each
    normalised on its own (positives are far fewer). All panels share the bins and the axes."""
    import pandas as pd
    import seaborn as sns

    _nonempty(sims, "sims")
    data = {}
    for name, pair in sims.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ConfigError(f"sims[{name!r}] must be a pair (pos, neg) of similarity arrays")
        pos, neg = _curve(pair[0], f"positives of {name!r}"), _curve(pair[1], f"negatives of {name!r}")
        data[name] = pd.DataFrame({"cosine similarity": np.concatenate([pos, neg]),
                                   "pair": np.repeat(["positive", "negative"], [len(pos), len(neg)])})
    everything = np.concatenate([d["cosine similarity"].to_numpy() for d in data.values()])
    edges = np.linspace(everything.min(), everything.max() + 1e-9, bins + 1)
    fig, axes = _grid(len(data), sharex=True, sharey=True)
    for ax, (name, df) in zip(axes, data.items(), strict=True):
        sns.histplot(df, x="cosine similarity", hue="pair", hue_order=["positive", "negative"], bins=edges,
                     stat="density", common_norm=False, element="step", alpha=0.3, ax=ax,
                     palette={"positive": PALETTE[0], "negative": PALETTE[1]})
        ax.set_title(str(name))
        ax.set_xlabel("cosine similarity")
        ax.set_ylabel("density")
    fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- t-SNE (DToP Fig. A6)
def _class_name(label, class_names) -> str:
    if class_names is None:
        return str(label)
    if isinstance(class_names, Mapping):
        return str(class_names.get(label, label))
    return str(class_names[int(label)])


@_styled
def plot_tsne(points: Mapping[str, tuple], class_names=None, max_cols: int = 3,
              title: str = "t-SNE of the test embeddings (DToP Fig. A6)") -> Figure:
    """Side-by-side panels, one per model, of 2-D points ``(xy [n, 2], labels [n])`` (from
    :func:`nbsrc.analysis.tsne`) coloured by class, one class colour across all panels, and one
    legend. ``class_names`` maps a label to its name (a dict, or a sequence indexed by label)."""
    _nonempty(points, "points")
    checked = {}
    for name, pair in points.items():
        xy, labels = np.asarray(pair[0], dtype=np.float64), np.asarray(pair[1])
        if xy.ndim != 2 or xy.shape[1] != 2 or labels.shape != (len(xy),):
            raise ConfigError(f"points[{name!r}] must be (xy [n, 2], labels [n]), "
                              f"got shapes {xy.shape}, {labels.shape}")
        checked[name] = (xy, labels)
    classes = np.unique(np.concatenate([lab for _, lab in checked.values()]))
    if len(classes) <= len(PALETTE):
        colours = PALETTE[:len(classes)]
    else:
        import seaborn as sns

        colours = sns.color_palette("husl", len(classes)).as_hex()
    fig, axes = _grid(len(checked), max_cols=max_cols, panel_height=2.4)
    for ax, (name, (xy, labels)) in zip(axes, checked.items(), strict=True):
        for c, colour in zip(classes, colours, strict=True):
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, alpha=0.8, color=colour, linewidths=0,
                       label=_class_name(c, class_names))
        ax.set_title(str(name))
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    handles = [Patch(color=colour, label=_class_name(c, class_names))
               for c, colour in zip(classes, colours, strict=True)]
    fig.legend(handles=handles, loc="outside right upper", title="class")
    fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- training curves
@_styled
def plot_training_curves(metrics: Mapping[str, list[dict]], keys: Sequence[str] = ("contrastive", "koleo", "total"),
                         title: str = "Training losses") -> Figure:
    """One panel per loss term in ``keys``, one line per run, against the iteration. ``metrics``
    maps a run name to its metric rows (``{"iteration": int, "contrastive": float, ...}``, as in a
    run's ``metrics.jsonl``); rows without ``iteration`` or without the key are skipped, and a key
    no run recorded gets an empty panel that says so."""
    _nonempty(metrics, "metrics")
    if isinstance(keys, str) or not keys:
        raise ConfigError(f"keys={keys!r} is invalid: expected a non-empty sequence of metric names")
    fig, axes = _grid(len(keys), max_cols=3, panel_height=2.2)
    colors = colors_for([str(name) for name in metrics])  # a run has one colour in every panel
    for ax, key in zip(axes, keys, strict=True):
        drawn = False
        for name, rows in metrics.items():
            pts = [(r["iteration"], r[key]) for r in rows if "iteration" in r and r.get(key) is not None]
            if pts:
                it, val = zip(*sorted(pts), strict=True)
                ax.plot(it, val, color=colors[str(name)], label=str(name))
                drawn = True
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"{key}: not recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.set_ylabel(key)
    fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- IRT Table 5
@_styled
def plot_recall_heatmap(table, row: str = "beta", col: str = "lam", value: str = "R@1", fmt: str = ".1f",
                        row_label: str = "margin β", col_label: str = "KoLeo weight λ", cmap: str = "viridis",
                        title: str = "Recall@1 over the β × λ grid (IRT Table 5)") -> Figure:
    """Heatmap of ``value`` over a grid, annotated with the numbers (seaborn ``heatmap``).
    ``table`` is either long (columns ``row``, ``col``, ``value``, one row per run) or already a
    grid (index = β, columns = λ). Missing cells are left blank."""
    import pandas as pd
    import seaborn as sns

    if not isinstance(table, pd.DataFrame) or table.empty:
        raise ConfigError("table must be a non-empty pandas DataFrame (long: beta, lam, R@1; or a β × λ grid)")
    if {row, col, value} <= set(table.columns):
        if table.duplicated([row, col]).any():
            raise ConfigError(f"table has several rows for the same ({row}, {col}); average them first, e.g. "
                              f"table.groupby([{row!r}, {col!r}], as_index=False)[{value!r}].mean()")
        grid = table.pivot(index=row, columns=col, values=value)
    else:
        grid = table
    try:
        grid = grid.sort_index().sort_index(axis=1).astype(float)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"table values must be numbers ({e}); pass a long table with columns "
                          f"{row!r}, {col!r}, {value!r} or a numeric grid") from None
    fig = Figure(figsize=(SINGLE_COLUMN + 0.6, SINGLE_COLUMN * 0.85), layout="constrained")
    ax = fig.add_subplot()
    sns.heatmap(grid, annot=True, fmt=fmt, cmap=cmap, cbar_kws={"label": value}, ax=ax,
                annot_kws={"fontsize": 7}, linewidths=0.5, linecolor="white")
    ax.grid(False)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(title)
    return fig


# ----------------------------------------------------------------------------- retrieval grid
def _image(img, what: str) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ConfigError(f"{what} must be a uint8 image H×W or H×W×3, got dtype {a.dtype} shape {a.shape}; "
                          "convert with (x * 255).clip(0, 255).astype(np.uint8)")
    return a


def _framed(ax, img, colour: str, width: float = 2.5):
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color(colour)
        spine.set_linewidth(width)


@_styled
def plot_retrieval_grid(query_images, retrieved_images, hits, query_titles=None, retrieved_titles=None,
                        title: str = "Queries and their top-k neighbours") -> Figure:
    """A row per query: the query (blue frame), then its top-k neighbours, best first, framed green
    when they have the query's label (``hits[q, j]``) and red when not.

    ``query_images[q]`` and ``retrieved_images[q][j]`` are uint8 arrays H×W (grey) or H×W×3;
    ``hits`` is ``[Q, k]`` bool (e.g. ``RetrievalResults.hits``). ``query_titles[q]`` labels a row
    (default "query q"); ``retrieved_titles[q][j]``, if given, is written under each neighbour
    (e.g. its class). ``hits=None``: whether a neighbour is correct is unknown (a query without a
    class): every neighbour gets a neutral grey frame."""
    known = hits is not None
    if not known:
        if len(retrieved_images) == 0:
            raise ConfigError("retrieved_images is empty: give at least one query with at least one neighbour")
        hits = np.zeros((len(retrieved_images), len(retrieved_images[0])), dtype=bool)
    hits = np.asarray(hits)
    if hits.ndim != 2 or hits.dtype != bool:
        raise ConfigError(f"hits must be a [Q, k] bool array, got dtype {hits.dtype} shape {hits.shape}")
    n_q, k = hits.shape
    if n_q == 0 or k == 0:
        raise ConfigError("hits is empty: give at least one query with at least one neighbour")
    if len(query_images) != n_q or len(retrieved_images) != n_q:
        raise ConfigError(f"hits has {n_q} queries but there are {len(query_images)} query images and "
                          f"{len(retrieved_images)} rows of retrieved images; give one row per query")
    cell = min(0.9, DOUBLE_COLUMN / (k + 1))
    fig = Figure(figsize=(cell * (k + 1), cell * n_q + 0.5), layout="constrained")
    axes = fig.subplots(n_q, k + 1, squeeze=False)
    for q in range(n_q):
        if len(retrieved_images[q]) != k:
            raise ConfigError(f"query {q} has {len(retrieved_images[q])} retrieved images but hits has k={k}")
        _framed(axes[q, 0], _image(query_images[q], f"query_images[{q}]"), QUERY_COLOR)
        axes[q, 0].set_ylabel(str(query_titles[q]) if query_titles is not None else f"query {q}", fontsize=7)
        for j in range(k):
            ax = axes[q, j + 1]
            _framed(ax, _image(retrieved_images[q][j], f"retrieved_images[{q}][{j}]"),
                    (HIT_COLOR if hits[q, j] else MISS_COLOR) if known else UNKNOWN_COLOR)
            if retrieved_titles is not None:
                ax.set_xlabel(str(retrieved_titles[q][j]), fontsize=6)
    axes[0, 0].set_title("query", fontsize=8)
    for j in range(k):
        axes[0, j + 1].set_title(f"#{j + 1}", fontsize=8)
    handles = [Patch(facecolor="none", edgecolor=QUERY_COLOR, linewidth=2, label="query")]
    if known:
        handles += [Patch(facecolor="none", edgecolor=HIT_COLOR, linewidth=2, label="correct"),
                    Patch(facecolor="none", edgecolor=MISS_COLOR, linewidth=2, label="incorrect")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    fig.suptitle(title)
    return fig
