"""Retrieval with a trained (or off-the-shelf) model, in one place for the CLI, widgets and notebooks.

- :class:`Index` (:mod:`nbsrc.retrieval.index`): ``Index.build(model, folder, out_dir)`` embeds a
  folder of your own images into a searchable index on disk (resumable, bad images skipped and
  reported), ``Index.load(dir)`` opens it, ``index.search(images, k)`` returns the top-k paths and
  cosine scores (:class:`SearchResults`, with ``.figure()`` and ``.lines()``);
- :func:`load_embedding_model` (:mod:`nbsrc.retrieval.models`): a run directory, a preset, a timm
  model name or ``efficientnet_lite0`` as a network plus its preprocessing;
- :func:`load_retrieval`, :func:`retrieval_for_query` (:mod:`nbsrc.retrieval.run_neighbours`): the top-k and
  the worst queries of a finished run's evaluation split (the retrieval browser's logic).

- :func:`~nbsrc.retrieval.export.export_model` (:mod:`nbsrc.retrieval.export`): a run's final descriptor as
  TorchScript or ONNX, or its backbone as safetensors for plain timm, with a JSON of the preprocessing.

The command line is ``python -m nbsrc embed`` / ``search`` / ``export`` (:mod:`nbsrc.retrieval.cli`).
"""

from nbsrc.retrieval.index import Index, Listing, SearchResults, search_image, thumbnail_of
from nbsrc.retrieval.models import EmbeddingModel, Preprocessing, load_embedding_model
from nbsrc.retrieval.run_neighbours import (
    QueryRetrieval,
    RunRetrieval,
    display_image,
    export_split_images,
    index_of_run,
    load_retrieval,
    retrieval_for_query,
)

__all__ = [
    "Index", "Listing", "SearchResults", "search_image", "thumbnail_of", "EmbeddingModel", "Preprocessing",
    "load_embedding_model",
    "QueryRetrieval", "RunRetrieval", "display_image", "load_retrieval", "retrieval_for_query",
    "export_split_images", "index_of_run",
]
