"""The spine end to end: config validation, data readers, model builder, training loop
(kill-and-resume, NaN, run directories) and the notebooks' parameter check."""

import gzip
import json
import struct

import numpy as np
import pandas as pd
import pytest
import torch

from nbsrc.config import ExperimentConfig, parse_classes
from nbsrc.errors import ConfigError, DatasetError, NonFiniteLossError, RunDirError, WeightsError


# ----------------------------------------------------------------- config
@pytest.mark.parametrize("field,value,needle", [
    ("beta", 1.5, "beta=1.5"), ("beta", -0.1, "beta=-0.1"), ("lam", -1.0, "lam=-1.0"),
    ("batch_size", 30, "multiple of m_per_class"), ("pooling", "", "pooling=''"),
    ("patch_size", 5, "divisor of img_size"), ("momentum", 0.999, "memory_size > 0"),
])
def test_config_rejects_nonsense(field, value, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        ExperimentConfig.from_dict({field: value})
    assert "\n" not in str(e.value)


def test_unknown_pooling_is_named_when_the_model_is_built():
    """A pooling name is checked against the registry (nbsrc.models.pooling.POOLINGS) when the model is built."""
    from nbsrc.models import model_from_config

    with pytest.raises(ConfigError, match="pooling='mean' is invalid: expected one of cls, ") as e:
        model_from_config(ExperimentConfig.from_dict({"pooling": "mean", "img_size": 8, "patch_size": 4}))
    assert "\n" not in str(e.value)


def test_config_unknown_key_suggests():
    with pytest.raises(ConfigError, match="did you mean 'beta'"):
        ExperimentConfig.from_dict({"betta": 0.3})


def test_config_roundtrip(tmp_path):
    cfg = ExperimentConfig(lam=0.3, ks=(1, 10))
    cfg.save(tmp_path / "c.json")
    assert ExperimentConfig.load(tmp_path / "c.json") == cfg


def test_parse_classes():
    assert parse_classes("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(ConfigError):
        parse_classes("4-1")


# ----------------------------------------------------------------- data
def _write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _fake_fmnist(folder, n=40):
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_fashion_mnist_reader_explicit_root(tmp_path):
    from nbsrc.data import load_fashion_mnist

    _fake_fmnist(tmp_path)
    images, labels = load_fashion_mnist(tmp_path)
    assert images.shape == (80, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == (list(np.arange(40) % 10) * 2)


def test_fashion_mnist_is_decompressed_once_while_its_files_are_unchanged(tmp_path):
    import os

    from nbsrc.data import load_fashion_mnist

    _fake_fmnist(tmp_path)
    first = load_fashion_mnist(tmp_path)
    assert load_fashion_mnist(tmp_path)[0] is first[0]  # reused, not read again
    with pytest.raises(ValueError, match="read-only"):
        first[0][0, 0, 0] = 1  # shared arrays: nobody can change them for the next caller
    _fake_fmnist(tmp_path, n=30)  # new files (other sizes): read again
    later = os.stat(tmp_path / "train-images-idx3-ubyte.gz").st_mtime_ns + 10**9
    os.utime(tmp_path / "train-images-idx3-ubyte.gz", ns=(later, later))
    again = load_fashion_mnist(tmp_path)
    assert again[0] is not first[0] and again[0].shape == (60, 28, 28)


def test_fashion_mnist_env_var(tmp_path, monkeypatch):
    from nbsrc.data import find_fashion_mnist

    _fake_fmnist(tmp_path)
    monkeypatch.setenv("NBSRC_DATA", str(tmp_path))
    assert find_fashion_mnist(None, download=False) == tmp_path


def test_missing_dataset_names_both_ways(tmp_path):
    from nbsrc.data import load_fashion_mnist

    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist.*NBSRC_DATA") as e:
        load_fashion_mnist(tmp_path / "nowhere")
    assert "\n" not in str(e.value)


def test_truncated_idx_file(tmp_path):
    from nbsrc.data import read_idx

    p = tmp_path / "x-idx3-ubyte.gz"
    _write_idx(p, np.zeros((5, 28, 28)))
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(p)
    p.write_bytes(p.read_bytes()[:30])  # a cut gzip stream
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        read_idx(p)


def test_real_fashion_mnist_when_installed():
    from nbsrc.data import load_fashion_mnist
    from nbsrc.data.fashion_mnist import DEBIAN_ROOT

    if not DEBIAN_ROOT.exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    images, labels = load_fashion_mnist(DEBIAN_ROOT)
    assert images.shape == (70000, 28, 28)
    assert np.bincount(labels).tolist() == [7000] * 10


def _image_folder(root, counts):
    from PIL import Image

    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((10, 12, 3), 30 * i, np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_split_and_errors(tmp_path):
    from nbsrc.data import build_data, load_image

    _image_folder(tmp_path / "ok", {"a": 3, "b": 2, "c": 4})
    cfg = ExperimentConfig(dataset="folder", data_root=str(tmp_path / "ok"), train_classes="0", test_classes="1-2",
                           img_size=8, patch_size=4)
    data = build_data(cfg)
    assert len(data.train) == 3 and len(data.query) == 6
    assert data.query[0][0].shape == (3, 8, 8)
    _image_folder(tmp_path / "bad", {"a": 3, "b": 1})  # the one test class has a single image: no query at all
    with pytest.raises(DatasetError, match="every test class has a single image"):
        build_data(cfg.replace(data_root=str(tmp_path / "bad"), test_classes="1"))
    corrupt = tmp_path / "ok" / "a" / "0.png"
    corrupt.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot decode image .*0.png"):
        load_image(corrupt)


def test_sampler_m_per_class_and_determinism():
    from nbsrc.data import MPerClassBatchSampler

    labels = np.repeat(np.arange(6), 10)
    s = MPerClassBatchSampler(labels, 12, 4, iterations=5, seed=3)
    batches = list(s)
    assert len(batches) == 5
    for b in batches:
        counts = np.bincount(labels[[i for i, _ in b]], minlength=6)
        assert sorted(counts[counts > 0].tolist()) == [4, 4, 4]
    s.set_start(3)
    assert list(s) == batches[3:]
    with pytest.raises(ConfigError, match="needs 4 classes per batch but the training set has 3"):
        MPerClassBatchSampler(np.repeat(np.arange(3), 5), 8, 2, 1)


def test_transform_deterministic_given_seed():
    from nbsrc.data import RetrievalTransform

    t = RetrievalTransform(28, train=True)
    img = torch.randint(0, 255, (28, 28), dtype=torch.uint8)
    a = t(img, torch.Generator().manual_seed(5))
    b = t(img, torch.Generator().manual_seed(5))
    assert a.shape == (3, 28, 28) and torch.equal(a, b)


# ----------------------------------------------------------------- models
def test_unknown_backbone():
    from nbsrc.models import build_model

    with pytest.raises(ConfigError, match="unknown backbone 'vit_tiniest'.*did you mean"):
        build_model("vit_tiniest")


@pytest.mark.parametrize("pooling", ["cls", "avg", "max", "gem"])
def test_poolings_reference(pooling):
    from nbsrc.models import build_model

    m = build_model("vit_tiny_patch16_224", pooling, img_size=16, patch_size=8).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tok = m.forward_tokens(x)
        z = m(x)
    patches = tok[:, 1:]
    ref = {"cls": tok[:, 0], "avg": patches.mean(1), "max": patches.max(1).values,
           "gem": patches.clamp(min=1e-6).pow(3).mean(1).pow(1 / 3)}[pooling]
    torch.testing.assert_close(z, torch.nn.functional.normalize(ref, dim=-1))
    assert torch.allclose(z.norm(dim=1), torch.ones(2))


def test_dist_pooling_needs_distilled_deit():
    from nbsrc.models import build_model

    with pytest.raises(ConfigError, match="distilled DeiT"):
        build_model("vit_tiny_patch16_224", "dist", img_size=16, patch_size=8)
    m = build_model("deit_tiny_distilled_patch16_224", "dist", img_size=16, patch_size=8).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        tok = m.forward_tokens(x)
        torch.testing.assert_close(m(x), torch.nn.functional.normalize(tok[:, 1], dim=-1))
        assert not torch.allclose(tok[:, 0], tok[:, 1])  # the distillation token is not the CLS token


def test_pca_reduction_projects_and_normalises():
    from nbsrc.models import build_model

    m = build_model("vit_tiny_patch16_224", "cls", dim=4, img_size=16, patch_size=8).eval()
    z = np.random.default_rng(0).normal(size=(50, 192))
    m.pca.fit(z)
    comps = m.pca.components.double()
    torch.testing.assert_close(comps @ comps.T, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    with torch.no_grad():
        out = m(torch.randn(3, 3, 16, 16))
    assert out.shape == (3, 4) and torch.allclose(out.norm(dim=1), torch.ones(3))


def test_efficientnet_lite0_offline_weights_are_real():
    """The package's ImageNet weights classify matplotlib's photo of Grace Hopper (in uniform) as
    'military uniform' (ImageNet class 652) or a neighbouring clothing class."""
    import matplotlib.cbook as cbook
    import timm
    from PIL import Image

    from nbsrc.models.weights import load_efficientnet_lite0

    net = timm.create_model("tf_efficientnet_lite0")
    load_efficientnet_lite0(net)
    img = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB").resize((224, 224))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
    with torch.no_grad():
        top5 = net.eval()(x[None]).topk(5).indices[0].tolist()
    assert 652 in top5[:2]  # military uniform
    assert {834, 457, 906} & set(top5)  # suit, bow tie, Windsor tie


def test_weights_errors(tmp_path):
    from nbsrc.models import build_model

    with pytest.raises(WeightsError, match="neither one of"):
        build_model("vit_tiny_patch16_224", weights=str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="only into backbone='tf_efficientnet_lite0'"):
        build_model("vit_tiny_patch16_224", weights="efficientnet_lite0")
    bad = tmp_path / "bad.pt"
    torch.save({"nope": torch.zeros(1)}, bad)
    with pytest.raises(WeightsError, match="do not fit"):
        build_model("vit_tiny_patch16_224", weights=str(bad), img_size=16, patch_size=8)


def test_timm_hub_failure_is_a_clear_error(monkeypatch):
    import timm

    from nbsrc.models import build_model

    def offline(*a, pretrained=False, **k):
        if pretrained:
            raise RuntimeError("Could not connect to the hub")
        return orig(*a, **k)

    orig = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError, match="could not fetch pretrained weights.*weights='none'"):
        build_model("vit_tiny_patch16_224", weights="timm")


# ----------------------------------------------------------------- training
def _final_weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)


@pytest.mark.parametrize("momentum", [None, 0.9], ids=["no-momentum", "momentum-encoder"])
def test_kill_and_resume_gives_identical_weights(tiny_cfg, momentum):
    from nbsrc.experiment import run_experiment

    tiny_cfg = tiny_cfg.replace(momentum=momentum)  # 0.9: the memory is filled by a momentum encoder
    full = run_experiment(tiny_cfg.replace(name="full"), mode="new")
    part = tiny_cfg.replace(name="part")
    run_experiment(part, mode="new", stop_after=4)  # "killed" after iteration 4 (checkpoint at 3 and 4)
    ck = _final_weights(part.run_dir)
    assert ck["iteration"] == 4
    resumed = run_experiment(part, mode="resume")
    a, b = _final_weights(full.run_dir)["model"], _final_weights(resumed.run_dir)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.results["R@1"] == resumed.results["R@1"]
    iters = [r["iteration"] for r in resumed.metrics("train")]
    assert iters == sorted(set(iters))  # rows after the checkpoint were not logged twice
    if momentum is not None:  # the encoder is part of the checkpoint, and it lags the model
        ema_full, ema_res = _final_weights(full.run_dir)["ema"], _final_weights(resumed.run_dir)["ema"]
        assert set(ema_full) == set(a) and all(torch.equal(ema_full[k], ema_res[k]) for k in a)
        assert any(not torch.equal(ema_res[k], b[k]) for k in b if b[k].is_floating_point())


def test_run_dir_is_never_overwritten(tiny_cfg):
    from nbsrc.experiment import run_experiment

    cfg = tiny_cfg.replace(iterations=2)
    run_experiment(cfg, mode="new")
    before = (cfg.run_dir / "results.json").read_text()
    with pytest.raises(RunDirError, match="already exists.*--resume.*--overwrite"):
        run_experiment(cfg, mode="new")
    assert (cfg.run_dir / "results.json").read_text() == before
    again = run_experiment(cfg, mode="reuse")
    assert again.reused
    with pytest.raises(RunDirError, match="different config.*lr"):
        run_experiment(cfg.replace(lr=0.5), mode="reuse")
    run_experiment(cfg, mode="overwrite")
    backups = list(cfg.run_dir.parent.glob("tiny.old-*"))
    assert len(backups) == 1 and (backups[0] / "results.json").read_text() == before


def test_nan_loss_stops_and_keeps_checkpoint(tiny_cfg, monkeypatch):
    from nbsrc.experiment import run_experiment
    from nbsrc.losses import contrastive

    calls = {"n": 0}
    orig = contrastive.contrastive_loss

    def poisoned(*a, **k):
        calls["n"] += 1
        out = orig(*a, **k)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(contrastive, "contrastive_loss", poisoned)  # where the registered loss looks it up
    cfg = tiny_cfg.replace(name="nan")
    with pytest.raises(NonFiniteLossError, match="not finite at iteration 4.*last good checkpoint"):
        run_experiment(cfg, mode="new")
    assert torch.load(cfg.run_dir / "checkpoint.pt", weights_only=False)["iteration"] == 3


def test_metrics_and_run_contents(tiny_cfg):
    from nbsrc.experiment import load_embeddings, run_experiment

    res = run_experiment(tiny_cfg.replace(record_grad_noise=True), mode="new")
    rows = res.metrics("train")
    assert {"contrastive", "koleo", "total", "lr"} <= set(rows[0])
    assert all(r["total"] == pytest.approx(r["contrastive"] + 0.5 * r["koleo"], rel=1e-5) for r in rows)
    assert any(0 <= r.get("grad_noise", -1) <= 1 for r in rows)
    emb = load_embeddings(res.run_dir)
    assert emb["query"].shape[0] == len(emb["query_labels"]) == res.results["n_query"]
    assert set(json.loads((res.run_dir / "config.json").read_text())["loss"]) >= {"beta", "lam", "memory_size"}


def test_cli_error_is_one_line(tmp_path, capsys):
    from nbsrc.__main__ import main

    rc = main(["train", "--beta", "2", "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: beta=2.0 is invalid") and "\n" not in err


# ----------------------------------------------------------------- notebooks
def test_unknown_notebook_parameter():
    from nbsrc.paper.notebooks import NOTEBOOKS_DIR, run_notebook

    with pytest.raises(ConfigError, match="unknown parameter 'iteration' .*did you mean 'iterations'"):
        run_notebook(NOTEBOOKS_DIR / "02_train.ipynb", {"iteration": 3})


def test_notebooks_have_parameters_and_no_outputs():
    import nbformat

    from nbsrc.paper.demo import notebooks

    nbs = notebooks()
    assert [p.name[:2] for p in nbs][:2] == ["01", "02"]
    for p in nbs:
        nb = nbformat.read(p, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, p.name
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), p.name


@pytest.mark.slow
def test_demo_notebooks_run_headless(tmp_path, monkeypatch):
    """Every notebook runs under papermill with tiny parameters (the CI smoke run): on the default demo
    (the glyphs: here a small set of Latin capitals drawn by matplotlib's fonts, so that no CJK font
    package is needed), pretraining included; then notebook 02 on the second demo, Fashion-MNIST."""
    from fixtures_glyphs import tiny_glyph_set

    from nbsrc.paper.demo import DEFAULT_DEMO, QUICK, run_demo

    assert DEFAULT_DEMO == "glyphs"
    if not __import__("nbsrc.data.fashion_mnist", fromlist=["x"]).DEBIAN_ROOT.exists():
        pytest.skip("needs Fashion-MNIST (make install puts it in place)")
    (tmp_path / "fashion").mkdir()
    monkeypatch.chdir(tmp_path / "fashion")
    run_demo(quick=True, demo="fashion_mnist", notebooks_to_run=["02_train.ipynb"])
    assert "IRT_R" in (tmp_path / "fashion" / QUICK["figures_dir"] / "table3_irt.md").read_text()
    assert (tmp_path / "fashion/runs/quick/fashion_mnist/irt_l/results.json").is_file()
    monkeypatch.chdir(tmp_path)
    run_demo(quick=True, fields={"data_root": str(tiny_glyph_set(tmp_path / "glyph_cache"))})
    assert [p.name for p in (tmp_path / "runs/quick/glyphs").glob("pretrain_*")], "the glyph demo pretrains first"
    table = (tmp_path / QUICK["figures_dir"] / "table3_irt.md").read_text()
    assert all(m in table for m in ("IRT_O", "IRT_L", "IRT_R"))
    seeds = pd.read_csv(tmp_path / QUICK["figures_dir"] / "table3_irt_seeds.csv", index_col=0)
    assert list(seeds.index) == ["IRT_O", "IRT_L", "IRT_R"] and set(seeds["n"]) == {1}
    # every claim measured and judged (one seed: inconclusive by the rule), each in its file and in verdicts.md
    verdicts = (tmp_path / QUICK["figures_dir"] / "verdicts.md").read_text()
    assert "not measured yet" not in verdicts and verdicts.count("**inconclusive** over 1 seed") == 7, verdicts
    for cid in ("C1", "C2", "C3", "C4", "C5", "C6", "C7"):
        saved = json.loads((tmp_path / QUICK["figures_dir"] / "claims" / f"{cid}.json").read_text())
        assert saved["verdict"] == "inconclusive" and all(c["n"] == 1 for c in saved["comparisons"]), cid
    for fig in ("training_curves", "pca_cumulative_energy", "fig3_vit_vs_convnet", "fig4_gradient_noise",
                "similarity_histograms", "tsne", "table5_beta_lambda", "dtop_ablations"):
        for ext in ("png", "pdf"):
            assert (tmp_path / QUICK["figures_dir"] / f"{fig}.{ext}").stat().st_size > 1000, fig
    for table in ("table4_objectives", "table6_lambda", "table9_pooling", "tableA8_k", "tableA13_fusion"):
        assert (tmp_path / QUICK["figures_dir"] / f"{table}.md").exists(), table
    # Figures are shown in the executed notebooks too (not only saved), as PNG outputs.
    import nbformat

    for nb in ("02_train", "03_pca_collapse", "05_similarity_histograms", "06_tsne"):
        cells = nbformat.read(tmp_path / "runs/notebooks/quick" / f"{nb}.ipynb", as_version=4).cells
        outputs = [o for c in cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert any("image/png" in o.get("data", {}) for o in outputs), nb
    # Notebook 09 without benchmark data (test_presets.py's check, made here on the same run)
    from fixtures_benchmarks import assert_notebook_09_without_data

    assert_notebook_09_without_data(tmp_path / "runs/notebooks/quick/09_benchmarks.ipynb",
                                    tmp_path / QUICK["figures_dir"])


def test_notebook_kernel_is_this_interpreter(tmp_path, monkeypatch):
    """A user-wide kernelspec left by another checkout must not decide which venv runs notebooks."""
    import json
    import sys

    from jupyter_client.kernelspec import KernelSpecManager

    from nbsrc.paper import notebooks as notebook

    stale = tmp_path / "user" / "kernels" / notebook.KERNEL
    stale.mkdir(parents=True)
    (stale / "kernel.json").write_text(json.dumps(
        {"argv": ["/nonexistent/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": "stale", "language": "python"}))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "user"))
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    name = notebook._default_kernel()
    assert name == notebook.KERNEL
    assert KernelSpecManager().get_kernel_spec(name).argv[0] == sys.executable
