"""The analyses of IRT as pure functions (numpy or torch in, numpy out), each with its formula:

- :func:`cumulative_energy`, :func:`effective_dim`, :func:`effective_rank`: PCA spectrum of the embeddings
  (IRT Figs. 2, 3);
- :func:`gradient_noise`, :func:`per_sample_embedding_grads`, :class:`GradientNoiseMeter`:
  γ = ‖Cov(ĝ)‖_* of the contrastive loss's gradient directions (IRT §3.5, Fig. 4);
- :func:`pair_similarities`, :func:`pair_indices`: positive / negative pair similarities (IRT Fig. 5), and
  :func:`separation_auc`, how well they separate;
  :func:`revisited_pair_similarities` the query-database pairs of Revisited Paris (Medium), as the
  paper draws them, and :func:`run_pair_similarities` whichever of the two a run's embeddings allow;
- :func:`tsne`: 2-D t-SNE map with a fixed seed (DToP Fig. A6);
- :func:`average_precision_per_query`, :func:`worst_queries`: per-query rankings for the retrieval grid.

:mod:`nbsrc.analysis.run_spectra` applies them to finished runs read from disk
(:func:`~nbsrc.analysis.run_spectra.spectrum_data`); it is imported on its own, so that this package stays
arrays in, arrays out.
"""

from nbsrc.analysis.embedding import TSNEResult, stratified_subsample, tsne
from nbsrc.analysis.gradients import GradientNoiseMeter, gradient_noise, per_sample_embedding_grads
from nbsrc.analysis.similarity import (
    average_precision_per_query,
    pair_indices,
    pair_similarities,
    revisited_pair_similarities,
    run_pair_similarities,
    separation_auc,
    worst_queries,
)
from nbsrc.analysis.spectrum import (
    as_embeddings,
    as_labels,
    cumulative_energy,
    dim_at_energy,
    effective_dim,
    effective_rank,
)

__all__ = [
    "cumulative_energy", "effective_dim", "effective_rank", "dim_at_energy", "as_embeddings", "as_labels",
    "gradient_noise", "per_sample_embedding_grads", "GradientNoiseMeter",
    "pair_similarities", "pair_indices", "separation_auc", "revisited_pair_similarities", "run_pair_similarities",
    "average_precision_per_query", "worst_queries",
    "tsne", "TSNEResult", "stratified_subsample",
]
