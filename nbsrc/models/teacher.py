"""The frozen teacher of feature distillation (:mod:`nbsrc.losses.distill`): an ImageNet convnet
that sees the student's batch, resized to its own input size and renormalised from the student's
normalisation to its own, and returns its pooled features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The teacher of the study's pretraining stand-in: the one ImageNet network available offline
# (nbsrc.models.weights: efficientnet_lite0), at 64 px (our reading: the convnet's own input size for
# glyphs in the study, nbsrc.paper.study.STUDY["convnet"]); its pooled features have 1,280 dimensions.
TEACHER = dict(backbone="tf_efficientnet_lite0", weights="efficientnet_lite0", img_size=64, dim=1280)


class Teacher(nn.Module):
    """``backbone`` with ``weights`` (:func:`nbsrc.models.backbones.create_backbone`), frozen in eval
    mode; ``forward(x)`` takes images normalised with ``student_norm`` (``{"mean", "std"}``) and
    returns the teacher's pooled features of them at ``img_size`` (bilinear, antialiased)."""

    def __init__(self, student_norm: dict, backbone: str = TEACHER["backbone"], weights: str = TEACHER["weights"],
                 img_size: int = TEACHER["img_size"]):
        super().__init__()
        from nbsrc.models import data_config
        from nbsrc.models.backbones import create_backbone

        net = create_backbone(backbone, weights).eval().requires_grad_(False)
        self.net = net.to(memory_format=torch.channels_last)  # a convnet: about 2x faster on CPU
        own, self.img_size = data_config(self.net), img_size
        s_mean, s_std = (torch.tensor(student_norm[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
        t_mean, t_std = (torch.tensor(own[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
        # x_student = (p - s_mean) / s_std, x_teacher = (p - t_mean) / t_std = x_student * scale + shift
        self.register_buffer("scale", s_std / t_std, persistent=False)
        self.register_buffer("shift", (s_mean - t_mean) / t_std, persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: the teacher's BatchNorm keeps its ImageNet statistics

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * self.scale + self.shift
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.net(x.contiguous(memory_format=torch.channels_last)).float()
