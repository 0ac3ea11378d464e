"""Embedding an image folder: nbsrc's :meth:`nbsrc.retrieval.Index.build` against a direct loop.

Both embed the same folder of generated JPEGs with the same network (one
:func:`~nbsrc.retrieval.models.load_embedding_model` object, EfficientNet-Lite0 with its offline
ImageNet weights by default), in rounds that alternate which goes first; each round is timed whole.

- **nbsrc**: ``Index.build(model, folder, out_dir)`` with its defaults: listing and header check,
  JPEG decoding, the evaluation transform, batching (DataLoader workers), model, normalisation,
  writing the index to disk.
- **direct**: the loop one writes without nbsrc: ``PIL.Image.open(...).convert("RGB")``, torchvision
  ``Resize((S, S))`` + ``CenterCrop(size)`` + ``ToTensor`` + ``Normalize`` (the same square
  geometry), batches of ``--direct-batch`` images, the model under ``torch.inference_mode``,
  ``F.normalize``, ``np.save``.

The images are ``--images`` generated JPEGs (``--source generated``, the default) or, with
``--source run`` and a run directory as ``--model``, that run's query images (the demo's glyphs or
Fashion-MNIST for a demo run; at most ``--per-class`` of each class), written as PNG files in class
folders by :func:`nbsrc.retrieval.export_split_images`.

Reported: per method the median seconds per round and img/s, and ``direct / nbsrc`` (speed of nbsrc
relative to the direct loop; target >= 0.95) as the median over rounds of the per-round ratio with
a 95% bootstrap interval over rounds; and how far the two embeddings are apart (they differ by the
resize kernels: PIL on uint8 against torchvision on float tensors).

    python -m bench embed --images 64 --rounds 3
    python -m bench embed --source run --model runs/glyphs/pretrain_b61eec08 --per-class 4
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench import timed_rounds
from nbsrc.config import upgrade
from nbsrc.errors import ConfigError


def make_jpegs(root: Path, n: int, width: int, height: int, n_classes: int = 4, seed: int = 0) -> Path:
    """``n`` smooth random-colour JPEGs of ``width × height`` in ``n_classes`` class folders of ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"class{i % n_classes}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((width, height), Image.BILINEAR)
        img.save(d / f"img{i:05d}.jpg", quality=90)
    return root


def direct_embed(model: torch.nn.Module, paths: list[Path], img_size: int, resize: int, mean, std,
                 batch: int, out: Path) -> np.ndarray:
    """The obvious loop: PIL + torchvision transforms + the model in inference mode, then np.save."""
    import torchvision.transforms as T
    from PIL import Image

    tf = T.Compose([T.Resize((resize, resize)), T.CenterCrop(img_size), T.ToTensor(), T.Normalize(mean, std)])
    model.eval()
    chunks = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i:i + batch]])
            chunks.append(F.normalize(model(x).float(), dim=-1))
    z = torch.cat(chunks).numpy()
    np.save(out, z)
    return z


def bench_embed(n_images: int = 64, width: int = 320, height: int = 240, rounds: int = 3,
                model: str = "efficientnet_lite0", direct_batch: int = 32, threads: int | None = None, seed: int = 0,
                source: str = "generated", per_class: int | None = None) -> dict:
    """Median seconds per round of nbsrc's ``Index.build`` and the direct loop over the same
    ``n_images`` generated JPEGs, their paired speed ratio and the embeddings' distance."""
    from bench.train import paired_ratio, verdict
    from nbsrc.data.images import list_images
    from nbsrc.retrieval import Index
    from nbsrc.retrieval.models import load_embedding_model

    if n_images < 2 or rounds < 1 or direct_batch < 1:
        raise ConfigError(f"images={n_images}, rounds={rounds}, direct_batch={direct_batch}: need >= 2, >= 1, >= 1")
    if source not in ("generated", "run"):
        raise ConfigError(f"source={source!r} is invalid: expected 'generated' (JPEGs) or 'run' (the run's query "
                          "images)")
    if per_class is not None and per_class < 1:
        raise ConfigError(f"per_class={per_class} is invalid: expected a positive number of images per class, "
                          "or None for all")
    if source == "run" and not (Path(model) / "config.json").exists():
        raise ConfigError(f"source='run' takes its images from a run: --model must be a run directory, not {model!r}")
    if threads:
        torch.set_num_threads(threads)
    em = load_embedding_model(model)
    pre = em.preprocessing
    work = Path(tempfile.mkdtemp(prefix="nbsrc_bench_embed_"))
    try:
        if source == "run":
            from nbsrc.retrieval import export_split_images

            folder = export_split_images(model, work / "photos", per_class=per_class)
        else:
            folder = make_jpegs(work / "photos", n_images, width, height, seed=seed)
        paths = sorted(list_images(folder))
        n_images = len(paths)
        if n_images < 2:
            raise ConfigError(f"the run {model} has {n_images} query image(s): the benchmark needs at least 2")
        def nbsrc_round(r: int):
            idx = Index.build(em, folder, work / f"index{r}", device="cpu", progress=False, log=None)
            return idx

        def direct_round(r: int):
            return direct_embed(em.model, paths, pre.img_size, pre.resize, pre.mean, pre.std, direct_batch,
                                work / f"direct{r}.npy")

        times, result = timed_rounds({"nbsrc": nbsrc_round, "direct": direct_round}, rounds)
        idx, z_direct = result["nbsrc"], result["direct"]
        z_nbsrc = np.load(idx.path / "embeddings.npy").astype(np.float32)  # listing order, stored as float16
        order = {Path(p).resolve(): i for i, p in enumerate(paths)}
        listed = [order[Path(idx.listing.path(i)).resolve()] for i in range(len(z_nbsrc))]
        cos = (z_nbsrc * z_direct[listed]).sum(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = paired_ratio(times["direct"], times["nbsrc"])
    med = {k: statistics.median(v) for k, v in times.items()}
    dataset = upgrade(em.reference["config"])["data"]["dataset"] if source == "run" else None
    what = (f"query images of the run's dataset ({dataset}) as PNG" if source == "run"
            else f"generated JPEGs of {width}x{height}")
    return {"model": model, "images": n_images, "photo": what, "img_size": pre.img_size,
            "rounds": rounds, "direct_batch": direct_batch, "threads": torch.get_num_threads(),
            "round_s": times, "median_s": med, "img_per_s": {k: n_images / v for k, v in med.items()},
            "nbsrc_over_direct": ratio["median"], "ci95": ratio["ci95"], "of_medians": ratio["of_medians"],
            "verdict": verdict(ratio["median"], ratio["ci95"], 0.95),
            "cosine_min": float(cos.min()), "loadavg": os.getloadavg()}


def results_markdown(r: dict, info: dict, note: str = "") -> str:
    """The ``embed`` section of bench/RESULTS.md."""
    from bench import machine_lines

    lo, hi = r["ci95"]
    s = (machine_lines(info, note)
         + f"- setup: {r['model']} at {r['img_size']} px, {r['images']} {r['photo']} in class folders, "
         f"torch threads {r['threads']}, {r['rounds']} rounds alternating which method goes first, each round timed "
         f"whole; direct loop in batches of {r['direct_batch']}\n"
         f"- load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in r['loadavg'])}\n"
         "- statistic: median over rounds of the per-round ratio direct time / nbsrc time, [95% bootstrap interval]; "
         "in brackets, the ratio of the median times\n\n"
         "| method | median s / round | img/s |\n|---|---|---|\n"
         + "".join(f"| {k} | {r['median_s'][k]:.2f} | {r['img_per_s'][k]:.1f} |\n" for k in ("nbsrc", "direct"))
         + f"\n| nbsrc speed / direct loop | target | verdict |\n|---|---|---|\n"
         f"| {r['nbsrc_over_direct']:.3f} [{lo:.3f}, {hi:.3f}] ({r['of_medians']:.3f}) | >= 0.95 "
         f"| {r['verdict']} |\n\n")
    if r["cosine_min"] is not None:
        s += ("Embeddings (nbsrc's stored as float16): the lowest cosine between nbsrc's and the direct loop's "
              "embedding of the same image is "
              f"{r['cosine_min']:.4f} (they differ by the resize kernels: PIL on uint8 vs torchvision on float).\n\n")
    s += (f"Reading: `Index.build` with its defaults embeds the folder at {r['nbsrc_over_direct']:.3f}x the speed of "
          f"the direct loop (target >= 0.95: {r['verdict']}).\n")
    return s


def add_arguments(p) -> None:
    p.add_argument("--images", type=int, default=64, help="generated JPEGs")
    p.add_argument("--source", choices=("generated", "run"), default="generated",
                   help="generated JPEGs, or the query images of the run given as --model")
    p.add_argument("--per-class", type=int, default=None, help="--source run: at most this many images of each class")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="efficientnet_lite0", help="a spec for nbsrc.retrieval.load_embedding_model")
    p.add_argument("--direct-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's count)")


def run(a, results_path=None, note: str = "") -> dict:
    import json

    from bench import RESULTS_PATH, machine_info, write_section

    r = bench_embed(a.images, a.width, a.height, a.rounds, a.model, a.direct_batch, a.threads or None, source=a.source,
                    per_class=a.per_class)
    print(json.dumps(r, indent=2))
    # one section per source: the generated photos and a run's own images are two different workloads
    section = "embed" if a.source == "generated" else "embed-run"
    write_section(section, results_markdown(r, machine_info(), note), results_path or RESULTS_PATH)
    return r
