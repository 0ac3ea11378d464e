"""Reading image files: one decoder, one folder walk, one check, used wherever images are read.

Every image file the package opens (training, evaluation, SfM-120k mining, ``nbsrc embed`` /
``nbsrc search``) goes through :func:`load_image`, and every folder of images is listed by
:func:`list_images`.

**What load_image does.** It returns a uint8 RGB tensor ``3 x H x W``:

- EXIF orientation is applied (a portrait photo taken with the camera on its side is upright);
- 16-bit grayscale (PNG ``I;16``, TIFF ``I``) is scaled by ``255 / 65535`` to 8 bits instead of
  being clipped at 255, which would turn almost every pixel white; 32-bit float (``F``) images are
  read as intensities in [0, 1] when they fit there, otherwise in [0, 255] (clipped);
- transparency (RGBA, LA, palette with a transparent colour) is composited over white (our
  reading: transparent pixels are background; a plain conversion would show whatever colour the
  transparent pixels happen to store, often black);
- CMYK, palette and 1-bit images are converted to RGB by Pillow;
- an image with more than :data:`MAX_PIXELS` pixels is refused *before* it is decoded (the
  decompression-bomb guard: a 14,000 x 14,000 PNG is a few kB on disk and 588 MB in memory);
- anything that cannot be decoded (truncated JPEG, zero-byte file, a text file named ``.jpg``)
  raises :class:`~nbsrc.errors.DatasetError` with one line that names the file and the reason.

**The policy for bad files.** Two rules, so that a bad file never surfaces halfway through work:

1. *Training and evaluation data are checked before any work starts.* An image folder dataset
   (``dataset="folder"``) is checked when it is built (:func:`nbsrc.data.folder.scan_image_folder`
   calls :func:`check_images`); a run on other path-based datasets calls
   :func:`check_dataset_images` on each split before training. Any unreadable or unsafe file stops
   the run with one :class:`~nbsrc.errors.DatasetError` naming the file(s) and how to fix them; a
   partial dataset is never trained on silently.
2. *``nbsrc embed`` (a user's folder) skips bad files* and lists each with its reason in the
   index's report (``skipped.tsv``) and in the command's summary: one damaged photo among 100k does
   not stop an embedding that takes hours.

**The folder walk.** :func:`list_images` follows symbolic links to directories but enters each real
directory once, so a symlink loop or a link to ``.`` neither hangs nor lists a file twice; hidden
files and folders (``.name``) are skipped; the result is sorted.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from nbsrc.errors import DatasetError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
# Pillow's own default limit (about 89.5 Mpx, a 9,459 x 9,459 image): above it we refuse to decode.
MAX_PIXELS = 89_478_485
# At most this many files are named in a one-line error; the rest are counted.
_NAMED_IN_ERROR = 3


class _Unreadable(Exception):
    """Internal: why a file cannot be used (the text of the one-line error, without the path)."""


def _refuse_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise _Unreadable(
            f"{width} x {height} = {width * height / 1e6:.0f} Mpx, above the limit of {MAX_PIXELS / 1e6:.0f} Mpx "
            "(decompression-bomb guard); downscale it, remove it, or raise nbsrc.data.images.MAX_PIXELS "
            "if you trust the file"
        )


def _reason(path, e: Exception) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not an image Pillow can read" + (": the file is empty" if _is_empty(path) else "")
    if isinstance(e, FileNotFoundError):
        return "the file does not exist (a broken link?)"
    if isinstance(e, IsADirectoryError):
        return "a folder, not a file"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, EOFError,
                  Image.DecompressionBombError)


def _open(path: str | Path) -> Image.Image:
    """``Image.open`` with the size checked from the header, before anything is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError:
        with warnings.catch_warnings():  # the header alone is safe to read: report the size
            warnings.simplefilter("ignore")
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(path) as im:
                    w, h = im.size
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        _refuse_size(w, h)
        raise
    try:
        _refuse_size(*im.size)
    except _Unreadable:
        im.close()
        raise
    return im


def _decode(path, keep_gray: bool = False) -> Image.Image:
    try:
        with _open(path) as im:
            im.load()
            if im.getexif().get(0x0112, 1) != 1:  # transposing makes a copy: only when needed
                im = ImageOps.exif_transpose(im)
            if keep_gray and im.mode == "L":
                return im
            return to_rgb(im)
    except _DECODE_ERRORS as e:
        raise _Unreadable(_reason(path, e)) from None


def _header(path) -> tuple[int, int]:
    try:
        with _open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except _DECODE_ERRORS as e:
        raise _Unreadable(_reason(path, e)) from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, with 16-bit scaling and transparency over white (module docstring)."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im, dtype=np.float64)
        a = np.clip(a, 0, 65535) * (255.0 / 65535.0)
        return Image.fromarray(np.rint(a).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0)
        scale = 255.0 if a.size and a.min() >= 0 and a.max() <= 1 else 1.0
        return Image.fromarray(np.rint(np.clip(a * scale, 0, 255)).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(path: str | Path | BinaryIO, name: str | None = None, keep_gray: bool = False) -> Image.Image:
    """The image at ``path`` (or in an open binary file) as an upright RGB ``PIL.Image`` (see the
    module docstring), or a one-line :class:`~nbsrc.errors.DatasetError` naming the file (or
    ``name``, e.g. "the uploaded image"). ``keep_gray``: an 8-bit grayscale image (mode ``L``)
    stays ``L`` (its RGB form repeats it in three channels)."""
    try:
        return _decode(path, keep_gray)
    except _Unreadable as e:
        raise DatasetError(f"cannot decode image {name or path} ({e}); remove or replace the file") from None


def _is_empty(path) -> bool:
    try:
        if hasattr(path, "getbuffer"):  # an in-memory file
            return path.getbuffer().nbytes == 0
        return os.path.getsize(path) == 0
    except (OSError, TypeError):
        return False


def load_image(path: str | Path | BinaryIO, name: str | None = None, keep_gray: bool = False) -> torch.Tensor:
    """Read an image file as a uint8 RGB tensor ``3 x H x W`` (:func:`decode_image`).

    ``keep_gray``: an 8-bit grayscale file gives ``1 x H x W`` instead, the one channel its RGB form
    repeats; :class:`~nbsrc.data.transforms.RetrievalTransform` repeats it after resizing, with the
    same numbers, at a third of the resizing work (``Index.build`` reads folders this way)."""
    im = decode_image(path, name, keep_gray)
    a = np.array(im, dtype=np.uint8)
    if a.ndim == 2:
        return torch.from_numpy(a).unsqueeze(0)
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of the image as :func:`load_image` returns it (EXIF rotation applied),
    read from the header only."""
    try:
        return _header(path)
    except _Unreadable as e:
        raise DatasetError(f"cannot decode image {path} ({e}); remove or replace the file") from None


# ----------------------------------------------------------------------------- folders
def list_images(root: str | Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Every file under ``root`` (recursively) whose extension is an image extension, sorted.

    Symbolic links to directories are followed, but each real directory is entered once (real
    folders before links, then in sorted order: the first path that reaches it wins), so a link
    loop or a link to ``.`` is harmless and a linked folder is listed once.
    Hidden files and directories (names starting with ``.``) are skipped. A link to a file is
    listed under the link's path; a broken link is listed too and fails when read."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a folder; pass a folder of images")
    exts = {e.lower() for e in extensions}
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if d.startswith("."):
                continue
            try:
                sub = os.stat(full)
            except OSError:  # a broken link to a directory
                continue
            if (sub.st_dev, sub.st_ino) not in seen:
                keep.append((os.path.islink(full), d))
        dirnames[:] = [d for _, d in sorted(keep)]  # real folders before links: a folder keeps its own name
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts]
    return sorted(found)


# ----------------------------------------------------------------------------- checks
def image_problem(path: str | Path, decode: bool = True) -> str | None:
    """Why ``path`` cannot be used (one line, without the path), or None when it reads.
    ``decode=False`` checks the header only (format, size limit): it misses truncated files but
    costs almost nothing."""
    try:
        _decode(path) if decode else _header(path)
    except _Unreadable as e:
        return str(e)
    return None


def scan_images(paths: Sequence[str | Path], decode: bool = True, workers: int | None = None,
                progress: bool = False) -> list[tuple[Path, str]]:
    """``[(path, reason), ...]`` for every image of ``paths`` that cannot be read, in input order;
    empty when all are fine. Images are decoded in ``workers`` threads (Pillow decodes outside the
    GIL; default: the CPU count, at most 8). Call it on a dataset's files before training."""
    from nbsrc.progress import progress as progress_bar

    paths = [Path(p) for p in paths]
    workers = workers or min(8, os.cpu_count() or 1)
    bad = []
    with progress_bar(len(paths), "check images", enabled=progress) as bar, ThreadPoolExecutor(workers) as pool:
        for p, problem in zip(paths, pool.map(lambda q: image_problem(q, decode), paths, chunksize=64), strict=True):
            if problem is not None:
                bad.append((p, problem))
            bar.update(1)
    return bad


def describe_bad_images(bad: Sequence[tuple[Path, str]], where: str) -> str:
    """One line naming the first few bad files of ``where`` and their reasons."""
    named = "; ".join(f"{p} ({reason})" for p, reason in bad[:_NAMED_IN_ERROR])
    more = f"; and {len(bad) - _NAMED_IN_ERROR} more" if len(bad) > _NAMED_IN_ERROR else ""
    return f"{len(bad)} unreadable image(s) in {where}: {named}{more}"


def check_images(paths: Sequence[str | Path], where: str, decode: bool = True, progress: bool = False) -> None:
    """Raise one :class:`~nbsrc.errors.DatasetError` naming the unreadable images of ``paths``
    (:func:`scan_images`) before any work starts; a file checked unchanged before (same size and
    modification time) in this process is not decoded again."""
    todo = [p for p in paths if _stamp(p) not in _CHECKED]
    bad = scan_images(todo, decode=decode, progress=progress) if todo else []
    bad_set = {p for p, _ in bad}
    _CHECKED.update(s for p in todo if Path(p) not in bad_set and (s := _stamp(p)) is not None)
    if bad:
        every = " (nbsrc.data.images.scan_images lists them all)" if len(bad) > _NAMED_IN_ERROR else ""
        raise DatasetError(describe_bad_images(bad, where) + f"; remove or replace these files{every}")


def check_dataset_images(dataset, where: str, decode: bool = True, progress: bool = False) -> None:
    """:func:`check_images` on a :class:`~nbsrc.data.RetrievalDataset` whose items are file paths;
    nothing to do for a dataset held in memory."""
    images = getattr(dataset, "images", None)
    if images is None or (isinstance(images, np.ndarray) and images.dtype != object):
        return
    paths = [p for p in images if isinstance(p, (str, Path))]
    if paths:
        check_images(paths, where, decode=decode, progress=progress)


_CHECKED: set[tuple[str, int, int]] = set()


def _stamp(path) -> tuple[str, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)
