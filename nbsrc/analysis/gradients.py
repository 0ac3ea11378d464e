"""Gradient noise of the contrastive loss, IRT §3.5 and Figure 4.

IRT argues that the margin β of the contrastive loss (eq. 1) trades off how many negatives are
active against how noisy the gradient is. The noise is measured on the per-sample gradients of the
loss with respect to the embeddings, g_i = ∂L/∂z_i, through their directions ĝ_i = g_i / ‖g_i‖::

    γ = ‖Cov(ĝ)‖_*,   Cov(ĝ) = 1/B Σ_i (ĝ_i − ḡ)(ĝ_i − ḡ)ᵀ,   ḡ = 1/B Σ_i ĝ_i

IRT averages γ "over all training iterations" (§3.5); the training loop samples it instead, on the
batch of every ``log_every``-th iteration (and the last), and :func:`nbsrc.paper.reporting.mean_grad_noise`
averages those samples (our reading, ``docs/fidelity.md``). The function itself, :func:`gradient_noise`,
lives in :mod:`nbsrc.losses.diagnostics` (below ``train``, so the training loop records γ while it
trains, with ``record_grad_noise``, instead of in a second pass); it is re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from nbsrc.errors import ConfigError
from nbsrc.losses.diagnostics import gradient_noise

__all__ = ["gradient_noise", "per_sample_embedding_grads", "GradientNoiseMeter"]


def per_sample_embedding_grads(loss_fn: Callable, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` gradients g_i = ∂L/∂z_i of the batch loss ``L = loss_fn(z, labels)`` (a scalar)
    with respect to each embedding row z_i.

    The contrastive loss is a sum over samples, L = 1/B Σ_i ℓ_i, and z_i enters the terms ℓ_j of
    the other samples it is paired with as well as its own ℓ_i; ∂L/∂z_i collects all of them, which
    is the per-sample gradient of the batch loss with respect to embedding i that IRT uses. One
    backward pass gives all rows at once (no per-sample loop is needed, because the rows of z are
    independent leaves). The 1/B factor scales every row alike and does not change the directions
    ĝ_i that :func:`gradient_noise` uses. ``z`` is detached first: the model is not touched.
    Rows of samples with no active pair are exactly zero.
    """
    if z.ndim != 2:
        raise ConfigError(f"z must be a 2-D tensor [B, D] of embeddings, got shape {tuple(z.shape)}")
    z = z.detach().clone().requires_grad_(True)
    loss = loss_fn(z, labels)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise ConfigError("loss_fn(z, labels) must return a scalar tensor (the batch loss, summed or averaged)")
    (g,) = torch.autograd.grad(loss, z, allow_unused=True)
    return torch.zeros_like(z) if g is None else g.detach()


class GradientNoiseMeter:
    """Accumulates γ over training iterations (IRT Fig. 4 plots its mean over training).

    ``update(grads)`` computes γ of one batch (see :func:`gradient_noise`) and stores it in
    ``values``; a batch with fewer than 2 samples with a non-zero gradient gives NaN, which is kept
    in ``values`` (so that ``len(values)`` is the number of batches seen) and left out of ``mean``.
    """

    def __init__(self):
        self.values: list[float] = []

    def update(self, grads: torch.Tensor) -> float:
        gamma = gradient_noise(grads)
        self.values.append(gamma)
        return gamma

    @property
    def count(self) -> int:
        """Batches with a defined γ (NaN batches not counted)."""
        return sum(not math.isnan(v) for v in self.values)

    @property
    def mean(self) -> float:
        """Mean γ over the batches with a defined γ; NaN if there are none."""
        finite = [v for v in self.values if not math.isnan(v)]
        return sum(finite) / len(finite) if finite else float("nan")

    def reset(self) -> None:
        self.values.clear()
