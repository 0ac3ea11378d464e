"""Feature distillation: the objective of the study's pretraining stand-in (:mod:`nbsrc.paper.study`).

DeiT's ImageNet pretraining is "supervised classification with distillation from a convnet teacher"
(Touvron et al., 2021; IRT §4 starts from it). The stand-in distils a frozen ImageNet convnet
(:class:`nbsrc.models.teacher.Teacher`) into the ViT on unlabeled images: a linear head h maps the
student's l2-normalised embedding z to the teacher's feature space, and the loss is the squared
distance of the two directions, t the teacher's pooled feature of the same image::

    L = 1/N Σ_i ‖ h(z_i)/‖h(z_i)‖ − t_i/‖t_i‖ ‖² = 1/N Σ_i (2 − 2 cos(h(z_i), t_i))

Our reading: DeiT distils the teacher's predicted ImageNet class (hard distillation); its 1,000
ImageNet classes say little about glyphs, so the stand-in regresses the teacher's features instead
(FitNets-style feature distillation, Romero et al., 2015). Labels, references and indices are unused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nbsrc.errors import ConfigError
from nbsrc.losses.contrastive import upcast
from nbsrc.losses.registry import register_pair_loss


class FeatureDistillation(nn.Module):
    """The loss of the module docstring over a batch: ``forward(z, ..., targets=t)``, ``t`` the teacher's
    features of the batch's images (N × ``teacher_dim``); the head h is a linear layer
    ``feature_dim → teacher_dim``, trained with the network."""

    def __init__(self, feature_dim: int, teacher_dim: int):
        super().__init__()
        self.head = nn.Linear(feature_dim, teacher_dim)

    def forward(self, z, labels=None, ref_emb=None, ref_labels=None, indices=None, ref_indices=None, targets=None):
        if targets is None:
            raise ConfigError("loss='distill' needs the teacher's features of the batch (targets=); it is trained "
                              "by the pair task, which computes them")
        h = F.normalize(F.linear(upcast(z), upcast(self.head.weight), upcast(self.head.bias)), dim=-1)
        return (h - F.normalize(upcast(targets), dim=-1)).pow(2).sum(-1).mean()


def distillation_reference(z, weight, bias, targets) -> torch.Tensor:
    """The loss of the module docstring, one sample at a time: mean of 2 − 2 cos(W z_i + b, t_i)."""
    total = 0.0
    for zi, ti in zip(z.double(), targets.double(), strict=True):
        hi = weight.double() @ zi + bias.double()
        total = total + 2 - 2 * (hi @ ti) / (hi.norm() * ti.norm())
    return total / len(z)


@register_pair_loss("distill")
def _distill(feature_dim: int, classes):
    """Feature distillation from a frozen ImageNet convnet (the study's pretraining)."""
    from nbsrc.models.teacher import TEACHER

    return FeatureDistillation(feature_dim, TEACHER["dim"])
