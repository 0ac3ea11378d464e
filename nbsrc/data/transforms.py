"""Image transforms that follow the paper, made deterministic for exact resume.

Training: resize the shorter side to ``round(size * 256 / 224)``, take a random ``size x size``
crop and flip horizontally with probability 1/2. Evaluation: the same resize, then a centre crop.
Grayscale images are repeated to 3 channels for backbones that expect RGB. The random choices are
drawn from a ``torch.Generator`` seeded per sample by the sampler, so a resumed run sees exactly the
augmentations an uninterrupted one would, with any number of DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 256 / 224


@dataclass
class RetrievalTransform:
    """uint8 image tensor (H x W or C x H x W) -> normalised float tensor (3 x size x size)."""

    size: int
    train: bool
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    resize: bool = True  # False keeps the input size (group-size sampling, multi-scale inference)

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if img.ndim == 2:
            img = img.unsqueeze(0)
        if img.shape[0] == 1 and self.channels == 3:
            img = img.expand(3, -1, -1)
        elif img.shape[0] == 4:
            img = img[:3]
        x = img.float().div_(255.0)
        if self.resize:
            x = TF.resize(x, [round(self.size * RESIZE_RATIO)], antialias=True)
            h, w = x.shape[-2:]
            if self.train:
                g = generator
                top = int(torch.randint(0, h - self.size + 1, (1,), generator=g))
                left = int(torch.randint(0, w - self.size + 1, (1,), generator=g))
                x = x[..., top : top + self.size, left : left + self.size]
            else:
                x = TF.center_crop(x, [self.size, self.size])
        if self.train and bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
        return TF.normalize(x, list(self.mean), list(self.std))
