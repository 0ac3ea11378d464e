"""The CUDA paths on a real GPU: each test runs the same work on the device under test and on the CPU
and compares. Skipped without a GPU; `make gpu-check` (bench/gpu_check.sh) runs them there, with the
train benchmark at IRT's SOP-size memory.

``NBSRC_TEST_DEVICE`` names the device under test (default ``cuda``). ``NBSRC_TEST_DEVICE=cpu`` runs
every test on the CPU against the CPU: that checks the tests themselves, never the GPU.

* fp32 training steps (contrastive + KoLeo with a cross-batch memory) give the CPU's loss terms, and
  the run's evaluation the CPU's embeddings (TF32 off, so that fp32 means fp32);
* bf16 autocast (``amp``), the fused optimizer and pinned batches: the first step's loss within
  bf16's rounding of fp32, every loss finite;
* ``torch.compile``: the compiled step computes the eager step's losses;
* IRT's loss against a memory as large as SOP's training set (59,551 × 384), value and gradient;
* DToP's full model at two input sizes (DPE), fp32, and its bf16 backward;
* DDP through ``torchrun`` (NCCL on the GPU, gloo on the CPU), one process: the run's embeddings equal
  the plain run's.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

DEVICE = os.environ.get("NBSRC_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (make gpu-check); NBSRC_TEST_DEVICE=cpu checks these tests on the CPU"),
]


@pytest.fixture(autouse=True)
def strict_fp32():
    """fp32 means fp32: no TF32 in matrix products or convolutions (the patch embedding) while comparing."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def digits(tmp_path, name, device, **kw):
    """ViT-Tiny (patch 4) on 8-px digits, contrastive + KoLeo against a cross-batch memory from step 0, SGD."""
    from nbsrc.config import ExperimentConfig

    base = dict(name=name, runs_dir=str(tmp_path), dataset="digits", img_size=8, patch_size=4,
                backbone="vit_tiny_patch16_224", iterations=4, batch_size=16, m_per_class=4, optimizer="sgd",
                lr=0.1, weight_decay=0.0, log_every=1, ckpt_every=4, progress=False, lam=0.5,
                memory_size=40, memory_start=0, device=device, amp=False, compile=False, fused_optimizer=False,
                pin_memory=False)
    return ExperimentConfig(**{**base, **kw})


def losses(run) -> np.ndarray:
    """Per step: the loss terms the run logged (total, contrastive, KoLeo)."""
    return np.array([[r[k] for k in ("total", "contrastive", "koleo")] for r in run.metrics("train")], dtype=float)


def test_fp32_training_and_evaluation_match_the_cpu(tmp_path):
    from nbsrc.experiment import run_experiment

    gpu = run_experiment(digits(tmp_path, "gpu", DEVICE))
    cpu = run_experiment(digits(tmp_path, "cpu", "cpu"))
    assert losses(gpu).shape == losses(cpu).shape == (4, 3)
    np.testing.assert_allclose(losses(gpu), losses(cpu), rtol=1e-4, atol=1e-6)
    e_gpu, e_cpu = gpu.embeddings(), cpu.embeddings()
    np.testing.assert_allclose(e_gpu["query"], e_cpu["query"], atol=1e-4)
    one_query = 100 / len(e_cpu["query"])  # fp32 rounding may flip a near-tie in one or two neighbour lists
    assert set(gpu.recall) == set(cpu.recall)
    for k, r in cpu.recall.items():
        assert abs(gpu.recall[k] - r) <= 2 * one_query, (k, gpu.recall[k], r)


def test_amp_fused_optimizer_and_pinned_batches(tmp_path):
    from nbsrc.experiment import run_experiment
    from nbsrc.models import model_from_config
    from nbsrc.train.loop import amp_settings, build_optimizer

    cfg = digits(tmp_path, "amp", DEVICE, amp=True, fused_optimizer=True, pin_memory=True)
    on, dtype = amp_settings(cfg, torch.device(DEVICE))
    if DEVICE.startswith("cuda"):
        assert on and dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        params = list(model_from_config(cfg).to(DEVICE).parameters())
        assert build_optimizer(cfg, params).defaults.get("fused") is True
    amp = run_experiment(cfg)
    fp32 = run_experiment(digits(tmp_path, "fp32", DEVICE))
    first_amp, first_fp32 = losses(amp)[0], losses(fp32)[0]
    assert np.isfinite(losses(amp)).all()
    np.testing.assert_allclose(first_amp, first_fp32, rtol=3e-2, atol=1e-3)  # bf16: 8 bits of mantissa


def test_compiled_step_computes_the_eager_losses(tmp_path):
    from nbsrc.experiment import run_experiment

    compiled = run_experiment(digits(tmp_path, "compiled", DEVICE, compile=True, iterations=3, ckpt_every=3))
    eager = run_experiment(digits(tmp_path, "eager", DEVICE, iterations=3, ckpt_every=3))
    np.testing.assert_allclose(losses(compiled), losses(eager), rtol=1e-3, atol=1e-5)


def test_irt_loss_against_an_sop_size_memory():
    """IRT §4.2: "a dynamic offline memory queue of the same size as the dataset" (SOP: 59,551 images);
    contrastive (β = 0.5) over batch × batch and batch × memory, plus λ = 0.7 · KoLeo, DeiT-S's 384-d."""
    from nbsrc.losses import contrastive_loss, koleo_loss

    gen = torch.Generator().manual_seed(0)
    z0 = torch.nn.functional.normalize(torch.randn(64, 384, generator=gen), dim=1)
    mem = torch.nn.functional.normalize(torch.randn(59_551, 384, generator=gen), dim=1)
    y, mem_y = torch.arange(64) // 2, torch.randint(0, 11_318, (59_551,), generator=gen)
    mem_y[:64] = y  # positives in the memory too

    def loss_and_grad(device):
        z = z0.to(device).requires_grad_()
        loss = contrastive_loss(z, y.to(device), mem.to(device), mem_y.to(device), beta=0.5) + 0.7 * koleo_loss(z)
        loss.backward()
        return loss.item(), z.grad.cpu()

    (l_dev, g_dev), (l_cpu, g_cpu) = loss_and_grad(DEVICE), loss_and_grad("cpu")
    assert l_dev == pytest.approx(l_cpu, rel=1e-4)  # sums of 64 × 59,551 terms, in another order
    torch.testing.assert_close(g_dev, g_cpu, atol=1e-6, rtol=1e-4)


def test_dtop_full_model_at_two_sizes_and_its_bf16_backward():
    from nbsrc.models import build_model

    torch.manual_seed(0)
    model = build_model("vit_tiny_patch16_224", dtop=True, k=2, head_dim=64, img_size=32, patch_size=8,
                        weights="none").eval()
    gen = torch.Generator().manual_seed(1)
    for size in ((32, 32), (48, 32)):
        x = torch.randn(2, 3, *size, generator=gen)
        with torch.no_grad():
            ref = model(x)
            out = model.to(DEVICE)(x.to(DEVICE)).cpu()
            model.to("cpu")
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    model.to(DEVICE).train()
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        z = model(torch.randn(4, 3, 48, 32, device=DEVICE))
    z.float().pow(2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_ddp_through_torchrun_equals_the_plain_run(tmp_path):
    """One process through ``torchrun`` (NCCL on a GPU, gloo on the CPU) runs the DDP code path: its
    all-reduced gradients over one rank are the plain gradients, so its embeddings are the plain run's
    (both through the CLI, so that both run with torch's default TF32 settings)."""
    from nbsrc.experiment import load_run

    flags = ["train", "--dataset", "digits", "--img-size", "8", "--patch-size", "4", "--backbone",
             "vit_tiny_patch16_224", "--iterations", "4", "--batch-size", "16", "--m-per-class", "4", "--optimizer",
             "sgd", "--lr", "0.1", "--weight-decay", "0", "--log-every", "1", "--ckpt-every", "4", "--no-progress",
             "--lam", "0.5", "--memory-size", "40", "--memory-start", "0", "--device", DEVICE, "--no-amp",
             "--no-compile", "--no-fused-optimizer", "--no-pin-memory", "--runs-dir", str(tmp_path)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "nbsrc"]
    for name, launcher in (("plain", [sys.executable, "-m", "nbsrc"]), ("ddp", torchrun)):
        done = subprocess.run([*launcher, *flags, "--name", name], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ddp, plain = load_run(tmp_path / "ddp"), load_run(tmp_path / "plain")
    assert len(ddp.metrics("train")) == 4
    np.testing.assert_allclose(losses(ddp), losses(plain), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ddp.embeddings()["query"], plain.embeddings()["query"], atol=1e-4)
