"""Pair training (IRT): the task that :func:`nbsrc.train.loop.fit` runs for every dataset of
classes, and for DToP's class training on SfM-120k.

Per iteration: forward the batch (m samples of each of ``batch_size / m`` classes, or a group-size
batch of one image size, DToP Table A12), l2-normalise, gather the global batch (DDP), compute the
pair loss of ``cfg.loss.name`` (:data:`nbsrc.losses.PAIR_LOSSES`) over batch × batch and batch × memory
plus λ · KoLeo, and, after the optimizer step, enqueue the batch into the cross-batch memory (XBM;
Wang et al., 2020): the momentum encoder's keys when ``cfg.loss.momentum`` is set, else the batch's own
embeddings.

**Memory warm-up** (``cfg.loss.memory_start``). XBM rests on the "slow drift" of the features: "the
features of the same instance computed at different iterations are close" only once the model has
stabilised, so Wang et al. start the memory after a warm-up of 1k iterations (their §4). Before
iteration ``memory_start`` the memory is neither read nor filled (batch × batch only); from it on,
the memory is used and filled as above. IRT fine-tunes a pretrained model whose features drift
slowly from the start and uses the memory throughout: ``memory_start = 0`` (the default).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from nbsrc.config import ExperimentConfig
from nbsrc.data import RetrievalDataset
from nbsrc.data.group_sampler import training_sampler
from nbsrc.errors import ConfigError
from nbsrc.losses import CrossBatchMemory, RetrievalLoss, build_loss, pair_loss
from nbsrc.losses.diagnostics import gradient_noise
from nbsrc.models import data_config
from nbsrc.models.teacher import Teacher
from nbsrc.train import distributed
from nbsrc.train.loop import StepParts, TrainingTask


@torch.no_grad()
def momentum_update(ema: torch.nn.Module, model: torch.nn.Module, m: float) -> None:
    """``ema ← m · ema + (1 − m) · model`` for the parameters; buffers are copied."""
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.mul_(m).add_(p.detach(), alpha=1 - m)
    for be, b in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(b)


class PairTask(TrainingTask):
    """Batches of classes and a pair loss (see the module docstring); ``train_ds`` is the training
    split, ``train_classes`` its classes (they index the proxies of a proxy loss)."""

    def __init__(self, cfg: ExperimentConfig, train_ds: RetrievalDataset, train_classes: list | None = None):
        pair_loss(cfg.loss.name)  # an unknown loss is an error before anything is built
        self.cfg, self.train_ds = cfg, train_ds
        self.train_classes = (train_classes if train_classes is not None
                              else np.unique(train_ds.labels).tolist())
        self.criterion: RetrievalLoss | None = None
        self.memory: CrossBatchMemory | None = None  # XBM; None when ``cfg.loss.memory_size == 0``
        self.ema: torch.nn.Module | None = None  # momentum encoder of the memory keys
        self.teacher: Teacher | None = None  # the frozen teacher of loss="distill"
        self.it = 0  # the iteration of the next step (memory warm-up)
        self._step = None

    def setup(self, parts: StepParts) -> list[torch.nn.Module]:
        cfg, model, device = self.cfg, parts.model, parts.device
        world = distributed.current().world_size
        if cfg.optim.batch_size % world:
            raise ConfigError(f"batch_size={cfg.optim.batch_size} must be divisible by the {world} processes")
        self.criterion = build_loss(cfg, model.feature_dim, self.train_classes).to(device)
        self.memory = (CrossBatchMemory(cfg.loss.memory_size, model.feature_dim, device) if cfg.loss.memory_size
                       else None)
        self.ema = copy.deepcopy(model).requires_grad_(False) if cfg.loss.momentum is not None else None
        # distillation: the frozen teacher sees each batch (not trained, not in the checkpoint)
        self.teacher = Teacher(data_config(model)).to(device) if cfg.loss.name == "distill" else None
        return [self.criterion]

    def batches(self, parts: StepParts, start: int, log: Callable[[dict], None]) -> Iterator:
        # Every rank draws the same global batch and takes its own slice of it. cfg.data.sampler picks
        # m-per-class square crops or group-size batches of one image size (DToP Table A12).
        cfg = self.cfg
        self.it = start
        sampler, ds, collate = training_sampler(cfg, self.train_ds, start)
        loader = DataLoader(ds, batch_sampler=distributed.RankSlice(sampler), collate_fn=collate,
                            num_workers=cfg.run.num_workers, pin_memory=parts.pin,
                            generator=torch.Generator().manual_seed(cfg.run.seed), persistent_workers=False)
        return iter(loader)

    def memory_on(self) -> bool:
        """Whether this step reads and fills the memory (from ``cfg.loss.memory_start`` on)."""
        return self.memory is not None and self.it >= self.cfg.loss.memory_start

    def loss(self, parts: StepParts, batch) -> dict[str, torch.Tensor]:
        x, y, idx = batch
        device, pin = parts.device, parts.pin
        x = x.to(device, non_blocking=pin)
        y, idx = y.to(device, non_blocking=pin), idx.to(device, non_blocking=pin)
        z_local = parts.net(x).float()  # l2-normalised; the PCA is fitted only after training
        z = distributed.gather_with_grad(z_local)
        y_all, idx_all = distributed.gather(y), distributed.gather(idx)
        memory = self.memory if self.memory_on() else None
        ref = memory.get() if memory is not None and len(memory) else (None, None, None)
        targets = distributed.gather(self.teacher(x)) if self.teacher is not None else None
        terms = self.criterion(z, y_all, ref[0], ref[1], idx_all, ref[2], targets=targets)
        self._step = (x, z, y_all, idx_all)
        return terms

    def diagnostics(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """The gradient noise γ of the main term w.r.t. the batch's embeddings (IRT Fig. 4)."""
        main_key = next(k for k in terms if k not in ("koleo", "total"))
        (g,) = torch.autograd.grad(terms[main_key], self._step[1], retain_graph=True)
        return {"grad_noise": gradient_noise(g)}

    def after_step(self, parts: StepParts) -> None:
        x, z, y_all, idx_all = self._step
        self._step = None
        if self.ema is not None:  # the encoder follows the model from the start, memory or not
            momentum_update(self.ema, parts.model, self.cfg.loss.momentum)
        if self.memory_on():
            if self.ema is not None:
                with torch.no_grad(), torch.autocast(parts.device.type, dtype=parts.amp_dtype, enabled=parts.amp_on):
                    keys = distributed.gather(self.ema(x).float())
                self.memory.enqueue(keys, y_all, idx_all)
            else:
                self.memory.enqueue(z.detach(), y_all, idx_all)
        self.it += 1

    def state(self, it: int) -> dict:
        return {"criterion": self.criterion.state_dict(),
                "memory": self.memory.state_dict() if self.memory is not None else None,
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state(self, state: dict) -> None:
        self.criterion.load_state_dict(state["criterion"])
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

