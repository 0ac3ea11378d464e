"""IRT §4.2's two image geometries (nbsrc.data.transforms): category-level square resize + crop,
particular-object squash to a square, and the demo's square images left exactly as they were."""

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from nbsrc.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RetrievalTransform,
    particular_object_transform,
    resize_side,
)
from nbsrc.errors import ConfigError

UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # output = pixel / 255


def marked_image(h: int, w: int, frac: float = 0.1) -> torch.Tensor:
    """A black ``h × w`` uint8 image with a white marker of ``frac`` of the side at the middle of each
    edge: top, bottom, left, right."""
    img = torch.zeros(h, w, dtype=torch.uint8)
    mh, mw = max(1, round(frac * h)), max(1, round(frac * w))
    img[:mh, w // 2 - mw // 2 : w // 2 + mw // 2 + 1] = 255  # top
    img[-mh:, w // 2 - mw // 2 : w // 2 + mw // 2 + 1] = 255  # bottom
    img[h // 2 - mh // 2 : h // 2 + mh // 2 + 1, :mw] = 255  # left
    img[h // 2 - mh // 2 : h // 2 + mh // 2 + 1, -mw:] = 255  # right
    return img


def edge_markers(x: torch.Tensor) -> dict[str, float]:
    """The brightest pixel of the outermost row / column of each edge of a [3, S, S] tensor."""
    x = x[0]
    return {"top": float(x[0].max()), "bottom": float(x[-1].max()), "left": float(x[:, 0].max()),
            "right": float(x[:, -1].max())}


@pytest.mark.parametrize("hw", [(300, 400), (400, 300), (120, 360), (360, 120)])  # 4:3, 3:4, 1:3, 3:1
def test_particular_object_transform_keeps_every_marker(hw):
    x = particular_object_transform(32, **UNIT)(marked_image(*hw))
    assert x.shape == (3, 32, 32)
    markers = edge_markers(x)
    assert all(v > 0.5 for v in markers.values()), markers


def test_particular_object_transform_is_a_plain_square_resize():
    img = torch.randint(0, 256, (3, 60, 180), dtype=torch.uint8)
    t = particular_object_transform(32, **UNIT)
    ref = TF.resize(img.float() / 255, [32, 32], antialias=True)
    assert torch.allclose(t(img), ref, atol=1e-6)
    # no augmentation
    assert torch.equal(t(img, torch.Generator().manual_seed(1)), t(img, torch.Generator().manual_seed(2)))


def test_category_eval_keeps_the_whole_width_of_a_4_3_image():
    """256×256 square resize then the centre 224 (our reading for evaluation): markers 1/8 of the
    width inside the left and right edges survive; a shorter-side resize + centre crop cuts them."""
    img = torch.zeros(300, 400, dtype=torch.uint8)
    img[140:160, 40:60] = 255  # left marker, 10-15 % of the width
    img[140:160, 340:360] = 255  # right marker, 85-90 %
    eval_tf = RetrievalTransform(28, train=False, **UNIT)
    x = eval_tf(img)[0]
    half = x.shape[1] // 2
    assert float(x[:, :half].max()) > 0.5 and float(x[:, half:].max()) > 0.5
    shorter_side = TF.center_crop(TF.resize(img[None].float() / 255, [32], antialias=True), [28, 28])[0]
    assert float(shorter_side[:, :half].max()) < 0.1  # what the former transform did


@pytest.mark.parametrize("train", [True, False])
def test_square_images_give_the_same_pixels_as_before(train):
    """The demo (Fashion-MNIST / digits, square images): the square resize equals the former
    shorter-side resize, so every tensor the demo trains and evaluates on is unchanged."""
    img = torch.randint(0, 256, (28, 28), dtype=torch.uint8)
    t = RetrievalTransform(28, train=train)
    x = img[None].expand(3, -1, -1).float() / 255
    x = TF.resize(x, [32], antialias=True)  # the former transform, written out
    g = torch.Generator().manual_seed(3)
    if train:
        top = int(torch.randint(0, 32 - 28 + 1, (1,), generator=g))
        left = int(torch.randint(0, 32 - 28 + 1, (1,), generator=g))
        x = x[..., top : top + 28, left : left + 28]
        if bool(torch.rand((), generator=g) < 0.5):
            x = x.flip(-1)
    else:
        x = TF.center_crop(x, [28, 28])
    ref = TF.normalize(x, list(t.mean), list(t.std))
    assert torch.equal(t(img, torch.Generator().manual_seed(3)), ref)


def test_resize_side_carries_the_papers_ratio():
    assert [resize_side(s) for s in (224, 28, 32, 384)] == [256, 32, 37, 439]


def test_category_train_transform_crops_and_flips_deterministically():
    train_tf = RetrievalTransform(28, train=True, **UNIT)
    img = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8)
    views = {tuple(train_tf(img, torch.Generator().manual_seed(s)).flatten()[:50].tolist()) for s in range(8)}
    assert len(views) > 1  # random crops / flips differ between seeds ...
    a = train_tf(img, torch.Generator().manual_seed(5))
    # ... reproducibly
    assert a.shape == (3, 28, 28) and torch.equal(a, train_tf(img, torch.Generator().manual_seed(5)))


def test_bad_size_is_an_error():
    with pytest.raises(ConfigError, match="size=0 must be a positive"):
        RetrievalTransform(0, train=False)


def _torchvision_transform(img, size, crop, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The evaluation transform through torchvision's functional API, as nbsrc computed it before its
    own resize / crop / normalise (the reference for bit-for-bit equality)."""
    if img.ndim == 2:
        img = img.unsqueeze(0)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    x = img.float().div_(255.0)
    if crop:
        side = resize_side(size)
        x = TF.center_crop(TF.resize(x, [side, side], antialias=True), [size, size])
    else:
        x = TF.resize(x, [size, size], antialias=True)
    return TF.normalize(x, list(mean), list(std))


def test_evaluation_transform_equals_torchvisions_bit_for_bit():
    """Up- and down-sizing, non-square inputs, grayscale, odd crops, and the no-op resize."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 240, 320), (3, 28, 28), (1, 28, 28), (28, 28), (3, 37, 19), (3, 500, 90), (3, 32, 32), (3, 224, 224)]
    for shape in shapes:
        img = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        for size in (28, 32, 29, 224):
            for crop in (True, False):
                got = RetrievalTransform(size, train=False, crop=crop)(img)
                assert torch.equal(got, _torchvision_transform(img, size, crop)), (shape, size, crop)


def test_grayscale_kept_as_one_channel_gives_the_numbers_of_its_rgb_form(tmp_path):
    """Index.build reads an 8-bit grayscale file as 1 x H x W (load_image keep_gray) and the
    transform repeats it to 3 channels after resizing: bit for bit what the RGB form gives, for the
    evaluation geometries and for a seeded training draw with DToP's scaling and illumination."""
    import numpy as np
    from PIL import Image

    from nbsrc.data.images import load_image

    g = torch.Generator().manual_seed(1)
    for shape in [(1, 28, 28), (1, 37, 19), (1, 240, 320)]:
        gray = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        rgb = gray.expand(3, -1, -1).contiguous()
        for size in (28, 29, 224):
            for crop in (True, False):
                tf = RetrievalTransform(size, train=False, crop=crop)
                assert torch.equal(tf(gray), tf(rgb)), (shape, size, crop)
            tf = RetrievalTransform(size, train=True, scale=(0.8, 1.0), brightness=0.4)
            a = tf(gray, torch.Generator().manual_seed(7))
            assert torch.equal(a, tf(rgb, torch.Generator().manual_seed(7))) and a.shape == (3, size, size)
    Image.fromarray(np.arange(12 * 10, dtype=np.uint8).reshape(12, 10), "L").save(tmp_path / "g.png")
    Image.fromarray(np.zeros((12, 10, 3), np.uint8), "RGB").save(tmp_path / "c.png")
    kept, full = load_image(tmp_path / "g.png", keep_gray=True), load_image(tmp_path / "g.png")
    assert kept.shape == (1, 12, 10) and full.shape == (3, 12, 10) and torch.equal(kept.expand(3, -1, -1), full)
    assert load_image(tmp_path / "c.png", keep_gray=True).shape == (3, 12, 10)  # colour stays colour
