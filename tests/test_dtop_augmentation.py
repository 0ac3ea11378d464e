"""DToP's training augmentation. Supplementary §A.1: "We apply random cropping, illumination and
scaling augmentation" — no ranges are given; ours (``DTOP_AUGMENTATION``, our reading) are a random
window of relative side s ∈ [0.8, 1] and a brightness factor b ∈ [0.6, 1.4]. The tests check that
each draw stays in its range, reaches both ends, that nothing changes when it is off (training
draws of every other run unchanged), and that the DToP presets, and only they, switch it on."""

import pytest
import torch

from nbsrc.config import ExperimentConfig
from nbsrc.data.group_sampler import training_sampler
from nbsrc.data.transforms import DTOP_AUGMENTATION, RetrievalTransform, training_transform
from nbsrc.errors import ConfigError
from nbsrc.presets import list_presets, load_preset

RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # no normalisation: the output is the pixel value


def test_our_reading_of_the_ranges():
    assert DTOP_AUGMENTATION == {"scale": (0.8, 1.0), "brightness": 0.4}


def test_illumination_multiplies_every_pixel_by_one_factor_in_range():
    tf = RetrievalTransform(8, train=True, resize=False, brightness=0.4, **RAW)
    img = torch.full((3, 8, 8), 100, dtype=torch.uint8)  # 100/255 ≈ 0.392: never clipped (1.4 × 0.392 < 1)
    factors = []
    for i in range(400):
        out = tf(img, torch.Generator().manual_seed(i))
        assert torch.allclose(out, out.flatten()[0].expand_as(out))  # one factor for the whole image
        factors.append(float(out.flatten()[0]) / (100 / 255))
    assert 0.6 - 1e-6 <= min(factors) < 0.62 and 1.38 < max(factors) <= 1.4 + 1e-6
    bright = torch.full((3, 4, 4), 250, dtype=torch.uint8)
    outs = [tf(bright, torch.Generator().manual_seed(i)) for i in range(50)]
    assert max(float(o.max()) for o in outs) == 1.0  # clipped to [0, 1]


def test_scaling_takes_a_window_of_the_image_in_range():
    """A 100 × 60 image whose pixel (r, c) holds (r, c, 0): the output (no resize) is the window
    rows top..top+h, columns left..left+w, with h/100 and w/60 both s ∈ [0.8, 1]."""
    rows = torch.arange(100).view(100, 1).expand(100, 60)
    cols = torch.arange(60).view(1, 60).expand(100, 60)
    img = torch.stack([rows, cols, torch.zeros_like(rows)]).to(torch.uint8)
    tf = RetrievalTransform(8, train=True, resize=False, scale=(0.8, 1.0), **RAW)
    sides, flipped = [], 0
    for i in range(300):
        out = (tf(img, torch.Generator().manual_seed(i)) * 255).round().long()
        h, w = out.shape[-2:]
        assert 80 <= h <= 100 and 48 <= w <= 60 and abs(h / 100 - w / 60) <= 1 / 60  # one s for both sides
        top, left = int(out[0, 0, 0]), int(out[1, 0, :].min())
        assert torch.equal(out[0, :, 0], torch.arange(top, top + h))
        assert sorted(out[1, 0].tolist()) == list(range(left, left + w))  # the columns (maybe flipped)
        flipped += int(out[1, 0, 0] > out[1, 0, -1])
        sides.append(h / 100)
    assert min(sides) < 0.82 and max(sides) > 0.98 and 0 < flipped < 300


def test_off_and_at_evaluation_nothing_changes():
    img = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    plain = RetrievalTransform(16, train=True)
    assert torch.equal(training_transform(16)(img, torch.Generator().manual_seed(3)),
                       plain(img, torch.Generator().manual_seed(3)))  # same draws as before the option existed
    on = training_transform(16, dtop_augmentation=True)
    assert on.scale == (0.8, 1.0) and on.brightness == 0.4
    assert not torch.equal(on(img, torch.Generator().manual_seed(3)), plain(img, torch.Generator().manual_seed(3)))
    ev = RetrievalTransform(16, train=False, scale=(0.8, 1.0), brightness=0.4)
    assert torch.equal(ev(img), RetrievalTransform(16, train=False)(img))


def test_group_size_batches_keep_the_augmentation():
    """The group-size path keeps the transform's size (resize=False) and its DToP augmentation."""
    from nbsrc.data.datasets import RetrievalDataset

    imgs = torch.randint(0, 256, (8, 3, 24, 32), dtype=torch.uint8).numpy()
    ds = RetrievalDataset(imgs, [0, 0, 1, 1, 2, 2, 3, 3], training_transform(16, dtop_augmentation=True))
    cfg = ExperimentConfig(sampler="group_size", batch_size=4, m_per_class=2, iterations=2, img_size=16, patch_size=8)
    _, train_ds, _ = training_sampler(cfg, ds)
    assert train_ds.transform.resize is False and train_ds.transform.brightness == 0.4


@pytest.mark.parametrize("bad", [dict(scale=(0.0, 1.0)), dict(scale=(0.9, 0.8)), dict(brightness=1.0)])
def test_bad_ranges_are_refused(bad):
    with pytest.raises(ConfigError, match="is invalid"):
        RetrievalTransform(16, train=True, **bad)


def test_on_in_the_dtop_presets_only():
    for name in list_presets():
        assert load_preset(name).data.dtop_augmentation == name.startswith("dtop_"), name
    with pytest.raises(ConfigError, match="dtop_augmentation"):
        ExperimentConfig(dtop_augmentation="yes").validate()
