"""``python -m nbsrc embed``, ``search`` and ``export``: your own images, indexed and searched; a model
as a file that runs without nbsrc.

::

    python -m nbsrc embed runs/irt_r photos/ --out photos_index       # a trained run
    python -m nbsrc embed efficientnet_lite0 photos/ --out photos_index  # offline ImageNet convnet
    python -m nbsrc embed vit_small_patch16_224 photos/ --out idx --weights timm
    python -m nbsrc search photos_index query.jpg -k 10 --grid hits.png
    python -m nbsrc export runs/irt_r --format onnx --out irt_r.onnx

``embed`` and ``search`` call :class:`nbsrc.retrieval.Index`, ``export``
:func:`nbsrc.retrieval.export.export_model`; :func:`add_subcommands` registers them on the main parser.
"""

from __future__ import annotations

import argparse
import sys

_SHOWN_SKIPS = 5


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` after a flag's help when X is a value (a default that depends on the
    model or the device is described in the help text itself)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool):
            return text
        return text + " (default: %(default)s)"


def add_subcommands(sub) -> None:
    """Add ``embed`` and ``search`` to the main parser's subparsers; each sets ``func``."""
    e = sub.add_parser(
        "embed", formatter_class=_Formatter,
        help="embed every image under a folder into a searchable index (resumable)",
        description="Embed every image under FOLDER (recursively; the first sub-folder of an image is its class, "
                    "when there are sub-folders) into the index directory --out: a faiss index, the image paths, the "
                    "model's weights and preprocessing. Interrupted, the same command resumes; unreadable images are "
                    "skipped and listed in OUT/skipped.tsv.")
    e.add_argument("model", metavar="MODEL",
                   help="a run directory (runs/irt_r), a preset (python -m nbsrc presets), a timm model name, or "
                        "efficientnet_lite0 (offline ImageNet weights)")
    e.add_argument("folder", metavar="FOLDER", help="folder of images (searched recursively)")
    e.add_argument("--out", required=True, metavar="INDEX_DIR", help="new or empty folder for the index (required)")
    e.add_argument("--weights", default=None,
                   help="for a preset or timm name: none | timm (hub, needs the internet) | efficientnet_lite0 | "
                        "checkpoint path (default for a timm name: timm; for a preset: its own)")
    from nbsrc.models.pooling import POOLINGS

    e.add_argument("--pooling", default=None, choices=tuple(POOLINGS),
                   help="for a timm name (default: cls for transformers, gem for convnets)")
    e.add_argument("--img-size", type=int, default=None,
                   help="input side in pixels, for a preset or timm name (default: the model's own)")
    e.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default: 256 on a GPU, 32 on the CPU)")
    e.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes decoding images (default: CPU cores - 1, at most 8; "
                        "none on a CPU of 2 cores or fewer)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    e.set_defaults(func=cmd_embed)

    s = sub.add_parser(
        "search", formatter_class=_Formatter,
        help="search an index with query images; print the top-k paths and scores",
        description="Print the K nearest indexed images of each QUERY_IMAGE, best first, with their cosine "
                    "similarity and class (when the indexed folder had class sub-folders).")
    s.add_argument("index", metavar="INDEX_DIR", help="an index directory written by nbsrc embed")
    s.add_argument("queries", metavar="QUERY_IMAGE", nargs="+", help="one or more query images")
    s.add_argument("-k", type=int, default=10, help="results per query")
    s.add_argument("--grid", metavar="OUT.png", default=None,
                   help="also save a picture of each query and its hits (.png or .pdf)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    s.set_defaults(func=cmd_search)

    from nbsrc.retrieval.export import FORMATS

    x = sub.add_parser(
        "export", formatter_class=_Formatter,
        help="write a trained model as TorchScript, ONNX or safetensors, with a JSON of its preprocessing",
        description="TorchScript and ONNX hold the final descriptor (backbone, pooling, PCA, l2: what nbsrc embed "
                    "computes), checked against the PyTorch model before they are kept; safetensors holds the "
                    "backbone's weights for timm.create_model(name, pretrained=True, "
                    "pretrained_cfg_overlay=dict(file=...)). OUT.json beside the file gives the model name, image "
                    "size, mean/std and the other settings needed to feed it.")
    x.add_argument("model", metavar="RUN",
                   help="a finished run directory (runs/irt_r); a preset or timm model name also works")
    x.add_argument("--format", required=True, choices=FORMATS, help="torchscript (.pt), onnx (.onnx) or "
                   "safetensors (.safetensors, the backbone only) (required)")
    x.add_argument("--out", default=None, metavar="PATH",
                   help="output file (default: <run name>.pt / .onnx / .safetensors in the current directory)")
    x.add_argument("--overwrite", action="store_true",
                   help="move an existing output (and its JSON) aside to <name>.old-<time>.<ext> first")
    x.set_defaults(func=cmd_export)


def _positive(value, flag: str) -> None:
    from nbsrc.errors import ConfigError

    if value is not None and value < 1:
        raise ConfigError(f"{flag} {value} is invalid: expected an integer >= 1")


def cmd_embed(ns) -> None:
    from pathlib import Path

    from nbsrc.config import check_device
    from nbsrc.errors import ConfigError
    from nbsrc.retrieval import Index, load_embedding_model

    check_device(ns.device, "--device")
    _positive(ns.batch_size, "--batch-size")
    _positive(ns.img_size, "--img-size")
    if ns.workers is not None and ns.workers < 0:
        raise ConfigError(f"--workers {ns.workers} is invalid: expected an integer >= 0")
    folder = Path(ns.folder)
    if not folder.is_dir():
        from nbsrc.errors import DatasetError

        raise DatasetError(f"image folder {folder} does not exist or is not a folder; pass a folder of images")
    model = load_embedding_model(ns.model, weights=ns.weights, pooling=ns.pooling, img_size=ns.img_size)
    index = Index.build(model, folder, ns.out, batch_size=ns.batch_size, device=ns.device,
                        num_workers=ns.workers, progress=ns.progress)
    m = index.manifest
    print(f"index {index.path}: {m['n_images']} images of {folder}, {m['dim']}-d, model {model.description}")
    if m["n_skipped"]:
        skipped = index.skipped
        print(f"skipped {len(skipped)} unreadable image(s), listed in {index.path / 'skipped.tsv'}:")
        for p, reason in skipped[:_SHOWN_SKIPS]:
            print(f"  {p}: {reason}")
        if len(skipped) > _SHOWN_SKIPS:
            print(f"  ... and {len(skipped) - _SHOWN_SKIPS} more")


def cmd_search(ns) -> None:
    from nbsrc.config import check_device
    from nbsrc.retrieval import Index

    check_device(ns.device, "--device")
    _positive(ns.k, "-k")
    if ns.grid is not None and not ns.grid.lower().endswith((".png", ".pdf")):
        from nbsrc.errors import ConfigError

        raise ConfigError(f"--grid {ns.grid}: expected a file name ending in .png or .pdf")
    index = Index.load(ns.index, device=ns.device)
    results = index.search(ns.queries, k=ns.k)
    print("\n".join(results.lines()))
    if ns.grid:
        from pathlib import Path

        fig = results.figure()
        out = Path(ns.grid)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
        fig.savefig(tmp, dpi=200)
        tmp.replace(out)
        print(f"grid saved to {out}", file=sys.stderr)


def cmd_export(ns) -> None:
    from nbsrc.retrieval.export import export_model

    done = export_model(ns.model, ns.format, ns.out, overwrite=ns.overwrite,
                        log=lambda line: print(line, file=sys.stderr))
    check = done.meta["check"]
    checked = (f"checked against the PyTorch model: max |difference| {check['max_abs_diff']:.1e} on "
               f"{check['images']} random images" if "max_abs_diff" in check else f"not checked: {check['skipped']}")
    what = "the backbone" if ns.format == "safetensors" else f"the {done.meta['dim']}-d descriptor"
    print(f"exported {what} of {ns.model} as {ns.format} to {done.path} (input {done.meta['img_size']} px); "
          f"{checked}; preprocessing in {done.meta_path}")
