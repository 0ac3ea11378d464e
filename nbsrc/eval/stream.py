"""Gallery embeddings streamed to a memory-mapped ``.npy`` file, resumable after an interruption.

A gallery of millions of images does not fit in RAM as float32 and takes hours to embed. Here the
embeddings go to disk batch by batch (float16 by default: half the bytes, and the precision the
search needs for unit vectors). A small sidecar ``<path>.progress.json`` records how many rows are
done; it is replaced atomically only after those rows are flushed to the file, so it never claims
more than is written. Run again after a crash and the extraction continues at the first missing row;
run it again when it is complete and it just opens the file.

The sidecar also records a fingerprint of the model (a hash of its parameters and buffers) and the
file's shape and dtype: resuming with other weights, another dataset size or another dtype would
silently mix two embeddings, so it is refused with a :class:`~nbsrc.errors.ConfigError` instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from nbsrc.errors import ConfigError, DatasetError
from nbsrc.models.fold import eval_mode, inference_model
from nbsrc.progress import progress as progress_bar


def sidecar_path(path: str | Path) -> Path:
    """Where the progress of ``path`` is recorded: ``<path>.progress.json``."""
    path = Path(path)
    return path.with_name(path.name + ".progress.json")


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's parameter and buffer names, shapes, dtypes and values."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _write_progress(side: Path, state: dict) -> None:
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, side)


def _read_progress(side: Path, path: Path) -> dict:
    """The progress file ``side`` of ``path`` as a dict, or a one-line error when it cannot be read."""
    try:
        state = json.loads(side.read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{side} is not a readable progress file ({type(e).__name__}: {e}); delete it and "
                          f"{path} to start again") from None
    return state


def recorded_batch_size(path: str | Path) -> int | None:
    """The batch size an unfinished :func:`embed_to_memmap` into ``path`` started with (a resume must
    keep it), or None when nothing was started there."""
    path = Path(path)
    side = sidecar_path(path)
    if not side.exists():
        return None
    size = _read_progress(side, path).get("batch_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 1 else None


def _check_resume(state: dict, expected: dict, path: Path, side: Path) -> None:
    for key, what in (("fingerprint", "model weights"), ("rows", "number of rows (dataset length)"),
                      ("dtype", "dtype"), ("batch_size", "batch size")):
        if state.get(key) != expected[key]:
            raise ConfigError(
                f"{path} was started with a different {what} ({key}: {state.get(key)!r} there, {expected[key]!r} now); "
                f"delete {path} and {side} to start again, or choose another path"
            )


@torch.inference_mode()
def embed_to_memmap(
    model: torch.nn.Module,
    dataset,
    path: str | Path,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    dtype=np.float16,
    progress: bool = True,
    num_workers: int = 0,
    on_batch: Callable[[int, object], None] | None = None,
    fold: bool = True,
) -> np.memmap:
    """Embed ``dataset`` (items ``(image, ...)``, in order) with ``model`` into the ``.npy`` file
    ``path`` of shape ``[len(dataset), D]`` and ``dtype``; returns it memory-mapped read-only.

    Rows are written batch by batch; a rerun resumes after the last recorded batch and does not
    recompute finished rows. The model must already be on ``device``; on CUDA the forward runs
    under bf16 autocast. The model's train/eval modes are restored afterwards. ``fold``: embed with a
    copy of the model whose BatchNorms are folded into its convolutions (:mod:`nbsrc.models.fold`);
    the resume fingerprint is the model's own.

    ``on_batch(first_row, batch)``, if given, is called with each batch as the loader returned it
    after its rows are on disk and before the sidecar records them (so whatever it saves about rows
    ``first_row...`` is never behind the sidecar; after a crash it may be ahead, and is seen again).
    """
    path = Path(path)
    side = sidecar_path(path)
    n = len(dataset)
    if n == 0:
        raise DatasetError("cannot embed an empty dataset; check the split")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is invalid: expected an integer >= 1")
    dtype = np.dtype(dtype)
    expected = {"fingerprint": model_fingerprint(model), "rows": n, "dtype": dtype.str, "batch_size": batch_size}
    done, out = 0, None
    if side.exists():
        state = _read_progress(side, path)
        _check_resume(state, expected, path, side)
        done = int(state["rows_done"])
        if done and not path.exists():
            raise ConfigError(f"{side} records {done} rows but {path} is missing; delete {side} to start again")
        if done:
            out = np.lib.format.open_memmap(path, mode="r+")
            if out.shape[0] != n or out.dtype != dtype or list(out.shape) != state.get("shape"):
                raise ConfigError(f"{path} has shape {out.shape} {out.dtype}, not what {side} records; delete both to "
                                  "start again")
    elif path.exists():
        raise ConfigError(f"{path} exists without its progress file {side}; delete it or choose another path")

    device = torch.device(device)
    cuda = device.type == "cuda"
    rest = Subset(dataset, range(done, n)) if done else dataset
    loader = DataLoader(rest, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=cuda)
    net = None
    bar = progress_bar(-(-n // batch_size), "embed to disk", enabled=progress, initial=done // batch_size)
    with eval_mode(model), bar:
        for batch in loader:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            images = images.to(device, non_blocking=True)
            if net is None:  # the first batch is the probe that checks the folded copy
                net = inference_model(model, images[:2]) if fold else model
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                z = net(images)
            if z.ndim != 2 or len(z) != len(images):
                raise ConfigError(f"the model returned shape {tuple(z.shape)} for {len(images)} images; "
                                  "an embedding model must return [batch, dim]")
            if out is None:  # the first batch gives the embedding dimension
                path.parent.mkdir(parents=True, exist_ok=True)
                # the progress file first (0 rows): a crash before the first batch is recorded then
                # leaves a file this function resumes, not one it must refuse as someone else's
                _write_progress(side, {**expected, "rows_done": done, "shape": None})
                out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, z.shape[1]))
            out[done : done + len(z)] = z.float().cpu().numpy().astype(dtype)
            out.flush()  # rows on disk before the sidecar says so
            if on_batch is not None:
                on_batch(done, batch)
            done += len(z)
            _write_progress(side, {**expected, "rows_done": done, "shape": list(out.shape)})
            bar.update(1)
    del out
    return np.load(path, mmap_mode="r")
