"""One source of truth for an experiment.

:class:`ExperimentConfig` is shared by the CLI (``python -m nbsrc train``), the notebooks'
``parameters`` cells and the saved run (``runs/<name>/config.json``). Every field has the paper's
default unless the comment says otherwise; ``validate()`` turns a nonsense value into a one-line
:class:`~nbsrc.errors.ConfigError` that names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nbsrc.errors import ConfigError

DATASETS = ("fashion_mnist", "digits", "glyphs", "folder", "cub", "sop", "inshop", "sfm120k")
SAMPLERS = ("m_per_class", "group_size")
SCHEDULERS = ("cosine", "constant")
OPTIMIZERS = ("adamw", "sgd", "adam")
WHITENINGS = (None, "learned")

# --help of the fields whose name alone does not say what they are (the CLI shows it)
FIELD_HELP = {
    "beta": "margin on negatives (pytorch-metric-learning: neg_margin), in [0, 1]; IRT eq. 1's beta",
    "lam": "KoLeo weight lambda (IRT eq. 5); 0 gives IRT_L, > 0 IRT_R",
    "dim": "PCA output dimension fitted after training (IRT: 128); none keeps the embedding",
    "memory_size": "cross-batch memory (XBM) size in embeddings; 0: off",
    "memory_start": "iteration from which the cross-batch memory is read and filled (XBM warm-up); 0: from the start",
}

# Fields that change how a run is executed or logged but not what it computes: two configs that
# differ only here describe the same experiment (used to decide whether a saved run can be reused).
EXECUTION_FIELDS = frozenset(
    {"runs_dir", "device", "num_workers", "log_every", "ckpt_every", "progress", "eval_batch_size",
     "compile", "pin_memory", "fused_optimizer", "cpu_compile", "threads"}
)
# Not here: ``amp`` and ``cpu_bf16``, which change the numbers a run computes (bf16 rounds every matmul).


@dataclass
class ExperimentConfig:
    # --- run ---
    name: str = "irt_r"
    runs_dir: str = "runs"
    seed: int = 0

    # --- data ---
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
    # SfM-120k tuple training (IRT §4.2, Radenović et al.): per epoch, pairs_per_epoch (query, positive)
    # pairs and a negative_pool of images; negatives_per_tuple hard negatives mined with the current model
    tuples_per_batch: int = 5
    negatives_per_tuple: int = 5
    pairs_per_epoch: int = 2000
    negative_pool: int = 22000

    # --- model ---
    backbone: str = "vit_tiny_patch16_224"  # any timm model name (paper: deit_small_patch16_224)
    patch_size: int | None = 7  # override the ViT patch size (None: the backbone's own)
    weights: str = "none"  # none | timm | efficientnet_lite0 | /path/to/checkpoint.pt
    pooling: str = "cls"  # a name of nbsrc.models.POOLINGS (cls | dist | avg | max | gem | rmac); checked when built
    gem_p: float = 3.0
    gem_learnable: bool = False
    dim: int | None = None  # PCA reduction fitted on training embeddings (paper: 128); None: off
    model_options: dict[str, Any] = field(default_factory=dict)  # extra build_model options (DToP)

    # --- loss (IRT eq. 1 and 5) ---
    loss: str = "contrastive"  # a name of nbsrc.losses.PAIR_LOSSES (contrastive | nsoftmax | snca | arcface);
    # checked when the run is built, before anything is written (SfM-120k tuples: contrastive, see tuple_loss)
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

    # --- optimisation ---
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
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 + GradScaler)
    compile: bool = False  # torch.compile the model (CUDA; measured in `python -m nbsrc.bench train`)
    pin_memory: bool = True  # pinned host memory + non-blocking copies when training on CUDA
    fused_optimizer: bool = True  # fused AdamW/Adam/SGD kernels on CUDA
    # CPU execution (issue 15; measured in `python -m nbsrc.bench train`); each is a no-op on CUDA
    cpu_bf16: bool = False  # bf16 autocast when training on CPU (changes the numbers: not an execution field)
    cpu_compile: bool = False  # torch.compile (inductor) the model when training on CPU
    threads: int = 0  # torch.set_num_threads for training (0: torch's own count)

    # --- bookkeeping ---
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    ckpt_every: int = 100
    record_grad_noise: bool = False  # log gamma = ||Cov(grad directions)||_* (IRT Fig. 4)
    ks: tuple[int, ...] = (1, 2, 4, 8)
    eval_batch_size: int = 256
    progress: bool = True

    # --- the papers' protocols (issue 11; docs/fidelity.md). Defaults leave the demo unchanged. ---
    # SfM-120k tuple loss: "distance" (cirtorch's ½d² / ½max(0, β − d)², summed over tuples; IRT §4.2
    # builds on that code) or "eq1" (IRT eq. 1 with β as a cosine threshold); nbsrc.losses.tuples
    tuple_loss: str = "distance"
    lr_decay_per_epoch: float = 0.0  # SfM tuple training: lr × exp(−decay · epoch) (cirtorch: 0.01); 0: off
    freeze_batchnorm: bool = False  # BatchNorm layers kept in eval mode while training (cirtorch); ViTs have none
    eval_scales: list[float] | None = None  # Revisited evaluation scales (DToP: 1, 1/√2, 1/2); None: single scale
    whitening: str | None = None  # None | "learned": supervised whitening from SfM-120k pairs (DToP, Radenović)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        """Build from a dict, rejecting unknown keys with a suggestion."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, sorted(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown parameter {k!r}{hint}; valid parameters are the fields of ExperimentConfig"
            )
        d = dict(d)
        if "ks" in d and d["ks"] is not None:
            d["ks"] = tuple(int(k) for k in d["ks"])
        if d.get("eval_scales") is not None:
            d["eval_scales"] = [float(v) for v in d["eval_scales"]]
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> ExperimentConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes: Any) -> ExperimentConfig:
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ks"] = list(self.ks)
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def fingerprint(self) -> dict[str, Any]:
        """The fields that define what the run computes (execution-only fields removed)."""
        return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name: str, value: Any, expected: str) -> None:
            raise ConfigError(f"{name}={value!r} is invalid: expected {expected}")

        for f in dataclasses.fields(self):  # NaN and inf pass every comparison below: refuse them first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                bad(f.name, value, "a finite number (not NaN or inf)")

        if not self.name or "/" in self.name or self.name in (".", ".."):
            bad("name", self.name, "a non-empty run name without '/'")
        if self.dataset not in DATASETS:
            bad("dataset", self.dataset, f"one of {', '.join(DATASETS)}")
        if not isinstance(self.dtop_augmentation, bool):
            bad("dtop_augmentation", self.dtop_augmentation, "true or false")
        if not isinstance(self.pooling, str) or not self.pooling:
            bad("pooling", self.pooling, "the name of a pooling of nbsrc.models.POOLINGS")
        if not isinstance(self.loss, str) or not self.loss:
            bad("loss", self.loss, "the name of a loss of nbsrc.losses.PAIR_LOSSES")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", self.optimizer, f"one of {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            bad("scheduler", self.scheduler, f"one of {', '.join(SCHEDULERS)}")
        if not 0.0 <= self.beta <= 1.0:
            bad("beta", self.beta, "a margin in [0, 1] (cosine similarity of negatives; paper: 0.5)")
        if self.lam < 0:
            bad("lam", self.lam, "a KoLeo weight >= 0 (0 turns KoLeo off; paper: 0.7)")
        if self.img_size < 8:
            bad("img_size", self.img_size, "an image side of at least 8 pixels")
        if self.patch_size is not None and (self.patch_size < 1 or self.img_size % self.patch_size):
            bad("patch_size", self.patch_size, f"a divisor of img_size={self.img_size}, or None")
        if self.dim is not None and self.dim < 1:
            bad("dim", self.dim, "a positive PCA dimension, or None to keep the full embedding")
        if self.m_per_class < 2:
            bad("m_per_class", self.m_per_class, "at least 2, so that every batch holds positives")
        if self.batch_size < 2 or self.batch_size % self.m_per_class:
            bad(
                "batch_size",
                self.batch_size,
                f"a multiple of m_per_class={self.m_per_class} (a batch holds m samples per class)",
            )
        if self.batch_size // self.m_per_class < 2:
            bad("batch_size", self.batch_size, "room for at least 2 classes of m_per_class samples")
        if self.memory_size < 0:
            bad("memory_size", self.memory_size, "a memory size >= 0 (0 turns the memory off)")
        if self.memory_start < 0:
            bad("memory_start", self.memory_start, "an iteration >= 0 from which the memory is used (0: from the start)")
        if self.momentum is not None and not 0.0 <= self.momentum < 1.0:
            bad("momentum", self.momentum, "a momentum in [0, 1) (paper: 0.999), or None")
        if self.momentum is not None and self.memory_size == 0:
            bad("momentum", self.momentum, "None unless memory_size > 0 (it encodes the memory)")
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
        if self.gem_p <= 0:
            bad("gem_p", self.gem_p, "a positive GeM exponent (paper: 3)")
        if not self.ks or any(int(k) < 1 for k in self.ks):
            bad("ks", self.ks, "positive Recall@K cut-offs such as (1, 2, 4, 8)")
        if self.split is not None and not 0.0 < self.split < 1.0:
            bad("split", self.split, "the fraction of the classes to train on, in (0, 1), e.g. 0.5; or None")
        defaults = tuple(type(self).__dataclass_fields__[k].default for k in ("train_classes", "test_classes"))
        if self.split is not None and (self.train_classes, self.test_classes) != defaults:
            given = ", ".join(f"{k}={v!r}" for k, v, d in (("train_classes", self.train_classes, defaults[0]),
                                                            ("test_classes", self.test_classes, defaults[1])) if v != d)
            raise ConfigError(f"split={self.split} chooses the training and test classes itself; drop {given}, "
                              "or drop split")
        if self.eval_per_class is not None and self.eval_per_class < 2:
            bad("eval_per_class", self.eval_per_class, "at least 2 images per class, or None")
        for name in ("log_every", "ckpt_every", "eval_every", "num_workers", "threads"):
            if getattr(self, name) < 0:
                bad(name, getattr(self, name), "a non-negative integer")
        if self.size_variant not in (None, "mixed"):
            bad("size_variant", self.size_variant, "None or 'mixed' (the mixed-size variant of DToP Table A12)")
        if self.sampler not in SAMPLERS:
            bad("sampler", self.sampler, f"one of {', '.join(SAMPLERS)}")
        if self.sfm_training not in ("tuples", "classes"):
            bad("sfm_training", self.sfm_training,
                "'tuples' (IRT: mined hard-negative tuples) or 'classes' (DToP: 3D models as classes, e.g. ArcFace)")
        for name in ("tuples_per_batch", "negatives_per_tuple", "pairs_per_epoch", "negative_pool"):
            if getattr(self, name) < 1:
                bad(name, getattr(self, name), "a positive integer")
        if self.arcface_scale <= 0 or self.temperature <= 0:
            bad("arcface_scale/temperature", (self.arcface_scale, self.temperature), "positive")
        if not isinstance(self.model_options, dict):
            bad("model_options", self.model_options, "a dict of extra build_model options")
        self._validate_protocol(bad)

    def _validate_protocol(self, bad) -> None:
        """The papers' protocol fields (the block at the end of the dataclass)."""
        if not isinstance(self.tuple_loss, str) or not self.tuple_loss:  # a name of nbsrc.losses.TUPLE_LOSSES,
            bad("tuple_loss", self.tuple_loss, "a form of nbsrc.losses.TUPLE_LOSSES ('distance' or 'eq1')")  # checked at build
        if not 0.0 <= self.lr_decay_per_epoch < 1.0:
            bad("lr_decay_per_epoch", self.lr_decay_per_epoch, "a rate in [0, 1): lr × exp(−rate · epoch) (cirtorch: 0.01)")
        if self.eval_scales is not None and (not self.eval_scales or any(not (math.isfinite(float(v)) and float(v) > 0) for v in self.eval_scales)):
            bad("eval_scales", self.eval_scales, "None or a non-empty list of positive scales, e.g. [1, 0.7071, 0.5]")
        if self.whitening not in WHITENINGS:
            bad("whitening", self.whitening, "None or 'learned' (supervised whitening from SfM-120k pairs)")


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
