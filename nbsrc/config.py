"""One source of truth for an experiment, in sections.

:class:`ExperimentConfig` is shared by the CLI (``python -m nbsrc train``), the notebooks'
``parameters`` cells and the saved run (``runs/<name>/config.json``). Like nanoGPT's ``GPTConfig``
it is made of small dataclasses, one per part of an experiment, and a reader learns one way to read
it, ``cfg.<section>.<field>``:

=========  ==========================================================================================
``run``    name, seed and how the run is executed and logged (:class:`RunConfig`)
``data``   dataset, class split, image size, sampler (:class:`DataConfig`)
``model``  backbone, weights, pooling, PCA, and ``model.dtop``: the DToP model or None
           (:class:`ModelConfig`, :class:`DToPConfig`)
``loss``   the loss (``loss.name``), its margin β, KoLeo λ, the cross-batch memory (:class:`LossConfig`)
``optim``  optimizer, learning rate and schedule, batch, iterations, precision (:class:`OptimConfig`)
``eval``   what is measured and how: the evaluator, Recall@K cut-offs, scales, whitening (:class:`EvalConfig`)
``tuples`` SfM-120k tuple training (:class:`TupleConfig`), None unless ``data.dataset='sfm120k'``
           with ``data.sfm_training='tuples'``
=========  ==========================================================================================

Every field has the paper's default unless its comment says otherwise; :meth:`ExperimentConfig.validate`
turns a nonsense value into a one-line :class:`~nbsrc.errors.ConfigError` that names the field and the fix.

**Flat names.** Every field also has a flat name, the one used before the config had sections and still
used by the CLI flags (``--lr``), presets, papermill parameters, ``cfg.replace(lr=...)`` and the saved
``config.json``: :data:`FLAT_FIELDS` maps each flat name to its place (``"lr": "optim.lr"``). A field's
name in its section is its flat name except ``loss`` (``loss.name``); the untyped ``model_options``
dict of old configs maps to the typed ``model.dtop`` (:func:`dtop_from_options`). ``config.json`` and
:meth:`ExperimentConfig.fingerprint` keep the flat form, so run directories saved before the sections
load and are reused (``tests/test_config_sections.py`` checks it on configs saved by the flat version).

**Sizes: one name per concept.** Along the model, from the image to the embedding, a size has one name
in the package (config fields, function parameters and model attributes alike):

=================  ==================================================================================
``width``          the backbone's token width D (a ViT) or channel count (a convnet); set by
                   ``model.backbone``, read from timm, which calls it ``embed_dim`` (ViTs) and
                   ``num_features`` (any model); DToP's eqs. 5–12 call it D
``global_dim``,    DToP's two branches before its head: k·D ([CLS] of the last k layers, eq. 7) and
``local_dim``      the fused ELM output (eqs. 10, A14–A20)
``head_dim``       DToP's head output N (eq. 12, Table A7: 1,536): config ``model.dtop.head_dim``; not
                   timm's per-attention-head size of the same name
``feature_dim``    the descriptor the model is trained with: the pooling's output (= ``width``) or DToP's
                   head output (= ``head_dim``); what the loss, its class proxies and the cross-batch
                   memory hold (``model.feature_dim``, ``build_loss(cfg, feature_dim, ...)``)
``dim``            the PCA's output (IRT's ▷dim, e.g. ▷128, Table 7), fitted after training: config
                   ``model.dim`` (None: no PCA), ``PCAReduction(feature_dim, dim)``
``output_dim``     the size of the embedding the model returns: ``dim`` once the PCA is fitted, else
                   ``feature_dim`` (``model.output_dim``; an export's ``"dim"``)
``whitening_dim``  the rows a learned whitening keeps (:func:`nbsrc.eval.particular.evaluate_revisited_data`)
=================  ==================================================================================

The config's names (``dim``, ``head_dim``) are those of saved ``config.json`` files, presets, CLI flags,
the CLI's run-name hashes and the notebooks' parameters, and stay as they are; the internal names follow
the table (``model.output_dim`` was ``embed_dim``, which timm uses for the width; the losses' and the
memory's ``embedding_dim`` / ``dim`` are ``feature_dim``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbsrc.errors import ConfigError

DATASETS = ("fashion_mnist", "digits", "glyphs", "folder", "cub", "sop", "inshop", "sfm120k")
SAMPLERS = ("m_per_class", "group_size")
SCHEDULERS = ("cosine", "constant")
OPTIMIZERS = ("adamw", "sgd", "adam")
WHITENINGS = (None, "learned")

# --help of the fields whose name alone does not say what they are (the CLI shows it); keyed by flat name
FIELD_HELP = {
    "beta": "margin on negatives (pytorch-metric-learning: neg_margin), in [0, 1]; IRT eq. 1's beta",
    "lam": "KoLeo weight lambda (IRT eq. 5); 0 gives IRT_L, > 0 IRT_R",
    "dim": "PCA output dimension (IRT's ▷dim, e.g. 128), fitted on training embeddings after training; the size "
           "of the returned embedding; none: no PCA, the embedding keeps feature_dim (the pooling's or DToP head's size)",
    "memory_size": "cross-batch memory (XBM) size in embeddings; 0: off",
    "memory_start": "iteration from which the cross-batch memory is read and filled (XBM warm-up); 0: from the start",
    "model_options": "the DToP model (model.dtop) as a JSON dict of nbsrc.config.DToPConfig fields under "
                     "\"dtop\": true, e.g. '{\"dtop\": true, \"k\": 6}'; {}: no DToP",
}

# Fields (flat names) that change how a run is executed or logged but not what it computes: two configs
# that differ only here describe the same experiment (used to decide whether a saved run can be reused,
# and the only fields `train --resume` may change). All are in `run`, except eval.eval_batch_size.
EXECUTION_FIELDS = frozenset(
    {"runs_dir", "device", "num_workers", "log_every", "ckpt_every", "progress", "eval_batch_size",
     "compile", "pin_memory", "fused_optimizer", "cpu_compile", "threads"}
)
# Not here: ``amp`` and ``cpu_bf16``, which change the numbers a run computes (bf16 rounds every matmul).


DEVICES = ("auto", "cpu", "cuda", "cuda:N")  # cuda:N: the N-th GPU (cuda:0, cuda:1, ...)


def check_device(value: Any, name: str = "device") -> None:
    """``value`` is one of :data:`DEVICES` (``cuda:N`` with an integer N), or a one-line
    :class:`ConfigError` naming ``name`` (``device``, ``--device``); whether CUDA is there is checked
    where the device is used."""
    if not (isinstance(value, str) and (value in DEVICES[:3] or (value.startswith("cuda:") and value[5:].isdigit()))):
        raise ConfigError(f"{name}={value!r} is invalid: expected one of auto, cpu, cuda or cuda:N (e.g. cuda:0)")


def invalid(name: str, value: Any, expected: str) -> None:
    """Raise the one-line error of a bad field: ``name=value is invalid: expected ...``."""
    raise ConfigError(f"{name}={value!r} is invalid: expected {expected}")


# ----------------------------------------------------------------------------- the sections
@dataclass
class RunConfig:
    """Section ``run``: the run's name, its seed, and how it is executed and logged."""

    name: str = "irt_r"
    runs_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    progress: bool = True
    record_grad_noise: bool = False  # log gamma = ||Cov(grad directions)||_* (IRT Fig. 4)
    compile: bool = False  # torch.compile the model (CUDA; measured in `python -m nbsrc.bench train`)
    pin_memory: bool = True  # pinned host memory + non-blocking copies when training on CUDA
    fused_optimizer: bool = True  # fused AdamW/Adam/SGD kernels on CUDA
    # CPU execution (issue 15; measured in `python -m nbsrc.bench train`); each is a no-op on CUDA
    cpu_compile: bool = False  # torch.compile (inductor) the model when training on CPU
    threads: int = 0  # torch.set_num_threads for training (0: torch's own count)

    def validate(self, bad) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            bad("name", self.name, "a non-empty run name without '/'")
        for name in ("log_every", "ckpt_every", "num_workers", "threads"):
            if getattr(self, name) < 0:
                bad(name, getattr(self, name), "a non-negative integer")
        check_device(self.device)


@dataclass
class DataConfig:
    """Section ``data``: which images train, which evaluate, and how batches are drawn."""

    dataset: str = "fashion_mnist"  # fashion_mnist | digits | folder | cub | sop | inshop | sfm120k
    data_root: str | None = None  # None: $NBSRC_DATA, then the Debian package, then a download
    train_classes: str = "0-4"  # class-disjoint split: train on these classes ...
    test_classes: str = "5-9"  # ... query and gallery on these unseen ones ("all": every class the other omits)
    split: float | None = None  # fraction split: the first round(split·n) sorted classes train, the rest test
    eval_per_class: int | None = None  # cap on evaluation images per class (None: all)
    img_size: int = 28  # square input side after resize and crop (paper: 224)
    sampler: str = "m_per_class"  # m_per_class | group_size (DToP Table A12: batches of one image size)
    size_variant: str | None = None  # None | "mixed": every image stretched to one of 5 aspect ratios (A12)
    # DToP §A.1 "random cropping, illumination and scaling augmentation" in training (ranges our reading:
    # nbsrc.data.transforms.DTOP_AUGMENTATION); on in the DToP presets, off elsewhere
    dtop_augmentation: bool = False
    # how SfM-120k trains: "tuples" (IRT §4.2: tuples with mined hard negatives, contrastive loss) or
    # "classes" (DToP: each image labelled by its 3D model, the ordinary loop with any loss, e.g. ArcFace)
    sfm_training: str = "tuples"

    @property
    def uses_tuples(self) -> bool:
        """SfM-120k trained on mined tuples (the ``tuples`` section applies)."""
        return self.dataset == "sfm120k" and self.sfm_training == "tuples"

    def validate(self, bad) -> None:
        if self.dataset not in DATASETS:
            bad("dataset", self.dataset, f"one of {', '.join(DATASETS)}")
        if self.img_size < 8:
            bad("img_size", self.img_size, "an image side of at least 8 pixels")
        if self.eval_per_class is not None and self.eval_per_class < 2:
            bad("eval_per_class", self.eval_per_class, "at least 2 images per class, or None")
        if self.size_variant not in (None, "mixed"):
            bad("size_variant", self.size_variant, "None or 'mixed' (the mixed-size variant of DToP Table A12)")
        if self.sampler not in SAMPLERS:
            bad("sampler", self.sampler, f"one of {', '.join(SAMPLERS)}")
        if not isinstance(self.dtop_augmentation, bool):
            bad("dtop_augmentation", self.dtop_augmentation, "true or false")
        if self.split is not None and not 0.0 < self.split < 1.0:
            bad("split", self.split, "the fraction of the classes to train on, in (0, 1), e.g. 0.5; or None")
        defaults = tuple(type(self).__dataclass_fields__[k].default for k in ("train_classes", "test_classes"))
        if self.split is not None and (self.train_classes, self.test_classes) != defaults:
            given = ", ".join(f"{k}={v!r}" for k, v, d in (("train_classes", self.train_classes, defaults[0]),
                                                            ("test_classes", self.test_classes, defaults[1])) if v != d)
            raise ConfigError(f"split={self.split} chooses the training and test classes itself; drop {given}, "
                              "or drop split")
        if self.sfm_training not in ("tuples", "classes"):
            bad("sfm_training", self.sfm_training,
                "'tuples' (IRT: mined hard-negative tuples) or 'classes' (DToP: 3D models as classes, e.g. ArcFace)")


@dataclass
class DToPConfig:
    """Section ``model.dtop``: the DToP model (Song et al., WACV 2023; :mod:`nbsrc.models.dtop`).

    Each default is the full model of the supplementary's Tables A7–A13. The names the model checks
    when it is built (``pos_embed``, ``pe_interp``, ``fusion``, ``branch``) are checked there."""

    # last encoder layers collected (eqs. 5–6); A8: "The optimal number of layers is k = 6"
    k: int = 6
    # position encoding (eq. 2, A9): 'dpe' (dynamic position embedding) | 'none' | 'cpe'
    pos_embed: str = "dpe"
    # DPE interpolation (A9): 'bilinear' | 'bicubic'; "Bi-linear interpolation is best"
    pe_interp: str = "bilinear"
    elm: bool = True  # enhanced locality module (eqs. 9–11, A10); the full model has it
    elm_irb: bool = True  # ELM's inverted residual block (A10: "all components contribute")
    elm_aspp: bool = True  # ELM's à trous spatial pyramid pooling (A10)
    elm_wave: bool = True  # ELM's WaveBlock (A10)
    # fusion of the ELM's input and output (A13): none | sum | hadamard | concat | fast_norm | orthogonal;
    # None: 'orthogonal' with the ELM ("We choose orthogonal fusion as default"), 'none' without
    fusion: str | None = None
    # output dimension N of the FC layer (eq. 12), the model's feature_dim (not timm's attention head size);
    # A7: "the best performance is obtained by N = 1,536"
    head_dim: int = 1536
    # 'both' (eq. 12) | 'global' ([CLS] only, eq. 7) | 'local' (patches only, eq. 10): A5 uses one branch
    branch: str = "both"

    def validate(self, bad) -> None:
        for name in ("k", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, value, f"an integer >= 1 (paper: {getattr(DToPConfig, name)})")
        for name in ("elm", "elm_irb", "elm_aspp", "elm_wave"):
            if not isinstance(getattr(self, name), bool):
                bad(name, getattr(self, name), "True or False")
        for name in ("pos_embed", "pe_interp", "branch"):
            if not isinstance(getattr(self, name), str):
                bad(name, getattr(self, name), "a name (see nbsrc.models.dtop)")
        if self.fusion is not None and not isinstance(self.fusion, str):
            bad("fusion", self.fusion, "a fusion name (see nbsrc.models.locality.FUSIONS), or None")

    @property
    def effective_fusion(self) -> str:
        """``fusion`` with None resolved: 'orthogonal' with the ELM, 'none' without (A13)."""
        return self.fusion if self.fusion is not None else ("orthogonal" if self.elm else "none")

    def options(self) -> dict[str, Any]:
        """The fields that differ from the paper's defaults (the flat form ``model_options`` keeps)."""
        default = DToPConfig()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}


@dataclass
class ModelConfig:
    """Section ``model``: what :func:`nbsrc.models.build_model` builds."""

    backbone: str = "vit_tiny_patch16_224"  # any timm model name (paper: deit_small_patch16_224)
    patch_size: int | None = 7  # override the ViT patch size (None: the backbone's own)
    weights: str = "none"  # none | timm | efficientnet_lite0 | /path/to/checkpoint.pt
    pooling: str = "cls"  # a name of nbsrc.models.POOLINGS (cls | dist | avg | max | gem | rmac); checked when built
    gem_p: float = 3.0
    gem_learnable: bool = False
    dim: int | None = None  # PCA output dimension (IRT ▷dim; paper: 128), fitted after training; None: off
    dtop: DToPConfig | None = None  # the DToP model (DToPConfig()), or None: backbone + pooling

    def validate(self, bad) -> None:
        if not isinstance(self.pooling, str) or not self.pooling:
            bad("pooling", self.pooling, "the name of a pooling of nbsrc.models.POOLINGS")
        if self.dim is not None and self.dim < 1:
            bad("dim", self.dim, "a positive PCA dimension, or None to keep the full embedding")
        if self.gem_p <= 0:
            bad("gem_p", self.gem_p, "a positive GeM exponent (paper: 3)")
        if self.dtop is not None:
            if not isinstance(self.dtop, DToPConfig):
                bad("dtop", self.dtop, "a DToPConfig, or None")
            self.dtop.validate(bad)


@dataclass
class LossConfig:
    """Section ``loss`` (IRT eqs. 1 and 5): the loss, its margin, KoLeo and the cross-batch memory."""

    # a name of nbsrc.losses.PAIR_LOSSES (contrastive | nsoftmax | snca | arcface); checked when the run is
    # built, before anything is written (SfM-120k tuples: contrastive, see tuple_loss). Flat name: ``loss``
    name: str = "contrastive"
    beta: float = 0.5  # margin on negatives (pytorch-metric-learning: neg_margin), in [0, 1]
    lam: float = 0.7  # KoLeo weight lambda; 0 gives IRT_L, > 0 gives IRT_R
    memory_size: int = 0  # cross-batch memory (XBM) size in embeddings; 0: off
    # iteration from which the memory is read and filled (XBM's warm-up; before it: batch x batch only);
    # 0: from the start, as IRT fine-tuning a pretrained model does
    memory_start: int = 0
    momentum: float | None = None  # momentum encoder for the memory (paper, In-Shop: 0.999)
    arcface_margin: float = 0.15
    arcface_scale: float = 30.0
    temperature: float = 0.05  # Normalized Softmax and Scalable NCA temperature
    # SfM-120k tuple loss: "distance" (cirtorch's ½d² / ½max(0, β − d)², summed over tuples; IRT §4.2
    # builds on that code) or "eq1" (IRT eq. 1 with β as a cosine threshold); nbsrc.losses.tuples
    tuple_loss: str = "distance"

    def validate(self, bad) -> None:
        if not isinstance(self.name, str) or not self.name:
            bad("loss", self.name, "the name of a loss of nbsrc.losses.PAIR_LOSSES")
        if not 0.0 <= self.beta <= 1.0:
            bad("beta", self.beta, "a margin in [0, 1] (cosine similarity of negatives; paper: 0.5)")
        if self.lam < 0:
            bad("lam", self.lam, "a KoLeo weight >= 0 (0 turns KoLeo off; paper: 0.7)")
        if self.memory_size < 0:
            bad("memory_size", self.memory_size, "a memory size >= 0 (0 turns the memory off)")
        if self.memory_start < 0:
            bad("memory_start", self.memory_start, "an iteration >= 0 from which the memory is used (0: from the start)")
        if self.momentum is not None and not 0.0 <= self.momentum < 1.0:
            bad("momentum", self.momentum, "a momentum in [0, 1) (paper: 0.999), or None")
        if self.momentum is not None and self.memory_size == 0:
            bad("momentum", self.momentum, "None unless memory_size > 0 (it encodes the memory)")
        if self.arcface_scale <= 0 or self.temperature <= 0:
            bad("arcface_scale/temperature", (self.arcface_scale, self.temperature), "positive")
        if not isinstance(self.tuple_loss, str) or not self.tuple_loss:  # a name of TUPLE_LOSSES, checked at build
            bad("tuple_loss", self.tuple_loss, "a form of nbsrc.losses.TUPLE_LOSSES ('distance' or 'eq1')")


@dataclass
class OptimConfig:
    """Section ``optim``: the optimizer, the schedule, the batches, and the precision of the numbers."""

    optimizer: str = "adamw"
    lr: float = 3e-5
    weight_decay: float = 5e-4
    batch_size: int = 64
    m_per_class: int = 16  # m samples of each class in every batch, so that every batch has positives
    iterations: int = 1000  # 0: no training, the off-the-shelf model (IRT_O)
    warmup_iters: int = 0
    scheduler: str = "cosine"
    min_lr_factor: float = 1e-2  # cosine decays to lr * min_lr_factor
    grad_clip: float | None = 1.0  # max global grad norm; None: off
    lr_decay_per_epoch: float = 0.0  # SfM tuple training: lr × exp(−decay · epoch) (cirtorch: 0.01); 0: off
    freeze_batchnorm: bool = False  # BatchNorm layers kept in eval mode while training (cirtorch); ViTs have none
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 + GradScaler)
    cpu_bf16: bool = False  # bf16 autocast when training on CPU (changes the numbers: not an execution field)

    def validate(self, bad) -> None:
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", self.optimizer, f"one of {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            bad("scheduler", self.scheduler, f"one of {', '.join(SCHEDULERS)}")
        if self.m_per_class < 2:
            bad("m_per_class", self.m_per_class, "at least 2, so that every batch holds positives")
        if self.batch_size < 2 or self.batch_size % self.m_per_class:
            bad("batch_size", self.batch_size,
                f"a multiple of m_per_class={self.m_per_class} (a batch holds m samples per class)")
        if self.batch_size // self.m_per_class < 2:
            bad("batch_size", self.batch_size, "room for at least 2 classes of m_per_class samples")
        if self.lr <= 0:
            bad("lr", self.lr, "a positive learning rate")
        if self.weight_decay < 0:
            bad("weight_decay", self.weight_decay, "a weight decay >= 0")
        if self.iterations < 0:
            bad("iterations", self.iterations, "a number of training iterations >= 0 (0: off-the-shelf, IRT_O)")
        if not 0 <= self.warmup_iters <= self.iterations:
            bad("warmup_iters", self.warmup_iters, f"in [0, iterations={self.iterations}]")
        if not 0 < self.min_lr_factor <= 1:
            bad("min_lr_factor", self.min_lr_factor, "a factor in (0, 1]")
        if self.grad_clip is not None and self.grad_clip <= 0:
            bad("grad_clip", self.grad_clip, "a positive max norm, or None")
        if not 0.0 <= self.lr_decay_per_epoch < 1.0:
            bad("lr_decay_per_epoch", self.lr_decay_per_epoch,
                "a rate in [0, 1): lr × exp(−rate · epoch) (cirtorch: 0.01)")


@dataclass
class EvalConfig:
    """Section ``eval``: what is measured (during and after training) and how the test images are embedded."""

    ks: tuple[int, ...] = (1, 2, 4, 8)
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batch_size: int = 256
    eval_scales: list[float] | None = None  # Revisited evaluation scales (DToP: 1, 1/√2, 1/2); None: single scale
    whitening: str | None = None  # None | "learned": supervised whitening from SfM-120k pairs (DToP, Radenović)
    # a name of nbsrc.experiment.EVALUATORS ("recall": Recall@K on the test classes; "revisited": mAP and mP@k
    # of Revisited Oxford and Paris), checked when the run is built; None: the dataset's own (revisited for
    # sfm120k, recall otherwise)
    evaluator: str | None = None

    def validate(self, bad) -> None:
        if self.evaluator is not None and (not isinstance(self.evaluator, str) or not self.evaluator):
            bad("evaluator", self.evaluator, "the name of an evaluator of nbsrc.experiment.EVALUATORS, or None")
        if not self.ks or any(int(k) < 1 for k in self.ks):
            bad("ks", self.ks, "positive Recall@K cut-offs such as (1, 2, 4, 8)")
        if self.eval_every < 0:
            bad("eval_every", self.eval_every, "a non-negative integer")
        if self.eval_scales is not None and (not self.eval_scales or any(
                not (math.isfinite(float(v)) and float(v) > 0) for v in self.eval_scales)):
            bad("eval_scales", self.eval_scales, "None or a non-empty list of positive scales, e.g. [1, 0.7071, 0.5]")
        if self.whitening not in WHITENINGS:
            bad("whitening", self.whitening, "None or 'learned' (supervised whitening from SfM-120k pairs)")


@dataclass
class TupleConfig:
    """Section ``tuples``: SfM-120k tuple training (IRT §4.2, Radenović et al.). Per epoch,
    ``pairs_per_epoch`` (query, positive) pairs and a ``negative_pool`` of images;
    ``negatives_per_tuple`` hard negatives mined with the current model for each pair."""

    tuples_per_batch: int = 5  # tuples in a batch (IRT §4.2: 5)
    negatives_per_tuple: int = 5  # SfM-120k: hard negatives mined per (query, positive) tuple
    pairs_per_epoch: int = 2000  # SfM-120k: (query, positive) pairs drawn per epoch
    negative_pool: int = 22000  # SfM-120k: images from which the hard negatives are mined each epoch

    def validate(self, bad) -> None:
        for name in ("tuples_per_batch", "negatives_per_tuple", "pairs_per_epoch", "negative_pool"):
            if getattr(self, name) < 1:
                bad(name, getattr(self, name), "a positive integer")


SECTIONS: dict[str, type] = {"run": RunConfig, "data": DataConfig, "model": ModelConfig, "loss": LossConfig,
                             "optim": OptimConfig, "eval": EvalConfig, "tuples": TupleConfig}

# ----------------------------------------------------------------------------- flat name -> section path
# Every flat name (CLI flag, preset key, papermill parameter, config.json key, cfg.replace keyword) and
# where it lives: ``cfg.lr`` of the flat config is ``cfg.optim.lr``. The input compatibility code maps
# with this table; tests/test_config_sections.py checks that it names every section field exactly once.
FLAT_FIELDS: dict[str, str] = {
    # run
    "name": "run.name", "runs_dir": "run.runs_dir", "seed": "run.seed", "device": "run.device",
    "num_workers": "run.num_workers", "log_every": "run.log_every", "ckpt_every": "run.ckpt_every",
    "progress": "run.progress", "record_grad_noise": "run.record_grad_noise", "compile": "run.compile",
    "pin_memory": "run.pin_memory", "fused_optimizer": "run.fused_optimizer", "cpu_compile": "run.cpu_compile",
    "threads": "run.threads",
    # data
    "dataset": "data.dataset", "data_root": "data.data_root", "train_classes": "data.train_classes",
    "test_classes": "data.test_classes", "split": "data.split", "eval_per_class": "data.eval_per_class",
    "img_size": "data.img_size", "sampler": "data.sampler", "size_variant": "data.size_variant",
    "dtop_augmentation": "data.dtop_augmentation", "sfm_training": "data.sfm_training",
    # model ("model_options", the untyped DToP dict of old configs, is model.dtop: see dtop_from_options)
    "backbone": "model.backbone", "patch_size": "model.patch_size", "weights": "model.weights",
    "pooling": "model.pooling", "gem_p": "model.gem_p", "gem_learnable": "model.gem_learnable",
    "dim": "model.dim", "model_options": "model.dtop",
    # loss
    "loss": "loss.name", "beta": "loss.beta", "lam": "loss.lam", "memory_size": "loss.memory_size",
    "memory_start": "loss.memory_start", "momentum": "loss.momentum", "arcface_margin": "loss.arcface_margin",
    "arcface_scale": "loss.arcface_scale", "temperature": "loss.temperature", "tuple_loss": "loss.tuple_loss",
    # optim
    "optimizer": "optim.optimizer", "lr": "optim.lr", "weight_decay": "optim.weight_decay",
    "batch_size": "optim.batch_size", "m_per_class": "optim.m_per_class", "iterations": "optim.iterations",
    "warmup_iters": "optim.warmup_iters", "scheduler": "optim.scheduler", "min_lr_factor": "optim.min_lr_factor",
    "grad_clip": "optim.grad_clip", "lr_decay_per_epoch": "optim.lr_decay_per_epoch",
    "freeze_batchnorm": "optim.freeze_batchnorm", "amp": "optim.amp", "cpu_bf16": "optim.cpu_bf16",
    # eval
    "ks": "eval.ks", "eval_every": "eval.eval_every", "eval_batch_size": "eval.eval_batch_size",
    "eval_scales": "eval.eval_scales", "whitening": "eval.whitening",
    "evaluator": "eval.evaluator",
    # tuples (None unless SfM-120k trains on tuples; the flat form then holds TupleConfig's defaults)
    "tuples_per_batch": "tuples.tuples_per_batch", "negatives_per_tuple": "tuples.negatives_per_tuple",
    "pairs_per_epoch": "tuples.pairs_per_epoch", "negative_pool": "tuples.negative_pool",
}
SECTION_OF = {flat: path.split(".")[0] for flat, path in FLAT_FIELDS.items()}
_FLAT_OF = {path: flat for flat, path in FLAT_FIELDS.items()}  # "optim.lr" -> "lr"


@dataclass(frozen=True)
class FlatField:
    """One flat name with its section field: what the CLI needs to make a flag of it."""

    name: str  # the flat name (``lr``; ``loss`` for loss.name; ``model_options`` for model.dtop)
    section: str  # ``optim``
    field: str  # the field in the section (``lr``; ``name``; ``dtop``)
    type: Any  # the section field's type hint, resolved
    default: Any  # the flat form of the default (model_options: {})


def flat_fields() -> list[FlatField]:
    """Every flat name, in :data:`FLAT_FIELDS` order, with its type and default (CLI flags, notebook checks)."""
    import typing

    out, default = [], ExperimentConfig().to_dict()
    for flat, path in FLAT_FIELDS.items():
        section, name = path.split(".")
        hint = typing.get_type_hints(SECTIONS[section])[name]
        out.append(FlatField(flat, section, name, dict[str, Any] if flat == "model_options" else hint, default[flat]))
    return out


def dtop_from_options(options: Any, where: str = "model_options") -> DToPConfig | None:
    """The typed ``model.dtop`` of an old config's ``model_options`` dict (``{"dtop": True, "k": 6, ...}``):
    None without ``dtop=True``; an option that is no :class:`DToPConfig` field is a one-line error naming it."""
    if options is None or isinstance(options, DToPConfig):
        return options
    if not isinstance(options, dict):
        raise ConfigError(f"model_options={options!r} is invalid: expected a dict of DToP options such as "
                          "{'dtop': True, 'k': 6}")
    options = dict(options)
    on = options.pop("dtop", False)
    names = [f.name for f in dataclasses.fields(DToPConfig)]
    unknown = [k for k in options if k not in names]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown DToP option {unknown[0]!r} in {where}{hint}; valid options are dtop, "
                          f"{', '.join(names)}")
    if not on:
        if options:
            raise ConfigError(f"model_options={options!r} needs 'dtop': True (its options are DToP's); add it, "
                              "or drop the options")
        return None
    return DToPConfig(**options)


def _as_dtop(value: Any) -> DToPConfig | None:
    """``model.dtop`` given as a DToPConfig, None, True/False, or a dict of its fields."""
    if value is None or value is False:
        return None
    if value is True:
        return DToPConfig()
    if isinstance(value, dict):
        return dtop_from_options({"dtop": True, **{k: v for k, v in value.items() if k != "dtop"}})
    if isinstance(value, DToPConfig):
        return value
    raise ConfigError(f"dtop={value!r} is invalid: expected a DToPConfig, a dict of its fields, True or None")


def _unknown(key: Any, names: list[str], where: str = "") -> ConfigError:
    close = difflib.get_close_matches(str(key), sorted(names), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown parameter {f'{where}{key}'!r}{hint}; valid parameters are the fields of "
                       "ExperimentConfig (flat names such as 'lr', or sections such as 'optim')")


def _section_values(section: str, value: Any) -> dict[str, Any]:
    """A whole section given as its dataclass or a dict of its fields -> {field: value}."""
    cls = SECTIONS[section]
    if isinstance(value, cls):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(cls)}
    if not isinstance(value, dict):
        raise ConfigError(f"{section}={value!r} is invalid: expected a {cls.__name__} or a dict of its fields")
    names = [f.name for f in dataclasses.fields(cls)]
    for k in value:
        if k not in names:
            raise _unknown(k, names, f"{section}.")
    return dict(value)


def _coerce(section: str, name: str, value: Any) -> Any:
    """JSON gives lists: ``ks`` is a tuple of ints, ``eval_scales`` a list of floats, ``weights`` a string."""
    if (section, name) == ("eval", "ks") and value is not None:
        return tuple(int(k) for k in value)
    if (section, name) == ("eval", "eval_scales") and value is not None:
        return [float(v) for v in value]
    if (section, name) == ("model", "weights") and isinstance(value, Path):
        return str(value)
    if (section, name) == ("model", "dtop"):
        return _as_dtop(value)
    return value


def _sections(given: dict[str, Any]) -> dict[str, Any]:
    """Map an input dict (flat names, whole sections, or both) to the sections of :class:`ExperimentConfig`.

    A key is a flat name (:data:`FLAT_FIELDS`), ``model_options`` (old configs' DToP dict), ``dtop``
    (``model.dtop``), or a section name with its dataclass or a dict of its fields (``tuples`` may be None).
    ``loss`` is the flat name when its value is a string, the section otherwise. A field given twice
    (flat and in its section) is an error; an unknown key is an error with the closest name."""
    parts: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    tuples_given, tuples_none = False, False

    def put(section: str, name: str, value: Any, key: str) -> None:
        if name in parts[section]:
            raise ConfigError(f"{key} is given twice (as a flat name and in section {section!r}); give it once")
        parts[section][name] = _coerce(section, name, value)

    for key, value in given.items():
        if key in SECTIONS and not (key == "loss" and isinstance(value, str)):
            if key == "tuples":
                tuples_given = True
                if value is None:
                    tuples_none = True
                    continue
            for name, v in _section_values(key, value).items():
                put(key, name, v, f"{key}.{name}")
        elif key == "model_options":
            put("model", "dtop", dtop_from_options(value), key)
        elif key == "dtop":
            put("model", "dtop", value, key)
        elif key in FLAT_FIELDS:
            section, name = FLAT_FIELDS[key].split(".")
            put(section, name, value, key)
        else:
            raise _unknown(key, [*FLAT_FIELDS, *SECTIONS])

    out = {s: SECTIONS[s](**parts[s]) for s in SECTIONS if s != "tuples"}
    if tuples_none:
        if parts["tuples"]:
            raise ConfigError(f"{next(iter(parts['tuples']))} is given with tuples=None; drop one of them")
        out["tuples"] = None
    elif tuples_given or out["data"].uses_tuples:
        out["tuples"] = TupleConfig(**parts["tuples"])
    else:  # the flat form always holds the tuple fields; only their defaults may stand for "no tuples"
        default = TupleConfig()
        for name, value in parts["tuples"].items():
            if value != getattr(default, name):
                raise ConfigError(
                    f"{name}={value!r} applies only to SfM-120k tuple training (dataset='sfm120k', "
                    f"sfm_training='tuples'), not to dataset={out['data'].dataset!r}; drop it")
        out["tuples"] = None
    return out


# ----------------------------------------------------------------------------- the config
@dataclass(init=False)
class ExperimentConfig:
    """An experiment: ``run``, ``data``, ``model`` (with ``model.dtop``), ``loss``, ``optim``, ``eval``
    and ``tuples`` (None unless SfM-120k trains on tuples).

    ``ExperimentConfig(lr=1e-3, dataset="cub")`` (flat names), ``ExperimentConfig(optim=OptimConfig(lr=1e-3))``
    (sections) and a mix are the same thing; construction maps and does not validate, :meth:`from_dict`
    (and so :meth:`replace` and :meth:`load`) validates."""

    run: RunConfig
    data: DataConfig
    model: ModelConfig
    loss: LossConfig
    optim: OptimConfig
    eval: EvalConfig
    tuples: TupleConfig | None

    def __init__(self, **fields: Any):
        for section, value in _sections(fields).items():
            setattr(self, section, value)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        """Build from a dict of flat names (old ``config.json``, presets, papermill parameters, CLI flags),
        of sections (``dataclasses.asdict(cfg)``), or both; validated. An unknown key is a one-line error
        with the closest name."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a dict of its fields, got a {type(d).__name__}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> ExperimentConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A validated copy with ``changes`` (flat names, ``dtop=``, or whole sections) applied."""
        base = self.to_dict()
        for key in changes:  # a whole section replaces its flat fields
            if key in SECTIONS and not (key == "loss" and isinstance(changes[key], str)):
                base = {k: v for k, v in base.items() if SECTION_OF[k] != key}
            elif key == "dtop":
                base.pop("model_options")
        return type(self).from_dict({**base, **changes})

    def to_dict(self) -> dict[str, Any]:
        """The flat form: every flat name of :data:`FLAT_FIELDS` with its value (``ks`` a list,
        ``model_options`` the DToP fields that differ from the paper's, under ``"dtop": True``; the tuple
        fields TupleConfig's defaults when ``tuples`` is None). It is ``config.json``'s saved form, and
        what :meth:`fingerprint` is made of, as before the sections, so old runs stay reusable."""
        out: dict[str, Any] = {}
        tuples = self.tuples if self.tuples is not None else TupleConfig()
        for flat, path in FLAT_FIELDS.items():
            section, name = path.split(".")
            value = getattr(tuples if section == "tuples" else getattr(self, section), name)
            if flat == "model_options":
                value = {} if value is None else {"dtop": True, **value.options()}
            elif flat == "ks":
                value = list(value)
            elif isinstance(value, list):
                value = list(value)
            out[flat] = value
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def fingerprint(self) -> dict[str, Any]:
        """The fields that define what the run computes (the flat form, execution-only fields removed)."""
        return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}

    def changed_fingerprint(self) -> dict[str, Any]:
        """The fingerprint's fields that differ from the defaults (``name`` left out): what a run's
        name is hashed from, so that a field added later with its default renames no run."""
        defaults = type(self)().fingerprint()
        return {k: v for k, v in self.fingerprint().items() if k != "name" and v != defaults.get(k)}

    @property
    def run_dir(self) -> Path:
        return Path(self.run.runs_dir) / self.run.name

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Each section's checks, then those that span sections; the first problem is a one-line
        :class:`~nbsrc.errors.ConfigError` naming the field (its flat name) and what was expected."""

        bad = invalid
        for section in SECTIONS:
            if not isinstance(getattr(self, section), (SECTIONS[section], type(None))):
                bad(section, getattr(self, section), f"a {SECTIONS[section].__name__}")
        flat = self.to_dict()
        for name in FLAT_FIELDS:  # NaN and inf pass every comparison below: refuse them first
            value = flat[name]
            if isinstance(value, float) and not math.isfinite(value):
                bad(name, value, "a finite number (not NaN or inf)")
        if self.model.dtop is not None:
            for name, value in dataclasses.asdict(self.model.dtop).items():
                if isinstance(value, float) and not math.isfinite(value):
                    bad(name, value, "a finite number (not NaN or inf)")

        self.run.validate(bad)
        self.data.validate(bad)
        self.model.validate(bad)
        self.loss.validate(bad)
        self.optim.validate(bad)
        self.eval.validate(bad)
        # across sections
        patch, img = self.model.patch_size, self.data.img_size
        if patch is not None and (patch < 1 or img % patch):
            bad("patch_size", patch, f"a divisor of img_size={img}, or None")
        if self.data.uses_tuples and self.tuples is None:
            bad("tuples", None, "a TupleConfig for dataset='sfm120k' with sfm_training='tuples' (TupleConfig() "
                "has IRT's settings)")
        if self.tuples is not None:
            if not self.data.uses_tuples:
                bad("tuples", self.tuples, "None unless dataset='sfm120k' with sfm_training='tuples'")
            self.tuples.validate(bad)


def parse_classes(spec: str | list[int] | tuple[int, ...]) -> list[int]:
    """Parse ``"0-4"``, ``"0,2,4"``, ``"0-3,7"`` or a list into a sorted list of class ids."""
    if isinstance(spec, (list, tuple)):
        return sorted(int(c) for c in spec)
    out: set[int] = set()
    try:
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-")
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise ConfigError(
            f"class list {spec!r} is invalid: expected ranges and ids such as '0-4' or '0,2,5-9'"
        ) from None
    if not out:
        raise ConfigError(f"class list {spec!r} is empty: expected e.g. '0-4'")
    return sorted(out)
