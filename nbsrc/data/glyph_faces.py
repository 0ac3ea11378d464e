"""A glyph set restricted to some font faces: the study's pretraining data have another look than its
fine-tuning data (IRT §4: ImageNet's photographs before SOP's product shots).

:data:`HAND_FACES` are the brush, handwriting and pen faces of :data:`nbsrc.data.glyphs.CJK_FONTS`
(kaisho, gyosho and sosho brushes, a pen hand); every other face is a print face (Mincho/Song, Gothic/Hei,
Batang/Dotum, rounded and monospace cuts). :func:`face_subset` writes the images of the faces kept as a
built glyph set of its own (same classes, parts and ``faces`` indices; a ``face_subset`` record in its
metadata), beside the source; a config names it with ``data_root=<its .npz>``. The pretraining runs on
the print faces of the pretraining classes; fine-tuning and evaluation see every face, so the brush and
handwriting faces are new to the pretrained model (our reading of "another look")."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from nbsrc.data.glyphs import GlyphSet, content_hash, load_built, write_atomic
from nbsrc.errors import ConfigError

# The faces of CJK_FONTS drawn by a brush or a pen, by file name (a collection's face: "name#index").
HAND_FACES: tuple[str, ...] = (
    "ukai.ttc",  # AR PL UKai: brush kaisho
    "AoyagiKouzanT.ttf",  # brush
    "KleeOne-Regular.ttf", "KleeOne-SemiBold.ttf",  # pen handwriting
    "kouzan-mouhitsu.ttf", "kouzan-mouhitsu-gyosho.ttf", "KouzanBrushFontSousyo.ttf",  # brush: kaisho, gyosho, sosho
    "UnGungseo.ttf",  # brush
)



def face_labels(glyphs: GlyphSet) -> list[str]:
    """The label of each face of ``glyphs`` (file name, ``#index`` for a collection's face other than the
    first), in the order of its ``faces`` indices."""
    return [Path(f["path"]).name + (f"#{f['index']}" if f.get("index") else "") for f in glyphs.meta["fonts"]]


def face_subset(glyphs: GlyphSet, exclude=HAND_FACES) -> Path:
    """Write (once) the images of ``glyphs`` whose face is not in ``exclude`` (labels, :func:`face_labels`)
    as a built glyph set ``<source stem>-faces-<hash>.npz`` (+ ``.json``) beside ``glyphs.path``, and return
    the ``.npz`` path. A label that is not a face of the set, an ``exclude`` that drops no face or every
    face, and a class that would keep fewer than 2 images (retrieval needs 2) are one-line errors."""
    labels = face_labels(glyphs)
    unknown = sorted(set(exclude) - set(labels))
    if unknown:
        raise ConfigError(f"face_subset: {', '.join(unknown)} is not a face of the glyph set {glyphs.path}; "
                          f"its faces are {', '.join(labels)}")
    drop = [i for i, name in enumerate(labels) if name in set(exclude)]
    if not drop or len(drop) == len(labels):
        raise ConfigError(f"face_subset: exclude names {len(drop)} of the {len(labels)} faces; keep some and drop some")
    if glyphs.path is None:
        raise ConfigError("face_subset: the glyph set has no file (build it with nbsrc.data.glyphs.build_glyphs)")
    keep = ~np.isin(glyphs.faces, drop)
    digest = hashlib.sha256(json.dumps([glyphs.meta["sha256"], sorted(exclude)]).encode()).hexdigest()[:8]
    npz = Path(glyphs.path).with_name(f"{Path(glyphs.path).stem}-faces-{digest}.npz")
    if npz.is_file() and npz.with_suffix(".json").is_file():
        return npz
    images, labels_, faces = glyphs.images[keep], glyphs.labels[keep], glyphs.faces[keep]
    counts = np.bincount(labels_, minlength=len(glyphs.class_names))
    if counts.min() < 2:
        raise ConfigError(f"face_subset: class {int(counts.argmin())} keeps {int(counts.min())} image(s) without "
                          f"{', '.join(exclude)}; retrieval needs 2 a class: exclude fewer faces")
    meta = {**glyphs.meta, "sha256": content_hash(images, labels_, faces),
            "counts": {**glyphs.meta.get("counts", {}), "images": int(keep.sum()), "per_class_min": int(counts.min()),
                       "per_class_mean": round(float(counts.mean()), 2), "per_class_max": int(counts.max())},
            "per_class": counts.tolist(),
            "face_subset": {"source": Path(glyphs.path).name, "source_sha256": glyphs.meta["sha256"],
                            "excluded": sorted(exclude), "kept": [n for i, n in enumerate(labels) if i not in drop]}}

    def write_npz(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, images=images, labels=labels_, faces=faces)

    write_atomic(npz, write_npz)
    write_atomic(npz.with_suffix(".json"),
                  lambda p: p.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n"))
    load_built(npz)  # its hash checks out
    return npz
