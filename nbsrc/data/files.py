"""Reading the pickled index files of the benchmarks (SfM-120k's database, Revisited's ground truth)."""

from __future__ import annotations

from pathlib import Path

from nbsrc.errors import DatasetError
from nbsrc.safeload import load_pickle, why_unreadable


def read_pickle(path: str | Path, layout: str, url: str):
    """The object pickled in ``path``, read with :func:`nbsrc.safeload.load_pickle` (containers,
    strings, numbers and numpy arrays only; a file that asks to call a function is refused and
    nothing in it is run); a missing or unreadable file is a one-line
    :class:`~nbsrc.errors.DatasetError` naming it, the expected ``layout`` and where to get it (``url``)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"expected {path}; {layout}; {url}")
    try:
        return load_pickle(path)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DatasetError(f"cannot read {path} ({why_unreadable(e)}); download it again ({url})") from None
