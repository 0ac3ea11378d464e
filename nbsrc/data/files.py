"""Reading the pickled index files of the benchmarks (SfM-120k's database, Revisited's ground truth)."""

from __future__ import annotations

import pickle
from pathlib import Path

from nbsrc.errors import DatasetError


def read_pickle(path: str | Path, layout: str, url: str):
    """The object pickled in ``path``; a missing or unreadable file is a one-line
    :class:`~nbsrc.errors.DatasetError` naming it, the expected ``layout`` and where to get it (``url``)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"expected {path}; {layout}; {url}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DatasetError(f"cannot read {path} ({type(e).__name__}: {e}); download it again ({url})") from None
