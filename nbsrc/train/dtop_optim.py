"""DToP's optimiser (§A.1): SGD with momentum 0.9, learning rate 1e-3, linear warm-up, then cosine
decay to ``lr · final_factor`` (1e-4). The schedule is stepped once per iteration::

    factor(t) = (t + 1) / T_w                                                  t < T_w
    factor(t) = f + (1 − f) · ½ (1 + cos(π · (t − T_w) / (T − T_w)))          T_w ≤ t ≤ T

with ``T_w = warmup_epochs · iters_per_epoch``, ``T = epochs · iters_per_epoch`` and ``f =
final_factor``; so the first step uses ``lr / T_w``, step ``T_w`` the full ``lr`` and step ``T``
(after the last) ``lr · f``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from nbsrc.errors import ConfigError


def dtop_lr_factor(t: int, total: int, warmup: int, final_factor: float = 1e-4) -> float:
    """The multiplier of the base learning rate at iteration ``t`` (see the module docstring)."""
    if t < warmup:
        return (t + 1) / warmup
    progress = min(1.0, (t - warmup) / max(1, total - warmup))
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def dtop_optimizer_and_scheduler(
    params: Iterable,
    lr: float = 1e-3,
    momentum: float = 0.9,
    epochs: int = 100,
    iters_per_epoch: int = 100,
    warmup_epochs: int = 0,
    final_factor: float = 1e-4,
    weight_decay: float = 0.0,
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD and its per-iteration warm-up + cosine schedule (call ``scheduler.step()`` every step)."""
    for name, value in (("epochs", epochs), ("iters_per_epoch", iters_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} is invalid: expected an integer >= 1")
    if not isinstance(warmup_epochs, int) or not 0 <= warmup_epochs < epochs:
        raise ConfigError(f"warmup_epochs={warmup_epochs!r} must be an integer in [0, epochs={epochs})")
    if lr <= 0 or not 0 < final_factor <= 1:
        raise ConfigError(f"lr={lr} must be > 0 and final_factor={final_factor} in (0, 1]")
    total, warmup = epochs * iters_per_epoch, warmup_epochs * iters_per_epoch
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: dtop_lr_factor(t, total, warmup, final_factor))
    return opt, sched
