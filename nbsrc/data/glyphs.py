"""CJK glyphs: an embedded many-class retrieval dataset rendered offline from Debian's font packages.

Each class is one CJK ideograph; its images are that ideograph drawn by every font face of
:data:`CJK_FONTS` (Japanese, Chinese and Korean type families: Mincho/Song and Gothic/Hei, brush,
handwriting and pen faces, thin to black weights). The classes come in three class-disjoint parts,
ImageNet → SOP in miniature (IRT §4: pretrain on ImageNet, fine-tune on the training classes of a
retrieval set, evaluate on its unseen test classes)::

    pretrain   classes    0 ..  999   the ImageNet stand-in (classification pretraining)
    train      classes 1000 .. 1499   the SOP-train stand-in (metric-learning fine-tuning)
    test       classes 1500 .. 1999   the SOP-test stand-in (query = gallery)

plus ``train_fit`` / ``train_val``, the training part split by class (the last 100 training classes
are the validation classes on which a recipe is chosen, never the test classes). A config selects a
part by name: ``train_classes="pretrain"``, ``test_classes="train_val"``; id ranges such as
``"1000-1399"`` and ``"all"`` (every class the other set does not name) work as for any dataset. A
config's ``data_root`` is the cache folder (None: the default below).

How it is built (:func:`build_glyphs`, deterministic, cached):

1. the faces of :data:`CJK_FONTS` are checked to be installed (a missing one is a one-line error
   that names its Debian package and the ``apt-get install`` command);
2. the characters are the ideographs of U+4E00–U+9FFF that every face maps in its ``cmap``,
   shuffled by a generator seeded with ``seed``; the first 2,000 are the classes, in that order;
3. each character is drawn by each face at ``font_size`` px (FreeType through Pillow's basic layout,
   anti-aliased), its ink cropped, shrunk to fit ``ink`` px if larger, and pasted centred into a
   black ``size`` × ``size`` square (white ink, uint8, like MNIST);
4. blank drawings are dropped (faces that map a code point to an empty glyph), then exact
   duplicates within a class (faces that share outlines draw the same bitmap: regional variants,
   proportional/monospace twins), then any bitmap that occurs in more than one class (it cannot
   be labelled);
5. the arrays go to ``<cache>/glyphs-<key>.npz`` and the metadata (faces, their Debian packages,
   versions and licences, characters, per-class and per-face counts, a SHA-256 of the arrays) to
   ``<cache>/glyphs-<key>.json``. ``<cache>`` is ``$NBSRC_DATA/glyphs`` or
   ``~/.cache/nbsrc/glyphs``; ``<key>`` hashes everything the bytes depend on (faces, package
   versions, font file sizes, parameters, Pillow and FreeType versions), so a change rebuilds
   into a new file and never overwrites an old one.

Why 32 × 32 with 28-px ink: a ViT with 4-px patches then sees 64 tokens (8 × 8), which trains at a
few hundred images per second on two CPU cores, while 28 px keeps the strokes of ideographs of up
to ~15 strokes apart. The 2-px margin survives the paper's transform (resize to
``round(32 · 256/224) = 37`` then a 32-px crop) without cutting ink.

The face list was chosen once, by hand and measurement: of the 145 faces with ideographs in the
Debian packages :data:`CJK_FONTS` comes from, a face was kept when its drawings of 200 random ideographs
differed from those of every face kept before it (in name order) by a mean absolute pixel
difference of at least 8/255. This drops the exact twins (``IPAPGothic`` = ``IPAGothic``, the TW/HK
cuts of AR PL, ``M PLUS 2`` = ``M PLUS 1``) and near-twins (``IPAmjMincho`` ≈ ``IPAMincho``,
``WenQuanYi Micro Hei`` ≈ ``Droid Sans Fallback``), and faces that draw no ideographs (Baekmuk
Headline, NanumSquare) or crash FreeType's hinting interpreter (Ume P Gothic S4/S5, Ume Gothic S5).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nbsrc.data.splits import ALL
from nbsrc.errors import ConfigError, DatasetError
from nbsrc.progress import progress as progress_bar

FORMAT_VERSION = 1  # bump when the rendering procedure changes what bytes a spec gives
CJK_BLOCK = (0x4E00, 0x9FFF)  # CJK Unified Ideographs
# (name, number of classes), in class-id order; see the module docstring
PARTS: tuple[tuple[str, int], ...] = (("pretrain", 1000), ("train", 500), ("test", 500))
VAL_CLASSES = 100  # the last VAL_CLASSES classes of "train" are "train_val", the others "train_fit"
SIZE, FONT_SIZE, INK = 32, 28, 28


@dataclass(frozen=True)
class FontFace:
    """One face: the file a Debian ``package`` installs at ``path``, face ``index`` of a collection."""

    package: str
    path: str
    index: int = 0

    @property
    def label(self) -> str:
        return f"{Path(self.path).name}#{self.index}" if self.index else Path(self.path).name


def _faces(package: str, folder: str, *names: str) -> tuple[FontFace, ...]:
    out = []
    for n in names:
        file, _, idx = n.partition("#")
        out.append(FontFace(package, f"{folder}/{file}", int(idx or 0)))
    return tuple(out)


_T, _O = "/usr/share/fonts/truetype", "/usr/share/fonts/opentype"
CJK_FONTS: tuple[FontFace, ...] = (
    *_faces("fonts-arphic-ukai", f"{_T}/arphic", "ukai.ttc"),  # AR PL UKai CN (brush kai)
    *_faces("fonts-arphic-uming", f"{_T}/arphic", "uming.ttc"),  # AR PL UMing CN
    *_faces("fonts-aoyagi-kouzan-t", f"{_T}/aoyagi-kouzan-t", "AoyagiKouzanT.ttf"),  # brush
    *_faces("fonts-morisawa-bizud-gothic", f"{_T}/bizud-gothic", "BIZUDGothic-Regular.ttf", "BIZUDGothic-Bold.ttf"),
    *_faces("fonts-morisawa-bizud-mincho", f"{_T}/bizud-mincho", "BIZUDMincho-Regular.ttf"),
    *_faces("fonts-baekmuk", f"{_T}/baekmuk", "batang.ttf", "dotum.ttf", "gulim.ttf"),
    *_faces("fonts-droid-fallback", f"{_T}/droid", "DroidSansFallbackFull.ttf"),
    *_faces("fonts-hanazono", f"{_T}/hanazono", "HanaMinA.ttf"),
    *_faces("fonts-ipafont-gothic", f"{_O}/ipafont-gothic", "ipag.ttf"),
    *_faces("fonts-ipafont-mincho", f"{_O}/ipafont-mincho", "ipam.ttf"),
    *_faces("fonts-ipaexfont-gothic", f"{_O}/ipaexfont-gothic", "ipaexg.ttf"),
    *_faces("fonts-ipaexfont-mincho", f"{_O}/ipaexfont-mincho", "ipaexm.ttf"),
    *_faces("fonts-klee", f"{_T}/klee", "KleeOne-Regular.ttf", "KleeOne-SemiBold.ttf"),  # pen handwriting
    *_faces("fonts-kouzan-mouhitsu", f"{_T}/kouzan-mouhitsu",  # brush: kaisho, gyosho, sosho (cursive)
            "kouzan-mouhitsu.ttf", "kouzan-mouhitsu-gyosho.ttf", "KouzanBrushFontSousyo.ttf"),
    *_faces("fonts-mplus", f"{_O}/mplus", "Mplus1-Black.otf", "Mplus1-Bold.otf", "Mplus1Code-ExtraLight.otf",
            "Mplus1Code-Light.otf", "Mplus1Code-Medium.otf", "Mplus1Code-Regular.otf", "Mplus1Code-SemiBold.otf",
            "Mplus1Code-Thin.otf", "Mplus1-ExtraBold.otf"),
    *_faces("fonts-migmix", f"{_T}/migmix", "migmix-1m-bold.ttf", "migmix-1m-regular.ttf", "migmix-2m-bold.ttf",
            "migmix-2m-regular.ttf"),
    *_faces("fonts-monapo", f"{_T}/monapo", "monapo.ttf"),
    *_faces("fonts-nanum", f"{_T}/nanum", "NanumBarunGothic.ttf", "NanumBarunGothicBold.ttf", "NanumGothic.ttf",
            "NanumGothicBold.ttf"),
    # Noto CJK collections: faces 0 JP, 2 SC, 4 HK (KR and TC draw ideographs as JP and HK do)
    *_faces("fonts-noto-cjk", f"{_O}/noto", "NotoSansCJK-Regular.ttc#4", "NotoSansCJK-Bold.ttc#4",
            "NotoSansCJK-Regular.ttc#0", "NotoSansCJK-Bold.ttc#0", "NotoSansCJK-Regular.ttc#2",
            "NotoSerifCJK-Regular.ttc#4", "NotoSerifCJK-Bold.ttc#4", "NotoSerifCJK-Regular.ttc#0",
            "NotoSerifCJK-Bold.ttc#0", "NotoSerifCJK-Regular.ttc#2", "NotoSerifCJK-Bold.ttc#2"),
    *_faces("fonts-horai-umefont", f"{_T}/horai-umefont", "ume-tgo4.ttf", "ume-tgc5.ttf", "ume-tmo3.ttf"),
    *_faces("fonts-unfonts-core", f"{_T}/unfonts-core", "UnBatang.ttf", "UnBatangBold.ttf", "UnDotum.ttf",
            "UnDotumBold.ttf", "UnGungseo.ttf"),  # UnGungseo: brush
    *_faces("fonts-vlgothic", f"{_T}/vlgothic", "VL-Gothic-Regular.ttf"),
    *_faces("fonts-wqy-zenhei", f"{_T}/wqy", "wqy-zenhei.ttc"),
)


def font_packages(fonts: tuple[FontFace, ...] = CJK_FONTS) -> list[str]:
    """The Debian packages that install ``fonts``, in first-use order (what ``make glyphs`` installs)."""
    return list(dict.fromkeys(f.package for f in fonts))


def check_fonts(fonts: tuple[FontFace, ...] = CJK_FONTS) -> None:
    """Raise a one-line :class:`DatasetError` naming the packages whose font files are missing."""
    missing = [f for f in fonts if not Path(f.path).is_file()]
    if missing:
        pkgs = font_packages(tuple(missing))
        raise DatasetError(
            f"glyphs: font package{'s' if len(pkgs) > 1 else ''} {', '.join(pkgs)} not installed "
            f"({missing[0].path} is missing); install with `apt-get install -y {' '.join(pkgs)}` as root, "
            "or run `make glyphs`"
        )


def package_versions(packages) -> dict[str, str]:
    """``{package: Debian version}`` from ``dpkg-query``; ``"unknown"`` where dpkg does not know it."""
    packages = list(packages)
    out = dict.fromkeys(packages, "unknown")
    try:
        res = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\t${Version}\n", *packages],
                             capture_output=True, text=True, check=False)
    except OSError:
        return out
    for line in res.stdout.splitlines():
        name, _, version = line.partition("\t")
        if name in out and version:
            out[name] = version
    return out


def package_licences(package: str) -> list[str]:
    """The licences of a package's files other than its Debian packaging, read from
    ``/usr/share/doc/<package>/copyright`` (DEP-5 ``Files``/``License`` stanzas; else the
    first "... LICENSE" heading)."""
    path = Path("/usr/share/doc") / package / "copyright"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    found = []
    for stanza in re.split(r"\n\s*\n", text):
        files = re.search(r"^Files:\s*(.+)$", stanza, re.M)
        lic = re.search(r"^License:\s*(.+)$", stanza, re.M)
        if files and lic and not files.group(1).strip().startswith("debian/"):
            found.append(lic.group(1).strip())
    if not found:
        heading = re.search(r"^\s*([A-Z][A-Z .-]*LICEN[SC]E)\s*$", text, re.M)
        found = [heading.group(1).strip().title()] if heading else []
    return list(dict.fromkeys(found))


def face_coverage(face: FontFace, block: tuple[int, int] = CJK_BLOCK) -> set[int]:
    """Code points of ``block`` (inclusive) that the face maps to a glyph in its ``cmap``."""
    from fontTools.ttLib import TTFont

    with TTFont(face.path, fontNumber=face.index, lazy=True) as f:
        cmap = f.getBestCmap() or {}
    lo, hi = block
    return {c for c in cmap if lo <= c <= hi}


def choose_characters(fonts: tuple[FontFace, ...], n: int, seed: int = 0,
                      block: tuple[int, int] = CJK_BLOCK) -> list[str]:
    """``n`` characters of ``block`` mapped by every face, in an order drawn with ``seed``.

    The pool is sorted by code point before the shuffle, so the same faces and seed give the same
    characters in the same order.
    """
    pool = set.intersection(*(face_coverage(f, block) for f in fonts)) if fonts else set()
    pool = sorted(pool)
    if len(pool) < n:
        raise DatasetError(
            f"glyphs: only {len(pool)} characters of U+{block[0]:04X}-U+{block[1]:04X} are in every one of "
            f"the {len(fonts)} faces, but {n} classes were asked for; ask for fewer classes or drop a face"
        )
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [chr(pool[i]) for i in order]


def load_face(face: FontFace, font_size: int = FONT_SIZE):
    """The face as a Pillow FreeType font with the basic layout engine (no Raqm: the bytes must
    not depend on which shaping library a machine has)."""
    from PIL import ImageFont

    return ImageFont.truetype(face.path, font_size, index=face.index, layout_engine=ImageFont.Layout.BASIC)


def render_glyph(font, char: str, size: int = SIZE, ink: int = INK) -> np.ndarray | None:
    """``char`` drawn white on black, its ink bounding box centred in a ``size`` × ``size`` uint8
    square (shrunk with Lanczos to fit ``ink`` px if larger); ``None`` when nothing is drawn."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (4 * size, 4 * size), 0)
    ImageDraw.Draw(canvas).text((size, size), char, fill=255, font=font)
    box = canvas.getbbox()
    if box is None:
        return None
    if box[0] == 0 or box[1] == 0 or box[2] == canvas.width or box[3] == canvas.height:
        raise DatasetError(f"glyphs: {char!r} drawn by {font.path} does not fit a {4 * size}-px canvas; "
                           "use a smaller font_size")
    glyph = canvas.crop(box)
    w, h = glyph.size
    if max(w, h) > ink:
        s = ink / max(w, h)
        glyph = glyph.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
        w, h = glyph.size
    out = Image.new("L", (size, size), 0)
    out.paste(glyph, ((size - w) // 2, (size - h) // 2))
    return np.asarray(out, dtype=np.uint8)


def remove_duplicates(drawings: list[list[tuple[int, np.ndarray]]]) -> tuple[list[list[tuple[int, np.ndarray]]], dict]:
    """Per class, a list of ``(face, image)``: keep the first of each exact duplicate within a class,
    then drop every bitmap that occurs in more than one class. Returns the kept lists and counts."""
    kept, owners = [], {}
    dup_within = 0
    for c, items in enumerate(drawings):
        seen, keep = set(), []
        for face, img in items:
            b = img.tobytes()
            if b in seen:
                dup_within += 1
                continue
            seen.add(b)
            keep.append((face, img))
            owners.setdefault(b, set()).add(c)
        kept.append(keep)
    shared = {b for b, cs in owners.items() if len(cs) > 1}
    n_shared = 0
    if shared:
        for c, items in enumerate(kept):
            before = len(items)
            kept[c] = [(f, im) for f, im in items if im.tobytes() not in shared]
            n_shared += before - len(kept[c])
    return kept, {"duplicates_within_class": dup_within, "shared_across_classes": n_shared}


def render_classes(fonts: tuple[FontFace, ...], chars: list[str], size: int = SIZE, font_size: int = FONT_SIZE,
                   ink: int = INK, progress: bool = False):
    """Draw every character with every face; return ``images`` (N × size × size uint8), ``labels``
    (class = position in ``chars``), ``faces`` (index into ``fonts``) and the counts of
    :func:`remove_duplicates` plus ``rendered`` and ``blank``."""
    drawings: list[list[tuple[int, np.ndarray]]] = [[] for _ in chars]
    blank = rendered = 0
    with progress_bar(len(fonts), "glyphs: font faces drawn", enabled=progress) as bar:  # a bar, or a line per 10 %
        for fi, face in enumerate(fonts):
            font = load_face(face, font_size)
            for c, ch in enumerate(chars):
                img = render_glyph(font, ch, size, ink)
                rendered += 1
                if img is None:
                    blank += 1
                else:
                    drawings[c].append((fi, img))
            bar.update()
    kept, counts = remove_duplicates(drawings)
    images = [im for items in kept for _, im in items]
    images = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
    labels = np.asarray([c for c, items in enumerate(kept) for _ in items], dtype=np.int64)
    faces = np.asarray([f for items in kept for f, _ in items], dtype=np.int16)
    return images, labels, faces, {"rendered": rendered, "blank": blank, **counts}


def content_hash(images: np.ndarray, labels: np.ndarray, faces: np.ndarray) -> str:
    """SHA-256 of the arrays' bytes (images uint8, labels int64 LE, faces int16 LE), in that order."""
    h = hashlib.sha256()
    for a, dt in ((images, np.uint8), (labels, "<i8"), (faces, "<i2")):
        h.update(np.ascontiguousarray(a, dtype=dt).tobytes())
    return h.hexdigest()


def part_ranges(parts=PARTS, val_classes: int = VAL_CLASSES) -> dict[str, tuple[int, int]]:
    """``{name: (first, last)}`` class ids (inclusive) of each part, with ``train_fit``/``train_val``
    splitting the part named ``train`` (its last ``val_classes`` classes are the validation ones)."""
    out, start = {}, 0
    for name, n in parts:
        out[name] = (start, start + n - 1)
        start += n
    if "train" in out and 0 < val_classes < out["train"][1] - out["train"][0] + 1:
        a, b = out["train"]
        out["train_fit"], out["train_val"] = (a, b - val_classes), (b - val_classes + 1, b)
    return out


def resolve_classes(spec, ranges: dict[str, tuple[int, int]]):
    """A part name (``"pretrain"``, ``"train"``, ``"train_fit"``, ``"train_val"``, ``"test"``) becomes its
    id range ``"a-b"``; ``"all"`` (any case) is returned as ``"all"``, every class the other set does not
    name, as for any dataset (:func:`nbsrc.data.splits.resolve_class_sets`); ids and ranges (``"0-4"``, a
    list) are returned unchanged."""
    if isinstance(spec, str) and re.fullmatch(r"\s*[A-Za-z_]+\s*", spec):
        if spec.strip().lower() == ALL:
            return ALL
        if spec.strip() not in ranges:
            raise ConfigError(f"class part {spec!r} is not one of the glyph parts {', '.join(ranges)} or {ALL!r}; "
                              "name a part, 'all' (every class the other set does not name) or class ids such as "
                              "'1000-1399'")
        a, b = ranges[spec.strip()]
        return f"{a}-{b}"
    return spec


def default_cache_dir() -> Path:
    env = os.environ.get("NBSRC_DATA")
    if env:
        return Path(env) / "glyphs"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nbsrc" / "glyphs"


@dataclass
class GlyphSet:
    """The rendered dataset: ``images`` (N × size × size uint8, white ink on black), ``labels``
    (class ids, parts contiguous), ``faces`` (which face drew each image), ``class_names``
    (``"U+4E00 一"``), ``parts`` (:func:`part_ranges`), ``meta`` (the JSON metadata) and ``path``."""

    images: np.ndarray
    labels: np.ndarray
    faces: np.ndarray
    class_names: list[str]
    parts: dict[str, tuple[int, int]]
    meta: dict = field(repr=False)
    path: Path | None = None


def _spec(fonts, parts, seed, block, size, font_size, ink, chars) -> dict:
    import PIL
    from PIL import features

    versions = package_versions(font_packages(fonts))
    return {
        "format": FORMAT_VERSION,
        "fonts": [[f.package, f.path, f.index, Path(f.path).stat().st_size] for f in fonts],
        "package_versions": versions,
        "parts": [list(p) for p in parts],
        "seed": seed, "block": list(block), "size": size, "font_size": font_size, "ink": ink,
        "chars": None if chars is None else "".join(chars),
        "pillow": PIL.__version__, "freetype": features.version("freetype2"),
    }


def write_atomic(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then renamed over it: a kill never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_glyphs(fonts: tuple[FontFace, ...] = CJK_FONTS, parts=PARTS, seed: int = 0,
                 block: tuple[int, int] = CJK_BLOCK, size: int = SIZE, font_size: int = FONT_SIZE,
                 ink: int = INK, chars: list[str] | None = None, cache_dir: str | Path | None = None,
                 val_classes: int = VAL_CLASSES, progress: bool = True) -> GlyphSet:
    """The glyph dataset, from its cache when built before with the same spec, else rendered and
    cached (see the module docstring). ``chars`` replaces the characters drawn from ``block``
    (then ``parts`` must add up to ``len(chars)``)."""
    fonts = tuple(fonts)
    check_fonts(fonts)
    n_classes = sum(n for _, n in parts)
    if chars is not None and len(chars) != n_classes:
        raise DatasetError(f"glyphs: {len(chars)} characters given for parts adding up to {n_classes} classes; "
                           "make them match")
    spec = _spec(fonts, parts, seed, block, size, font_size, ink, chars)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    npz, meta_path = cache / f"glyphs-{key}.npz", cache / f"glyphs-{key}.json"
    ranges = part_ranges(parts, val_classes)
    if meta_path.is_file() and npz.is_file():
        return _load(npz, meta_path, ranges)

    t0 = time.perf_counter()
    if chars is None:
        chars = choose_characters(fonts, n_classes, seed, block)
    images, labels, faces, counts = render_classes(fonts, chars, size, font_size, ink, progress)
    per_class = np.bincount(labels, minlength=n_classes)
    if n_classes and per_class.min() < 2:
        c = int(np.argmin(per_class))
        raise DatasetError(f"glyphs: class {c} ({chars[c]!r}) has {per_class[c]} distinct drawing(s) after "
                           "duplicates were removed; retrieval needs 2: add faces or choose other characters")
    versions = spec["package_versions"]
    meta = {
        "what": "CJK glyphs: one class per ideograph, one image per font face drawing it (nbsrc.data.glyphs)",
        "key": key, "spec": spec,
        "fonts": [{"package": f.package, "version": versions[f.package], "path": f.path, "index": f.index,
                   "images": int((faces == i).sum())} for i, f in enumerate(fonts)],
        "licences": {p: package_licences(p) for p in font_packages(fonts)},
        "characters": "".join(chars),
        "parts": {name: list(r) for name, r in ranges.items()},
        "counts": {**counts, "images": int(len(labels)), "classes": n_classes,
                   "per_class_min": int(per_class.min()), "per_class_mean": round(float(per_class.mean()), 2),
                   "per_class_max": int(per_class.max())},
        "per_class": per_class.tolist(),
        "sha256": content_hash(images, labels, faces),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    cache.mkdir(parents=True, exist_ok=True)
    def write_npz(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, images=images, labels=labels, faces=faces)

    write_atomic(npz, write_npz)
    write_atomic(meta_path, lambda p: p.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n"))
    return GlyphSet(images, labels, faces, _class_names(chars), ranges, meta, npz)


def _class_names(chars) -> list[str]:
    return [f"U+{ord(c):04X} {c}" for c in chars]


def _load(npz: Path, meta_path: Path, ranges) -> GlyphSet:
    meta = json.loads(meta_path.read_text())
    try:
        with np.load(npz) as f:
            images, labels, faces = f["images"], f["labels"], f["faces"]
    except (OSError, ValueError, KeyError) as e:
        raise DatasetError(f"glyphs: cache file {npz} is unreadable ({e}); delete it and {meta_path} to "
                           "rebuild") from None
    if content_hash(images, labels, faces) != meta["sha256"]:
        raise DatasetError(f"glyphs: cache file {npz} does not match the SHA-256 in {meta_path}; "
                           "delete both to rebuild")
    return GlyphSet(images, labels, faces, _class_names(meta["characters"]), ranges, meta, npz)


def load_glyphs(cache_dir: str | Path | None = None, progress: bool = True) -> GlyphSet:
    """The default glyph dataset (:data:`CJK_FONTS`, :data:`PARTS`, seed 0, 32 px), built on first use
    in ``cache_dir``; or, when ``cache_dir`` names a built set's file (``glyphs-<key>.npz`` or its
    ``.json``), that set whatever its spec (e.g. a small one built by :func:`build_glyphs` for a test)."""
    if cache_dir is not None and Path(cache_dir).suffix in (".npz", ".json"):
        return load_built(cache_dir)
    return build_glyphs(cache_dir=cache_dir, progress=progress)


def load_built(path: str | Path) -> GlyphSet:
    """The glyph set built before into ``path`` (its ``.npz`` or ``.json``), with the parts its metadata records."""
    npz, meta_path = Path(path).with_suffix(".npz"), Path(path).with_suffix(".json")
    if not (npz.is_file() and meta_path.is_file()):
        raise DatasetError(f"glyphs: {path} is not a built glyph set (need both {npz.name} and {meta_path.name}); "
                           "give the cache folder instead, or build the set with `python -m nbsrc.data.glyphs build`")
    meta = json.loads(meta_path.read_text())
    return _load(npz, meta_path, {name: tuple(r) for name, r in meta["parts"].items()})


def main(argv=None) -> int:
    """``python -m nbsrc.data.glyphs [build|packages|check]``: build (or find) the cached dataset and
    print a summary; print the Debian packages it needs (one line, for ``apt-get install``); or
    check that their fonts are installed (exit status 2 and the error if not)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m nbsrc.data.glyphs", description=main.__doc__)
    ap.add_argument("command", nargs="?", default="build", choices=["build", "packages", "check"])
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    if args.command == "packages":
        print(" ".join(font_packages()))
        return 0
    try:
        if args.command == "check":
            check_fonts()
            return 0
        t0 = time.perf_counter()
        g = load_glyphs(args.cache_dir)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = g.meta["counts"]
    print(f"glyphs: {c['images']} images of {c['classes']} classes ({c['per_class_min']}-{c['per_class_max']} per "
          f"class, mean {c['per_class_mean']}) from {len(g.meta['fonts'])} faces; parts "
          + ", ".join(f"{k} {a}-{b}" for k, (a, b) in g.parts.items())
          + f"; {g.path} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
