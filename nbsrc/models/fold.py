"""BatchNorm folded into the convolution before it, for inference.

In eval mode a BatchNorm after a convolution is an affine map per output channel,
``y = γ (x − μ) / √(σ² + ε) + β``, so it can be absorbed into the convolution's weights and bias::

    s = γ / √(σ² + ε),   W' = s · W (per output channel),   b' = s · (b − μ) + β

and the BatchNorm disappears (a timm ``BatchNormAct2d`` keeps its dropout and activation). The
embeddings are the same up to float rounding; a convnet's inference gets faster because the network
no longer reads and writes every feature map once more per BatchNorm. EfficientNet-Lite0 at 224 px,
a batch of 32 on this project's 2-core CPU: 1.30 s a batch before, 0.86-1.00 s after (one ad-hoc
run); the whole ``Index.build`` went from 0.86x to 1.28x the speed of a direct loop in
``python -m bench embed`` (with the other changes of that day: bench/RESULTS.md).

Which BatchNorm follows which convolution is read from a forward pass on a probe batch (a BatchNorm
whose input is exactly a convolution's output), not from module names, and the folded copy is then
checked against the original on that probe: if a convolution's output also fed something else (so
folding would change it), the outputs differ and the original model is used instead. The caller's
model is never modified: folding works on a copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Largest difference allowed between the folded and the original model's output on the probe,
# relative to the output's largest magnitude (folding changes only float rounding: ~1e-6 measured).
FOLD_RTOL = 1e-4


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; every submodule's own train/eval mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _foldable_norm(m: nn.Module) -> bool:
    """A BatchNorm2d in eval semantics that folding can replace: plain ``nn.BatchNorm2d`` or timm's
    ``BatchNormAct2d`` (BatchNorm, then its ``drop``, then its ``act``), with running statistics."""
    if type(m) is nn.BatchNorm2d:
        ok = True
    else:
        try:
            from timm.layers import BatchNormAct2d
        except ImportError:  # pragma: no cover - timm is a dependency
            return False
        ok = type(m) is BatchNormAct2d
    return ok and m.track_running_stats and m.running_mean is not None and m.running_var is not None


def conv_norm_pairs(model: nn.Module, probe: torch.Tensor) -> list[tuple[nn.Conv2d, nn.Module]]:
    """``(conv, norm)`` pairs where ``norm`` (a foldable BatchNorm) took exactly ``conv``'s output as
    its input in a forward pass of ``model`` on ``probe`` (in eval mode, without gradients)."""
    # The outputs are kept alive (so that ids stay unique) with their version counter: a tensor changed
    # in place between the convolution and the BatchNorm (an in-place activation) is not a pair.
    outputs: dict[int, tuple[nn.Module, torch.Tensor, int]] = {}
    pairs: list[tuple[nn.Conv2d, nn.Module]] = []

    def conv_hook(mod, inp, out):
        outputs[id(out)] = (mod, out, out._version)

    def norm_hook(mod, inp, out):
        seen = outputs.get(id(inp[0]))
        if seen is not None and seen[1] is inp[0] and inp[0]._version == seen[2]:
            pairs.append((seen[0], mod))

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(norm_hook) for m in model.modules() if _foldable_norm(m)]
    try:
        with eval_mode(model), torch.no_grad():
            model(probe)
    finally:
        for h in hooks:
            h.remove()
    partners: dict[int, set[int]] = {}  # a module called twice (shared weights) must pair alike each time
    for conv, norm in pairs:
        partners.setdefault(id(conv), set()).add(id(norm))
        partners.setdefault(id(norm), set()).add(id(conv))
    unique = {id(norm): (conv, norm) for conv, norm in pairs
              if len(partners[id(conv)]) == 1 and len(partners[id(norm)]) == 1}
    return list(unique.values())


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, norm: nn.Module) -> None:
    scale = torch.rsqrt(norm.running_var.float() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.float()
    shift = -norm.running_mean.float() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.float()
    w = conv.weight
    conv.weight.copy_((w.float() * scale.view(-1, *([1] * (w.ndim - 1)))).to(w.dtype))
    bias = shift if conv.bias is None else conv.bias.float() * scale + shift
    conv.bias = nn.Parameter(bias.to(w.dtype), requires_grad=False)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)


def fold_batchnorm(model: nn.Module, probe: torch.Tensor) -> tuple[nn.Module, int]:
    """``(model', n)``: a copy of ``model`` in eval mode with the ``n`` BatchNorms that directly follow
    a convolution folded into it (module docstring), or ``(model, 0)`` itself when there is nothing to
    fold or the folded copy's output on ``probe`` differs from the original's by more than
    :data:`FOLD_RTOL` of its magnitude. ``model`` is not modified. Works inside
    ``torch.inference_mode`` too (it folds outside it: inference tensors keep no version counter)."""
    if not any(_foldable_norm(m) for m in model.modules()):
        return model, 0
    with torch.inference_mode(False), torch.no_grad():
        return _fold_checked(model, probe.clone())


def _fold_checked(model: nn.Module, probe: torch.Tensor) -> tuple[nn.Module, int]:
    pairs = conv_norm_pairs(model, probe)
    if not pairs:
        return model, 0
    index = {id(m): i for i, m in enumerate(model.modules())}
    try:
        folded = copy.deepcopy(model).eval()
    except Exception:  # a model holding something that cannot be copied: embed with it as it is
        return model, 0
    modules = list(folded.modules())
    try:
        for conv, norm in pairs:
            c, n = modules[index[id(conv)]], modules[index[id(norm)]]
            _fold_pair(c, n)
            _replace(folded, n, nn.Sequential(n.drop, n.act) if hasattr(n, "act") else nn.Identity())
    except Exception:  # a weight that cannot be written (a parametrized convolution): embed as it is
        return model, 0
    with eval_mode(model):
        ref, out = model(probe), folded(probe)
    if not isinstance(ref, torch.Tensor) or ref.shape != out.shape:
        return model, 0
    tol = FOLD_RTOL * max(float(ref.float().abs().max()), 1e-6)
    if not bool(torch.isfinite(out).all()) or float((out.float() - ref.float()).abs().max()) > tol:
        return model, 0
    return folded, len(pairs)


def inference_model(model: nn.Module, probe: torch.Tensor) -> nn.Module:
    """The network to embed with: ``model`` with its BatchNorms folded (:func:`fold_batchnorm`) when
    it has any, else ``model`` itself. A DDP wrapper is left as it is (each rank embeds with its own)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    return fold_batchnorm(model, probe)[0]
