"""Image transforms that follow the papers, made deterministic for exact resume.

Two geometries, one per task of IRT §4.2:

* **category-level** (``crop=True``, the default; SOP, CUB-200-2011, In-Shop and the embedded
  demo data): "resizing the image to 256×256 and then taking a random crop of size 224×224,
  combined with random horizontal flipping" (IRT §4.2). The resize is to a *square*
  ``S × S`` (the aspect ratio is not kept), ``S = round(size · 256 / 224)``: the paper's 256/224
  ratio carried to other sizes (``size=224``: 256; ``size=28``: 32; ``size=32``: 37;
  ``size=384``: 439). Evaluation: the same square resize, then the centre ``size × size`` crop.
  IRT does not state its evaluation transform; our reading keeps the training's square resize, so
  that a test image is seen at the geometry the model was trained on (timm's evaluation instead
  keeps the aspect ratio, shorter side to ``S``; docs/fidelity.md).
* **particular-object** (``crop=False``; SfM-120k training and mining, Revisited Oxford / Paris
  queries and database): "the input images are resized to have the same fixed width and height"
  and "all the query and database images are resized into a square image with the same
  resolution as used during the finetuning stage" (IRT §4.2): a resize straight to
  ``size × size``, nothing cropped away (queries are cropped to their bounding box first, by
  :class:`~nbsrc.data.oxford_paris.RevisitedQueries`). :func:`particular_object_transform` is this
  geometry without augmentation, as cirtorch trains (resize and normalise only; our reading of "We
  follow the same optimization and regularization procedure").

DToP's test geometry (our reading; the supplement does not state it, docs/fidelity.md):
:func:`aspect_kept_transform`, each image (query crop, database image, SfM-120k image of the learned
whitening) resized so that its **longer side** is the training size and its aspect ratio is kept
(:func:`longer_side_size`), as group-size sampling trains and as the multi-scale protocol DToP takes
from Radenović et al. [52] tests. Images of one size are embedded together
(:func:`nbsrc.eval.particular.embed_at_scales`).

DToP's training adds, with ``dtop_augmentation`` (:func:`training_transform`): "We apply random
cropping, illumination and scaling augmentation" (DToP supplementary §A.1, the only sentence on
it; no ranges are given). Our reading, :data:`DTOP_AUGMENTATION`: *scaling and random cropping* — a
window of relative side ``s ~ U[0.8, 1]`` (aspect ratio kept) at a uniformly random place, which the
later resize brings back to the training size (a zoom by 1/s); *illumination* — every pixel
multiplied by one brightness factor ``b ~ U[0.6, 1.4]`` (torchvision's ``ColorJitter(brightness=0.4)``
range), clipped to [0, 1]. Both are drawn only when switched on, so the other runs' random draws
are unchanged.

For a square input (Fashion-MNIST, digits) the square resize equals the former shorter-side resize,
so the demo's pixels are unchanged (``tests/test_transforms.py`` checks it bit for bit).

Grayscale images are repeated to 3 channels for backbones that expect RGB. The random choices are
drawn from a ``torch.Generator`` seeded per sample by the sampler, so a resumed run sees exactly the
augmentations an uninterrupted one would, with any number of DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nbsrc.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DToP §A.1 "random cropping, illumination and scaling augmentation": the ranges are our reading
DTOP_AUGMENTATION = {"scale": (0.8, 1.0), "brightness": 0.4}
RESIZE_RATIO = 256 / 224  # IRT §4.2: 256×256 resize before the 224×224 crop


def resize_bilinear(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear, antialiased resize of a float ``C × H × W`` image: the same numbers as torchvision's
    ``v2.functional.resize(x, [height, width], antialias=True)`` (a no-op at the same size), at about
    half its cost per call (tests/test_transforms.py checks it bit for bit)."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x.unsqueeze(0), size=[height, width], mode="bilinear", align_corners=False,
                         antialias=True).squeeze(0)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre ``size × size`` window of an image at least that large: torchvision's ``center_crop``
    offsets (``round((H − size) / 2)``)."""
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def longer_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)`` with the longer side ``size`` and the aspect ratio of ``height × width`` (the other side
    rounded, at least 1 pixel)."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


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
    inference): only the flip (when ``train``) and the normalisation apply. ``keep_aspect=True`` (with
    ``resize``, no crop): the longer side to ``size``, the aspect ratio kept (:func:`longer_side_size`).

    ``scale`` and ``brightness`` (training only; off by default, DToP's augmentation): first a
    window of relative side ``s ~ U[scale]`` at a random place of the input, last the pixels
    multiplied by ``b ~ U[1 − brightness, 1 + brightness]`` and clipped to [0, 1].
    """

    size: int
    train: bool
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    resize: bool = True  # False keeps the input size (group-size sampling, multi-scale inference)
    crop: bool = True  # False: squash to size x size, nothing cropped (IRT §4.2, particular objects)
    keep_aspect: bool = False  # True (crop False): longer side to size, aspect ratio kept (DToP's test geometry)
    scale: tuple[float, float] = (1.0, 1.0)  # training: a random window of relative side U[lo, hi]; (1, 1): off
    brightness: float = 0.0  # training: pixels x U[1 - brightness, 1 + brightness], clipped; 0: off

    def __post_init__(self):
        if self.size < 1:
            raise ConfigError(f"size={self.size} must be a positive image side in pixels")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"scale={tuple(self.scale)} is invalid: expected 0 < low <= high <= 1 (relative window "
                              "side)")
        if not 0 <= self.brightness < 1:
            raise ConfigError(f"brightness={self.brightness} is invalid: expected 0 <= brightness < 1")
        if self.keep_aspect and self.crop:
            raise ConfigError("keep_aspect=True resizes the longer side and crops nothing: use it with crop=False")
        # mean and std as C x 1 x 1 tensors, made once (not a field: dataclasses.replace rebuilds them)
        self._mean_t = torch.tensor(tuple(self.mean), dtype=torch.float32).view(-1, 1, 1)
        self._std_t = torch.tensor(tuple(self.std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if img.ndim == 2:
            img = img.unsqueeze(0)
        if img.shape[0] == 4:
            img = img[:3]
        # A grayscale image is repeated to 3 channels at the end, before the per-channel
        # normalisation: every step before it acts on each channel alike, so the numbers are those
        # of repeating first, for a third of the work.
        x = img.float().div_(255.0)
        if self.train and tuple(self.scale) != (1.0, 1.0):  # DToP: scaling + random cropping
            x = self._random_window(x, generator)
        if self.resize and self.keep_aspect:
            x = resize_bilinear(x, *longer_side_size(*x.shape[-2:], self.size))
        elif self.resize and not self.crop:
            x = resize_bilinear(x, self.size, self.size)
        elif self.resize:
            side = resize_side(self.size)
            x = resize_bilinear(x, side, side)
            if self.train:
                g = generator
                top = int(torch.randint(0, side - self.size + 1, (1,), generator=g))
                left = int(torch.randint(0, side - self.size + 1, (1,), generator=g))
                x = x[..., top : top + self.size, left : left + self.size]
            else:
                x = center_crop(x, self.size)
        if self.train and bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
        if self.train and self.brightness > 0:  # DToP: illumination
            b = 1 - self.brightness + 2 * self.brightness * float(torch.rand((), generator=generator))
            x = (x * b).clamp_(0.0, 1.0)
        if x.shape[0] == 1 and self.channels == 3:
            x = x.expand(3, -1, -1)
        return (x - self._mean_t) / self._std_t  # torchvision's normalize, without its checks

    def _random_window(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A window of relative side ``s ~ U[scale]`` (both sides, at least 1 pixel) at a uniformly random place."""
        lo, hi = self.scale
        s = lo + (hi - lo) * float(torch.rand((), generator=generator))
        h, w = x.shape[-2:]
        wh, ww = max(1, round(s * h)), max(1, round(s * w))
        top = int(torch.randint(0, h - wh + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - ww + 1, (1,), generator=generator))
        return x[..., top : top + wh, left : left + ww]


def training_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       dtop_augmentation: bool = False) -> RetrievalTransform:
    """The training transform of :class:`RetrievalTransform` (random crop + flip), plus DToP's
    scaling, random cropping and illumination augmentation (:data:`DTOP_AUGMENTATION`) when
    ``dtop_augmentation`` (``cfg.data.dtop_augmentation``; on in the DToP presets)."""
    extra = DTOP_AUGMENTATION if dtop_augmentation else {}
    return RetrievalTransform(size, train=True, mean=mean, std=std, **extra)


def particular_object_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> RetrievalTransform:
    """SfM-120k training and mining, Revisited Oxford / Paris evaluation (IRT §4.2): every image
    "resized into a square image" of ``size × size``, no crop, no flip, normalised."""
    return RetrievalTransform(size, train=False, mean=mean, std=std, crop=False)


def aspect_kept_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> RetrievalTransform:
    """DToP's test geometry (our reading, module docstring): the longer side resized to ``size``, the
    aspect ratio kept, no crop, no flip, normalised."""
    return RetrievalTransform(size, train=False, mean=mean, std=std, crop=False, keep_aspect=True)
