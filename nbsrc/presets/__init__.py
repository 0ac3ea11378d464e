"""Presets: the papers' rows as ready configs (IRT Tables 2-9; DToP Tables A5, A7-A13).

One JSON file per row in this folder, named after the row: ``irt_r_sop_deits`` is IRT_R
(contrastive loss + KoLeo, IRT eq. 5) on Stanford Online Products with DeiT-S; ``_dist`` marks a
distilled DeiT (DeiT-S†, DeiT-B†), ``_128`` the PCA to 128 components (▷128), ``384`` a 384-px
input, ``r50`` / ``r101`` the convnet rows; ``dtop_full_r50vitb16_sfm`` is the full DToP model of
Tables A7-A13 and ``dtop_a5_*`` the backbone benchmark of Table A5 (one branch, no ELM, N = 768).
A file holds the :class:`~nbsrc.config.ExperimentConfig` fields of the row by section, in the
saved form of ``config.json`` (every setting the paper states is the paper's; docs/fidelity.md lists
each one), and a ``"paper"`` block that is not a config field: the paper, table, row label, the
reported numbers exactly as printed (``null`` where the table prints none), optional ``grids`` (the
paper's ablation tables around this row, with their numbers: :func:`preset_grid_tables`) and notes
that say which settings are our reading. ``python -m nbsrc.presets.rewrite`` rewrites a preset added
in the older flat form in this one (:func:`upgrade_preset`; the flat form loads too)::

    cfg = load_preset("irt_r_cub_deits", data_root="/data/CUB_200_2011")
    python -m nbsrc train --preset irt_r_cub_deits --data-root /data/CUB_200_2011
    python -m nbsrc presets                       # the table in docs/presets.md

The run is named after the preset unless ``name=`` overrides it. This package only loads, lists
and describes the presets (it imports the config and nothing that runs); running them is the
runner layer's: :func:`nbsrc.paper.reproduce.preset_grid` turns a recorded grid into configs, and
:func:`nbsrc.paper.reproduce.evaluate_benchmarks` (notebook 09) puts a model's numbers beside the paper's.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any

from nbsrc.config import SECTIONS, ExperimentConfig, upgrade
from nbsrc.errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- loading
def list_presets() -> list[str]:
    """The preset names, sorted."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def _read(name: str) -> dict[str, Any]:
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        names = list_presets()
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; `python -m nbsrc presets` lists the {len(names)} presets")
    return upgrade_preset(json.loads(path.read_text()))


def upgrade_preset(d: dict[str, Any]) -> dict[str, Any]:
    """A preset file's dict in today's form: its config by section (:func:`nbsrc.config.upgrade`, each
    section's fields in their dataclass's order), then its ``paper`` block, whose grid rows name DToP's
    fields directly (an older preset held them under ``model_options``). A preset in today's form
    comes back unchanged."""
    paper = d.get("paper")
    config = upgrade({k: v for k, v in d.items() if k != "paper"})
    out: dict[str, Any] = {"format": config.pop("format")}
    for section, cls in SECTIONS.items():
        if section in config:
            order = [f.name for f in dataclasses.fields(cls)]
            fields = config.pop(section)
            out[section] = None if fields is None else {k: fields[k] for k in sorted(fields, key=order.index)}
    if paper is not None:
        paper = copy.deepcopy(paper)
        for grid in paper.get("grids", []):
            rows = grid.get("args", {}).get("overrides", {})
            for label, row in rows.items():
                if "model_options" in row:
                    options = {k: v for k, v in row["model_options"].items() if k != "dtop"}
                    rows[label] = {**{k: v for k, v in row.items() if k != "model_options"}, **options}
        out["paper"] = paper
    return out


def preset_dict(name: str) -> dict[str, Any]:
    """The config of preset ``name`` in its saved form (``{"format": 2, section: {field: value}}``; the
    ``paper`` block stripped, ``run.name`` set to the preset's)."""
    d = _read(name)
    d.pop("paper", None)
    d["run"] = {"name": name, **(d.get("run") or {})}
    return d


def preset_paper(name: str) -> dict[str, Any]:
    """The preset's ``paper`` block: ``paper``, ``table``, ``row``, ``results`` ({benchmark: {metric:
    value or None}}) and ``notes``."""
    return _read(name)["paper"]


def load_preset(name: str, /, **overrides: Any) -> ExperimentConfig:
    """The validated :class:`~nbsrc.config.ExperimentConfig` of preset ``name``, with ``overrides``
    (config fields, e.g. ``data_root=...``, ``device="cuda"``, even ``name=...``) applied on top."""
    return ExperimentConfig.from_layers(preset_dict(name), overrides)


# ----------------------------------------------------------------------------- the paper's grids
def preset_grid_tables(name: str) -> list[str]:
    """The tables of the grids recorded in preset ``name``'s paper block (e.g. ``['5']``, ``['A7', 'A8']``)."""
    return [g["table"] for g in preset_paper(name).get("grids", [])]


# ----------------------------------------------------------------------------- the table of docs/presets.md
def _fmt(v) -> str:
    return "–" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _paper_numbers(results: dict) -> str:
    parts = []
    for bench, metrics in results.items():
        shown = " / ".join(_fmt(v) for v in metrics.values())
        parts.append(f"{bench} {'/'.join(metrics)}: {shown}")
    return "; ".join(parts)


def preset_table() -> str:
    """A markdown table with one row per preset: the paper row it reproduces, the settings that
    differ between presets, and the paper's numbers (– where not recorded)."""
    head = ("| preset | paper, table | row | dataset | backbone | loss (β, λ) | memory | optimizer, lr | "
            "iterations | image | dim | paper's numbers | grids |")
    # loss column: contrastive (β, λ) for IRT, arcface (margin, scale) for DToP
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in list_presets():
        c, p = load_preset(name), preset_paper(name)
        trained = c.optim.iterations > 0
        if not trained:
            loss = "none (off-the-shelf)"
        elif c.loss.name == "arcface":
            loss = f"arcface (m {_fmt(c.loss.arcface_margin)}, s {_fmt(c.loss.arcface_scale)})"
        else:
            loss = f"{c.loss.name} ({_fmt(c.loss.beta)}, {_fmt(c.loss.lam)})"
        optim = f"{c.optim.optimizer}, {c.optim.lr:g}" if trained else "–"
        lines.append(
            f"| `{name}` | {p['paper']} {p['table']} | {p['row']} | {c.data.dataset} | `{c.model.backbone}` | {loss} | "
            f"{c.loss.memory_size} | {optim} | {c.optim.iterations} | {c.data.img_size} | "
            f"{_fmt(c.model.dim)} | {_paper_numbers(p['results'])} | {', '.join(preset_grid_tables(name)) or '–'} |"
        )
    return "\n".join(lines) + "\n"
