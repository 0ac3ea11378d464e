"""Training throughput of nbsrc's step against a direct reference loop and the bare backbone.

Three methods take turns step by step on the same machine within one run (A B C, B C A, C A B, ...),
each step timed on its own with ``time.perf_counter`` (CUDA synchronised before and after), on the same
pre-generated batches, after ``warmup`` untimed steps each; ``steps × repeats`` timed steps per
method. Data loading is outside the timed step (the batches sit on the CPU, as a DataLoader hands
them over; the copy to the device is inside, as in the loop).

- **nbsrc**: :func:`nbsrc.train.loop.train_step`, the loop's own step, on a
  :func:`~nbsrc.models.model_from_config` model with :func:`~nbsrc.losses.build_loss` (contrastive,
  IRT eq. 1, over batch × batch and batch × XBM memory, + λ · KoLeo, eq. 5),
  :func:`~nbsrc.train.loop.build_optimizer` and the warm-up/cosine scheduler: forward, loss, the
  finiteness check, backward, gradient clipping, optimiser and scheduler step, memory enqueue.
- **reference**: the same timm backbone written the most direct way, with
  ``pytorch_metric_learning``'s ``ContrastiveLoss(pos_margin=1, neg_margin=beta,
  distance=CosineSimilarity())`` inside its ``CrossBatchMemory``, KoLeo written inline, the same
  optimiser, clipping and precision.
- **bare**: the backbone's forward + backward + optimiser step with a trivial loss (mean square).

Reported: median img/s per method (``batch / median step time``); ``ratio = nbsrc / reference``
(target >= 1) and ``overhead = 1 − nbsrc / bare`` (target <= 5% on CPU), each as the median over
rounds of the per-round speed ratio (the methods of one round share the machine's state, so drift and
bursts of load cancel) with a 95% bootstrap interval over rounds, and as the ratio of the medians.
The verdict on a target says "met" only when the whole interval clears it. Beside the steps, the
part in which nbsrc and the reference differ, the loss over batch × (batch + memory) with KoLeo and
its backward, is timed alone the same way (``loss_ms``). On CUDA the execution
switches (bf16 autocast, fused AdamW, pinned memory + non_blocking, torch.compile) are each turned
off from the baseline and the nbsrc step's speed-up ``on / off`` is reported the same way.

    python -m bench train --batch 64 --steps 3 --repeats 5 --threads 1
"""

from __future__ import annotations

import os
import re
import statistics

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from bench import rotation, timed, timed_rounds
from nbsrc.config import ExperimentConfig
from nbsrc.data import MPerClassBatchSampler
from nbsrc.errors import ConfigError
from nbsrc.models import model_from_config
from nbsrc.train.loop import amp_settings, build_step_parts, resolve_device, train_step
from nbsrc.train.pair_task import PairTask

METHODS = ("nbsrc", "reference", "bare")


# ----------------------------------------------------------------------------- data
class SyntheticImages(Dataset):
    """``n`` fixed random uint8 images of ``n_classes`` classes; an item is converted to a
    normalised float tensor the way a ``ToTensor`` + ``Normalize`` transform would."""

    def __init__(self, n: int, n_classes: int, img_size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, img_size, img_size), dtype=torch.uint8, generator=g)
        self.labels = np.arange(n) % n_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        return (self.images[i].float() / 255.0 - 0.5) / 0.25, int(self.labels[i]), int(i)


def make_batches(cfg: ExperimentConfig, ds: SyntheticImages, n: int) -> list[tuple[torch.Tensor, ...]]:
    """``n`` batches ``(x, y, idx)`` of the m-per-class sampler, drawn once and shared by every method."""
    sampler = MPerClassBatchSampler(ds.labels, cfg.optim.batch_size, cfg.optim.m_per_class, n, cfg.run.seed)
    return [tuple(b) for b in DataLoader(ds, batch_sampler=sampler)]


def _pinned(batches: list[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.pin_memory() for t in b) for b in batches]


def _unit(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=gen), dim=-1)


# ----------------------------------------------------------------------------- the three steps
class NbsrcStep:
    """:func:`nbsrc.train.loop.train_step`, the body of the training loop (logging and checkpointing
    aside), on parts built as :func:`~nbsrc.train.loop.fit` builds them, for a pair task."""

    def __init__(self, cfg: ExperimentConfig, device: torch.device, n_train: int):
        torch.manual_seed(cfg.run.seed)
        self.cfg, self.it = cfg, 0
        self.task = PairTask(cfg, None, list(range(n_train)))
        self.parts = build_step_parts(cfg, model_from_config(cfg), self.task, device)

    def prefill(self, gen: torch.Generator, n_classes: int, first_index: int) -> None:
        """Fill the memory with random unit vectors (dataset indices >= ``first_index``, so no
        batch sample is masked as its own copy), as it is after the first iterations."""
        memory, device = self.task.memory, self.parts.device
        if memory is not None:
            m = memory.size
            memory.enqueue(_unit(m, memory.feature_dim, gen).to(device),
                           torch.randint(0, n_classes, (m,), generator=gen).to(device),
                           torch.arange(first_index, first_index + m).to(device))

    def __call__(self, x, y, idx) -> None:
        train_step(self.cfg, self.parts, (x, y, idx), it=self.it)
        self.it += 1


def _timm_backbone(cfg: ExperimentConfig, device: torch.device) -> torch.nn.Module:
    import timm

    from nbsrc.models import has_patch_grid

    torch.manual_seed(cfg.run.seed)
    kw = {"img_size": cfg.data.img_size} if has_patch_grid(cfg.model.backbone) else {}
    if cfg.model.patch_size is not None:
        kw["patch_size"] = cfg.model.patch_size
    return timm.create_model(cfg.model.backbone, num_classes=0, **kw).to(device).train()


def _direct_adamw(cfg: ExperimentConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    fused = cfg.run.fused_optimizer and next(model.parameters()).is_cuda
    return torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                             fused=fused or None)


def inline_koleo(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (IRT eq. 5) as one writes it inline: -mean log ‖z_i − z_nn(i)‖, nearest neighbour by
    inner product (DINO's implementation)."""
    with torch.no_grad():
        sim = z @ z.T
        sim.fill_diagonal_(-2.0)
        nn_idx = sim.argmax(dim=1)
    return -torch.log((z - z[nn_idx]).norm(dim=1) + eps).mean()


class ReferenceStep:
    """The direct loop: timm backbone, pytorch-metric-learning contrastive loss inside its
    CrossBatchMemory, inline KoLeo, AdamW, gradient clipping."""

    def __init__(self, cfg: ExperimentConfig, device: torch.device, feature_dim: int | None = None):
        from pytorch_metric_learning.distances import CosineSimilarity
        from pytorch_metric_learning.losses import ContrastiveLoss
        from pytorch_metric_learning.losses import CrossBatchMemory as PMLCrossBatchMemory

        self.cfg, self.device = cfg, device
        self.model = _timm_backbone(cfg, device)
        self.net = torch.compile(self.model) if cfg.run.compile and device.type == "cuda" else self.model
        feature_dim = feature_dim or self.model.num_features
        loss = ContrastiveLoss(pos_margin=1, neg_margin=cfg.loss.beta, distance=CosineSimilarity())
        self.loss = PMLCrossBatchMemory(loss, embedding_size=feature_dim,
                                        memory_size=max(cfg.loss.memory_size, cfg.optim.batch_size))
        self.optimizer = _direct_adamw(cfg, self.model)
        self.amp_on, self.amp_dtype = amp_settings(cfg, device)
        self.pin = cfg.run.pin_memory and device.type == "cuda"

    def prefill(self, gen: torch.Generator, n_classes: int, first_index: int) -> None:
        m, dim = self.loss.memory_size, self.loss.embedding_size
        self.loss.add_to_memory(_unit(m, dim, gen), torch.randint(0, n_classes, (m,), generator=gen), m)

    def __call__(self, x, y, idx) -> None:
        x, y = x.to(self.device, non_blocking=self.pin), y.to(self.device, non_blocking=self.pin)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_on):
            z = self.net(x)
        z = F.normalize(z.float(), dim=-1)
        loss = self.loss(z, y) + self.cfg.loss.lam * inline_koleo(z)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()


class BareStep:
    """Backbone forward + backward + AdamW step with a trivial loss: the floor for any method."""

    def __init__(self, cfg: ExperimentConfig, device: torch.device):
        self.device = device
        self.model = _timm_backbone(cfg, device)
        self.net = torch.compile(self.model) if cfg.run.compile and device.type == "cuda" else self.model
        self.optimizer = _direct_adamw(cfg, self.model)
        self.amp_on, self.amp_dtype = amp_settings(cfg, device)
        self.pin = cfg.run.pin_memory and device.type == "cuda"

    def prefill(self, gen, n_classes, first_index) -> None:
        pass

    def __call__(self, x, y, idx) -> None:
        x = x.to(self.device, non_blocking=self.pin)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_on):
            z = self.net(x)
        loss = z.float().square().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


# ----------------------------------------------------------------------------- timing
def interleave(runners: dict, device: torch.device, warmup: int, n: int,
               first: dict | None = None) -> dict[str, list[float]]:
    """``{name: [seconds of each timed step]}``. ``runners`` is ``{name: (step, batches)}``; all take
    ``warmup`` untimed steps, then step ``i`` of every runner in turn, each timed on its own, on
    ``batches[warmup + i]`` for ``i < n``. The order rotates from round to round (A B C, B C A,
    C A B, ...), so that no method always runs first or right after the same other one. ``first``,
    if given, receives each runner's first warm-up step in seconds (where torch.compile compiles)."""
    for name, (step, batches) in runners.items():
        for i in range(warmup):
            _, seconds = timed(lambda step=step, batches=batches, i=i: step(*batches[i]), device)
            if i == 0 and first is not None:
                first[name] = seconds
    names = list(runners)
    out = {name: [] for name in names}
    for i in range(warmup, warmup + n):
        for name in rotation(names, i - warmup):
            step, batches = runners[name]
            out[name].append(timed(lambda step=step, batches=batches, i=i: step(*batches[i]), device)[1])
    return out


def _setup(kind: str, cfg: ExperimentConfig, device: torch.device, n_classes: int, first_index: int):
    step = {"nbsrc": lambda: NbsrcStep(cfg, device, n_classes),
            "reference": lambda: ReferenceStep(cfg, device),
            "bare": lambda: BareStep(cfg, device)}[kind]()
    step.prefill(torch.Generator().manual_seed(cfg.run.seed + 1), n_classes, first_index)
    return step


def _switch_variants(cfg: ExperimentConfig) -> dict:
    """The baseline (every switch on, compile as requested) and one variant per switch turned off
    (compile: toggled). DataLoader workers are not among them: loading is outside the timed step."""
    base = cfg.replace(amp=True, fused_optimizer=True, pin_memory=True)
    return {
        "baseline": base,
        "bf16 autocast": base.replace(amp=False),
        "fused AdamW": base.replace(fused_optimizer=False),
        "pinned memory + non_blocking": base.replace(pin_memory=False),
        "torch.compile": base.replace(compile=not base.run.compile),
    }


# The CPU execution options of the nbsrc step (config fields, nbsrc.train.loop), each against the
# reference as a user writes it (fp32, eager) in the same interleaved rounds.
CPU_VARIANTS = {
    "nbsrc fp32": {},
    "nbsrc bf16": {"cpu_bf16": True},
    "nbsrc compile": {"cpu_compile": True},
    "nbsrc bf16 + compile": {"cpu_bf16": True, "cpu_compile": True},
}


def bench_cpu_variants(cfg: ExperimentConfig, device: torch.device, batches, n_classes: int, first_index: int,
                       warmup: int, n: int, variants=tuple(CPU_VARIANTS)) -> dict:
    """The reference (fp32 eager) and the nbsrc step under each CPU option of ``variants`` (names of
    :data:`CPU_VARIANTS`), interleaved in the same rounds. Per variant: speed over the reference
    (paired, with its interval), speed over nbsrc fp32 eager, and for compiled ones the compile time
    (first warm-up step minus the median step) and the steps it needs to pay off
    (compile time / time saved per step; None when it saves nothing)."""
    unknown = [v for v in variants if v not in CPU_VARIANTS]
    if unknown:
        raise ConfigError(f"unknown CPU variant(s) {unknown}; choose from {list(CPU_VARIANTS)}")
    base = cfg.replace(amp=False, compile=False, cpu_bf16=False, cpu_compile=False)
    runners = {"reference": (_setup("reference", base, device, n_classes, first_index), batches)}
    names = ["nbsrc fp32", *[v for v in variants if v != "nbsrc fp32"]]
    for name in names:
        runners[name] = (_setup("nbsrc", base.replace(**CPU_VARIANTS[name]), device, n_classes, first_index), batches)
    first: dict[str, float] = {}
    step_s = interleave(runners, device, max(warmup, 2), n, first=first)  # compile may recompile once
    med = {k: statistics.median(v) for k, v in step_s.items()}
    out = {"step_s": step_s, "first_step_s": first, "variants": {}}
    for name in names:
        row = {"over_reference": paired_ratio(step_s["reference"], step_s[name]),
               "over_nbsrc_fp32": paired_ratio(step_s["nbsrc fp32"], step_s[name]),
               "img_per_s": cfg.optim.batch_size / med[name], "compile_s": None, "payoff_steps": None}
        if CPU_VARIANTS[name].get("cpu_compile"):
            row["compile_s"] = first[name] - med[name]
            saved = med["nbsrc fp32"] - med[name]
            row["payoff_steps"] = row["compile_s"] / saved if saved > 0 else None
        out["variants"][name] = row
    out["reference_img_per_s"] = cfg.optim.batch_size / med["reference"]
    return out


def _img_per_s(batch: int, step_s: dict[str, list[float]]) -> dict[str, float]:
    return {name: batch / statistics.median(t) for name, t in step_s.items()}


def paired_ratio(slow: list[float], fast: list[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """Speed of ``fast``'s method relative to ``slow``'s from per-round times of the same rounds:
    ``{"median": median_i slow_i / fast_i, "ci95": (lo, hi) by a percentile bootstrap over rounds,
    "of_medians": median(slow) / median(fast)}``. Above 1: the ``fast`` method is faster."""
    a, b = np.asarray(slow, dtype=float), np.asarray(fast, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ConfigError(f"paired_ratio needs two equally long, non-empty lists of times, got {a.shape} and {b.shape}")
    r = a / b
    rng = np.random.default_rng(seed)
    boot = np.median(r[rng.integers(0, len(r), size=(n_boot, len(r)))], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"median": float(np.median(r)), "ci95": (float(lo), float(hi)),
            "of_medians": float(np.median(a) / np.median(b))}


def verdict(value: float, ci95: tuple[float, float], target: float, higher_is_better: bool = True) -> str:
    """"met", "not met", or "within noise of the target" when the 95% interval straddles it."""
    lo, hi = ci95
    if higher_is_better:
        return "met" if lo >= target else "not met" if hi < target else "within noise of the target"
    return "met" if hi <= target else "not met" if lo > target else "within noise of the target"


def bench_loss(cfg: ExperimentConfig, device: torch.device, n: int = 50, seed: int = 0) -> dict[str, float]:
    """Median ms of the loss alone, forward + backward, on one batch of random unit embeddings
    against a full memory of ``cfg.loss.memory_size``: nbsrc's criterion (IRT eq. 1 + λ·KoLeo over
    batch × batch and batch × memory) against pytorch-metric-learning's ContrastiveLoss in its
    CrossBatchMemory + inline KoLeo; interleaved, ``n`` timed calls each after 3 untimed ones."""
    gen = torch.Generator().manual_seed(seed)
    n_classes = max(2 * cfg.optim.batch_size // cfg.optim.m_per_class, 8)
    mine, ref = NbsrcStep(cfg, device, n_classes), ReferenceStep(cfg, device)
    feature_dim = ref.loss.embedding_size  # the backbone's width: 192 for ViT-Tiny, 384 for DeiT-S
    mine.prefill(gen, n_classes, 10**9)
    ref.prefill(gen, n_classes, 10**9)
    memory = mine.task.memory
    mem = memory.get() if memory is not None and len(memory) else (None, None, None)
    z0 = _unit(cfg.optim.batch_size, feature_dim, gen).to(device)
    y = (torch.arange(cfg.optim.batch_size) // cfg.optim.m_per_class % n_classes).to(device)
    idx = torch.arange(cfg.optim.batch_size).to(device)

    def nbsrc_loss():
        z = z0.clone().requires_grad_()
        mine.task.criterion(z, y, mem[0], mem[1], idx, mem[2])["total"].backward()

    def reference_loss():
        z = z0.clone().requires_grad_()
        (ref.loss(z, y) + cfg.loss.lam * inline_koleo(z)).backward()

    times, _ = timed_rounds({"nbsrc": lambda r: nbsrc_loss(), "reference": lambda r: reference_loss()}, n, device,
                            warmup=3)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def bench_train(
    model: str = "vit_tiny_patch16_224",
    img_size: int = 28,
    patch_size: int | None = 7,
    batch: int = 64,
    m_per_class: int = 4,
    steps: int = 3,
    repeats: int = 5,
    warmup: int = 1,
    memory_size: int = 1024,
    lam: float = 0.7,
    beta: float = 0.5,
    device: str = "auto",
    amp: bool = True,
    compile: bool = False,
    pin_memory: bool = True,
    fused_optimizer: bool = True,
    switches: bool | None = None,
    seed: int = 0,
    loss_only: bool = True,
    cpu_variants: tuple[str, ...] = (),
) -> dict:
    """Median img/s of the three methods (see the module docstring) over ``steps × repeats``
    interleaved, individually timed steps each, their ratios and, when ``switches`` (default: on
    CUDA), the speed-up of each execution switch of the nbsrc step; on CPU, the ``cpu_variants``
    (names of :data:`CPU_VARIANTS`) against the fp32 eager reference (:func:`bench_cpu_variants`)."""
    if steps < 1 or repeats < 1 or warmup < 0:
        raise ConfigError(f"steps={steps}, repeats={repeats}, warmup={warmup}: need steps >= 1, repeats >= 1, "
                          "warmup >= 0")
    dev = resolve_device(device)
    if switches and dev.type != "cuda":
        raise ConfigError("the execution switches only act on CUDA; run with --device cuda or --no-switches")
    cfg = ExperimentConfig(
        name="bench_train", backbone=model, img_size=img_size, patch_size=patch_size, batch_size=batch,
        m_per_class=m_per_class, memory_size=memory_size, lam=lam, beta=beta, loss="contrastive", device=str(dev),
        amp=amp, compile=compile, num_workers=0, pin_memory=pin_memory, fused_optimizer=fused_optimizer,
        iterations=10**6, warmup_iters=0, progress=False, seed=seed,
    )
    cfg.validate()
    n_classes = max(2 * batch // m_per_class, 8)
    ds = SyntheticImages(max(4 * batch, n_classes * m_per_class * 2), n_classes, img_size, seed)
    n = steps * repeats
    plain = make_batches(cfg, ds, max(warmup, 2) + n)  # the CPU variants warm up at least 2 steps
    on_cuda = dev.type == "cuda"
    pinned = _pinned(plain) if on_cuda else None  # what a pin_memory DataLoader hands over

    def batches_for(c: ExperimentConfig):
        return pinned if c.run.pin_memory and on_cuda else plain

    runners = {kind: (_setup(kind, cfg, dev, n_classes, len(ds)), batches_for(cfg)) for kind in METHODS}
    step_s = interleave(runners, dev, warmup, n)
    med = _img_per_s(batch, step_s)
    vs_ref = paired_ratio(step_s["reference"], step_s["nbsrc"])
    vs_bare = paired_ratio(step_s["nbsrc"], step_s["bare"])  # > 1: bare is faster than nbsrc
    overhead_ci = (1 - 1 / vs_bare["ci95"][0], 1 - 1 / vs_bare["ci95"][1])
    out = {
        "model": model, "img_size": img_size, "patch_size": patch_size, "batch": batch, "steps": steps,
        "repeats": repeats, "warmup": warmup, "memory_size": memory_size, "lam": lam, "beta": beta,
        "device": str(dev), "amp": amp_settings(cfg, dev)[0], "compile": compile and on_cuda,
        "img_per_s": med, "step_s": step_s,
        "ratio_nbsrc_over_reference": vs_ref["median"],
        "ratio_ci95": vs_ref["ci95"],
        "ratio_of_medians": med["nbsrc"] / med["reference"],
        "ratio_verdict": verdict(vs_ref["median"], vs_ref["ci95"], 1.0),
        "overhead_vs_bare": 1.0 - 1.0 / vs_bare["median"],
        "overhead_ci95": overhead_ci,
        "overhead_of_medians": 1.0 - med["nbsrc"] / med["bare"],
        "overhead_verdict": verdict(1.0 - 1.0 / vs_bare["median"], overhead_ci, 0.05, higher_is_better=False),
        "loss_ms": bench_loss(cfg, dev, seed=seed) if loss_only else None,
        "switches": None,
        "cpu_variants": (bench_cpu_variants(cfg, dev, plain, n_classes, len(ds), warmup, n, cpu_variants)
                         if cpu_variants and not on_cuda else None),
        "loadavg": os.getloadavg(),
    }
    if switches if switches is not None else on_cuda:
        variants = _switch_variants(cfg)
        runners = {name: (_setup("nbsrc", c, dev, n_classes, len(ds)), batches_for(c)) for name, c in variants.items()}
        sw = _img_per_s(batch, interleave(runners, dev, warmup, n))
        base = sw.pop("baseline")
        out["switches"] = {"baseline_img_per_s": base,
                           "speedup_on_over_off": {name: base / v for name, v in sw.items()},
                           "img_per_s_off": sw}
    return out


def results_markdown(r: dict, info: dict, note: str = "") -> str:
    """The ``train`` section of bench/RESULTS.md."""
    from bench import machine_lines

    ratio, over = r["ratio_nbsrc_over_reference"], r["overhead_vs_bare"]
    (rlo, rhi), (olo, ohi) = r["ratio_ci95"], r["overhead_ci95"]
    s = (machine_lines(info, note)
         + f"- setup: {r['model']}, img {r['img_size']}, patch {r['patch_size'] or 'native'}, batch {r['batch']}, "
         f"XBM memory {r['memory_size']}, KoLeo λ={r['lam']}, β={r['beta']}, device {r['device']}, "
         f"amp {r['amp']}, compile {r['compile']}, torch threads {r.get('threads', torch.get_num_threads())}; "
         f"{r['repeats'] * r['steps']} rounds, each one step of every method in rotating order, timed one by one "
         f"on the same batches, {r['warmup']} warm-up steps excluded\n"
         + (f"- load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in r['loadavg'])}\n"
            if r.get("loadavg") else "")
         + "- statistic: median over rounds of the per-round ratio, [95% bootstrap interval over rounds]; "
         "in brackets after it, the ratio of the methods' median step times\n\n"
         "| nbsrc / reference (img/s) | target | verdict | overhead 1 − nbsrc / bare | target | verdict |\n"
         "|---|---|---|---|---|---|\n"
         f"| {ratio:.3f} [{rlo:.3f}, {rhi:.3f}] ({r['ratio_of_medians']:.3f}) | >= 1.0 | {r['ratio_verdict']} "
         f"| {100 * over:.1f}% [{100 * olo:.1f}, {100 * ohi:.1f}] ({100 * r['overhead_of_medians']:.1f}%) "
         f"| <= 5% (CPU) | {r['overhead_verdict']} |\n\n")
    if r.get("loss_ms"):
        lm = r["loss_ms"]
        s += (f"Loss alone (forward + backward on one batch against a full memory of {r['memory_size']}): "
              f"nbsrc {lm['nbsrc']:.2f} ms, pytorch-metric-learning + inline KoLeo {lm['reference']:.2f} ms "
              f"({lm['reference'] / lm['nbsrc']:.2f}x); nbsrc's loss is "
              f"{100 * lm['nbsrc'] / (1000 * statistics.median(r['step_s']['bare'])):.1f}% of the bare step's "
              "median time.\n\n")
    s += (f"Reading: nbsrc's step runs at {ratio:.3f}x the speed of the direct pytorch-metric-learning loop "
          f"(target >= 1.0: {r['ratio_verdict']}) and spends {100 * over:.1f}% of a step beyond the bare backbone "
          f"forward/backward/update (target <= 5%: {r['overhead_verdict']}).\n")
    if r.get("cpu_variants"):
        cv = r["cpu_variants"]
        s += ("\nCPU execution options (config fields `cpu_bf16`, `cpu_compile`) of the nbsrc step against the "
              "reference as a user writes it (fp32, eager), all in the same interleaved rounds "
              f"(reference {cv['reference_img_per_s']:.1f} img/s):\n\n"
              "| nbsrc variant | speed over reference (fp32 eager) | speed over nbsrc fp32 eager | img/s "
              "| compile time | steps to pay off |\n|---|---|---|---|---|---|\n")
        for name, v in cv["variants"].items():
            a, b = v["over_reference"], v["over_nbsrc_fp32"]
            comp = "" if v["compile_s"] is None else f"{v['compile_s']:.1f} s"
            pay = ("" if v["compile_s"] is None else "never (no step saved)" if v["payoff_steps"] is None
                   else f"{v['payoff_steps']:.0f}")
            s += (f"| {name} | {a['median']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] | "
                  f"{b['median']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}] | {v['img_per_s']:.1f} | {comp} "
                  f"| {pay} |\n")
    if r["switches"]:
        s += "\n| switch (nbsrc step) | speed-up on / off |\n|---|---|\n"
        s += "".join(f"| {k} | {v:.2f}x |\n" for k, v in r["switches"]["speedup_on_over_off"].items())
    return s


def _patch_size(text: str) -> int | None:
    import argparse

    if text == "native":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of pixels, or 'native' for the model's own")
    return value


def add_arguments(p) -> None:
    import argparse

    p.add_argument("--backbone", default="vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--patch-size", type=_patch_size, default=7,
                   help="ViT patch size (default %(default)s; 'native' keeps the model's own, e.g. 16 for DeiT-S/224)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--m-per-class", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed steps per method = steps x repeats, interleaved; the median step time is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method before timing")
    p.add_argument("--memory-size", type=int, default=1024)
    p.add_argument("--lam", type=float, default=0.7)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch.set_num_threads (default: %(default)s, torch's current count)")
    p.add_argument("--cpu-variants", default=None,
                   help="comma-separated CPU variants to measure against the fp32 eager reference, from "
                        f"{', '.join(CPU_VARIANTS)} (default on CPU: all; 'none' to skip)")
    p.add_argument("--switches", action=argparse.BooleanOptionalAction, default=None,
                   help="measure each CUDA execution switch on/off (default: on CUDA)")
    p.add_argument("--section", default="train",
                   help="the section of the results file to write (default %(default)s; e.g. train-xbm for a "
                        "run at a paper's memory size, so the default run's section stays)")


def _parse_variants(text: str | None) -> tuple[str, ...]:
    if text is None:
        return tuple(CPU_VARIANTS)
    if text.strip() == "none":
        return ()
    return tuple(v.strip() for v in text.split(",") if v.strip())


def run(a, results_path=None, note: str = "") -> dict:
    import json

    from bench import RESULTS_PATH, machine_info, write_section

    if a.threads < 1:
        raise ConfigError(f"--threads {a.threads}: need at least 1 thread")
    if not re.fullmatch(r"train(-[a-z0-9]+)*", a.section):
        raise ConfigError(f"--section {a.section!r}: give 'train' or 'train-' and a lowercase word, e.g. train-xbm")
    torch.set_num_threads(a.threads)
    r = bench_train(a.backbone, a.img_size, a.patch_size, a.batch, a.m_per_class, a.steps, a.repeats, a.warmup,
                    a.memory_size, a.lam, a.beta, a.device, a.amp, a.compile, switches=a.switches,
                    cpu_variants=_parse_variants(a.cpu_variants))
    r["threads"] = torch.get_num_threads()
    print(json.dumps(r, indent=2))
    write_section(a.section, results_markdown(r, machine_info(), note), results_path or RESULTS_PATH)
    return r
