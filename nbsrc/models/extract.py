"""The one embedding function: a model applied to a whole dataset, in order, in eval mode.

Training (hard-negative mining of SfM-120k tuples, the PCA fit) and evaluation (Recall@K, Revisited
mAP) both call :func:`extract_embeddings`; it sits at the models layer so that ``train`` and
``eval`` may import it without pointing up the layering.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from nbsrc.data import RetrievalDataset
from nbsrc.errors import ConfigError, DatasetError
from nbsrc.models.fold import eval_mode, inference_model
from nbsrc.progress import progress as progress_bar


@torch.no_grad()
def extract_embeddings(
    model: torch.nn.Module,
    dataset: RetrievalDataset,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    amp: bool = True,
    fold: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``model`` (images -> embeddings [B, D]) over ``dataset`` in order, in eval mode.

    Returns ``(embeddings float32 [N, D], labels int64 [N], indices int64 [N])``; row ``n`` is
    ``dataset[n]``. The model must already be on ``device``; on CUDA the forward pass runs under
    bf16 autocast (``amp=False``: float32) and the outputs are cast back to float32. The
    train/eval mode of every submodule is restored afterwards. ``fold``: run a copy of the model
    with its BatchNorms folded into the convolutions before them (:mod:`nbsrc.models.fold`: the same
    embeddings up to float rounding, faster for a convnet; a no-op for a ViT); ``model`` itself is
    not changed.
    """
    if len(dataset) == 0:
        raise DatasetError("cannot extract embeddings of an empty dataset; check the split (classes, eval_per_class)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is invalid: expected an integer >= 1")
    device = torch.device(device)
    cuda = device.type == "cuda"
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                        num_workers=num_workers, pin_memory=cuda)
    embs, labels, indices = [], [], []
    net = None
    with eval_mode(model), progress_bar(len(loader), "embed", enabled=progress) as bar:
        for images, y, idx in loader:
            images = images.to(device, non_blocking=True)
            if net is None:  # the first batch is the probe that checks the folded copy
                net = inference_model(model, images[:2]) if fold else model
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and amp):
                z = net(images)
            if z.ndim != 2 or len(z) != len(images):
                raise ConfigError(
                    f"the model returned shape {tuple(z.shape)} for a batch of {len(images)} images; "
                    "an embedding model must return [batch, dim]"
                )
            embs.append(z.float().cpu())
            labels.append(y)
            indices.append(idx)
            bar.update(1)
    return (torch.cat(embs).numpy(), torch.cat(labels).numpy().astype(np.int64),
            torch.cat(indices).numpy().astype(np.int64))
