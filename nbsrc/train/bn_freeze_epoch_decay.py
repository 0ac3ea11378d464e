"""Training-side settings of the SfM-120k protocol of IRT §4.2, which "build[s] on top of the public
code associated with the work by Radenović et al. (2018b)" and uses "the default hyper-parameters"
of that code (cnnimageretrieval-pytorch, ``cirtorch/examples/train.py``):

* the learning rate decays by ``exp(−0.01)`` per epoch (cirtorch's ``ExponentialLR`` with
  ``gamma = exp(−0.01)``, stepped once an epoch): :func:`epoch_lr_decay`;
* BatchNorm layers stay in evaluation mode while training (cirtorch's ``set_batchnorm_eval``, so
  the running statistics of ImageNet are kept and batches of one tuple are harmless):
  :func:`freeze_batchnorm`. A ViT has LayerNorm only, so this matters for the convnet rows (R50,
  R101 of IRT Table 7).

Neither is stated in the paper's words: our reading of "the default hyper-parameters"
(docs/fidelity.md).
"""

from __future__ import annotations

import math

from torch import nn

from nbsrc.errors import ConfigError


def epoch_lr_decay(iteration: int, steps_per_epoch: int, rate: float = 0.01) -> float:
    """``exp(−rate · epoch)`` with ``epoch = iteration // steps_per_epoch``: the lr factor of cirtorch's
    per-epoch exponential decay (``rate = 0.01``) at optimizer step ``iteration``; ``rate = 0`` gives 1."""
    if steps_per_epoch < 1:
        raise ConfigError(f"steps_per_epoch={steps_per_epoch} must be a positive number of steps")
    if rate < 0:
        raise ConfigError(f"rate={rate} must be >= 0 (cirtorch: 0.01)")
    return math.exp(-rate * (int(iteration) // steps_per_epoch))


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm layer of ``model`` in eval mode (the rest keeps its mode); returns how
    many layers were set. Call it after every ``model.train()``."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n


def train_mode(model: nn.Module, frozen_batchnorm: bool = False) -> nn.Module:
    """``model.train()``, then :func:`freeze_batchnorm` when ``frozen_batchnorm``; returns ``model``."""
    model.train()
    if frozen_batchnorm:
        freeze_batchnorm(model)
    return model
