"""Image transforms that follow the papers, made deterministic for exact resume.

Two geometries, one per task of IRT §4.2:

* **category-level** (``crop=True``, the default; SOP, CUB-200-2011, In-Shop and the embedded
  demo data): "resizing the image to 256×256 and then taking a random crop of size 224×224,
  combined with random horizontal flipping" (IRT §4.2). The resize is to a *square*
  ``S × S`` (the aspect ratio is not kept), ``S = round(size · 256 / 224)``: the paper's 256/224
  ratio carried to other sizes (``size=224``: 256; ``size=28``: 32; ``size=32``: 37;
  ``size=384``: 439). Evaluation: the same square resize, then the centre ``size × size`` crop
  (the paper does not describe its evaluation transform: our reading, the usual DeiT/timm one).
* **particular-object** (``crop=False``; SfM-120k training and mining, Revisited Oxford / Paris
  queries and database): "the input images are resized to have the same fixed width and height"
  and "all the query and database images are resized into a square image with the same
  resolution as used during the finetuning stage" (IRT §4.2): a resize straight to
  ``size × size``, nothing cropped away (queries are cropped to their bounding box first, by
  :class:`~nbsrc.data.revisited.RevisitedQueries`). :func:`particular_object_transform` is this
  geometry without augmentation, as cirtorch trains (resize and normalise only; our reading of "We
  follow the same optimization and regularization procedure").

For a square input (Fashion-MNIST, digits) the square resize equals the former shorter-side resize,
so the demo's pixels are unchanged (``tests/test_transforms.py`` checks it bit for bit).

Grayscale images are repeated to 3 channels for backbones that expect RGB. The random choices are
drawn from a ``torch.Generator`` seeded per sample by the sampler, so a resumed run sees exactly the
augmentations an uninterrupted one would, with any number of DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF

from nbsrc.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 256 / 224  # IRT §4.2: 256×256 resize before the 224×224 crop


def resize_side(size: int) -> int:
    """The square resize side before a ``size`` crop: ``round(size · 256/224)`` (IRT §4.2's ratio)."""
    return round(size * RESIZE_RATIO)


@dataclass
class RetrievalTransform:
    """uint8 image tensor (H x W or C x H x W) -> normalised float tensor (3 x size x size).

    ``train``: random crop (when ``crop``) and horizontal flip with probability 1/2; otherwise
    deterministic. ``crop=True``: square resize to :func:`resize_side` then a ``size`` crop
    (category-level, IRT §4.2); ``crop=False``: square resize straight to ``size`` (particular
    objects, IRT §4.2). ``resize=False`` keeps the input size (group-size sampling, multi-scale
    inference): only the flip (when ``train``) and the normalisation apply.
    """

    size: int
    train: bool
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    resize: bool = True  # False keeps the input size (group-size sampling, multi-scale inference)
    crop: bool = True  # False: squash to size x size, nothing cropped (IRT §4.2, particular objects)

    def __post_init__(self):
        if self.size < 1:
            raise ConfigError(f"size={self.size} must be a positive image side in pixels")

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if img.ndim == 2:
            img = img.unsqueeze(0)
        if img.shape[0] == 1 and self.channels == 3:
            img = img.expand(3, -1, -1)
        elif img.shape[0] == 4:
            img = img[:3]
        x = img.float().div_(255.0)
        if self.resize and not self.crop:
            x = TF.resize(x, [self.size, self.size], antialias=True)
        elif self.resize:
            side = resize_side(self.size)
            x = TF.resize(x, [side, side], antialias=True)
            if self.train:
                g = generator
                top = int(torch.randint(0, side - self.size + 1, (1,), generator=g))
                left = int(torch.randint(0, side - self.size + 1, (1,), generator=g))
                x = x[..., top : top + self.size, left : left + self.size]
            else:
                x = TF.center_crop(x, [self.size, self.size])
        if self.train and bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
        return TF.normalize(x, list(self.mean), list(self.std))


def category_transforms(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[RetrievalTransform, RetrievalTransform]:
    """``(train, eval)`` of category-level retrieval (IRT §4.2): square resize to
    :func:`resize_side`, random ``size`` crop + flip for training, centre crop for evaluation."""
    return (RetrievalTransform(size, train=True, mean=mean, std=std),
            RetrievalTransform(size, train=False, mean=mean, std=std))


def particular_object_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> RetrievalTransform:
    """SfM-120k training and mining, Revisited Oxford / Paris evaluation (IRT §4.2): every image
    "resized into a square image" of ``size × size``, no crop, no flip, normalised."""
    return RetrievalTransform(size, train=False, mean=mean, std=std, crop=False)
