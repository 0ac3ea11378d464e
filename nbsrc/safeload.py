"""Reading ``.pt`` and ``.pkl`` files without running code from them.

A pickle (and so a ``torch.save`` file) may name any Python function to call while it is read: a
crafted ``checkpoint.pt`` or ``gnd_roxford5k.pkl`` would run code as the user who reads it. nbsrc
reads every such file through one of two doors that build data only:

* :func:`load_torch`: ``torch.load(weights_only=True)`` (tensors, plain containers, numbers, strings)
  with numpy's array and scalar reconstruction allowed by name (:func:`torch_numpy_globals`), for the
  numpy RNG state and tuples of checkpoints written before they were saved as tensors. Checkpoints,
  a run's or an index's ``model.pt`` and ``--weights`` files are read with it.
* :func:`load_pickle`: a :class:`pickle.Unpickler` whose ``find_class`` knows only builtin containers
  and scalars, ``collections.OrderedDict``, numpy's array, dtype and scalar reconstruction (numpy 1
  and 2 names) and protocol 2's ``_codecs.encode`` for ``latin1`` bytes. The benchmarks' ``.pkl``
  index files (SfM-120k's database, Revisited's ground truth: dicts, lists, strings and arrays) are
  read with it.

A file that names anything else fails with :class:`pickle.UnpicklingError` before anything is
called; :func:`why_unreadable` turns any failure into the short phrase of a one-line error.
"""

from __future__ import annotations

import codecs
import collections
import pickle
import re
from pathlib import Path

import numpy as np
import torch

_NUMERIC_DTYPES = "?bBhHiIlLqQefdgFDG"  # bool, signed and unsigned ints, floats, complex


def _numpy_helpers() -> tuple:
    """numpy's ``_reconstruct``, ``scalar`` and ``_frombuffer`` (under ``numpy._core`` in numpy 2,
    ``numpy.core`` in numpy 1), found through the reductions that use them rather than by import."""
    return np.zeros(1).__reduce__()[0], np.float64(0).__reduce__()[0], np.zeros(1).__reduce_ex__(5)[0]


def torch_numpy_globals() -> list:
    """What ``weights_only`` needs, besides its defaults, to read numpy arrays and scalars of numeric
    dtypes: the reconstructors (under their numpy 1 and 2 names), ``ndarray``, ``dtype`` and the
    dtype classes. None of them runs code; each builds an array, a dtype or a number."""
    reconstruct, scalar, _ = _numpy_helpers()
    dtype_classes = sorted({type(np.dtype(c)) for c in _NUMERIC_DTYPES}, key=lambda t: t.__name__)
    return [reconstruct, scalar, np.ndarray, np.dtype, *dtype_classes,
            (reconstruct, "numpy.core.multiarray._reconstruct"), (scalar, "numpy.core.multiarray.scalar")]


def load_torch(path: str | Path):
    """``torch.load(path, map_location="cpu", weights_only=True)`` with :func:`torch_numpy_globals`
    allowed; raises what ``torch.load`` raises (a refused global: :class:`pickle.UnpicklingError`)."""
    with torch.serialization.safe_globals(torch_numpy_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _latin1_encode(obj, encoding: str = "utf-8", errors: str = "strict"):
    """Protocol 2's form of ``bytes``: ``_codecs.encode(text, 'latin1')``; no other codec."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not data")
    return codecs.encode(obj, "latin1", errors)


def _pickle_allowed() -> dict[tuple[str, str], object]:
    reconstruct, scalar, frombuffer = _numpy_helpers()
    allowed: dict[tuple[str, str], object] = {("_codecs", "encode"): _latin1_encode,
                                              ("collections", "OrderedDict"): collections.OrderedDict,
                                              ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("builtins", "__builtin__"):  # protocol 2 from Python 2 names builtins __builtin__
        for t in (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, complex, bool):
            allowed[(module, t.__name__)] = t
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    for c in _NUMERIC_DTYPES + "USO":
        cls = type(np.dtype(c))
        allowed[("numpy.dtypes", cls.__name__)] = cls
    return allowed


class DataUnpickler(pickle.Unpickler):
    """An unpickler that builds containers, strings, numbers and numpy arrays only (module docstring)."""

    _allowed: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str):
        if DataUnpickler._allowed is None:
            DataUnpickler._allowed = _pickle_allowed()
        found = DataUnpickler._allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return found


def load_pickle(path: str | Path):
    """The object pickled in ``path``, read with :class:`DataUnpickler`."""
    with open(path, "rb") as f:
        return DataUnpickler(f).load()


def why_unreadable(e: BaseException) -> str:
    """A short phrase for why a file could not be read: for a file that names a function (a global
    outside the allowed ones) ``"it asks to call posix.system, which data never does; nothing was
    run"``, else ``"<ExceptionType>: <first sentence>"``."""
    text = " ".join(str(e).split())
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(e, pickle.UnpicklingError) and m:
        return f"it asks to call {m.group(1)}, which data never does; nothing was run"
    return f"{type(e).__name__}: {text.split('. ')[0][:120]}"


def is_refused(e: BaseException) -> bool:
    """Whether ``e`` is the refusal of a file that names a function (see :func:`why_unreadable`)."""
    return isinstance(e, pickle.UnpicklingError) and re.search(r"GLOBAL [\w.]+", str(e)) is not None


def load_model_file(path: str | Path, rebuild: str) -> dict[str, torch.Tensor]:
    """The state dict in a ``model.pt`` that nbsrc wrote (a run's, an index's), read with
    :func:`load_torch`. A file that cannot be read, asks to call a function or holds anything but a
    dict of tensors is a one-line :class:`~nbsrc.errors.RunDirError`: "``path`` is damaged or is not
    an nbsrc file (why); rebuild it with ``rebuild``"."""
    from nbsrc.errors import RunDirError

    path = Path(path)
    try:
        state = load_torch(path)
        why = "" if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()) \
            else f"it holds a {type(state).__name__}, not a state dict of tensors"
    except Exception as e:  # noqa: BLE001 - truncated zip, refused global, not a torch file, ...
        why = why_unreadable(e)
    if why:
        raise RunDirError(f"{path} is damaged or is not an nbsrc file ({why}); rebuild it with {rebuild}")
    return state
