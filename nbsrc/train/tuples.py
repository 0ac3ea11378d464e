"""SfM-120k tuple training (IRT §4.2, the protocol of Radenović et al., TPAMI 2018).

A tuple is ``(q, p, n_1, ..., n_K)``: a query, a positive (another view of the same 3D model) and
``K = cfg.negatives_per_tuple`` (5) hard negatives mined with the current model (see
:mod:`nbsrc.data.sfm`). The loss (:mod:`nbsrc.losses.tuples`, ``cfg.tuple_loss``) is by default
cirtorch's contrastive loss on Euclidean distances, summed over the tuples (IRT builds on that
code), or IRT's eq. (1) on the anchor-positive and anchor-negative pairs of each tuple; margin
β = ``cfg.beta`` (paper: 0.85); plus λ · KoLeo (``cfg.lam``) over the distinct images of the batch.
B = ``cfg.tuples_per_batch`` (5) tuples per step. Adam, lr 5e-7, weight decay 1e-6, 100 epochs in
the paper; cirtorch's per-epoch decay ``exp(−cfg.lr_decay_per_epoch)`` and frozen BatchNorm
(``cfg.freeze_batchnorm``) from :mod:`nbsrc.train.protocol`.

**Epochs and iterations.** ``cfg.iterations`` counts optimizer steps, as everywhere in nbsrc. An
epoch is ``ceil(n_pairs / tuples_per_batch)`` steps, ``n_pairs = min(cfg.pairs_per_epoch, pairs in
the split)`` (400 at the paper's 2,000 / 5), so the paper's 100 epochs are ``iterations=40_000``;
when ``iterations`` is not a multiple of an epoch, the last epoch stops early. At the start of every
epoch the tuples are mined anew with the model as it is then (``model.eval()``, evaluation
transform), and the epoch trains on exactly those tuples, in an order and with augmentations that
depend only on ``(cfg.seed, epoch)``. Training, mining and evaluation see the same
transform, an ``img_size`` square resize without augmentation (IRT §4.2; cirtorch's default). The lr schedule (warm-up + cosine or constant) runs over
iterations, as in :mod:`nbsrc.train.loop`.

**Resume.** A checkpoint holds the model, optimizer, scheduler, scaler, RNG states and the current
epoch's tuples, so a run resumed from any checkpoint ends with the same weights as an uninterrupted
one: at an epoch boundary the tuples are mined again (mining is deterministic given the weights),
inside an epoch the saved ones are used and the batches already trained on are skipped.
Checkpoints are written every ``cfg.ckpt_every`` steps, at every epoch end and at the end.

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
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from nbsrc.config import ExperimentConfig
from nbsrc.data.sfm import SfMSplit, TupleDataset, TupleSampler, collate_tuples
from nbsrc.data.transforms import particular_object_transform
from nbsrc.errors import ConfigError, NonFiniteLossError
from nbsrc.losses.tuples import tuple_contrastive_loss, tuple_loss_terms  # noqa: F401 (re-exported)
from nbsrc.models import data_config
from nbsrc.progress import progress as progress_bar
from nbsrc.train import distributed
from nbsrc.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from nbsrc.train.loop import amp_settings, build_optimizer, lr_factor, resolve_device
from nbsrc.train.protocol import epoch_lr_decay, train_mode
from nbsrc.train.rundir import append_metrics, truncate_metrics


# the loss: nbsrc.losses.tuples (distance form of cirtorch by default, IRT eq. 1 as an option)


# ----------------------------------------------------------------------------- epochs
def batches_per_epoch(cfg: ExperimentConfig, db: SfMSplit) -> int:
    """Steps in one epoch: ``ceil(min(pairs_per_epoch, pairs in db) / tuples_per_batch)``."""
    return math.ceil(min(cfg.pairs_per_epoch, len(db.qidxs)) / cfg.tuples_per_batch)


@torch.no_grad()
def embed_images(model: torch.nn.Module, images, batch_size: int, device, num_workers: int = 0,
                 amp: tuple[bool, torch.dtype] = (False, torch.float32)) -> np.ndarray:
    """``[len(images), D]`` float32 embeddings of a dataset of ``(image, label, index)``, in order, in
    eval mode (the train/eval mode is restored). The same computation as
    :func:`nbsrc.eval.extract_embeddings`, which this layer may not import."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for x, _, _ in DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers):
            with torch.autocast(torch.device(device).type, dtype=amp[1], enabled=amp[0]):
                out.append(model(x.to(device)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


def mine_epoch(model: torch.nn.Module, sampler: TupleSampler, epoch: int, eval_tf, cfg: ExperimentConfig,
               device, amp: tuple[bool, torch.dtype] = (False, torch.float32)) -> np.ndarray:
    """The tuples ``[n_pairs, 2 + K]`` of ``epoch``, mined with ``model`` as it is now (eval mode,
    evaluation transform): :meth:`~nbsrc.data.sfm.TupleSampler.epoch_tuples`."""
    images = sampler.db.images(eval_tf)
    dinfo = distributed.current()

    def embed(idx: np.ndarray) -> np.ndarray:  # each rank a contiguous share, gathered in rank order
        share = np.array_split(np.asarray(idx), dinfo.world_size)[dinfo.rank]
        local = (embed_images(model, images.subset(share), cfg.eval_batch_size, device, cfg.num_workers, amp)
                 if len(share) else None)
        return np.concatenate([e for e in distributed.gather_objects(local) if e is not None])

    return distributed.broadcast_object(sampler.epoch_tuples(epoch, embed))  # rank 0's tuples everywhere


def epoch_batches(cfg: ExperimentConfig, epoch: int, n_tuples: int) -> list[list[tuple[int, int]]]:
    """The epoch's batches of dataset keys ``(tuple, augmentation seed)``: a permutation of the tuples
    cut into ``tuples_per_batch`` (the last batch may be smaller), both drawn from ``(seed, epoch)``."""
    rng = np.random.default_rng([cfg.seed, int(epoch), 7])
    order = rng.permutation(n_tuples)
    seeds = rng.integers(0, 2**62, n_tuples)
    keys = [(int(t), int(seeds[t])) for t in order]
    return [keys[s : s + cfg.tuples_per_batch] for s in range(0, n_tuples, cfg.tuples_per_batch)]


def check_tuple_config(cfg: ExperimentConfig) -> None:
    """Settings the tuple loop cannot honour are errors, not silently ignored."""
    if cfg.loss != "contrastive":
        raise ConfigError(
            f"loss={cfg.loss!r}: SfM-120k tuple training uses the contrastive loss; set loss='contrastive', "
            "or sfm_training='classes' to train on the 3D models as classes"
        )
    if cfg.memory_size:
        raise ConfigError(f"memory_size={cfg.memory_size}: tuple training has no cross-batch memory; set memory_size=0")


def check_world_size(cfg: ExperimentConfig, db: SfMSplit, world: int) -> None:
    """Every batch of tuples, the epoch's last one included, must split evenly among ``world`` ranks."""
    last = min(cfg.pairs_per_epoch, len(db.qidxs)) % cfg.tuples_per_batch
    if world > 1 and (cfg.tuples_per_batch % world or last % world):
        raise ConfigError(
            f"tuples_per_batch={cfg.tuples_per_batch} (global) and the epoch's last batch of {last} tuples must "
            f"divide among the {world} processes: choose tuples_per_batch and pairs_per_epoch as multiples of {world}"
        )


# ----------------------------------------------------------------------------- the loop
def train_tuples(cfg: ExperimentConfig, model: torch.nn.Module, db_train: SfMSplit, run_dir: str | Path,
                 resume: bool = False, progress: bool = True, stop_after: int | None = None) -> torch.nn.Module:
    """Train ``model`` in place on SfM-120k tuples for ``cfg.iterations`` steps; returns it.

    See the module docstring for the epochs, the loss and resuming. ``progress=False`` (or
    ``cfg.progress=False``) hides the progress bar. ``stop_after`` ends the run at
    that step, checkpointing first (to test that a resumed run ends with the same weights).
    Metrics go to ``run_dir/metrics.jsonl``: a ``mine`` row per epoch and ``train`` rows every
    ``cfg.log_every`` steps.
    """
    check_tuple_config(cfg)
    run_dir = Path(run_dir)
    dinfo = distributed.current()
    check_world_size(cfg, db_train, dinfo.world_size)
    device = resolve_device(cfg.device)
    if dinfo.enabled and device.type == "cuda":
        device = torch.device("cuda", dinfo.local_rank)
    torch.manual_seed(cfg.seed)
    train_mode(model.to(device), cfg.freeze_batchnorm)  # cirtorch: BatchNorm in eval mode (nbsrc.train.protocol)
    norm = data_config(model)
    train_tf = eval_tf = particular_object_transform(cfg.img_size, norm["mean"], norm["std"])  # IRT §4.2, no augmentation
    sampler = TupleSampler(db_train, cfg.pairs_per_epoch, cfg.negative_pool, cfg.negatives_per_tuple, cfg.seed)
    dataset = TupleDataset(db_train, train_tf)
    tuple_size = 2 + cfg.negatives_per_tuple
    per_epoch = batches_per_epoch(cfg, db_train)

    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(cfg, it) * epoch_lr_decay(it, per_epoch, cfg.lr_decay_per_epoch))
    amp_on, amp_dtype = amp_settings(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_on and amp_dtype == torch.float16)

    start, tuples = 0, None
    if resume:
        state = load_checkpoint(run_dir)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start, tuples = int(state["iteration"]), state.get("tuples")
        if dinfo.is_main:
            truncate_metrics(run_dir, start)
    net = distributed.wrap_ddp(model, device)  # after loading: every rank starts from the same weights

    def checkpoint(it: int) -> None:
        if dinfo.is_main:
            save_checkpoint({
                "iteration": it, "epoch": it // per_epoch, "config": cfg.to_dict(), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng_state(), "tuples": tuples,
            }, run_dir)
        distributed.barrier()

    end = cfg.iterations if stop_after is None else min(cfg.iterations, stop_after)
    bar = progress_bar(end, f"train {cfg.name} (tuples)", progress and cfg.progress and dinfo.is_main,
                       initial=start)
    it, t_last, seen = start, time.perf_counter(), 0
    while it < end:
        epoch, offset = divmod(it, per_epoch)
        if offset == 0 or tuples is None:  # a new epoch: mine with the model as it is now
            t0 = time.perf_counter()
            tuples = mine_epoch(model, sampler, epoch, eval_tf, cfg, device, (amp_on, amp_dtype))
            train_mode(model, cfg.freeze_batchnorm)
            if dinfo.is_main:
                append_metrics(run_dir, {"kind": "mine", "iteration": it, "epoch": epoch, "n_tuples": len(tuples),
                                         "seconds": round(time.perf_counter() - t0, 3)})
        dataset.set_tuples(tuples)
        batches = [_rank_share(b, dinfo) for b in epoch_batches(cfg, epoch, len(tuples))[offset:]]
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_tuples, num_workers=cfg.num_workers,
                            pin_memory=cfg.pin_memory and device.type == "cuda")
        for x, _, idx in loader:
            if it >= end:
                break
            x = x.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_on):
                z = net(x).float()
            if dinfo.enabled:  # the loss and KoLeo of the global batch, tuples in rank order
                z, idx = distributed.gather_with_grad(z), distributed.gather(idx.to(device)).cpu()
            terms = tuple_loss_terms(z, idx, tuple_size, cfg.beta, cfg.lam, cfg.tuple_loss)
            total = terms["total"]
            if not torch.isfinite(total):
                vals = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
                raise NonFiniteLossError(
                    f"loss is not finite at iteration {it} ({vals}); the last good checkpoint in {run_dir} is kept: "
                    "lower lr, enable grad_clip, or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            it += 1
            seen += len(x) * dinfo.world_size  # the global batch
            bar.update(1)
            if dinfo.is_main and (it % max(cfg.log_every, 1) == 0 or it == end):
                now = time.perf_counter()
                row = {"kind": "train", "iteration": it, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                       "img_per_s": seen / max(now - t_last, 1e-9)}
                row.update({k: float(v.detach()) for k, v in terms.items()})
                append_metrics(run_dir, row)
                bar.set_postfix({k: round(float(v.detach()), 4) for k, v in terms.items()})
                t_last, seen = now, 0
            if it < end and ((cfg.ckpt_every and it % cfg.ckpt_every == 0) or it % per_epoch == 0):
                checkpoint(it)
    bar.close()
    checkpoint(it)
    return model


def _rank_share(batch: list, dinfo: distributed.DistInfo) -> list:
    """This rank's contiguous share of a global batch of tuples (all of it in one process)."""
    if not dinfo.enabled:
        return batch
    n = len(batch) // dinfo.world_size  # check_world_size made every batch divide evenly
    return batch[dinfo.rank * n : (dinfo.rank + 1) * n]
