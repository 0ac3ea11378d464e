"""An index's manifest.json describes the category-level evaluation geometry truly: a user who embeds a
4:3 (or 3:4) photo by following its ``preprocessing`` words alone, with torchvision's transforms and not
nbsrc's, gets the index's row back (cosine >= 0.9999); timm's aspect-kept evaluation (shorter side,
then a centre crop) does not."""

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from fixtures_photos import _sources
from PIL import Image

from nbsrc.retrieval import Index, load_embedding_model

IMG = 64


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos") / "photos"
    root.mkdir()
    china = _sources()["china"]  # 640 x 427
    china.crop((0, 0, 560, 420)).save(root / "landscape_4x3.jpg", quality=95)
    china.crop((100, 0, 415, 420)).save(root / "portrait_3x4.jpg", quality=95)
    model = load_embedding_model("efficientnet_lite0", img_size=IMG)
    return Index.build(model, root, tmp_path_factory.mktemp("idx") / "index", batch_size=2, num_workers=0,
                       progress=False, log=None)


def embed_by_the_words(index, path, pp: dict, keep_aspect: bool) -> np.ndarray:
    """The manifest's steps with torchvision: RGB scaled to [0, 1]; resize to ``pp["resize"]`` (h, w),
    bilinear, antialiased (or, with ``keep_aspect``, timm's shorter side to that size); centre crop
    ``pp["crop_size"]``; normalise; then the index's network."""
    x = TF.to_dtype(TF.pil_to_tensor(Image.open(path).convert("RGB")), torch.float32, scale=True)
    size = pp["resize"][:1] if keep_aspect else pp["resize"]
    x = TF.resize(x, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=pp["antialias"])
    x = TF.normalize(TF.center_crop(x, pp["crop_size"]), pp["mean"], pp["std"])
    with torch.no_grad():
        z = index.model(x[None])[0].numpy()
    return z / np.linalg.norm(z)


def test_following_the_manifest_with_torchvision_gives_the_index_row(index):
    pp = json.loads((index.path / "manifest.json").read_text())["preprocessing"]
    assert pp["keep_aspect_ratio"] is False and pp["crop"] == "center" and pp["interpolation"] == "bilinear"
    assert pp["resize"] == [round(IMG * 256 / 224)] * 2 and pp["crop_size"] == [IMG, IMG]
    rows = np.load(index.path / "embeddings.npy").astype(np.float32)
    for row in range(len(index)):
        path = index.listing.path(row)
        assert Image.open(path).size[0] != Image.open(path).size[1]  # a 4:3 or 3:4 photo
        stored = rows[row] / np.linalg.norm(rows[row])
        assert float(embed_by_the_words(index, path, pp, keep_aspect=False) @ stored) >= 0.9999
        assert float(embed_by_the_words(index, path, pp, keep_aspect=True) @ stored) < 0.999  # the other reading
