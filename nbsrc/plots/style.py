"""The one style of every figure: fonts, sizes, palette, model colours, and how figures are saved.

Every function in :mod:`nbsrc.plots.figures` draws inside ``matplotlib.rc_context(STYLE)``, so the
figures look the same whether or not a notebook called :func:`use_style`; call it to give your own
figures the same look. :func:`save_figure` writes ``<name>.png`` (300 dpi) and ``<name>.pdf``
atomically under stable names.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
from cycler import cycler

from nbsrc.errors import ConfigError

# seaborn's "colorblind" palette (Wong 2011), as hex, so that importing the style needs no seaborn.
PALETTE: list[str] = [
    "#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc",
    "#ca9161", "#fbafe4", "#949494", "#ece133", "#56b4e9",
]
HIT_COLOR, MISS_COLOR, QUERY_COLOR = PALETTE[2], PALETTE[3], PALETTE[0]  # green, vermillion, blue

# Fixed colours for the models the paper compares; any other name gets a stable colour from the rest.
MODEL_COLORS: dict[str, str] = {
    "IRT_O": PALETTE[7],  # off-the-shelf: grey
    "IRT_L": PALETTE[0],  # contrastive, λ = 0
    "IRT_R": PALETTE[3],  # contrastive + KoLeo
    "off-the-shelf": PALETTE[7],
    "convnet": PALETTE[5],
}
_OTHER_COLORS = [c for c in PALETTE if c not in (PALETTE[7], PALETTE[0], PALETTE[3], PALETTE[5])]

# Figure widths in inches: one column and the full width of a two-column paper (CVPR/ICML-like).
SINGLE_COLUMN = 3.3
DOUBLE_COLUMN = 6.9
SAVE_DPI = 300
SAVE_FORMATS = ("png", "pdf")

STYLE: dict = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "figure.titlesize": 10,
    "axes.prop_cycle": cycler(color=PALETTE),
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.5,
    "lines.markersize": 4,
    "legend.frameon": False,
    "figure.dpi": 100,
    "figure.constrained_layout.use": True,
    "savefig.dpi": SAVE_DPI,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.05,  # thick frames (retrieval grid) reach past the axes
    "pdf.fonttype": 42,  # TrueType in PDFs: text stays editable and searchable
    "ps.fonttype": 42,
    "image.cmap": "viridis",
}


def use_style() -> dict:
    """Apply :data:`STYLE` to matplotlib's global ``rcParams`` and return it."""
    mpl.rcParams.update(STYLE)
    return STYLE


def color_for(name: str) -> str:
    """The colour of a model or series name: fixed for the paper's models (``IRT_O`` grey,
    ``IRT_L`` blue, ``IRT_R`` vermillion, ``convnet`` brown), and for any other name one of the
    remaining palette colours chosen by a CRC32 of the name, so it is the same in every figure,
    session and process (unlike ``hash``)."""
    if name in MODEL_COLORS:
        return MODEL_COLORS[name]
    return _OTHER_COLORS[zlib.crc32(str(name).encode()) % len(_OTHER_COLORS)]


def colors_for(names: Sequence[str]) -> dict[str, str]:
    """:func:`color_for` of each name, made distinct within one figure: a name whose hashed colour an earlier
    name already took gets the next colour of the palette that none has (in order), so two series never share
    a colour while the palette lasts (the study's two convnet recipes hashed to the same green)."""
    out: dict[str, str] = {}
    for name in names:
        c = color_for(str(name))
        if name not in MODEL_COLORS and c in out.values():
            start = _OTHER_COLORS.index(c)
            c = next((o for o in _OTHER_COLORS[start:] + _OTHER_COLORS[:start] if o not in out.values()), c)
        out[name] = c
    return out


def figsize(columns: int = 1, aspect: float = 0.75, rows: int = 1) -> tuple[float, float]:
    """``(width, height)`` in inches: one (``columns=1``) or two (``columns=2``) paper columns
    wide, ``rows`` panels of height ``aspect`` × the width of one panel column."""
    if columns not in (1, 2):
        raise ConfigError(f"columns={columns!r} is invalid: expected 1 (single column) or 2 (full width)")
    width = SINGLE_COLUMN if columns == 1 else DOUBLE_COLUMN
    return width, SINGLE_COLUMN * aspect * rows


def save_figure(fig, name: str, out_dir: str | os.PathLike = "figures") -> list[Path]:
    """Write ``fig`` to ``out_dir/<name>.png`` (300 dpi) and ``out_dir/<name>.pdf``; return the paths.

    Atomic: each file is first rendered to a hidden temporary file in ``out_dir`` and only when
    both have been written are they moved into place with ``os.replace``. If rendering fails, the
    temporary files are removed and any previous ``<name>.png`` / ``<name>.pdf`` stay untouched, so
    a reader never sees a half-written figure. The PDF carries no creation date, so the same figure
    gives the same bytes and a rerun leaves version control clean.
    """
    if not name or Path(name).name != name or name.startswith("."):
        raise ConfigError(f"figure name {name!r} is invalid: give a plain file stem such as 'fig2_pca_energy'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    finals = [out / f"{name}.{fmt}" for fmt in SAVE_FORMATS]
    temps: list[Path] = []
    try:
        for fmt in SAVE_FORMATS:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".{fmt}.tmp", dir=out)
            temps.append(Path(tmp))
            with os.fdopen(fd, "wb") as fh:
                meta = {"CreationDate": None} if fmt == "pdf" else {}  # no timestamp: same figure, same bytes
                fig.savefig(fh, format=fmt, dpi=SAVE_DPI, bbox_inches="tight", pad_inches=0.05, metadata=meta)
                fh.flush()
                os.fsync(fh.fileno())
        mode = 0o666 & ~_umask()  # mkstemp makes 0600 files; give the figures the usual permissions
        for tmp, final in zip(temps, finals, strict=True):
            os.chmod(tmp, mode)
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return finals


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
