"""Embeddings of a whole dataset, and the Recall@K evaluation of a model on a RetrievalData."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from nbsrc.data import RetrievalData, RetrievalDataset
from nbsrc.errors import ConfigError, DatasetError
from nbsrc.eval.recall import recall_at_k
from nbsrc.progress import progress as progress_bar


@torch.no_grad()
def extract_embeddings(
    model: torch.nn.Module,
    dataset: RetrievalDataset,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``model`` (images -> embeddings [B, D]) over ``dataset`` in order, in eval mode.

    Returns ``(embeddings float32 [N, D], labels int64 [N], indices int64 [N])``; row ``n`` is
    ``dataset[n]``. The model must already be on ``device``; on CUDA the forward pass runs under
    bf16 autocast and the outputs are cast back to float32. The train/eval mode of every submodule
    is restored afterwards.
    """
    if len(dataset) == 0:
        raise DatasetError("cannot extract embeddings of an empty dataset; check the split (classes, eval_per_class)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is invalid: expected an integer >= 1")
    device = torch.device(device)
    cuda = device.type == "cuda"
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                        num_workers=num_workers, pin_memory=cuda)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    embs, labels, indices = [], [], []
    try:
        with progress_bar(len(loader), "embed", enabled=progress) as bar:
            for images, y, idx in loader:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    z = model(images.to(device, non_blocking=True))
                if z.ndim != 2 or len(z) != len(images):
                    raise ConfigError(
                        f"the model returned shape {tuple(z.shape)} for a batch of {len(images)} images; "
                        "an embedding model must return [batch, dim]"
                    )
                embs.append(z.float().cpu())
                labels.append(y)
                indices.append(idx)
                bar.update(1)
    finally:
        for m, training in modes:
            m.training = training
    return (torch.cat(embs).numpy(), torch.cat(labels).numpy().astype(np.int64),
            torch.cat(indices).numpy().astype(np.int64))


def evaluate(
    model: torch.nn.Module,
    data: RetrievalData,
    ks: Sequence[int] = (1, 2, 4, 8),
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
    num_workers: int = 0,
) -> dict[str, float]:
    """Recall@K of ``model`` on ``data``, in percent: ``{"R@1": 71.3, "R@2": ...}``.

    ``data.gallery is None``: every query searches the other queries (SOP, CUB); otherwise the
    queries search ``data.gallery`` (In-Shop). See :func:`~nbsrc.eval.recall.recall_at_k`.
    """
    q, ql, _ = extract_embeddings(model, data.query, batch_size, device, num_workers, progress)
    g = gl = None
    if data.gallery is not None:
        g, gl, _ = extract_embeddings(model, data.gallery, batch_size, device, num_workers, progress)
    recall = recall_at_k(q, ql, ks, gallery_emb=g, gallery_labels=gl)
    return {f"R@{k}": 100.0 * v for k, v in recall.items()}
