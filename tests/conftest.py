import os

# Idle OpenMP threads sleep instead of spinning. On a 2-core machine shared with another process (a
# notebook kernel, a forked CLI case, a second test run, someone's training) torch's two spinning
# threads otherwise fight for the cores: a tiny 2-iteration training took 20-60 s instead of 3-5 s.
# libgomp reads this once, when torch loads it, so it is set before torch is imported; subprocesses
# (notebook kernels, `python -m nbsrc`) inherit it. It changes scheduling only, never a number.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def tiny_cfg(tmp_path):
    """A config that trains in seconds on scikit-learn's digits."""
    from nbsrc.config import ExperimentConfig

    return ExperimentConfig(
        name="tiny", runs_dir=str(tmp_path / "runs"), dataset="digits", img_size=8, patch_size=4,
        backbone="test_vit", iterations=6, batch_size=16, m_per_class=4, lr=1e-3,
        log_every=2, ckpt_every=3, eval_per_class=20, progress=False, lam=0.5, memory_size=32,
        model_options={},
    )
