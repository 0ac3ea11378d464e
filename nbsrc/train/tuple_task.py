"""SfM-120k tuple training (IRT §4.2, the protocol of Radenović et al., TPAMI 2018).

The task that :func:`nbsrc.train.loop.fit` runs for ``sfm_training="tuples"``. A tuple is
``(q, p, n_1, ..., n_K)``: a query, a positive (another view of the same 3D model) and
``K = cfg.tuples.negatives_per_tuple`` (5) hard negatives mined with the current model (see
:mod:`nbsrc.data.sfm`). The loss is IRT's contrastive loss, eq. (1), on the anchor-positive and
anchor-negative pairs of each tuple only (no positive-negative or cross-tuple pairs), with margin
β = ``cfg.loss.beta`` (paper: 0.85)::

    ℓ_t = (1 − s(q_t, p_t)) + Σ_k [s(q_t, n_tk) − β]_+ ,      s(a, b) = aᵀb (l2-normalised)
    L   = 1/B Σ_t ℓ_t  +  λ · L_KoLeo                           (eq. 1 and eq. 5)

B = ``cfg.tuples.tuples_per_batch`` (5) tuples per step; KoLeo (λ = ``cfg.loss.lam``) runs over the distinct
images of the batch (an image may be a negative of several tuples; its copies are not its nearest
neighbour). Adam, lr 5e-7, weight decay 1e-6, 100 epochs in the paper.

**Epochs and iterations.** ``cfg.optim.iterations`` counts optimizer steps, as everywhere in nbsrc. An
epoch is ``ceil(n_pairs / tuples_per_batch)`` steps, ``n_pairs = min(cfg.tuples.pairs_per_epoch, pairs in
the split)`` (400 at the paper's 2,000 / 5), so the paper's 100 epochs are ``iterations=40_000``;
when ``iterations`` is not a multiple of an epoch, the last epoch stops early. At the start of every
epoch the tuples are mined anew with the model as it is then (``model.eval()``, evaluation
transform), and the epoch trains on exactly those tuples, in an order and with augmentations that
depend only on ``(cfg.run.seed, epoch)``. Training, mining and evaluation see the same transform, an
``img_size`` square resize without augmentation (IRT §4.2; cirtorch's default). The lr schedule
(warm-up + cosine or constant) runs over iterations (:func:`~nbsrc.train.loop.fit`), times the
per-epoch decay (:meth:`TupleTask.lr_scale`).

**Resume.** A checkpoint holds the model, optimizer, scheduler, scaler, RNG states and the current
epoch's tuples, so a run resumed from any checkpoint ends with the same weights as an uninterrupted
one: at an epoch boundary the tuples are mined again (mining is deterministic given the weights),
inside an epoch the saved ones are used and the batches already trained on are skipped.
Checkpoints are written every ``cfg.run.ckpt_every`` steps, at every epoch end and at the end.

**Data-parallel (torchrun).** ``tuples_per_batch`` is the global batch: each rank trains its share
of every batch's tuples, the loss and KoLeo see the gathered global batch
(:func:`~nbsrc.train.distributed.gather_with_grad`), so a step equals one process's step on the
whole batch. Mining embeds a contiguous share of the images on each rank and gathers them, so every
rank mines the same tuples (rank 0's are broadcast to be sure). Rank 0 alone writes checkpoints
and metrics. ``tuples_per_batch`` and the epoch's last, smaller batch must divide among the ranks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from nbsrc.config import ExperimentConfig
from nbsrc.data.sfm import SfMSplit, TupleDataset, TupleSampler, collate_tuples
from nbsrc.data.transforms import particular_object_transform
from nbsrc.errors import ConfigError
from nbsrc.losses.tuples import tuple_loss_fn, tuple_loss_terms
from nbsrc.models import data_config
from nbsrc.models.extract import extract_embeddings
from nbsrc.train import distributed
from nbsrc.train.bn_freeze_epoch_decay import epoch_lr_decay, train_mode
from nbsrc.train.loop import StepParts, TrainingTask


# ----------------------------------------------------------------------------- epochs
def batches_per_epoch(cfg: ExperimentConfig, db: SfMSplit) -> int:
    """Steps in one epoch: ``ceil(min(pairs_per_epoch, pairs in db) / tuples_per_batch)``."""
    return math.ceil(min(cfg.tuples.pairs_per_epoch, len(db.qidxs)) / cfg.tuples.tuples_per_batch)


def mine_epoch(model: torch.nn.Module, sampler: TupleSampler, epoch: int, eval_tf, cfg: ExperimentConfig,
               device) -> np.ndarray:
    """The tuples ``[n_pairs, 2 + K]`` of ``epoch``, mined with ``model`` as it is now (eval mode,
    evaluation transform, :func:`~nbsrc.models.extract.extract_embeddings` with ``cfg.optim.amp``):
    :meth:`~nbsrc.data.sfm.TupleSampler.epoch_tuples`."""
    images = sampler.db.images(eval_tf)
    dinfo = distributed.current()

    def embed(idx: np.ndarray) -> np.ndarray:  # each rank a contiguous share, gathered in rank order
        share = np.array_split(np.asarray(idx), dinfo.world_size)[dinfo.rank]
        local = (extract_embeddings(model, images.subset(share), cfg.eval.eval_batch_size, device, cfg.run.num_workers,
                                    progress=False, amp=cfg.optim.amp)[0] if len(share) else None)
        return np.concatenate([e for e in distributed.gather_objects(local) if e is not None])

    return distributed.broadcast_object(sampler.epoch_tuples(epoch, embed))  # rank 0's tuples everywhere


def epoch_batches(cfg: ExperimentConfig, epoch: int, n_tuples: int) -> list[list[tuple[int, int]]]:
    """The epoch's batches of dataset keys ``(tuple, augmentation seed)``: a permutation of the tuples
    cut into ``tuples_per_batch`` (the last batch may be smaller), both drawn from ``(seed, epoch)``."""
    rng = np.random.default_rng([cfg.run.seed, int(epoch), 7])
    order = rng.permutation(n_tuples)
    seeds = rng.integers(0, 2**62, n_tuples)
    keys = [(int(t), int(seeds[t])) for t in order]
    return [keys[s : s + cfg.tuples.tuples_per_batch] for s in range(0, n_tuples, cfg.tuples.tuples_per_batch)]


def check_tuple_config(cfg: ExperimentConfig) -> None:
    """Settings the tuple task cannot honour are errors, not silently ignored."""
    if cfg.loss.name != "contrastive":
        raise ConfigError(
            f"loss={cfg.loss.name!r}: SfM-120k tuple training uses the contrastive loss (its form: tuple_loss); set "
            "loss='contrastive', or sfm_training='classes' to train on the 3D models as classes"
        )
    tuple_loss_fn(cfg.loss.tuple_loss)
    if cfg.loss.memory_size:
        raise ConfigError(f"memory_size={cfg.loss.memory_size}: tuple training has no cross-batch memory; set "
                          "memory_size=0")


def check_world_size(cfg: ExperimentConfig, db: SfMSplit, world: int) -> None:
    """Every batch of tuples, the epoch's last one included, must split evenly among ``world`` ranks."""
    last = min(cfg.tuples.pairs_per_epoch, len(db.qidxs)) % cfg.tuples.tuples_per_batch
    if world > 1 and (cfg.tuples.tuples_per_batch % world or last % world):
        raise ConfigError(
            f"tuples_per_batch={cfg.tuples.tuples_per_batch} (global) and the epoch's last batch of {last} tuples must "
            f"divide among the {world} processes: choose tuples_per_batch and pairs_per_epoch as multiples of {world}"
        )


# ----------------------------------------------------------------------------- the task
class TupleTask(TrainingTask):
    """SfM-120k tuples mined at every epoch start, and a tuple loss (see the module docstring)."""

    name = "tuples"

    def __init__(self, cfg: ExperimentConfig, db: SfMSplit):
        check_tuple_config(cfg)
        check_world_size(cfg, db, distributed.current().world_size)
        self.cfg, self.db = cfg, db
        self.per_epoch = batches_per_epoch(cfg, db)
        self.tuple_size = 2 + cfg.tuples.negatives_per_tuple
        self.tuples: np.ndarray | None = None  # the current epoch's tuples (in the checkpoint)

    def batches(self, parts: StepParts, start: int, log: Callable[[dict], None]) -> Iterator:
        cfg, model, device = self.cfg, parts.model, parts.device
        norm = data_config(model)
        eval_tf = particular_object_transform(cfg.data.img_size, norm["mean"], norm["std"])  # IRT §4.2: squashed
        train_tf = eval_tf  # no augmentation (cirtorch's default)
        sampler = TupleSampler(self.db, cfg.tuples.pairs_per_epoch, cfg.tuples.negative_pool,
                               cfg.tuples.negatives_per_tuple, cfg.run.seed)
        dataset = TupleDataset(self.db, train_tf)
        it = start
        while True:
            epoch, offset = divmod(it, self.per_epoch)
            if offset == 0 or self.tuples is None:  # a new epoch: mine with the model as it is now
                t0 = time.perf_counter()
                self.tuples = mine_epoch(model, sampler, epoch, eval_tf, cfg, device)
                train_mode(model, cfg.optim.freeze_batchnorm)
                log({"kind": "mine", "iteration": it, "epoch": epoch, "n_tuples": len(self.tuples),
                     "seconds": round(time.perf_counter() - t0, 3)})
            dataset.set_tuples(self.tuples)
            batches = distributed.RankSlice(epoch_batches(cfg, epoch, len(self.tuples))[offset:])
            for batch in DataLoader(dataset, batch_sampler=batches, collate_fn=collate_tuples,
                                    num_workers=cfg.run.num_workers, pin_memory=parts.pin):
                yield batch
                it += 1

    def loss(self, parts: StepParts, batch) -> dict[str, torch.Tensor]:
        x, _, idx = batch
        z = parts.net(x.to(parts.device, non_blocking=True)).float()
        if distributed.current().enabled:  # the loss and KoLeo of the global batch, tuples in rank order
            z, idx = distributed.gather_with_grad(z), distributed.gather(idx.to(parts.device)).cpu()
        return tuple_loss_terms(z, idx, self.tuple_size, self.cfg.loss.beta, self.cfg.loss.lam,
                                self.cfg.loss.tuple_loss)

    def state(self, it: int) -> dict:
        tuples = None if self.tuples is None else torch.from_numpy(np.ascontiguousarray(self.tuples))
        return {"epoch": it // self.per_epoch, "tuples": tuples}  # a tensor: a checkpoint holds no numpy

    def load_state(self, state: dict) -> None:
        tuples = state.get("tuples")  # a tensor, or an array in a checkpoint written before
        self.tuples = None if tuples is None else np.asarray(tuples, dtype=np.int64)

    def log_fields(self, it: int) -> dict:
        return {"epoch": it // self.per_epoch}

    def lr_scale(self, it: int) -> float:
        """cirtorch's per-epoch decay ``exp(−cfg.optim.lr_decay_per_epoch · epoch)`` (IRT §4.2: 0.01)."""
        return epoch_lr_decay(it, self.per_epoch, self.cfg.optim.lr_decay_per_epoch)

    def checkpoint_due(self, it: int) -> bool:
        return it % self.per_epoch == 0  # every epoch end: a resume mines the next epoch afresh

