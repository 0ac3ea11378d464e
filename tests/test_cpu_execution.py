"""The CPU execution options of training: bf16 autocast (``cpu_bf16``), ``torch.compile``
(``cpu_compile``) and the thread count (``threads``). Each trains on digits with finite losses; bf16
stays close to fp32 on the first step; each is a no-op with a one-line notice where it does not act.
No timing here: the speed is measured by ``python -m bench train``."""

import math

import pytest
import torch

from nbsrc.config import EXECUTION_FIELDS
from nbsrc.experiment import run_experiment
from nbsrc.train import loop, read_metrics


@pytest.fixture
def cfg(tiny_cfg):
    return tiny_cfg.replace(iterations=3, log_every=1, ckpt_every=0, device="cpu")


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch):
    monkeypatch.setattr(loop, "_NOTICES", set())
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # ``threads`` sets the process's count


def _losses(result) -> list[float]:
    return [r["total"] for r in read_metrics(result.run_dir, "train")]


@pytest.mark.parametrize("option", [{"cpu_bf16": True}, {"threads": 1},
                                    pytest.param({"cpu_compile": True}, marks=pytest.mark.slow)],
                         ids=["cpu_bf16", "threads", "cpu_compile"])
def test_each_cpu_option_trains_digits_with_finite_losses(cfg, option):
    if "threads" in option:  # a count other than the process's own (1 under pytest-xdist): the assertion can fail
        option = {"threads": 2 if torch.get_num_threads() == 1 else 1}
    r = run_experiment(cfg.replace(name="opt", **option), mode="new")
    losses = _losses(r)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    if "threads" in option:
        assert torch.get_num_threads() == option["threads"]


def test_cpu_bf16_first_step_loss_is_close_to_fp32(cfg):
    fp32 = _losses(run_experiment(cfg.replace(name="fp32", iterations=1), mode="new"))[0]
    bf16 = _losses(run_experiment(cfg.replace(name="bf16", iterations=1, cpu_bf16=True), mode="new"))[0]
    assert bf16 != fp32  # autocast did act: bf16 rounds the matmuls
    assert bf16 == pytest.approx(fp32, rel=2e-2, abs=1e-2)  # bf16 keeps ~3 significant digits


def test_amp_settings_per_device(cfg, capsys):
    assert loop.amp_settings(cfg, torch.device("cpu")) == (False, torch.float32)
    assert loop.amp_settings(cfg.replace(cpu_bf16=True), torch.device("cpu")) == (True, torch.bfloat16)
    capsys.readouterr()  # (a CPU without native bf16 says so)
    # on CUDA, cpu_bf16 is a no-op with a notice; `amp` decides (the device object needs no GPU to build)
    off = loop.amp_settings(cfg.replace(amp=False, cpu_bf16=True), torch.device("cuda"))
    assert off == (False, torch.float32)
    err = capsys.readouterr().err
    assert "cpu_bf16 acts on CPU training only" in err and len(err.strip().splitlines()) == 1


def test_compile_wanted_per_device_and_without_a_compiler(cfg, capsys, monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not loop.compile_wanted(cfg.replace(compile=True), cpu)  # `compile` stays CUDA-only
    assert loop.compile_wanted(cfg.replace(cpu_compile=True), cpu)
    assert not loop.compile_wanted(cfg.replace(cpu_compile=True, compile=False), cuda)
    assert "cpu_compile acts on CPU training only" in capsys.readouterr().err
    monkeypatch.setattr(loop.shutil, "which", lambda name: None)
    assert not loop.compile_wanted(cfg.replace(cpu_compile=True), cpu)
    err = capsys.readouterr().err
    assert "needs a C++ compiler" in err and len(err.strip().splitlines()) == 1


def test_one_device_resolver_for_runs_and_indexes(monkeypatch):
    """``auto`` and None pick CUDA only where there is one; asking for CUDA without one is a one-line error."""
    from nbsrc.errors import ConfigError
    from nbsrc.retrieval import index

    assert index.resolve_device is loop.resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loop.resolve_device("auto") == loop.resolve_device(None) == torch.device("cpu")
    assert loop.resolve_device(torch.device("cpu")) == torch.device("cpu")
    for name in ("cuda", "cuda:1", torch.device("cuda", 0)):
        with pytest.raises(ConfigError, match=r"device='cuda(:\d)?' but CUDA is not available here; use device='cpu'"):
            loop.resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loop.resolve_device("auto") == loop.resolve_device(None) == torch.device("cuda")


def test_notice_is_printed_once(capsys):
    loop.notice("x does nothing here")
    loop.notice("x does nothing here")
    assert capsys.readouterr().err == "note: x does nothing here\n"


def test_bf16_changes_the_experiment_compile_and_threads_do_not(cfg):
    assert {"cpu_compile", "threads"} <= EXECUTION_FIELDS and "cpu_bf16" not in EXECUTION_FIELDS
    assert cfg.replace(cpu_compile=True, threads=1).fingerprint() == cfg.fingerprint()
    assert cfg.replace(cpu_bf16=True).fingerprint() != cfg.fingerprint()


def test_negative_threads_is_a_config_error(cfg):
    from nbsrc.errors import ConfigError

    with pytest.raises(ConfigError, match="threads"):
        cfg.replace(threads=-1).validate()


def test_a_convnet_runs_channels_last_with_the_same_numbers_and_a_vit_does_not():
    """Convnet backbones run in channels-last memory format (weights and input): the embeddings equal
    those of the same weights in the default format up to float rounding, gradients too, and the
    weights load from and save to the same state dict. A ViT keeps its default format."""
    from nbsrc.models import build_model

    torch.manual_seed(0)
    cnn = build_model("resnet18", "gem", weights="none", img_size=32)
    plain = build_model("resnet18", "gem", weights="none", img_size=32)
    plain.channels_last = False
    plain.backbone.to(memory_format=torch.contiguous_format)
    plain.load_state_dict(cnn.state_dict())
    assert cnn.channels_last and not plain.channels_last
    conv = next(m for m in cnn.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    x = torch.randn(4, 3, 32, 32)
    for net in (cnn, plain):
        net.train()
        net.zero_grad()
        net(x).sum().backward()
    torch.testing.assert_close(cnn(x), plain(x), rtol=1e-4, atol=1e-5)
    g_cnn, g_plain = (next(p.grad for n, p in net.named_parameters() if n.endswith("conv1.weight"))
                      for net in (cnn, plain))
    assert (g_cnn - g_plain).abs().max() <= 1e-3 * g_plain.abs().max()  # float rounding, not another gradient
    again = build_model("resnet18", "gem", weights="none", img_size=32)
    again.load_state_dict(plain.state_dict())
    torch.testing.assert_close(again.eval()(x), plain.eval()(x), rtol=1e-4, atol=1e-5)
    vit = build_model("vit_tiny_patch16_224", "cls", weights="none", img_size=32, patch_size=8)
    assert not vit.channels_last
    assert vit.backbone.patch_embed.proj.weight.is_contiguous()
