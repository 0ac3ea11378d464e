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
``loss``   the loss (``loss.name``), its margin β, KoLeo λ, the cross-batch memory, and the hyperparameters
           a registered loss declares (``loss.hyperparameters``, :data:`LOSS_HYPERPARAMETERS`) (:class:`LossConfig`)
``optim``  optimizer, learning rate and schedule, batch, iterations, precision (:class:`OptimConfig`)
``eval``   what is measured and how: the evaluator, Recall@K cut-offs, scales, whitening (:class:`EvalConfig`)
``tuples`` SfM-120k tuple training (:class:`TupleConfig`), None unless ``data.dataset='sfm120k'``
           with ``data.sfm_training='tuples'``
=========  ==========================================================================================

Each field is declared once, with :func:`setting`: its default (the paper's unless its help says
otherwise), its help, its choices and the paper's value, from which the CLI makes ``--help``
(:func:`config_fields`). :meth:`ExperimentConfig.validate` turns a nonsense value into a one-line
:class:`~nbsrc.errors.ConfigError` that names the field and the fix.

**Names.** A field's name is unique across the sections (``loss.name`` is called ``loss``, and the
DToP model's fields are named as in :class:`DToPConfig`), so a field is given by its name alone:
``--lr`` on the command line, ``ExperimentConfig(lr=1e-4)``, ``cfg.replace(lr=1e-4)``, a notebook's
``-p lr 1e-4``; ``cfg.value("lr")`` reads it. A section may also be given whole, as its dataclass or a
dict of some of its fields (``optim={"lr": 1e-4}``).

**Saved form.** ``config.json`` and the presets hold the sections (:meth:`ExperimentConfig.to_dict`)
with ``"format": 2``; :func:`upgrade` reads the flat form of older run directories and presets (every
field at the top, the DToP model as ``model_options``). :meth:`ExperimentConfig.fingerprint`, what a
run's reuse and its CLI name are made of, keeps that older form's keys and values, so an old run
directory is found and reused by the same settings.

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

The config's names (``dim``, ``head_dim``) are also those of saved ``config.json`` files, presets, CLI
flags, the CLI's run-name hashes and the notebooks' parameters.
"""


from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbsrc.errors import ConfigError

SAMPLERS = ("m_per_class", "group_size")
SCHEDULERS = ("cosine", "constant")
OPTIMIZERS = ("adamw", "sgd", "adam")
WHITENINGS = (None, "learned")
CONFIG_FORMAT = 2  # config.json's "format": the sections; a file without it is the older flat form (upgrade)


def setting(default: Any, help: str, *, choices: tuple | str | None = None, paper: Any = None,
            name: str | None = None, execution: bool = False) -> Any:
    """A config field: its ``default`` and, in its metadata, what ``--help`` says of it.

    ``choices``: the values it takes, or the dotted path of a registry whose keys they are
    (``"nbsrc.losses.PAIR_LOSSES"``, read by the CLI; the config imports nothing above it); ``paper``:
    the paper's value where the default is another; ``name``: its name where the field's own is not
    unique (``loss.name`` is ``loss``); ``execution``: it changes how a run is executed or logged but
    not what it computes (:data:`EXECUTION_FIELDS`)."""
    meta = {"help": help, "choices": choices, "paper": paper, "name": name, "execution": execution}
    return dataclasses.field(default=default, metadata={k: v for k, v in meta.items() if v not in (None, False)})


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

    name: str = setting("irt_r", "the run's directory under --runs-dir")
    runs_dir: str = setting("runs", "directory that holds the run directories", execution=True)
    seed: int = setting(0, "random seed of the model's initialisation, the sampler and the data order")
    device: str = setting("auto", "where to train and evaluate", choices=("auto", "cpu", "cuda", "cuda:N"),
                          execution=True)
    num_workers: int = setting(0, "DataLoader worker processes (0: load in the main process)", execution=True)
    log_every: int = setting(10, "write a metrics.jsonl row every N iterations", execution=True)
    ckpt_every: int = setting(100, "save checkpoint.pt every N iterations (0: only at the end)", execution=True)
    progress: bool = setting(True, "show a progress bar while training", execution=True)
    record_grad_noise: bool = setting(False, "log gamma = ||Cov(grad directions)||_* (IRT Fig. 4)")
    compile: bool = setting(False, "torch.compile the model (CUDA; measured in `python -m bench train`)",
                            execution=True)
    pin_memory: bool = setting(True, "pinned host memory + non-blocking copies when training on CUDA",
                               execution=True)
    fused_optimizer: bool = setting(True, "fused AdamW/Adam/SGD kernels on CUDA", execution=True)
    cpu_compile: bool = setting(False, "torch.compile (inductor) the model when training on CPU", execution=True)
    threads: int = setting(0, "torch.set_num_threads for training (0: torch's own count)", execution=True)

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

    dataset: str = setting("fashion_mnist", "the images: a built-in dataset, a folder of class folders, or a "
                           "benchmark", choices="nbsrc.data.DATASETS")
    data_root: str | None = setting(None, "where the dataset is; none: $NBSRC_DATA, then the Debian package, "
                                    "then a download")
    train_classes: str = setting("0-4", "class-disjoint split: train on these classes ...")
    test_classes: str = setting("5-9", "... query and gallery on these unseen ones (\"all\": every class the "
                                "other omits)")
    split: float | None = setting(None, "fraction split: the first round(split·n) sorted classes train, the "
                                  "rest test")
    eval_per_class: int | None = setting(None, "cap on evaluation images per class (none: all)")
    img_size: int = setting(28, "square input side after resize and crop", paper=224)
    sampler: str = setting("m_per_class", "how batches are drawn (group_size: batches of one image size, DToP "
                           "Table A12)", choices=SAMPLERS)
    size_variant: str | None = setting(None, "mixed: every image stretched to one of 5 aspect ratios (DToP "
                                       "Table A12)", choices=(None, "mixed"))
    dtop_augmentation: bool = setting(
        False, "DToP §A.1 \"random cropping, illumination and scaling augmentation\" in training (ranges our "
        "reading: nbsrc.data.transforms.DTOP_AUGMENTATION); on in the DToP presets, off elsewhere")
    sfm_training: str = setting(
        "tuples", "how SfM-120k trains: \"tuples\" (IRT §4.2: tuples with mined hard negatives, contrastive "
        "loss) or \"classes\" (DToP: each image labelled by its 3D model, the ordinary loop with any loss, e.g. "
        "ArcFace)", choices=("tuples", "classes"))

    @property
    def uses_tuples(self) -> bool:
        """SfM-120k trained on mined tuples (the ``tuples`` section applies)."""
        return self.dataset == "sfm120k" and self.sfm_training == "tuples"

    def validate(self, bad) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            bad("dataset", self.dataset, "the name of a dataset of nbsrc.data.DATASETS")
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

    k: int = setting(6, "last encoder layers collected (eqs. 5–6); A8: \"The optimal number of layers is k = 6\"")
    pos_embed: str = setting("dpe", "position encoding (eq. 2, A9): dynamic position embedding (dpe), none, or "
                             "conditional (cpe)", choices=("dpe", "none", "cpe"))
    pe_interp: str = setting("bilinear", "DPE interpolation (A9): \"Bi-linear interpolation is best\"",
                             choices=("bilinear", "bicubic"))
    elm: bool = setting(True, "enhanced locality module (eqs. 9–11, A10); the full model has it")
    elm_irb: bool = setting(True, "ELM's inverted residual block (A10: \"all components contribute\")")
    elm_aspp: bool = setting(True, "ELM's à trous spatial pyramid pooling (A10)")
    elm_wave: bool = setting(True, "ELM's WaveBlock (A10)")
    fusion: str | None = setting(
        None, "fusion of the ELM's input and output (A13); None (null): 'orthogonal' with the ELM (\"We choose "
        "orthogonal fusion as default\"), 'none' without", choices="nbsrc.models.locality.FUSIONS")
    head_dim: int = setting(1536, "output dimension N of the FC layer (eq. 12), the model's feature_dim (not "
                            "timm's attention head size); A7: \"the best performance is obtained by N = 1,536\"")
    branch: str = setting("both", "both (eq. 12), global ([CLS] only, eq. 7) or local (patches only, eq. 10): "
                          "A5 uses one branch", choices="nbsrc.models.dtop.BRANCHES")

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


@dataclass
class ModelConfig:
    """Section ``model``: what :func:`nbsrc.models.build_model` builds."""

    backbone: str = setting("vit_tiny_patch16_224", "any timm model name", paper="deit_small_patch16_224")
    patch_size: int | None = setting(7, "override the ViT patch size (none: the backbone's own)")
    weights: str = setting("none", "starting weights: none (random), timm (timm's pretrained), efficientnet_lite0 "
                           "(offline ImageNet weights), or a checkpoint file or run directory")
    pooling: str = setting("cls", "how the tokens or feature map become one descriptor (nbsrc.models.POOLINGS); "
                           "checked when built", choices="nbsrc.models.pooling.POOLINGS")
    gem_p: float = setting(3.0, "GeM pooling exponent p (pooling gem)")
    gem_learnable: bool = setting(False, "learn GeM's p with the network")
    dim: int | None = setting(
        None, "PCA output dimension (IRT's ▷dim, e.g. 128), fitted on training embeddings after training; the "
        "size of the returned embedding; none: no PCA, the embedding keeps feature_dim (the pooling's or DToP "
        "head's size)")
    dtop: DToPConfig | None = setting(None, "the DToP model (the fields of model.dtop; on: the paper's full model "
                                      "unless they change it); none: backbone + pooling")

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

    name: str = setting("contrastive", "the loss; checked when the run is built, before anything is written "
                        "(SfM-120k tuples: contrastive, see tuple_loss)", choices="nbsrc.losses.PAIR_LOSSES",
                        name="loss")
    beta: float = setting(0.5, "margin on negatives (pytorch-metric-learning: neg_margin), in [0, 1]; IRT eq. 1's "
                          "beta")
    lam: float = setting(0.7, "KoLeo weight lambda (IRT eq. 5); 0 gives IRT_L, > 0 IRT_R")
    memory_size: int = setting(0, "cross-batch memory (XBM) size in embeddings; 0: off")
    memory_start: int = setting(0, "iteration from which the cross-batch memory is read and filled (XBM warm-up; "
                                "before it: batch x batch only); 0: from the start, as IRT fine-tuning a "
                                "pretrained model does")
    momentum: float | None = setting(None, "momentum encoder for the memory; none: off", paper="0.999 (In-Shop)")
    arcface_margin: float = setting(0.15, "ArcFace additive angular margin m (loss arcface)")
    arcface_scale: float = setting(30.0, "ArcFace scale s (loss arcface)")
    temperature: float = setting(0.05, "Normalized Softmax and Scalable NCA temperature")
    tuple_loss: str = setting(
        "distance", "SfM-120k tuple loss: \"distance\" (cirtorch's ½d² / ½max(0, β − d)², summed over tuples; "
        "IRT §4.2 builds on that code) or \"eq1\" (IRT eq. 1 with β as a cosine threshold); nbsrc.losses.tuples",
        choices="nbsrc.losses.TUPLE_LOSSES")
    hyperparameters: dict | None = setting(
        None, "the hyperparameters a registered loss declares itself (nbsrc.losses.register_pair_loss), as "
        "{name: value}; each is also given by its own name (toy_scale=2.0, --toy-scale 2); none: their defaults")

    def hyperparameter(self, name: str) -> Any:
        """The value of the loss hyperparameter ``name``: a field of this section (``beta``), else one a
        registered loss declared (:data:`LOSS_HYPERPARAMETERS`), as given or at its default."""
        if name in self.__dataclass_fields__:
            return getattr(self, name)
        if name not in LOSS_HYPERPARAMETERS:
            raise _unknown(name, [*self.__dataclass_fields__, *LOSS_HYPERPARAMETERS], "loss.")
        return (self.hyperparameters or {}).get(name, LOSS_HYPERPARAMETERS[name].default)

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
            bad("memory_start", self.memory_start,
                "an iteration >= 0 from which the memory is used (0: from the start)")
        if self.momentum is not None and not 0.0 <= self.momentum < 1.0:
            bad("momentum", self.momentum, "a momentum in [0, 1) (paper: 0.999), or None")
        if self.momentum is not None and self.memory_size == 0:
            bad("momentum", self.momentum, "None unless memory_size > 0 (it encodes the memory)")
        if self.arcface_scale <= 0 or self.temperature <= 0:
            bad("arcface_scale/temperature", (self.arcface_scale, self.temperature), "positive")
        if not isinstance(self.tuple_loss, str) or not self.tuple_loss:  # a name of TUPLE_LOSSES, checked at build
            bad("tuple_loss", self.tuple_loss, "a form of nbsrc.losses.TUPLE_LOSSES ('distance' or 'eq1')")
        self._validate_hyperparameters(bad)

    def _validate_hyperparameters(self, bad) -> None:
        """Each of ``hyperparameters`` is declared by a registered loss, belongs to this loss (another
        loss's only at its default) and passes its declaration's check."""
        given = self.hyperparameters
        if given is None:
            return
        if not isinstance(given, dict):
            bad("hyperparameters", given, "a dict {name: value} of the loss's hyperparameters, or None")
        for key, value in given.items():
            h = LOSS_HYPERPARAMETERS.get(key)
            if h is None:
                close = difflib.get_close_matches(str(key), sorted(LOSS_HYPERPARAMETERS), n=1)
                raise ConfigError(f"unknown loss hyperparameter {key!r}" + (f" (did you mean {close[0]!r}?)" if close
                                  else "") + "; a registered loss declares its own (nbsrc.losses.register_pair_loss)")
            if self.name not in h.losses and value != h.default:
                raise ConfigError(f"{key}={value!r} is a hyperparameter of loss {' or '.join(sorted(h.losses))}, "
                                  f"not of loss={self.name!r}; drop it, or set loss={sorted(h.losses)[0]!r}")
            if isinstance(value, float) and not math.isfinite(value):
                bad(key, value, "a finite number (not NaN or inf)")
            expected = h.check(value) if h.check is not None else None
            if expected:
                bad(key, value, expected)


@dataclass
class OptimConfig:
    """Section ``optim``: the optimizer, the schedule, the batches, and the precision of the numbers."""

    optimizer: str = setting("adamw", "optimizer of the network's parameters", choices=OPTIMIZERS)
    lr: float = setting(3e-5, "peak learning rate")
    loss_lr_mult: float = setting(1.0, "learning rate of the loss's own parameters (class proxies, a linear "
                                  "head) as a multiple of lr; our reading: neither paper sets one (Proxy-Anchor "
                                  "trains its proxies at 100 × lr)")
    weight_decay: float = setting(5e-4, "decoupled weight decay (AdamW) or L2 (SGD, Adam)")
    batch_size: int = setting(64, "images per batch, a multiple of --m-per-class")
    m_per_class: int = setting(16, "m samples of each class in every batch, so that every batch has positives")
    iterations: int = setting(1000, "training iterations; 0: no training, the off-the-shelf model (IRT_O)")
    warmup_iters: int = setting(0, "iterations of linear learning-rate warm-up")
    scheduler: str = setting("cosine", "learning-rate schedule after the warm-up", choices=SCHEDULERS)
    min_lr_factor: float = setting(1e-2, "cosine decays to lr * min_lr_factor")
    grad_clip: float | None = setting(1.0, "max global grad norm; none: off")
    lr_decay_per_epoch: float = setting(0.0, "SfM tuple training: lr × exp(−decay · epoch) (cirtorch: 0.01); 0: off")
    freeze_batchnorm: bool = setting(False, "BatchNorm layers kept in eval mode while training (cirtorch); ViTs "
                                     "have none")
    amp: bool = setting(True, "mixed precision on CUDA (bf16 where supported, else fp16 + GradScaler)")
    cpu_bf16: bool = setting(False, "bf16 autocast when training on CPU (changes the numbers: not an execution "
                             "field)")

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
        if self.loss_lr_mult <= 0:
            bad("loss_lr_mult", self.loss_lr_mult, "a positive multiple of lr (1: the network's rate)")
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

    ks: tuple[int, ...] = setting((1, 2, 4, 8), "the K of Recall@K")
    eval_every: int = setting(0, "evaluate every N iterations; 0: only at the end")
    eval_batch_size: int = setting(256, "images per batch when embedding for evaluation", execution=True)
    eval_scales: list[float] | None = setting(None, "Revisited evaluation scales (DToP: 1, 1/√2, 1/2); none: "
                                              "single scale")
    whitening: str | None = setting(None, "learned: supervised whitening from SfM-120k pairs (DToP, Radenović); "
                                    "none: off", choices=WHITENINGS)
    evaluator: str | None = setting(
        None, "what is measured (\"recall\": Recall@K on the test classes; \"revisited\": mAP and mP@k of "
        "Revisited Oxford and Paris), checked when the run is built; none: the dataset's own (revisited for "
        "sfm120k, recall otherwise)", choices="nbsrc.eval.evaluators.EVALUATORS")

    def validate(self, bad) -> None:
        if self.evaluator is not None and (not isinstance(self.evaluator, str) or not self.evaluator):
            bad("evaluator", self.evaluator, "the name of an evaluator of nbsrc.eval.evaluators.EVALUATORS, or None")
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

    tuples_per_batch: int = setting(5, "tuples in a batch (IRT §4.2: 5)")
    negatives_per_tuple: int = setting(5, "SfM-120k: hard negatives mined per (query, positive) tuple")
    pairs_per_epoch: int = setting(2000, "SfM-120k: (query, positive) pairs drawn per epoch")
    negative_pool: int = setting(22000, "SfM-120k: images from which the hard negatives are mined each epoch")

    def validate(self, bad) -> None:
        for name in ("tuples_per_batch", "negatives_per_tuple", "pairs_per_epoch", "negative_pool"):
            if getattr(self, name) < 1:
                bad(name, getattr(self, name), "a positive integer")


@dataclass(frozen=True)
class LossHyperparameter:
    """A hyperparameter a pair loss declares itself (:func:`nbsrc.losses.register_pair_loss`), held in
    ``loss.hyperparameters`` and given by its ``name`` like a field: its ``default``, its ``help``, the
    ``paper``'s value where the default is another, and ``check(value)``: None when the value is valid,
    else what was expected (``"a positive scale"``). ``losses``: the registered losses that take it."""

    name: str
    default: Any
    help: str
    paper: Any = None
    check: Any = None
    losses: frozenset = frozenset()


# name -> declaration of the hyperparameters the registered pair losses declare beyond LossConfig's fields;
# filled by nbsrc.losses.register_pair_loss (the config imports nothing above it).
LOSS_HYPERPARAMETERS: dict[str, LossHyperparameter] = {}


SECTIONS: dict[str, type] = {"run": RunConfig, "data": DataConfig, "model": ModelConfig, "loss": LossConfig,
                             "optim": OptimConfig, "eval": EvalConfig, "tuples": TupleConfig}


# ----------------------------------------------------------------------------- the fields by name
@dataclass(frozen=True)
class ConfigField:
    """One field as the CLI and the notebooks see it: its ``name`` (the flag ``--lr``, the keyword
    ``lr=``), where it lives (``section`` ``optim``, or ``model.dtop`` for DToP's; ``field``, its name
    there), its type hint, default and what :func:`setting` says of it."""

    name: str
    section: str
    field: str
    type: Any
    default: Any
    help: str
    choices: tuple | str | None  # the values, or the dotted path of the registry that holds them
    paper: Any
    execution: bool


def _declared() -> list[tuple[str, type, dataclasses.Field]]:
    """``(section, class, field)`` of every field, DToP's after the model's."""
    out = []
    for section, cls in SECTIONS.items():
        out += [(section, cls, f) for f in dataclasses.fields(cls)]
        if cls is ModelConfig:
            out += [("model.dtop", DToPConfig, f) for f in dataclasses.fields(DToPConfig)]
    return out


def _name_of(f: dataclasses.Field) -> str:
    return f.metadata.get("name", f.name)


_WHERE: dict[str, tuple[str, str]] = {}  # a field's name -> (section, field): "lr" -> ("optim", "lr")
for _section, _cls, _f in _declared():
    if _name_of(_f) in _WHERE or _name_of(_f) in SECTIONS and _name_of(_f) != "loss":
        raise AssertionError(f"config field name {_name_of(_f)!r} is not unique")  # names are the CLI's flags
    _WHERE[_name_of(_f)] = (_section, _f.name)

# The fields that change how a run is executed or logged but not what it computes (``setting(...,
# execution=True)``): two configs that differ only here describe the same experiment (used to decide
# whether a saved run can be reused, and the only fields `train --resume` may change). Not here: ``amp``
# and ``cpu_bf16``, which change the numbers a run computes (bf16 rounds every matmul).
EXECUTION_FIELDS = frozenset(_name_of(f) for _, _, f in _declared() if f.metadata.get("execution"))
# Fields added after runs were saved, with the value every earlier run had: at that value they stay out of
# the fingerprint, so an earlier run is still found (and named) by the fingerprint it was saved with.
ADDED_FIELDS: dict[str, Any] = {"loss_lr_mult": 1.0, "hyperparameters": None}


@functools.cache
def config_fields() -> tuple[ConfigField, ...]:
    """Every field of the config, section by section (the CLI's flags, the notebooks' parameters)."""
    out = []
    for section, cls, f in _declared():
        m = f.metadata
        out.append(ConfigField(_name_of(f), section, f.name, typing.get_type_hints(cls)[f.name], f.default,
                               m.get("help", ""), m.get("choices"), m.get("paper"), bool(m.get("execution"))))
    return tuple(out)


def loss_hyperparameter_fields() -> tuple[ConfigField, ...]:
    """The hyperparameters the registered pair losses declare (:data:`LOSS_HYPERPARAMETERS`) as fields of
    section ``loss``: the CLI's flags (``--toy-scale``) and the notebooks' parameters beside
    :func:`config_fields`."""
    return tuple(ConfigField(h.name, "loss", h.name, type(h.default), h.default,
                             f"{h.help} (loss {' or '.join(sorted(h.losses))})", None, h.paper, False)
                 for h in LOSS_HYPERPARAMETERS.values())


def _unknown(key: Any, names: list[str], where: str = "") -> ConfigError:
    close = difflib.get_close_matches(str(key), sorted(names), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown parameter {f'{where}{key}'!r}{hint}; valid parameters are the fields of "
                       "ExperimentConfig (names such as 'lr', or sections such as 'optim')")


def as_dtop(value: Any, current: DToPConfig | None = None, where: str = "dtop") -> DToPConfig | None:
    """``model.dtop`` from what a user gives: a DToPConfig, None or False (no DToP), True (on: ``current``,
    else the paper's full model), or a dict of some of its fields (over ``current``, else over the paper's
    defaults); a key that is no DToPConfig field is a one-line error naming it and ``where`` it was given."""
    if value is None or value is False:
        return None
    if value is True:
        return dataclasses.replace(current) if current is not None else DToPConfig()
    if isinstance(value, DToPConfig):
        return dataclasses.replace(value)
    if isinstance(value, dict):
        names = [f.name for f in dataclasses.fields(DToPConfig)]
        unknown = [k for k in value if k not in names]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown DToP option {unknown[0]!r} in {where}{hint}; valid options are "
                              f"{', '.join(names)}")
        return dataclasses.replace(current or DToPConfig(), **value)
    raise ConfigError(f"{where}={value!r} is invalid: expected a DToPConfig, a dict of its fields, True or None")


def _coerce(section: str, name: str, value: Any, current: Any) -> Any:
    """JSON gives lists: ``ks`` is a tuple of ints, ``eval_scales`` a list of floats, ``weights`` a string,
    ``dtop`` a DToPConfig (``current``: the section being changed)."""
    if (section, name) == ("eval", "ks") and value is not None:
        return tuple(int(k) for k in value)
    if (section, name) == ("eval", "eval_scales") and value is not None:
        return [float(v) for v in value]
    if (section, name) == ("model", "weights") and isinstance(value, Path):
        return str(value)
    if (section, name) == ("model", "dtop"):
        return as_dtop(value, current.dtop)
    if (section, name) == ("loss", "hyperparameters") and not value:
        return None  # {} is none given
    return value


def _changed(sections: dict[str, Any], changes: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """``sections`` (``{section: dataclass or None}``) with ``changes`` applied, and the sections changed.

    A key of ``changes`` is a field's name (``lr``, ``loss``, DToP's ``k``) or a section's, with its
    dataclass (the section, whole; ``tuples`` may be None) or a dict of some of its fields (those fields
    changed). ``loss`` is the field when its value is a string, the section otherwise. A field given
    twice (by its name and in its section) is an error, as is an unknown key (with the closest name), a
    DToP field while the DToP model is off, and a tuple field away from its default while SfM-120k does
    not train on tuples (at its default it is ignored: older configs held the tuple fields always)."""
    whole: dict[str, Any] = {}
    edits: dict[str, dict[str, Any]] = {}
    keys: dict[tuple[str, str], str] = {}

    hyper: dict[str, Any] = {}  # loss hyperparameters given by name, merged into loss.hyperparameters

    def put(section: str, name: str, value: Any, key: str) -> None:
        if (section, name) in keys:
            raise ConfigError(f"{key} is given twice (by its name and in section {section!r}); give it once")
        keys[(section, name)] = key
        if section == "loss" and name in LOSS_HYPERPARAMETERS:
            hyper[name] = value
        else:
            edits.setdefault(section, {})[name] = value

    for key, value in changes.items():
        if key in SECTIONS and not (key == "loss" and isinstance(value, str)):
            cls = SECTIONS[key]
            if isinstance(value, cls) or (key == "tuples" and value is None):
                whole[key] = value
            elif isinstance(value, dict):
                names = [f.name for f in dataclasses.fields(cls)]
                names += list(LOSS_HYPERPARAMETERS) if key == "loss" else []
                for name, v in value.items():
                    if name not in names:
                        raise _unknown(name, names, f"{key}.")
                    put(key, name, v, f"{key}.{name}")
            else:
                raise ConfigError(f"{key}={value!r} is invalid: expected a {cls.__name__} or a dict of its fields")
        elif key in _WHERE:
            put(*_WHERE[key], value, key)
        elif key in LOSS_HYPERPARAMETERS:
            put("loss", key, value, key)
        else:
            raise _unknown(key, [*_WHERE, *LOSS_HYPERPARAMETERS, *SECTIONS])
    if hyper:
        if "loss" in whole:
            raise ConfigError(f"{next(iter(hyper))} is given with the whole section 'loss'; give it once")
        base = edits.get("loss", {}).get("hyperparameters", sections["loss"].hyperparameters)
        edits.setdefault("loss", {})["hyperparameters"] = {**(base or {}), **hyper}
    for section in whole:
        if edits.get(section):
            first = next(iter(edits[section]))
            raise ConfigError(f"{keys[(section, first)]} is given with the whole section {section!r}; give it once")

    out, touched = dict(sections), (set(whole) | set(edits)) - {"model.dtop"}
    for section, value in whole.items():
        out[section] = None if value is None else dataclasses.replace(value)
    for section in ("run", "data", "model", "loss", "optim", "eval"):
        if section in whole or section in edits:  # a whole section's fields are coerced too (ks a list)
            obj = out[section]
            names = [f.name for f in dataclasses.fields(obj)] if section in whole else list(edits[section])
            values = {**{n: getattr(obj, n) for n in names}, **edits.get(section, {})}
            out[section] = dataclasses.replace(obj, **{n: _coerce(section, n, v, obj) for n, v in values.items()})
    if edits.get("model.dtop"):
        touched.add("model")
        model = out["model"]
        if model.dtop is None:
            name, v = next(iter(edits["model.dtop"].items()))
            raise ConfigError(f"{name}={v!r} is a setting of the DToP model, which is off; turn it on with dtop=True "
                              f"(--dtop), or drop {name}")
        out["model"] = dataclasses.replace(model, dtop=dataclasses.replace(model.dtop, **edits["model.dtop"]))
    _place_tuples(out, touched, "tuples" in whole, edits.get("tuples", {}))
    return out, touched


def _place_tuples(out: dict[str, Any], touched: set[str], given_whole: bool, edits: dict[str, Any]) -> None:
    """The ``tuples`` section after a change: TupleConfig (with ``edits``) when SfM-120k trains on tuples,
    else None; a section given whole is kept as given (validation says whether it fits)."""
    if given_whole:
        return
    if out["data"].uses_tuples:
        if out["tuples"] is None or edits:
            out["tuples"] = dataclasses.replace(out["tuples"] or TupleConfig(), **edits)
            touched.add("tuples")
        return
    held = {**(dataclasses.asdict(out["tuples"]) if out["tuples"] is not None else {}), **edits}
    for name, value in held.items():
        if value != getattr(TupleConfig, name):
            raise ConfigError(f"{name}={value!r} applies only to SfM-120k tuple training (dataset='sfm120k', "
                              f"sfm_training='tuples'), not to dataset={out['data'].dataset!r}; drop it")
    if out["tuples"] is not None:
        out["tuples"] = None
        touched.add("tuples")


def _default_sections() -> dict[str, Any]:
    return {s: None if s == "tuples" else cls() for s, cls in SECTIONS.items()}


def _finite(obj: Any, bad) -> None:
    """NaN and inf pass every comparison of the checks: refuse them first."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            bad(_name_of(f), value, "a finite number (not NaN or inf)")


def _dtop_of_options(options: Any) -> Any:
    """The ``model.dtop`` of an older config's ``model_options`` (``{"dtop": True, "k": 6, ...}``, the whole
    DToP model): a dict of every DToP field, or None without ``"dtop": True``."""
    if not isinstance(options, dict):
        raise ConfigError(f"model_options={options!r} is invalid: expected a dict of DToP options such as "
                          "{'dtop': True, 'k': 6}")
    options = dict(options)
    if not options.pop("dtop", False):
        if options:
            raise ConfigError(f"model_options={options!r} needs 'dtop': True (its options are DToP's); add it, "
                              "or drop the options")
        return None
    return dataclasses.asdict(as_dtop(options, where="model_options"))


def upgrade(d: dict[str, Any]) -> dict[str, Any]:
    """A saved config (a run's ``config.json``, a preset) in today's form: ``{"format": 2, section: {field:
    value}, ...}``, with only the fields ``d`` gives.

    ``d`` of format 2 is returned as it is. ``d`` without ``"format"`` is the flat form of older versions
    (every field by its name at the top, the DToP model as ``model_options``: ``{}`` or ``{"dtop": True,
    <DToP fields that differ from the paper's>}``; the tuple fields held even where SfM-120k does not
    train on tuples, then at their defaults, which are dropped). A key that is no field is a one-line
    error with the closest name; a format newer than this version's is one too."""
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a dict of its fields, got a {type(d).__name__}")
    if "format" in d:
        if d["format"] != CONFIG_FORMAT:
            raise ConfigError(f"config format {d['format']!r} is not one this nbsrc reads (format {CONFIG_FORMAT}); "
                              "use the nbsrc version that wrote it, or a newer one")
        return dict(d)
    out: dict[str, Any] = {"format": CONFIG_FORMAT}
    for key, value in d.items():
        if key == "model_options":
            section, name, value = "model", "dtop", _dtop_of_options(value)
            if value is None:
                continue
        elif key in SECTIONS and isinstance(value, dict):
            for name, v in value.items():
                if name in out.setdefault(key, {}):
                    raise ConfigError(f"{key}.{name} is given twice (by its name and in section {key!r}); give it once")
                out[key][name] = v
            continue
        elif key in _WHERE:
            section, name = _WHERE[key]
        elif key in LOSS_HYPERPARAMETERS:
            section, name = "loss", key
        else:
            raise _unknown(key, [*_WHERE, *LOSS_HYPERPARAMETERS, *SECTIONS])
        if section == "model.dtop":
            section, value, name = "model", {**(out.get("model", {}).get("dtop") or {}), name: value}, "dtop"
        elif name in out.get(section, {}):
            raise ConfigError(f"{key} is given twice (by its name and in section {section!r}); give it once")
        out.setdefault(section, {})[name] = value
    data = {**{f.name: f.default for f in dataclasses.fields(DataConfig)}, **out.get("data", {})}
    if not DataConfig(**data).uses_tuples and "tuples" in out:
        out["tuples"] = {k: v for k, v in out["tuples"].items() if v != getattr(TupleConfig, k)}
        if not out["tuples"]:
            del out["tuples"]
    return out


def _as_changes(d: dict[str, Any]) -> dict[str, Any]:
    """A dict given to :meth:`ExperimentConfig.from_dict` as keywords: a saved form (with ``format``, or
    the flat form's ``model_options``) upgraded first; fields by name and sections as they are."""
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a dict of its fields, got a {type(d).__name__}")
    if "format" in d or "model_options" in d:
        d = upgrade(d)
        d.pop("format")
    return d


# ----------------------------------------------------------------------------- the config
@dataclass(init=False)
class ExperimentConfig:
    """An experiment: ``run``, ``data``, ``model`` (with ``model.dtop``), ``loss``, ``optim``, ``eval``
    and ``tuples`` (None unless SfM-120k trains on tuples).

    ``ExperimentConfig(lr=1e-3, dataset="cub")`` (fields by name), ``ExperimentConfig(optim=OptimConfig(lr=1e-3))``
    (sections) and a mix are the same thing; construction does not validate, :meth:`from_dict`,
    :meth:`from_layers` and :meth:`replace` (and so :meth:`load`) do."""

    run: RunConfig
    data: DataConfig
    model: ModelConfig
    loss: LossConfig
    optim: OptimConfig
    eval: EvalConfig
    tuples: TupleConfig | None

    def __init__(self, **fields: Any):
        self._set(_changed(_default_sections(), fields)[0])

    def _set(self, sections: dict[str, Any]) -> None:
        for section, value in sections.items():
            setattr(self, section, value)

    def _sections(self) -> dict[str, Any]:
        return {s: getattr(self, s) for s in SECTIONS}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        """Build from a dict, validated: a saved form (``config.json`` or a preset, of any version:
        :func:`upgrade`), fields by name (papermill parameters, a ``--config`` file), sections, or a mix.
        An unknown key is a one-line error with the closest name."""
        cfg = cls(**_as_changes(d))
        cfg.validate()
        return cfg

    @classmethod
    def from_layers(cls, *layers: dict[str, Any]) -> ExperimentConfig:
        """The defaults with each layer (a dict as :meth:`from_dict` reads it) applied over the ones
        before, a later layer's field winning (a preset, then a ``--config`` file, then flags);
        validated once, when all are applied."""
        sections = _default_sections()
        for layer in layers:
            sections = _changed(sections, _as_changes(layer))[0]
        cfg = cls.__new__(cls)
        cfg._set(sections)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> ExperimentConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A copy with ``changes`` (fields by name, ``dtop=``, or sections, as the constructor takes them)
        applied: the sections they touch are new, the others shared with this config (treat a config
        as a value: change it with ``replace``). The touched sections and the checks across sections
        are validated."""
        sections, touched = _changed(self._sections(), changes)
        cfg = type(self).__new__(type(self))
        cfg._set(sections)
        cfg._validate(touched)
        return cfg

    def value(self, name: str) -> Any:
        """The field called ``name`` (``cfg.value("lam") == cfg.loss.lam``); None for a field of a section
        the config does not have (DToP's without the DToP model, the tuples' without tuple training); a
        registered loss's hyperparameter (``cfg.value("toy_scale")``) as given or at its default."""
        if name in LOSS_HYPERPARAMETERS and name not in _WHERE:
            return self.loss.hyperparameter(name)
        if name not in _WHERE:
            raise _unknown(name, [*_WHERE, *LOSS_HYPERPARAMETERS])
        section, field = _WHERE[name]
        obj = self.model.dtop if section == "model.dtop" else getattr(self, section)
        return None if obj is None else getattr(obj, field)

    def to_dict(self) -> dict[str, Any]:
        """The saved form, ``config.json``'s: ``{"format": 2, section: {field: value}}`` with every field
        (``ks`` a list; ``model.dtop`` and ``tuples`` None or their fields)."""
        out: dict[str, Any] = {"format": CONFIG_FORMAT}
        for section, obj in self._sections().items():
            out[section] = None if obj is None else json.loads(json.dumps(dataclasses.asdict(obj)))
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def fingerprint(self) -> dict[str, Any]:
        """What the run computes: ``{name: value}`` of every field but the execution fields, in the form
        of the versions that saved the config flat, so that a run's reuse and the names hashed from it
        (the CLI's, the demo's pretraining run) are those of the runs they saved: ``ks`` a list, the tuple
        fields at their defaults without tuple training, and the DToP model as one entry
        ``"model_options"``: ``{}`` without it, else ``{"dtop": True}`` with its fields that differ from
        the paper's."""
        out: dict[str, Any] = {}
        for obj in self._sections().values():
            obj = TupleConfig() if obj is None else obj
            for f in dataclasses.fields(obj):
                name, value = _name_of(f), getattr(obj, f.name)
                if f.name == "dtop":
                    default = DToPConfig()
                    name, value = "model_options", {} if value is None else {"dtop": True, **{
                        g.name: getattr(value, g.name) for g in dataclasses.fields(value)
                        if getattr(value, g.name) != getattr(default, g.name)}}
                elif isinstance(value, (tuple, list)):
                    value = list(value)
                if name not in EXECUTION_FIELDS and not (name in ADDED_FIELDS and value == ADDED_FIELDS[name]):
                    out[name] = value
        return out

    def changed_fingerprint(self) -> dict[str, Any]:
        """The fingerprint's fields that differ from the defaults (``name`` left out): what a run's
        name is hashed from, so that a field added later with its default renames no run."""
        defaults = _DEFAULT_FINGERPRINT
        return {k: v for k, v in self.fingerprint().items() if k != "name" and v != defaults.get(k)}

    @property
    def run_dir(self) -> Path:
        return Path(self.run.runs_dir) / self.run.name

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Each section's checks, then those that span sections; the first problem is a one-line
        :class:`~nbsrc.errors.ConfigError` naming the field and what was expected."""
        self._validate(set(SECTIONS))

    def _validate(self, sections: set[str]) -> None:
        """The checks of ``sections`` (those a :meth:`replace` touched) and those across sections."""
        bad = invalid
        for section in SECTIONS:
            if section not in sections:
                continue
            obj = getattr(self, section)
            if not isinstance(obj, (SECTIONS[section], type(None))):
                bad(section, obj, f"a {SECTIONS[section].__name__}")
            if obj is None or section == "tuples":
                continue
            _finite(obj, bad)
            if section == "model" and self.model.dtop is not None:
                if not isinstance(self.model.dtop, DToPConfig):
                    bad("dtop", self.model.dtop, "a DToPConfig, or None")
                _finite(self.model.dtop, bad)
            obj.validate(bad)
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
            if "tuples" in sections:
                _finite(self.tuples, bad)
                self.tuples.validate(bad)


_DEFAULT_FINGERPRINT = ExperimentConfig().fingerprint()


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
