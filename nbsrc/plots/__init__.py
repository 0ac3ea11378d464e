"""Figures of the papers in one style: :mod:`nbsrc.plots.style` (fonts, sizes, palette, model
colours, atomic PNG + PDF saving) and :mod:`nbsrc.plots.figures` (one function per figure, arrays in,
``Figure`` out)."""

from nbsrc.plots.figures import (
    plot_cumulative_energy,
    plot_gradient_noise,
    plot_recall_heatmap,
    plot_retrieval_grid,
    plot_similarity_histograms,
    plot_training_curves,
    plot_tsne,
)
from nbsrc.plots.style import (
    DOUBLE_COLUMN,
    MODEL_COLORS,
    PALETTE,
    SINGLE_COLUMN,
    STYLE,
    color_for,
    colors_for,
    figsize,
    save_figure,
    use_style,
)

__all__ = [
    "use_style", "STYLE", "PALETTE", "MODEL_COLORS", "color_for", "colors_for", "figsize", "SINGLE_COLUMN",
    "DOUBLE_COLUMN",
    "save_figure",
    "plot_cumulative_energy", "plot_gradient_noise", "plot_similarity_histograms", "plot_tsne",
    "plot_training_curves", "plot_recall_heatmap", "plot_retrieval_grid",
]
