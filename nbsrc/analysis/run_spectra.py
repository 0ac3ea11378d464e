"""The analyses of finished runs, read from the embeddings each run saved (nothing is recomputed
from the model): :func:`spectrum_data`, the PCA spectrum (IRT Fig. 2) and the pair similarities
(IRT Fig. 5) of several runs, as the spectrum explorer of :mod:`nbsrc.widgets` overlays them.

It reads runs through :mod:`nbsrc.runlist`, so it is imported on its own
(``from nbsrc.analysis.run_spectra import spectrum_data``), never by :mod:`nbsrc.analysis`, whose functions
take arrays and stay free of the runner.
"""

from __future__ import annotations

from nbsrc.analysis.similarity import pair_similarities
from nbsrc.analysis.spectrum import cumulative_energy
from nbsrc.runlist import RunSummary, as_run


def spectrum_data(runs, max_negatives: int | None = 200_000, seed: int = 0):
    """For each run (:class:`~nbsrc.runlist.RunSummary`, :class:`~nbsrc.experiment.RunResult` or run
    directory): the cumulative PCA energy of its query embeddings (IRT Fig. 2) and its positive /
    negative pair similarities (IRT Fig. 5). Returns ``(curves {label: E}, sims {label: (pos, neg)})``
    keyed by :attr:`RunSummary.short_label <nbsrc.runlist.RunSummary.short_label>`, ready for
    :func:`nbsrc.plots.plot_cumulative_energy` and :func:`nbsrc.plots.plot_similarity_histograms`."""
    curves, sims = {}, {}
    for r in runs:
        run = as_run(r)
        label = RunSummary.of(run).short_label
        e = run.embeddings()
        curves[label] = cumulative_energy(e["query"])
        pos, neg, _ = pair_similarities(e["query"], e["query_labels"], max_negatives=max_negatives, seed=seed)
        sims[label] = (pos, neg)
    return curves, sims
