"""``nbsrc export``: TorchScript and ONNX give the final descriptor of ``nbsrc embed`` to
1e-5, fed by the JSON's preprocessing alone; the safetensors file loads into plain timm; nothing is
overwritten."""

import json

import numpy as np
import pytest
import torch

from nbsrc.__main__ import main
from nbsrc.retrieval import Index, load_embedding_model

pytestmark = pytest.mark.xdist_group("export")  # its tests share module-scoped fixtures: one worker

# timm's test_vit (6 blocks of width 64, 0.3 M parameters) instead of the default ViT-Tiny (12 blocks of
# width 192): the ONNX exporter traces every op, so half the blocks halve its time; the exported
# descriptor (GeM over the patch tokens, PCA, l2) is the same
TINY = ["--backbone", "test_vit", "--dataset", "digits", "--img-size", "16", "--patch-size", "4", "--batch-size", "16",
        "--m-per-class", "4", "--iterations", "2", "--eval-per-class", "20", "--log-every", "1", "--ckpt-every", "0",
        "--memory-size", "0", "--no-progress", "--device", "cpu", "--lam", "0", "--pooling", "gem", "--dim", "8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny finished run with GeM pooling and a fitted PCA (the whole descriptor is exercised)."""
    runs = tmp_path_factory.mktemp("export") / "runs"
    assert main(["train", "--name", "r", "--runs-dir", str(runs), *TINY]) == 0
    return runs / "r"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Five small RGB files of different sizes and aspect ratios."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(20, 20), (31, 17), (12, 40), (64, 48), (16, 16)]):
        p = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def preprocess_from_json(paths, meta: dict) -> np.ndarray:
    """What a user without nbsrc does with the JSON beside the export: RGB in [0, 1], square resize to
    ``resize`` (bilinear, antialiased), centre crop ``img_size``, normalise with ``mean``/``std``."""
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    out = []
    for p in paths:
        x = torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255
        x = TF.center_crop(TF.resize(x, [meta["resize"], meta["resize"]], antialias=True), [meta["img_size"]] * 2)
        out.append(TF.normalize(x, meta["mean"], meta["std"]))
    return torch.stack(out).numpy()


def embed_reference(run, images, tmp_path) -> np.ndarray:
    """float32 embeddings of ``images`` as ``nbsrc embed`` / ``nbsrc search`` compute them."""
    index = Index.build(run, images, tmp_path / "idx", device="cpu", num_workers=0, progress=False, log=None)
    return index.embed(images)


def test_torchscript_gives_what_embed_computes(run, images, tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    assert "max |difference|" in capsys.readouterr().out
    meta = json.loads((tmp_path / "m.pt.json").read_text())
    assert (meta["format"], meta["model"], meta["img_size"], meta["patch_size"], meta["pooling"], meta["dim"],
            meta["pca"]) == ("torchscript", "test_vit", 16, 4, "gem", 8, True)
    assert meta["check"]["max_abs_diff"] <= 1e-5 and len(meta["run_fingerprint"]) == 64
    scripted = torch.jit.load(str(out))
    with torch.no_grad():
        got = scripted(torch.from_numpy(preprocess_from_json(images, meta))).numpy()
    want = embed_reference(run, images, tmp_path)
    assert got.shape == (5, 8)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow  # torch's torch.export-based ONNX exporter: ~10 CPU-seconds for this tiny ViT
def test_onnx_gives_what_embed_computes(run, images, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "m.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert meta["input"]["name"] == "images" and meta["output"]["shape"] == ["N", 8]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["embeddings"], {"images": preprocess_from_json(images, meta)})[0]  # batch 5: the axis is free
    np.testing.assert_allclose(got, embed_reference(run, images, tmp_path), atol=1e-5, rtol=0)


def test_safetensors_loads_into_plain_timm(run, tmp_path):
    import timm

    out = tmp_path / "b.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "b.safetensors.json").read_text())
    net = timm.create_model(meta["timm_model"], pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                            **meta["timm_create_model"]).eval()
    ours = load_embedding_model(run).model
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net.forward_features(x), ours.backbone.forward_features(x), atol=1e-6, rtol=0)
        # and the run's descriptor from it: GeM over the patch tokens, l2, PCA, l2 (the JSON says which)
        z = torch.nn.functional.normalize(ours.pool(net.forward_features(x)), dim=-1)
        z = torch.nn.functional.normalize(ours.pca(z), dim=-1)
        torch.testing.assert_close(z, ours(x), atol=1e-6, rtol=0)


def test_existing_output_is_never_overwritten(run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run), "--format", "torchscript"]) == 0  # default name: <run name>.pt
    first = (tmp_path / "r.pt").read_bytes()
    capsys.readouterr()
    assert main(["export", str(run), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "r.pt already exists" in err and "--overwrite" in err
    assert (tmp_path / "r.pt").read_bytes() == first
    (tmp_path / "r.pt").unlink()  # the JSON alone is also kept
    assert main(["export", str(run), "--format", "torchscript"]) == 2
    assert "r.pt.json already exists" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "torchscript", "--overwrite"]) == 0
    moved = sorted(p.name for p in tmp_path.glob("r.old-*"))
    assert len(moved) == 1 and moved[0].endswith(".pt.json")
    (tmp_path / "r.pt").write_bytes(first)  # overwrite again: the file and its JSON both move aside, nothing lost
    assert main(["export", str(run), "--format", "torchscript", "--overwrite"]) == 0
    moved = sorted(p.name for p in tmp_path.glob("r.old-*"))
    assert len(moved) == 3 and any((tmp_path / m).read_bytes() == first for m in moved if m.endswith(".pt"))


def test_bad_export_arguments_are_one_line(run, tmp_path, capsys):
    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a torchscript export is a .pt file" in err
    with pytest.raises(SystemExit) as e:  # argparse's choices, through the one-line parser
        main(["export", str(run), "--format", "keras"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'keras'" in err
    assert not list(tmp_path.iterdir())


def test_unfinished_run_is_a_one_line_error(tmp_path, capsys):
    run = tmp_path / "runs" / "half"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has not finished" in err
    assert not (tmp_path / "m.pt").exists()


def test_dtop_backbone_is_not_offered_to_timm(tmp_path):
    """A DToP model's extra modules are not timm's: safetensors is refused in one line, before writing."""
    from nbsrc.errors import ConfigError
    from nbsrc.models import build_model
    from nbsrc.retrieval.export import export_model
    from nbsrc.retrieval.models import EmbeddingModel, Preprocessing

    net = build_model("vit_tiny_patch16_224", pooling="gem", img_size=32, patch_size=8, dtop=True, k=2,
                      elm=False, head_dim=16)
    em = EmbeddingModel(net.eval(), Preprocessing(32), {"source": "run", "spec": "runs/dtop", "config": {
        "backbone": "vit_tiny_patch16_224", "model_options": {"dtop": True}}})
    with pytest.raises(ConfigError, match="DToPModel.*torchscript or onnx"):
        export_model(em, "safetensors", tmp_path / "d.safetensors", log=None)
    hybrid = build_model("effnet_lite0_vit", pooling="cls", img_size=32, patch_size=None, weights="none")
    with pytest.raises(ConfigError, match="not a plain timm backbone"):  # a timm ViT, but with a CNN stem
        export_model(EmbeddingModel(hybrid.eval(), Preprocessing(32), {"source": "timm", "spec": "hybrid"}),
                     "safetensors", tmp_path / "h.safetensors", log=None)
    assert not list(tmp_path.iterdir())
    done = export_model(em, "torchscript", tmp_path / "d.pt", log=None)  # the descriptor exports
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(done.path))(x), net(x), atol=1e-5, rtol=0)
