"""The training loop: one plain loop for CPU and CUDA, single process or DDP.

Per iteration: forward the batch, l2-normalise, gather the global batch (DDP), compute the loss
over batch × batch and batch × memory, step, enqueue the batch into the memory, log. AMP on CUDA
(bf16 where supported, else fp16 with a GradScaler), gradient clipping, warm-up + cosine schedule.
A NaN or inf loss stops the run with :class:`~nbsrc.errors.NonFiniteLossError` and leaves the last
good checkpoint in place. Resuming restores model, optimizer, scheduler, scaler, memory, momentum
encoder, RNG states and the sampler position, so a resumed run ends with the same weights.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from nbsrc.config import ExperimentConfig
from nbsrc.data import MPerClassBatchSampler, RetrievalDataset
from nbsrc.errors import ConfigError, NonFiniteLossError
from nbsrc.losses import CrossBatchMemory, RetrievalLoss, build_loss
from nbsrc.losses.diagnostics import gradient_noise
from nbsrc.progress import progress
from nbsrc.train import distributed
from nbsrc.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from nbsrc.train.rundir import append_metrics, truncate_metrics


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device='cpu' or 'auto'")
    return dev


def amp_settings(cfg: ExperimentConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    """(enabled, dtype): bf16 on GPUs that support it, fp16 otherwise; off on CPU."""
    if not cfg.amp or device.type != "cuda":
        return False, torch.float32
    return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def lr_factor(cfg: ExperimentConfig, it: int) -> float:
    """Linear warm-up over ``warmup_iters``, then cosine decay to ``min_lr_factor`` (or constant)."""
    if it < cfg.warmup_iters:
        return (it + 1) / cfg.warmup_iters
    if cfg.scheduler == "constant":
        return 1.0
    t = (it - cfg.warmup_iters) / max(1, cfg.iterations - cfg.warmup_iters)
    return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def build_optimizer(cfg: ExperimentConfig, params) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD (momentum 0.9) over the trainable ``params``; with ``cfg.fused_optimizer``
    the fused CUDA kernels when the parameters live on a GPU (ignored on CPU)."""
    params = [p for p in params if p.requires_grad]
    fused = {"fused": True} if cfg.fused_optimizer and params and all(p.is_cuda for p in params) else {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, **fused)


@torch.no_grad()
def _momentum_update(ema: torch.nn.Module, model: torch.nn.Module, m: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.mul_(m).add_(p.detach(), alpha=1 - m)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


@dataclass
class StepParts:
    """What one training step reads and updates; :func:`train` builds it, a benchmark may too."""

    model: torch.nn.Module  # the plain model: clipping, the momentum update
    net: torch.nn.Module  # what the forward runs: ``model`` or its DDP / compiled wrapper
    criterion: RetrievalLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    memory: CrossBatchMemory | None  # XBM; None when ``cfg.memory_size == 0``
    ema: torch.nn.Module | None  # momentum encoder of the memory keys; None when ``cfg.momentum`` is None
    device: torch.device
    amp_on: bool
    amp_dtype: torch.dtype
    pin: bool  # batches are pinned: copy them non-blocking


def train_step(
    cfg: ExperimentConfig,
    parts: StepParts,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    *,
    it: int = 0,
    grad_noise: bool = False,
    run_dir: str | Path | None = None,
) -> tuple[dict[str, torch.Tensor], float | None]:
    """One iteration of :func:`train` on this rank's batch ``(x, y, idx)``; returns the loss terms
    (``"total"`` among them) and the gradient noise (IRT Fig. 4) when ``grad_noise``, else None.

    Moves the batch to the device, forwards it (autocast), gathers the global batch (DDP), computes
    the loss over batch × batch and batch × memory, raises :class:`~nbsrc.errors.NonFiniteLossError`
    on a NaN/inf loss (``it`` and ``run_dir`` go into its message), backward (GradScaler), clips,
    steps optimizer, scaler and scheduler, then enqueues the batch into the memory: the momentum
    encoder's keys after its update when there is one, else the batch's own embeddings.
    """
    device, pin, memory, ema = parts.device, parts.pin, parts.memory, parts.ema
    x = x.to(device, non_blocking=pin)
    y, idx = y.to(device, non_blocking=pin), idx.to(device, non_blocking=pin)
    with torch.autocast(device.type, dtype=parts.amp_dtype, enabled=parts.amp_on):
        z_local = parts.net(x).float()  # l2-normalised; the PCA is fitted only after training
    z = distributed.gather_with_grad(z_local)
    y_all, idx_all = distributed.gather(y), distributed.gather(idx)
    ref = memory.get() if memory is not None and len(memory) else (None, None, None)
    terms = parts.criterion(z, y_all, ref[0], ref[1], idx_all, ref[2])
    total = terms["total"]
    if not torch.isfinite(total):
        vals = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        kept = f"the last good checkpoint in {run_dir} is kept: " if run_dir is not None else ""
        raise NonFiniteLossError(
            f"loss is not finite at iteration {it} ({vals}); {kept}lower lr, enable grad_clip, or check the data"
        )
    noise = None
    if grad_noise:
        main_key = next(k for k in terms if k not in ("koleo", "total"))
        (g,) = torch.autograd.grad(terms[main_key], z, retain_graph=True)
        noise = gradient_noise(g)
    optimizer, scaler = parts.optimizer, parts.scaler
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if cfg.grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    parts.scheduler.step()
    if memory is not None:
        if ema is not None:
            _momentum_update(ema, parts.model, cfg.momentum)
            with torch.no_grad(), torch.autocast(device.type, dtype=parts.amp_dtype, enabled=parts.amp_on):
                keys = distributed.gather(ema(x).float())
            memory.enqueue(keys, y_all, idx_all)
        else:
            memory.enqueue(z.detach(), y_all, idx_all)
    return terms, noise


def build_step_parts(cfg: ExperimentConfig, model: torch.nn.Module, train_classes: list,
                     device: torch.device) -> StepParts:
    """Everything :func:`train_step` needs, built from ``cfg`` around ``model`` (moved to ``device``):
    the loss, optimizer, schedule, grad scaler, cross-batch memory, momentum encoder, and the network
    the step runs (DDP-wrapped when a process group is up, ``torch.compile``-d on CUDA if asked;
    checkpoints keep the plain model's keys)."""
    model.to(device).train()
    criterion: RetrievalLoss = build_loss(cfg, model.feature_dim, train_classes).to(device)
    optimizer = build_optimizer(cfg, list(model.parameters()) + list(criterion.parameters()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))
    amp_on, amp_dtype = amp_settings(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_on and amp_dtype == torch.float16)
    memory = CrossBatchMemory(cfg.memory_size, model.feature_dim, device) if cfg.memory_size else None
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.momentum is not None else None
    net = distributed.wrap_ddp(model, device)
    if cfg.compile and device.type == "cuda":  # a no-op on CPU
        net = torch.compile(net)
    pin = cfg.pin_memory and device.type == "cuda"  # pinned batches + non-blocking copies (CUDA only)
    return StepParts(model, net, criterion, optimizer, scheduler, scaler, memory, ema, device, amp_on, amp_dtype, pin)


def train(
    cfg: ExperimentConfig,
    model: torch.nn.Module,
    train_ds: RetrievalDataset,
    run_dir: str | Path,
    resume: bool = False,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    stop_after: int | None = None,
) -> torch.nn.Module:
    """Train ``model`` in place following ``cfg``; returns the (unwrapped) model.

    ``evaluate(model) -> dict`` is called every ``cfg.eval_every`` iterations (rank 0) and its
    result logged. ``stop_after`` ends the loop early at that iteration, checkpointing first (used to
    test that killing and resuming gives the same weights).
    """
    run_dir = Path(run_dir)
    dinfo = distributed.current()
    device = resolve_device(cfg.device)
    if dinfo.enabled and device.type == "cuda":
        device = torch.device("cuda", dinfo.local_rank)
    if cfg.batch_size % dinfo.world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the {dinfo.world_size} processes")
    torch.manual_seed(cfg.seed)
    parts = build_step_parts(cfg, model, np.unique(train_ds.labels).tolist(), device)
    criterion, optimizer, scheduler, scaler = parts.criterion, parts.optimizer, parts.scheduler, parts.scaler
    memory, ema = parts.memory, parts.ema

    start = 0
    if resume:
        state = load_checkpoint(run_dir)
        model.load_state_dict(state["model"])
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if memory is not None:
            memory.load_state_dict(state["memory"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        start = int(state["iteration"])
        if dinfo.is_main:
            truncate_metrics(run_dir, start)

    def checkpoint(it: int) -> None:
        if dinfo.is_main:
            save_checkpoint({
                "iteration": it, "config": cfg.to_dict(), "model": model.state_dict(),
                "criterion": criterion.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "memory": memory.state_dict() if memory is not None else None,
                "ema": ema.state_dict() if ema is not None else None, "rng": rng_state(),
            }, run_dir)
        distributed.barrier()

    pin = parts.pin

    # Every rank draws the same global batch and takes its own slice of it. cfg.sampler picks
    # m-per-class square crops or group-size batches of one image size (DToP Table A12).
    from nbsrc.data.group_sampler import training_sampler

    sampler, train_ds, collate = training_sampler(cfg, train_ds, start)
    local = cfg.batch_size // dinfo.world_size
    batches = _RankSlice(sampler, dinfo.rank, local)
    loader = DataLoader(train_ds, batch_sampler=batches, collate_fn=collate, num_workers=cfg.num_workers,
                        pin_memory=pin, generator=torch.Generator().manual_seed(cfg.seed),
                        persistent_workers=False)

    end = cfg.iterations if stop_after is None else min(cfg.iterations, stop_after)
    bar = progress(end, f"train {cfg.name}", cfg.progress and dinfo.is_main, initial=start)
    it, t_last, seen = start, time.perf_counter(), 0
    for x, y, idx in loader:
        if it >= end:
            break
        want_noise = cfg.record_grad_noise and ((it + 1) % max(cfg.log_every, 1) == 0 or it + 1 == end)
        terms, noise = train_step(cfg, parts, x, y, idx, it=it, grad_noise=want_noise, run_dir=run_dir)
        it += 1
        seen += len(y) * dinfo.world_size  # the global batch
        bar.update(1)
        if dinfo.is_main and (it % max(cfg.log_every, 1) == 0 or it == end):
            now = time.perf_counter()
            row = {"kind": "train", "iteration": it, "lr": scheduler.get_last_lr()[0],
                   "img_per_s": seen / max(now - t_last, 1e-9)}
            row.update({k: float(v.detach()) for k, v in terms.items()})
            if noise is not None:
                row["grad_noise"] = noise
            append_metrics(run_dir, row)
            bar.set_postfix({k: round(float(v.detach()), 4) for k, v in terms.items()})
            t_last, seen = now, 0
        if cfg.ckpt_every and it % cfg.ckpt_every == 0 and it < end:
            checkpoint(it)
        if evaluate is not None and cfg.eval_every and it % cfg.eval_every == 0 and it < cfg.iterations:
            if dinfo.is_main:
                append_metrics(run_dir, {"kind": "eval", "iteration": it, **evaluate(model)})
                model.train()
            distributed.barrier()
    bar.close()
    checkpoint(it)
    return model


class _RankSlice:
    """This rank's slice of every global batch of a batch sampler."""

    def __init__(self, sampler: MPerClassBatchSampler, rank: int, local: int):
        self.sampler, self.rank, self.local = sampler, rank, local

    def __iter__(self):
        for batch in self.sampler:
            yield batch[self.rank * self.local : (self.rank + 1) * self.local]

    def __len__(self) -> int:
        return len(self.sampler)
