import os

import numpy as np
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
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
        backbone="vit_tiny_patch16_224", iterations=6, batch_size=16, m_per_class=4, lr=1e-3,
        log_every=2, ckpt_every=3, eval_per_class=20, progress=False, lam=0.5, memory_size=32,
        model_options={},
    )
