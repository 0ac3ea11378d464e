"""Training-step cost of the full DToP model relative to the plain ViT of the same backbone (issue:
at most 1.5×). Both take the same batches, loss (ArcFace) and optimiser (SGD); their steps
alternate within one run, the order switching every step, so that both see the same machine load.
The cost ratio is the median over steps of the per-step ratio DToP / ViT, with a 95% bootstrap
interval (:func:`bench.train.paired_ratio`); the target is met when the whole interval is at
most 1.5.

    python -m bench dtop --img-size 64 --batch 16 --steps 30
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench import timed_rounds
from bench.train import paired_ratio, verdict
from nbsrc.losses.arcface import ArcFaceLoss
from nbsrc.models import build_model


def _train_step(model, loss_fn, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()


def bench_dtop_vs_vit(
    backbone: str = "vit_tiny_patch16_224",
    img_size: int = 64,
    batch: int = 16,
    steps: int = 10,
    device: str = "cpu",
    patch_size: int | None = None,
    warmup: int = 2,
    num_classes: int = 10,
    seed: int = 0,
    **dtop_options,
) -> dict:
    """Median seconds per training step of DToP (``build_model(backbone, dtop=True,
    **dtop_options)``, full model by default) and of the plain ViT (``pooling='cls'``); ``ratio``:
    the median per-step ratio DToP / ViT, ``ratio_ci95`` its 95% bootstrap interval, ``verdict``
    against the 1.5 budget."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    models = {
        "dtop": build_model(backbone, img_size=img_size, patch_size=patch_size, dtop=True, **dtop_options),
        "vit": build_model(backbone, pooling="cls", img_size=img_size, patch_size=patch_size),
    }
    setups = {}
    for name, model in models.items():
        model.to(dev).train()
        loss_fn = ArcFaceLoss(num_classes, model.feature_dim).to(dev)
        opt = torch.optim.SGD(list(model.parameters()) + list(loss_fn.parameters()), lr=1e-3, momentum=0.9)
        setups[name] = (model, loss_fn, opt)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(warmup + steps):  # one batch per round, the same for both models
        x = torch.randn(batch, 3, img_size, img_size, generator=gen)
        batches.append((x.to(dev), torch.randint(0, num_classes, (batch,), generator=gen).to(dev)))
    times, _ = timed_rounds({name: (lambda r, s=setups[name]: _train_step(*s, *batches[r])) for name in setups},
                            steps, dev, warmup)
    dtop_s, vit_s = statistics.median(times["dtop"]), statistics.median(times["vit"])
    paired = paired_ratio(times["dtop"], times["vit"])  # per step: DToP seconds / ViT seconds
    return {
        "backbone": backbone, "img_size": img_size, "batch": batch, "steps": steps, "device": str(dev),
        "dtop_step_s": dtop_s, "vit_step_s": vit_s, "ratio": paired["median"], "ratio_ci95": paired["ci95"],
        "ratio_of_medians": paired["of_medians"], "verdict": verdict(paired["median"], paired["ci95"], 1.5, False),
        "dtop_params": sum(p.numel() for p in models["dtop"].parameters()),
        "vit_params": sum(p.numel() for p in models["vit"].parameters()),
    }


def results_markdown(r: dict, info: dict, note: str = "") -> str:
    """The ``dtop`` section of bench/RESULTS.md."""
    from bench import machine_lines

    lo, hi = r["ratio_ci95"]
    return (machine_lines(info, note)
            + f"- setup: {r['backbone']}, img {r['img_size']}, patch {r['patch_size']}, batch {r['batch']}, "
            f"{r['steps']} timed steps each (alternating, order switched every step), device {r['device']}\n"
            f"- statistic: median over steps of the per-step ratio DToP / ViT, [95% bootstrap interval]; in "
            f"brackets after it, the ratio of the median step times\n"
            f"- parameters: DToP {r['dtop_params']:,} vs ViT {r['vit_params']:,}\n\n"
            f"| DToP step / ViT step | target | verdict |\n|---|---|---|\n"
            f"| {r['ratio']:.2f} [{lo:.2f}, {hi:.2f}] ({r['ratio_of_medians']:.2f}) | <= 1.5 | {r['verdict']} |\n\n"
            f"Reading: a full DToP training step costs {r['ratio']:.2f}x the plain ViT step "
            f"(budget 1.5x: {r['verdict']}).\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")


def run(a, results_path=None, note: str = "") -> dict:
    """Run the bench from parsed arguments, print the JSON and write the ``dtop`` section."""
    from bench import RESULTS_PATH, machine_info, write_section

    r = bench_dtop_vs_vit(a.backbone, a.img_size, a.batch, a.steps, a.device, a.patch_size, a.warmup)
    r["patch_size"] = a.patch_size
    print(json.dumps(r, indent=2))
    write_section("dtop", results_markdown(r, machine_info(), note), results_path or RESULTS_PATH)
    return r
