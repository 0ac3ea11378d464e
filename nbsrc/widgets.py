"""Interactive exploration of finished runs in JupyterLab (ipywidgets). This module only builds the
widgets; what they show is computed elsewhere, so that everything a widget draws can be reproduced
(and tested) without a browser:

- :func:`retrieval_browser`: a run's queries and their top-k neighbours, hits framed green, worst
  queries first on request (:func:`nbsrc.retrieval.load_retrieval`, :func:`nbsrc.retrieval.retrieval_for_query`);
- :func:`spectrum_explorer`: cumulative PCA energy (IRT Fig. 2) and pair similarities (IRT Fig. 5)
  of several runs overlaid (:func:`nbsrc.analysis.run_spectra.spectrum_data`);
- :func:`query_browser`: upload your own image and see its neighbours in an index built by
  ``nbsrc embed`` (:class:`nbsrc.retrieval.Index`, :func:`nbsrc.retrieval.search_image`).

The runs offered are those of :func:`nbsrc.runlist.list_finished_runs`. Nothing is recomputed from the
model: the widgets read each run's ``embeddings.npz`` (written by
:func:`nbsrc.experiment.run_experiment`) and rebuild the run's evaluation images with
:func:`nbsrc.data.build_data` from its saved config, so the runs must have finished (notebook 02).

Without a widget frontend (papermill, nbconvert) the widgets cannot draw; ``static=None`` then
also displays the default view as a plain figure, so an executed notebook still shows it.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

from nbsrc.analysis.run_spectra import spectrum_data
from nbsrc.errors import ConfigError, NbsrcError
from nbsrc.plots import plot_cumulative_energy, plot_similarity_histograms
from nbsrc.retrieval.run_neighbours import QueryRetrieval, RunRetrieval, load_retrieval, retrieval_for_query
from nbsrc.runlist import list_finished_runs

__all__ = ["retrieval_browser", "spectrum_explorer", "query_browser", "widget_frontend_connected"]


# ----------------------------------------------------------------------------- widgets
def widget_frontend_connected() -> bool:
    """Whether the cell now running was sent by a frontend that draws widgets: one opened the
    ``jupyter.widget.control`` comm, or the execute request carries JupyterLab's cell metadata
    (``cellId``, ``deletedCells``; Notebook 7 sends the same). papermill / nbclient send neither."""
    import ipywidgets

    if getattr(ipywidgets.Widget, "_control_comm", None) is not None:
        return True
    try:
        from IPython import get_ipython

        kernel = getattr(get_ipython(), "kernel", None)
        parent = kernel.get_parent() if kernel is not None else None
    except Exception:  # noqa: BLE001 - an unusual kernel: assume no frontend, draw statically
        return False
    meta = (parent or {}).get("metadata") or {}
    return any(key in meta for key in ("cellId", "deletedCells", "recordTiming"))


def _png_output(fig, dpi: int = 110) -> dict:
    """A figure as an Output-widget output (PNG), so the widget's content is its ``outputs`` trait
    (what the frontend shows, and what a test can read) rather than a side effect of printing."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": repr(fig)}}


def _text_output(text: str) -> dict:
    return {"output_type": "stream", "name": "stdout", "text": text + "\n"}


def _show_static(widget, static: bool | None) -> None:
    if static is None:
        static = not widget_frontend_connected()
    if static and widget.figures:
        from IPython.display import Image, display

        # As PNG, not the Figure: a bare Figure (never registered with pyplot) has no image repr.
        display(*(Image(data=base64.b64decode(_png_output(f)["data"]["image/png"]), format="png")
                  for f in widget.figures))


def _make_retrieval_browser(runs_dir, k: int):
    import ipywidgets as w

    class RetrievalBrowser(w.VBox):
        """Pick a run and a query; see the query's top-k neighbours, hits framed green."""

        def __init__(self):
            self.runs = {s.name: s for s in list_finished_runs(runs_dir)}
            self.k = k
            self._cache: dict[str, RunRetrieval] = {}
            self.figures: list = []
            self.current: QueryRetrieval | None = None
            self.run_picker = w.Dropdown(options=[(s.label, s.name) for s in self.runs.values()],
                                         description="run", layout=w.Layout(width="420px"))
            self.worst = w.ToggleButton(value=False, description="worst queries first", icon="sort-amount-asc",
                                        layout=w.Layout(width="auto"),
                                        tooltip="order the slider by average precision, lowest first")
            self.slider = w.IntSlider(value=0, min=0, max=0, description="query", continuous_update=False,
                                      layout=w.Layout(width="420px"))
            self.info = w.HTML()
            self.output = w.Output()
            super().__init__([w.HBox([self.run_picker, self.worst]), self.slider, self.info, self.output])
            self.run_picker.observe(self._on_run, names="value")
            self.worst.observe(self._on_worst, names="value")
            self._quiet = False
            self.slider.observe(lambda _: None if self._quiet else self.update(), names="value")
            self._on_run()

        @property
        def retrieval(self) -> RunRetrieval:
            name = self.run_picker.value
            if name not in self._cache:
                self._cache[name] = load_retrieval(self.runs[name], self.k)
            return self._cache[name]

        def query_row(self) -> int:
            """The query row shown: the slider value, or with "worst" the value-th worst query."""
            if self.worst.value:
                return int(self.retrieval.worst()[self.slider.value])
            return int(self.slider.value)

        def _on_run(self, _=None):
            self._reset_slider()

        def _on_worst(self, _=None):
            self._reset_slider()

        def _reset_slider(self):
            try:
                n = len(self.retrieval.worst()) if self.worst.value else self.retrieval.n_queries
            except NbsrcError as e:
                return self._fail(e)
            self.slider.description = "worst #" if self.worst.value else "query"
            self._quiet = True  # one redraw below, not one per slider change
            try:
                self.slider.max = max(n - 1, 0)
                self.slider.value = 0 if self.worst.value else min(self.slider.value, self.slider.max)
            finally:
                self._quiet = False
            self.update()

        def _fail(self, e: Exception):
            self.figures, self.current = [], None
            self.info.value = ""
            self.output.outputs = (_text_output(f"error: {e}"),)

        def update(self):
            """Redraw for the current run, query and mode."""
            try:
                rr = self.retrieval
                q = self.query_row()
                self.current = retrieval_for_query(rr, q, self.k)
            except (NbsrcError, IndexError) as e:
                return self._fail(e)
            hits = self.current.hits
            ap = f", AP {rr.average_precision[q]:.2f}" if self.worst.value else ""
            self.info.value = (f"query {q} of {rr.n_queries} (label {self.current._name(self.current.query_label)}"
                               f"{ap}): {int(hits.sum())} of {len(hits)} neighbours correct")
            fig = self.current.figure()
            self.figures = [fig]
            self.output.outputs = (_png_output(fig),)

    return RetrievalBrowser()


def retrieval_browser(runs_dir: str | Path = "runs", k: int = 8, static: bool | None = None):
    """A widget to browse the retrievals of the finished runs of ``runs_dir``: a run picker
    (``run_picker``), a query slider (``slider``) and a "worst queries first" toggle (``worst``,
    slider = rank by average precision, lowest first); the output shows the query and its top
    ``k`` neighbours framed green (same label) or red (:func:`nbsrc.retrieval.retrieval_for_query`).

    The returned ``ipywidgets.VBox`` also holds ``current`` (the :class:`~nbsrc.retrieval.QueryRetrieval` shown)
    and ``figures`` (the figure shown). ``static``: also display the default view as a plain
    figure; ``None`` does so only when no widget frontend is connected (papermill)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k={k!r} is invalid: expected the number of neighbours to show, an integer >= 1")
    browser = _make_retrieval_browser(runs_dir, int(k))
    _show_static(browser, static)
    return browser


def _make_spectrum_explorer(runs_dir, max_negatives, default: int):
    import ipywidgets as w

    class SpectrumExplorer(w.VBox):
        """Pick several runs; see their PCA energy curves and similarity histograms together."""

        def __init__(self):
            self.runs = {s.name: s for s in list_finished_runs(runs_dir)}
            self._cache: dict[str, tuple] = {}
            self.figures: list = []
            names = list(self.runs)
            self.picker = w.SelectMultiple(options=[(s.label, s.name) for s in self.runs.values()],
                                           value=tuple(names[:default]), rows=min(8, len(names)),
                                           description="runs", layout=w.Layout(width="520px"))
            self.output = w.Output()
            super().__init__([w.HTML("Select several runs (Ctrl/Shift-click) to overlay them."),
                              self.picker, self.output])
            self.picker.observe(lambda _: self.update(), names="value")
            self.update()

        def _data(self, name: str):
            if name not in self._cache:
                curves, sims = spectrum_data([self.runs[name]], max_negatives)
                (label, curve), (pair,) = next(iter(curves.items())), sims.values()
                self._cache[name] = (label, curve, pair)
            return self._cache[name]

        def update(self):
            """Redraw for the current selection."""
            if not self.picker.value:
                self.figures = []
                self.output.outputs = (_text_output("select one or more runs"),)
                return
            try:
                picked = [self._data(n) for n in self.picker.value]
                curves = {label: curve for label, curve, _ in picked}
                sims = {label: pair for label, _, pair in picked}
                self.figures = [plot_cumulative_energy(curves), plot_similarity_histograms(sims)]
            except NbsrcError as e:
                self.figures = []
                self.output.outputs = (_text_output(f"error: {e}"),)
                return
            self.output.outputs = tuple(_png_output(f) for f in self.figures)

    return SpectrumExplorer()


def spectrum_explorer(runs_dir: str | Path = "runs", max_negatives: int | None = 200_000, default: int = 3,
                      static: bool | None = None):
    """A widget to compare finished runs of ``runs_dir``: a multiple-choice run picker (``picker``,
    labels give λ and β; the first ``default`` runs selected) and, for the selection, the
    cumulative PCA energy curves (IRT Fig. 2) and positive / negative similarity histograms
    (IRT Fig. 5) overlaid (:func:`nbsrc.analysis.run_spectra.spectrum_data`). The returned ``ipywidgets.VBox`` holds the
    figures shown in ``figures``; ``static`` as in :func:`retrieval_browser`."""
    if isinstance(default, bool) or not isinstance(default, int) or default < 1:
        raise ConfigError(f"default={default!r} is invalid: expected how many runs to select at first, an integer >= 1")
    explorer = _make_spectrum_explorer(runs_dir, max_negatives, default)
    _show_static(explorer, static)
    return explorer


# ----------------------------------------------------------------------------- query with your own image
def _make_query_browser(index, k: int, default_query):
    import ipywidgets as w

    from nbsrc.retrieval import Index, search_image

    class QueryBrowser(w.VBox):
        """Upload an image; see its top-k neighbours in an index built by ``nbsrc embed``."""

        def __init__(self):
            self.index = index if isinstance(index, Index) else Index.load(index)
            self.figures: list = []
            self.current = None  # SearchResults of the image shown
            self.upload = w.FileUpload(accept="image/*", multiple=False, description="query image")
            self.k = w.BoundedIntText(value=k, min=1, max=max(1, len(self.index)), description="k",
                                      layout=w.Layout(width="140px"))
            self.info = w.HTML()
            self.output = w.Output()
            super().__init__([w.HBox([self.upload, self.k]), self.info, self.output])
            self.upload.observe(self._on_upload, names="value")
            self.k.observe(lambda _: self.show(*self._last) if self._last else None, names="value")
            self._last = None
            first = default_query if default_query is not None else self.index.listing.path(
                int(self.index.indexed_rows[0]))
            self.show(first, str(first))

        def _on_upload(self, change):
            files = change["new"]
            if files:
                f = files[0]
                self.show(bytes(f["content"]), f["name"])

        def show(self, image, name: str):
            """Search ``image`` (a path or encoded bytes) and redraw."""
            self._last = (image, name)
            try:
                self.current, fig = search_image(self.index, image, int(self.k.value), name=name)
            except NbsrcError as e:
                self.figures, self.current = [], None
                self.info.value = ""
                self.output.outputs = (_text_output(f"error: {e}"),)
                return
            best = self.current.paths[0][0]
            self.info.value = (f"{name}: top {self.current.rows.shape[1]} of {len(self.index)} images "
                               f"(best {self.current.scores[0, 0]:.3f}: {best.name})")
            self.figures = [fig]
            self.output.outputs = (_png_output(fig),)

    return QueryBrowser()


def query_browser(index, k: int = 8, default_query=None, static: bool | None = None):
    """A widget to query an index (an :class:`nbsrc.retrieval.Index` or its directory, from
    ``nbsrc embed``) with your own image: a file upload (``upload``) and ``k``; the output shows
    the query and its top ``k`` (:func:`nbsrc.retrieval.search_image`). Before any upload it shows
    ``default_query`` (a path; default: the first indexed image). The returned ``ipywidgets.VBox``
    holds ``current`` (the :class:`~nbsrc.retrieval.SearchResults` shown), ``figures``, and
    ``show(image, name)`` to search a path or encoded bytes from code; ``static`` as in
    :func:`retrieval_browser`."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k={k!r} is invalid: expected the number of neighbours to show, an integer >= 1")
    browser = _make_query_browser(index, int(k), default_query)
    _show_static(browser, static)
    return browser
