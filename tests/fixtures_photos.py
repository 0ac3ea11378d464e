"""Generated photo folders for the retrieval tests: random crops of three real photographs shipped
with scikit-learn (china.jpg, flower.jpg) and matplotlib (grace_hopper.jpg)."""

from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image


def _sources() -> dict[str, Image.Image]:
    """Three real photographs shipped with scikit-learn and matplotlib."""
    from sklearn.datasets import load_sample_image

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return {"china": Image.fromarray(load_sample_image("china.jpg")),
            "flower": Image.fromarray(load_sample_image("flower.jpg")),
            "hopper": Image.open(hopper).convert("RGB")}


def _crop(im: Image.Image, rng) -> Image.Image:
    w, h = im.size
    s = rng.uniform(0.55, 0.9)
    cw, ch = int(w * s), int(h * s)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    c = im.crop((x, y, x + cw, y + ch)).resize((int(cw * 0.5), int(ch * 0.5)))
    return c.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else c


def make_photo_folder(root: Path, per_class: int = 4, seed: int = 0) -> dict[str, Path]:
    """``root/<class>/<i>.jpg``: random crops of three photographs; returns one held-out query
    crop per class (outside ``root``)."""
    rng = np.random.default_rng(seed)
    queries = {}
    for name, im in _sources().items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _crop(im, rng).save(root / name / f"{i}.jpg", quality=90)
        queries[name] = root.parent / f"query_{name}.jpg"
        _crop(im, rng).save(queries[name], quality=90)
    return queries


def make_drawn_folder(root: Path, n_classes: int = 20, per_class: int = 4, size: int = 48, seed: int = 0,
                      singles: tuple[int, ...] = ()) -> list[str]:
    """``root/<class>/<i>.png``: class ``c`` is one drawn shape (3 to 7 corners) in one of four colours on
    one of two backgrounds, so every class differs from the others; each image moves, scales and turns it
    (seeded). Classes in ``singles`` get one image. Returns the class names (``c00``, ``c01``, ...)."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    colours = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (230, 200, 30)]
    names = []
    for c in range(n_classes):
        name = f"c{c:02d}"
        names.append(name)
        (root / name).mkdir(parents=True)
        corners, colour, background = 3 + c % 5, colours[(c // 5) % 4], (0, 0, 0) if c < 10 else (255, 255, 255)
        for i in range(1 if c in singles else per_class):
            im = Image.new("RGB", (size, size), background)
            cx, cy = rng.uniform(0.4, 0.6, 2) * size
            r, turn = rng.uniform(0.25, 0.4) * size, rng.uniform(0, 2 * np.pi)
            angles = turn + np.arange(corners) * 2 * np.pi / corners
            ImageDraw.Draw(im).polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles], fill=colour)
            im.save(root / name / f"{i}.png")
    return names
