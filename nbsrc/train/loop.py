"""The one training loop: :func:`fit` runs a :class:`TrainingTask` on CPU or CUDA, in one process
or under DDP (torchrun).

``fit`` owns what every kind of training shares: the device, mixed precision (AMP on CUDA: bf16
where supported, else fp16 with a GradScaler), the optimizer step with gradient clipping, the
warm-up + cosine schedule, checkpoints and exact resume, the non-finite-loss guard, the metrics log
(``metrics.jsonl``), the progress bar and DDP. What differs between kinds of training is a task
(timm's ``TrainingTask``, pytorch-metric-learning's ``calculate_loss``):

* :class:`nbsrc.train.pair_task.PairTask`: m-per-class (or group-size) batches, any pair loss of
  :data:`nbsrc.losses.PAIR_LOSSES` over batch × batch and batch × cross-batch memory, the momentum
  encoder; IRT's training and DToP's class training on SfM-120k;
* :class:`nbsrc.train.tuple_task.TupleTask`: SfM-120k tuples with hard negatives mined at every epoch
  start, any tuple loss of :data:`nbsrc.losses.TUPLE_LOSSES`.

Per iteration ``fit`` asks the task for this rank's next batch, the task forwards it and returns
its loss terms (``"total"`` among them), and ``fit`` checks them, steps and logs. A NaN or inf loss
stops the run with :class:`~nbsrc.errors.NonFiniteLossError`, whose message says which checkpoint,
if any, is on disk. Resuming restores model, optimizer, scheduler, scaler, RNG states and what the
task keeps (memory, momentum encoder, the epoch's tuples), so a resumed run ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nbsrc.config import ExperimentConfig, check_device
from nbsrc.errors import ConfigError, NonFiniteLossError
from nbsrc.progress import progress
from nbsrc.train import distributed
from nbsrc.train.bn_freeze_epoch_decay import train_mode
from nbsrc.train.checkpoint import LATEST, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from nbsrc.train.rundir import append_metrics, truncate_metrics


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device a config's or a caller's ``device`` names: ``"auto"`` (or None) is CUDA when available,
    else the CPU; a CUDA device where there is none is a one-line :class:`ConfigError`."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, torch.device):
        check_device(name)  # 'gpu', 'cuda:x': one line naming the choices, not torch's RuntimeError
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(name)!r} but CUDA is not available here; use device='cpu' or 'auto'")
    return dev


_NOTICES: set[str] = set()


def notice(message: str) -> None:
    """Print a one-line notice to stderr, once per process and message (an option that does nothing here)."""
    if message not in _NOTICES:
        _NOTICES.add(message)
        print(f"note: {message}", file=sys.stderr, flush=True)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX-512 BF16 or AMX); elsewhere CPU bf16
    autocast still computes the same, through slower emulated kernels."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_settings(cfg: ExperimentConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    """(enabled, dtype). On CUDA ``cfg.optim.amp``: bf16 on GPUs that support it, fp16 otherwise. On CPU
    ``cfg.optim.cpu_bf16``: bf16 autocast (with a notice where the CPU has no native bf16, since it then runs
    emulated and is likely slower than fp32). Each field is a no-op, with a notice, on the other device."""
    if device.type == "cuda":
        if cfg.optim.cpu_bf16:
            notice("cpu_bf16 acts on CPU training only; on CUDA mixed precision is `amp`")
        if not cfg.optim.amp:
            return False, torch.float32
        return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cfg.optim.cpu_bf16:
        if not cpu_has_native_bf16():
            notice("cpu_bf16: this CPU has no native bf16 (AVX-512 BF16 / AMX); autocast runs emulated, likely slower")
        return True, torch.bfloat16
    return False, torch.float32


def compile_wanted(cfg: ExperimentConfig, device: torch.device) -> bool:
    """Whether to ``torch.compile`` the network: ``cfg.run.compile`` on CUDA, ``cfg.run.cpu_compile`` on CPU
    (a no-op, with a notice, where torch.compile is unavailable or on the other device)."""
    if device.type == "cuda":
        if cfg.run.cpu_compile:
            notice("cpu_compile acts on CPU training only; on CUDA it is `compile`")
        return cfg.run.compile
    if device.type != "cpu" or not cfg.run.cpu_compile:
        return False
    if not hasattr(torch, "compile") or shutil.which("g++") is None and shutil.which("c++") is None:
        notice("cpu_compile: torch.compile needs a C++ compiler (g++) for inductor on CPU; running eager")
        return False
    return True


def apply_threads(cfg: ExperimentConfig) -> None:
    """``torch.set_num_threads(cfg.run.threads)`` for the process when ``cfg.run.threads`` > 0 (0: leave it)."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)


def lr_factor(cfg: ExperimentConfig, it: int) -> float:
    """Linear warm-up over ``warmup_iters``, then cosine decay to ``min_lr_factor`` (or constant)."""
    if it < cfg.optim.warmup_iters:
        return (it + 1) / cfg.optim.warmup_iters
    if cfg.optim.scheduler == "constant":
        return 1.0
    t = (it - cfg.optim.warmup_iters) / max(1, cfg.optim.iterations - cfg.optim.warmup_iters)
    return cfg.optim.min_lr_factor + (1 - cfg.optim.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def build_optimizer(cfg: ExperimentConfig, params, loss_params=()) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD (momentum 0.9) over the trainable ``params`` and the loss's own ``loss_params``
    (class proxies, a linear head), these at ``lr × cfg.optim.loss_lr_mult`` in a second parameter group
    when the multiple is not 1; with ``cfg.run.fused_optimizer`` the fused CUDA kernels when the
    parameters live on a GPU (ignored on CPU)."""
    params, loss_params = [p for p in params if p.requires_grad], [p for p in loss_params if p.requires_grad]
    every = params + loss_params
    fused = {"fused": True} if cfg.run.fused_optimizer and every and all(p.is_cuda for p in every) else {}
    params = ([{"params": params}, {"params": loss_params, "lr": cfg.optim.lr * cfg.optim.loss_lr_mult}]
              if cfg.optim.loss_lr_mult != 1 and loss_params else every)
    if cfg.optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, **fused)
    if cfg.optim.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, **fused)
    return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=0.9, weight_decay=cfg.optim.weight_decay, **fused)


class TrainingTask:
    """What one kind of training adds to :func:`fit`. A subclass overrides what it needs.

    ``setup`` builds the task's own modules around the model (a loss with learnable proxies, a
    memory) and returns the extra modules whose parameters the optimizer also trains; ``batches``
    yields this rank's batches from iteration ``start`` on; ``loss`` forwards one batch through
    ``parts.net`` (autocast is on) and returns the loss terms; ``after_step`` runs after the
    optimizer step (the memory's enqueue). ``state`` / ``load_state`` are the task's part of a
    checkpoint; ``log_fields`` adds to every logged row; ``checkpoint_due`` asks for extra
    checkpoints (at the end of an epoch); ``lr_scale`` multiplies the schedule's factor (SfM-120k's
    per-epoch decay).
    """

    name = "train"

    def setup(self, parts: StepParts) -> list[torch.nn.Module]:
        return []

    def batches(self, parts: StepParts, start: int, log: Callable[[dict], None]) -> Iterator:
        raise NotImplementedError

    def loss(self, parts: StepParts, batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def diagnostics(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Extra values logged on a logging step (the gradient noise of IRT Fig. 4)."""
        return {}

    def after_step(self, parts: StepParts) -> None:
        pass

    def state(self, it: int) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def log_fields(self, it: int) -> dict:
        return {}

    def checkpoint_due(self, it: int) -> bool:
        return False

    def lr_scale(self, it: int) -> float:
        return 1.0


@dataclass
class StepParts:
    """What one training step reads and updates; :func:`fit` builds it, a benchmark may too."""

    cfg: ExperimentConfig
    model: torch.nn.Module  # the plain model: clipping, checkpoints, the momentum update
    net: torch.nn.Module  # what the forward runs: ``model`` or its DDP / compiled wrapper
    task: TrainingTask
    optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    device: torch.device
    amp_on: bool
    amp_dtype: torch.dtype
    pin: bool  # batches are pinned: copy them non-blocking


def build_step_parts(cfg: ExperimentConfig, model: torch.nn.Module, task: TrainingTask,
                     device: torch.device, load: dict | None = None) -> StepParts:
    """Everything :func:`train_step` needs, built from ``cfg`` around ``model`` (moved to ``device``):
    the task's modules, the optimizer over the model's and their parameters, the schedule, the grad
    scaler, and the network the step runs (DDP-wrapped when a process group is up, after ``load``
    (a checkpoint) is restored; ``torch.compile``-d on CUDA if asked; checkpoints keep the plain
    model's keys)."""
    train_mode(model.to(device), cfg.optim.freeze_batchnorm)
    amp_on, amp_dtype = amp_settings(cfg, device)
    pin = cfg.run.pin_memory and device.type == "cuda"  # pinned batches + non-blocking copies (CUDA only)
    parts = StepParts(cfg, model, model, task, None, None, None, device, amp_on, amp_dtype, pin)
    extra = task.setup(parts)
    parts.optimizer = build_optimizer(cfg, model.parameters(), [p for m in extra for p in m.parameters()])
    parts.scheduler = torch.optim.lr_scheduler.LambdaLR(parts.optimizer,
                                                        lambda it: lr_factor(cfg, it) * task.lr_scale(it))
    parts.scaler = torch.amp.GradScaler("cuda", enabled=amp_on and amp_dtype == torch.float16)
    if load is not None:
        model.load_state_dict(load["model"])
        parts.optimizer.load_state_dict(load["optimizer"])
        parts.scheduler.load_state_dict(load["scheduler"])
        parts.scaler.load_state_dict(load["scaler"])
        task.load_state(load)
    net = distributed.wrap_ddp(model, device)  # every rank starts from the same weights
    if compile_wanted(cfg, device):
        net = torch.compile(net)
    parts.net = net
    return parts


def non_finite_message(terms: dict, it: int, run_dir: Path | None, last_checkpoint: int | None) -> str:
    """What a NaN/inf loss at iteration ``it`` means for what is on disk, in one line."""
    vals = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
    if run_dir is None:
        disk = ""
    elif last_checkpoint is not None:
        disk = f"the last good checkpoint {Path(run_dir) / LATEST} (iteration {last_checkpoint}) is kept; "
    else:
        disk = f"no checkpoint was written, so {run_dir} is not a run yet and the next start replaces it; "
    return f"loss is not finite at iteration {it} ({vals}); {disk}lower lr, enable grad_clip, or check the data"


def train_step(cfg: ExperimentConfig, parts: StepParts, batch, *, it: int = 0, grad_noise: bool = False,
               run_dir: str | Path | None = None, last_checkpoint: int | None = None) -> tuple[dict, dict]:
    """One iteration of :func:`fit` on this rank's ``batch``; returns the loss terms (``"total"``
    among them) and the task's diagnostics when ``grad_noise`` (else ``{}``).

    The task forwards the batch (autocast) and computes its loss; a NaN/inf loss raises
    :class:`~nbsrc.errors.NonFiniteLossError` (``it``, ``run_dir`` and ``last_checkpoint`` go into
    its message); then backward (GradScaler), clipping, the optimizer, scaler and scheduler steps,
    and the task's ``after_step``.
    """
    task = parts.task
    with torch.autocast(parts.device.type, dtype=parts.amp_dtype, enabled=parts.amp_on):
        terms = task.loss(parts, batch)
    total = terms["total"]
    if not torch.isfinite(total):
        raise NonFiniteLossError(non_finite_message(terms, it, run_dir, last_checkpoint))
    extra = task.diagnostics(terms) if grad_noise else {}
    optimizer, scaler = parts.optimizer, parts.scaler
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if cfg.optim.grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.optim.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    parts.scheduler.step()
    task.after_step(parts)
    return terms, extra


def fit(
    cfg: ExperimentConfig,
    model: torch.nn.Module,
    task: TrainingTask,
    run_dir: str | Path,
    resume: bool = False,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    stop_after: int | None = None,
) -> torch.nn.Module:
    """Train ``model`` in place on ``task`` for ``cfg.optim.iterations`` steps; returns the plain model.

    ``evaluate(model) -> dict`` is called every ``cfg.eval.eval_every`` iterations (rank 0) and its
    result logged. ``stop_after`` ends the loop early at that iteration, checkpointing first (to
    test that killing and resuming gives the same weights). Checkpoints are written every
    ``cfg.run.ckpt_every`` steps, when the task asks (``checkpoint_due``) and at the end; rank 0 alone
    writes checkpoints and metrics.
    """
    run_dir = Path(run_dir)
    dinfo = distributed.current()
    device = resolve_device(cfg.run.device)
    if dinfo.enabled and device.type == "cuda":
        device = torch.device("cuda", dinfo.local_rank)
    apply_threads(cfg)
    torch.manual_seed(cfg.run.seed)
    state = load_checkpoint(run_dir) if resume else None
    parts = build_step_parts(cfg, model, task, device, load=state)
    start, last_checkpoint = 0, None
    if state is not None:
        set_rng_state(state["rng"])
        start = last_checkpoint = int(state["iteration"])
        if dinfo.is_main:
            truncate_metrics(run_dir, start)

    def checkpoint(it: int) -> None:
        nonlocal last_checkpoint
        if dinfo.is_main:
            save_checkpoint({
                "iteration": it, "config": cfg.to_dict(), "model": model.state_dict(),
                "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
                "scaler": parts.scaler.state_dict(), "rng": rng_state(), **task.state(it),
            }, run_dir)
        distributed.barrier()
        last_checkpoint = it

    def log(row: dict) -> None:
        if dinfo.is_main:
            append_metrics(run_dir, row)

    end = cfg.optim.iterations if stop_after is None else min(cfg.optim.iterations, stop_after)
    bar = progress(end, f"train {cfg.run.name}{'' if task.name == 'train' else f' ({task.name})'}",
                   cfg.run.progress and dinfo.is_main, initial=start)
    batches = task.batches(parts, start, log)
    it, t_last, seen = start, time.perf_counter(), 0
    while it < end:
        batch = next(batches, None)
        if batch is None:
            break
        want_noise = cfg.run.record_grad_noise and ((it + 1) % max(cfg.run.log_every, 1) == 0 or it + 1 == end)
        terms, extra = train_step(cfg, parts, batch, it=it, grad_noise=want_noise, run_dir=run_dir,
                                  last_checkpoint=last_checkpoint)
        fields = task.log_fields(it)
        it += 1
        seen += len(batch[0]) * dinfo.world_size  # the global batch
        bar.update(1)
        if dinfo.is_main and (it % max(cfg.run.log_every, 1) == 0 or it == end):
            now = time.perf_counter()
            row = {"kind": "train", "iteration": it, **fields, "lr": parts.scheduler.get_last_lr()[0],
                   "img_per_s": seen / max(now - t_last, 1e-9)}
            row.update({k: float(v.detach()) for k, v in terms.items()})
            row.update(extra)
            append_metrics(run_dir, row)
            bar.set_postfix({k: round(float(v.detach()), 4) for k, v in terms.items()})
            t_last, seen = now, 0
        if it < end and ((cfg.run.ckpt_every and it % cfg.run.ckpt_every == 0) or task.checkpoint_due(it)):
            checkpoint(it)
        if evaluate is not None and cfg.eval.eval_every and it % cfg.eval.eval_every == 0 and it < cfg.optim.iterations:
            if dinfo.is_main:
                append_metrics(run_dir, {"kind": "eval", "iteration": it, **evaluate(model)})
                train_mode(model, cfg.optim.freeze_batchnorm)
            distributed.barrier()
    bar.close()
    checkpoint(it)
    return model
