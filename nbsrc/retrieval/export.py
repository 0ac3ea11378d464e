"""A trained model as a file that runs without nbsrc: ``nbsrc export RUN --format torchscript|onnx|safetensors``.

Three formats, for two uses:

- ``torchscript`` (``.pt``, :func:`torch.jit.load`) and ``onnx`` (``.onnx``, onnxruntime or any ONNX
  runtime): the **final descriptor**, images ``[N, 3, S, S]`` (preprocessed as below) -> l2-normalised
  embeddings ``[N, dim]``: backbone, pooling, PCA and l2, exactly what ``nbsrc embed`` computes with
  the same model (:class:`Descriptor`). Each export is run once on random images and compared with
  the PyTorch model before it is kept (largest difference at most :data:`TOLERANCE`, recorded).
- ``safetensors`` (``.safetensors``): the **backbone's weights** only, under timm's own names, so
  plain timm loads them::

      net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file="model.safetensors"),
                              **create_kwargs)   # name and create_kwargs: from the JSON beside the file

  The pooling, PCA and l2 are not in that file (they are not timm's); use torchscript or onnx for
  the final descriptor. DToP models (their extra modules are not timm's) export to torchscript and
  onnx only.

Beside every export ``<file>.json`` says how to feed it: the timm model name and the arguments that
rebuild its backbone, image size, patch size, mean / std and the square resize + centre crop of the
evaluation transform (:class:`~nbsrc.retrieval.models.Preprocessing`), pooling, output dimension,
the nbsrc version, the fingerprint of the run's config and of the weights, and the check's result.

Nothing is overwritten: an existing output (the file or its JSON) is a one-line
:class:`~nbsrc.errors.RunDirError`; ``overwrite=True`` moves both aside to ``<stem>.old-<time><suffix>``
first, as ``--overwrite`` does for runs. Files are written into a temporary folder beside the output,
checked there, and renamed into place.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nbsrc.errors import ConfigError, RunDirError
from nbsrc.eval.stream import model_fingerprint
from nbsrc.retrieval.models import EmbeddingModel, load_embedding_model

FORMATS = ("torchscript", "onnx", "safetensors")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx", "safetensors": ".safetensors"}
TOLERANCE = 1e-5  # largest |exported - PyTorch| accepted on the check's images (float32)
CHECK_IMAGES = 4  # random images the check runs through both (a batch > 1: the batch axis stays free)
INPUT, OUTPUT = "images", "embeddings"  # ONNX tensor names


class Descriptor(nn.Module):
    """The final descriptor of a retrieval model, fixed for export:
    ``z = l2(forward_features(x))``, then, when the model's PCA is fitted, ``z = l2(W (z - μ))``
    (:class:`~nbsrc.models.RetrievalModel` and :class:`~nbsrc.models.dtop.DToPModel` ``forward``).
    Whether the PCA applies is decided here, once, instead of by reading the ``fitted`` flag on every
    call: a data-dependent branch that neither ``torch.export`` (ONNX) nor tracing can follow."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        pca = getattr(model, "pca", None)
        self.use_pca = pca is not None and bool(pca.fitted)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.model.forward_features(x), dim=-1)
        if self.use_pca:
            pca = self.model.pca
            z = F.normalize((z - pca.mean) @ pca.components.T, dim=-1)
        return z


@dataclass
class Export:
    """What :func:`export_model` wrote: the model file, its JSON and the JSON's content."""

    path: Path
    meta_path: Path
    meta: dict


def export_path(spec: str | Path, fmt: str) -> Path:
    """The default output: ``<name>.<suffix>`` in the current directory, ``name`` the run directory's
    (or preset's, or timm model's) last path component."""
    return Path(Path(str(spec).rstrip("/\\")).name + SUFFIX[fmt])


def export_model(model: EmbeddingModel | str | Path, fmt: str, out: str | Path | None = None, *,
                 overwrite: bool = False, log=print) -> Export:
    """Export ``model`` (an :class:`~nbsrc.retrieval.models.EmbeddingModel`, or what
    :func:`~nbsrc.retrieval.models.load_embedding_model` accepts: a run directory, a preset, a timm
    name) as ``fmt`` (one of :data:`FORMATS`) to ``out`` (default :func:`export_path`), with the JSON
    beside it (module docstring). ``log``: where the one-line notes go (``None``: nowhere)."""
    log = log or (lambda *_: None)
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    spec = model if not isinstance(model, EmbeddingModel) else model.reference["spec"]
    em = model if isinstance(model, EmbeddingModel) else load_embedding_model(model)
    out = Path(out) if out is not None else export_path(spec, fmt)
    if out.suffix != SUFFIX[fmt]:
        raise ConfigError(f"--out {out}: a {fmt} export is a {SUFFIX[fmt]} file; name it e.g. "
                          f"{out.with_suffix(SUFFIX[fmt]).name}")
    meta_path = out.with_name(out.name + ".json")
    net = em.model.eval().cpu()
    if fmt == "safetensors":
        timm_name, create_kwargs = timm_backbone(em)  # checks that the backbone is plain timm before writing
    data_path = out.with_name(out.name + ".data")  # an ONNX model above 2 GB keeps its weights there
    _make_room([out, meta_path] + ([data_path] if fmt == "onnx" else []), overwrite, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp = work / out.name  # the final name, so that an ONNX file's reference to its .data file holds
    meta = describe(em)
    try:
        if fmt == "safetensors":
            _write_safetensors(net, tmp)
            meta.update(timm_model=timm_name, timm_create_model=create_kwargs,
                        holds="the backbone's weights only (timm names); pooling, PCA and l2 are not included",
                        check=_check_safetensors(net, tmp, timm_name, create_kwargs, em.preprocessing.img_size))
        else:
            example = torch.randn(CHECK_IMAGES, 3, em.preprocessing.img_size, em.preprocessing.img_size,
                                  generator=torch.Generator().manual_seed(0))
            descriptor = Descriptor(net).eval()
            (_write_torchscript if fmt == "torchscript" else _write_onnx)(descriptor, example, tmp)
            meta.update(holds="the final descriptor: backbone, pooling, PCA and l2 normalisation",
                        input={"name": INPUT, "shape": ["N", 3, em.preprocessing.img_size, em.preprocessing.img_size],
                               "dtype": "float32"},
                        output={"name": OUTPUT, "shape": ["N", meta["dim"]], "dtype": "float32",
                                "l2_normalised": True},
                        check=_check_descriptor(fmt, net, tmp, example))
        if (work / data_path.name).exists():
            os.replace(work / data_path.name, data_path)
            meta["external_data"] = data_path.name
        os.replace(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta.update(format=fmt, file=out.name)
    _write_json(meta_path, meta)
    return Export(out, meta_path, meta)


# ----------------------------------------------------------------------------- the JSON
def describe(em: EmbeddingModel) -> dict:
    """What a user needs to feed the exported file (module docstring), without the format's part. Read
    from the model's reference, else from the network itself (timm's ``pretrained_cfg``, the pooling
    module)."""
    import nbsrc
    from nbsrc.config import upgrade

    net = em.model
    ref = em.reference
    config = ref.get("config") or {}
    cfg = upgrade(config).get("model") or {} if config else {}  # the model section of a config of any version
    build = ref.get("build_model") or {}
    embed = getattr(getattr(net, "backbone", None), "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    pp = em.preprocessing
    pooling = cfg.get("pooling") or build.get("pooling") or getattr(getattr(net, "pool", None), "kind", None)
    return {
        "model": cfg.get("backbone") or build.get("backbone") or _architecture(net),
        "source": {"kind": ref["source"], "spec": ref["spec"]},
        "dtop": type(net).__name__ == "DToPModel",
        "img_size": pp.img_size,
        "patch_size": int(tuple(patch)[0]) if patch is not None else None,
        "mean": list(pp.mean), "std": list(pp.std),
        "preprocessing": pp.description,
        "resize": pp.resize,
        "pooling": pooling,
        "dim": int(net.output_dim),
        "pca": bool(getattr(net, "pca", None) is not None and bool(net.pca.fitted)),
        "nbsrc_version": getattr(nbsrc, "__version__", None),
        "run_fingerprint": config_fingerprint(config) if config else None,
        "model_fingerprint": model_fingerprint(net),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _architecture(net: nn.Module) -> str | None:
    """The timm model name of ``net``'s backbone (timm's ``pretrained_cfg["architecture"]``), or None."""
    return (getattr(getattr(net, "backbone", None), "pretrained_cfg", None) or {}).get("architecture")


def config_fingerprint(config: dict) -> str:
    """sha256 of what a run computes: its config without the execution-only fields
    (:meth:`~nbsrc.config.ExperimentConfig.fingerprint`) and without its name."""
    from nbsrc.config import ExperimentConfig

    fp = {k: v for k, v in ExperimentConfig.from_dict(config).fingerprint().items() if k != "name"}
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()


def timm_backbone(em: EmbeddingModel) -> tuple[str, dict]:
    """``(timm name, create_model kwargs)`` that rebuild the backbone of ``em`` in plain timm, checked by
    building that model (random weights) and comparing every weight's name and shape; a backbone plain
    timm cannot hold (DToP, the EfficientNet-ViT hybrid) is a one-line error, raised before anything is
    written."""
    import timm

    from nbsrc.models import RetrievalModel

    net = em.model
    name = _architecture(net) if isinstance(net, RetrievalModel) else None
    refuse = (f"{em.reference['spec']} is not a plain timm backbone "
              f"({type(net).__name__}{' of ' + name if name else ''}),"
              " so timm cannot load it from safetensors; export --format torchscript or onnx instead")
    if not name or not timm.is_model(name):
        raise ConfigError(refuse)
    wrapper = type(net.backbone)
    if not wrapper.__module__.startswith("timm."):  # nbsrc's own module around timm's weights (PiTTokens)
        raise ConfigError(f"{em.reference['spec']}'s backbone is nbsrc's {wrapper.__name__} around timm's {name}, "
                          "whose features timm alone does not compute; export --format torchscript or onnx instead")
    kwargs: dict = {"num_classes": 0}
    embed = getattr(net.backbone, "patch_embed", None)
    if embed is not None and getattr(embed, "img_size", None) is not None:
        kwargs["img_size"] = int(tuple(embed.img_size)[0])
        kwargs["patch_size"] = int(tuple(embed.patch_size)[0])
    try:
        plain = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, AssertionError, RuntimeError):
        raise ConfigError(refuse) from None
    shapes = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in net.backbone.state_dict().items()}:
        raise ConfigError(refuse)
    return name, kwargs


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- never overwrite
def _make_room(paths: list[Path], overwrite: bool, log) -> None:
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    if not existing:
        return
    if not overwrite:
        raise RunDirError(f"{existing[0]} already exists; choose another --out, or pass --overwrite to move it "
                          "aside (nothing is deleted)")
    for p in existing:
        log(f"moved {p} aside to {move_file_aside(p)}")


def move_file_aside(path: Path) -> Path:
    """Rename ``path`` to ``<stem>.old-<time><suffixes>`` (``-2``, ``-3``, ... when taken): the name is
    reserved by creating it exclusively, then the file is renamed onto it, so no backup is ever
    replaced (the same rule as :func:`nbsrc.train.rundir.move_aside` for run directories)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base, suffixes = path.name.split(".", 1) if "." in path.name else (path.name, "")
    suffixes = "." + suffixes if suffixes else ""
    n = 1
    while True:
        backup = path.with_name(f"{base}.old-{stamp}" + (f"-{n}" if n > 1 else "") + suffixes)
        try:
            os.close(os.open(backup, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            n += 1
            continue
        os.replace(path, backup)
        return backup


# ----------------------------------------------------------------------------- the formats
def _write_torchscript(descriptor: Descriptor, example: torch.Tensor, path: Path) -> None:
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # timm's input-size asserts: the size is fixed
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript; it still runs everywhere
        traced = torch.jit.trace(descriptor, example[:1], check_trace=False)
    traced.save(str(path))


def _write_onnx(descriptor: Descriptor, example: torch.Tensor, path: Path) -> None:
    """torch's ``torch.export``-based ONNX exporter (the default since torch 2.9), the batch axis left free."""
    import contextlib
    import io
    import warnings

    try:
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise ConfigError("ONNX export needs the packages onnx and onnxscript; pip install 'nbsrc[export]' "
                          "(or onnx onnxscript onnxruntime)") from None
    batch = torch.export.Dim("batch", min=1)
    sink = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(descriptor, (example[:2],), dynamo=True, input_names=[INPUT],
                                    output_names=[OUTPUT], dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(path))


def _write_safetensors(net: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in net.backbone.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- the checks
def _compare(ours: torch.Tensor, theirs, what: str) -> dict:
    theirs = torch.as_tensor(theirs)
    if tuple(theirs.shape) != tuple(ours.shape):
        raise RunDirError(f"the {what} gives shape {tuple(theirs.shape)}, the PyTorch model {tuple(ours.shape)}; "
                          "nothing was written (report this as a bug)")
    diff = float((theirs.float() - ours.float()).abs().max())
    if not diff <= TOLERANCE:
        raise RunDirError(f"the {what} differs from the PyTorch model by {diff:.2e} (> {TOLERANCE:g}); nothing was "
                          "written (report this as a bug)")
    return {"images": int(ours.shape[0]), "max_abs_diff": diff, "tolerance": TOLERANCE}


def _check_descriptor(fmt: str, net: nn.Module, path: Path, example: torch.Tensor) -> dict:
    with torch.no_grad():
        ours = net(example)
    if fmt == "torchscript":
        import warnings

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            theirs = torch.jit.load(str(path))(example)
        return _compare(ours, theirs, "TorchScript export")
    try:
        import onnxruntime as ort
    except ImportError:
        return {"skipped": "onnxruntime is not installed (pip install onnxruntime)"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    theirs = session.run([OUTPUT], {INPUT: example.numpy()})[0]
    return _compare(ours, theirs, "ONNX export (onnxruntime)")


def _check_safetensors(net: nn.Module, path: Path, name: str, kwargs: dict, img_size: int) -> dict:
    import timm

    plain = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return _compare(net.backbone.forward_features(x), plain.forward_features(x),
                        "backbone loaded by timm.create_model from the safetensors file")
