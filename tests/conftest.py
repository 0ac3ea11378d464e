import functools
import os
import re
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. On a 2-core machine shared with another process (a
# notebook kernel, a forked CLI case, a second test run, someone's training) torch's two spinning
# threads otherwise fight for the cores: a tiny 2-iteration training took 20-60 s instead of 3-5 s.
# libgomp reads this once, when torch loads it, so it is set before torch is imported; subprocesses
# (notebook kernels, `python -m nbsrc`) inherit it. It changes scheduling only, never a number.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")

# Under pytest-xdist (`make test` runs `pytest -n 2`) each worker process already has a core of its
# own: one intra-op thread per worker, for torch here and, through the environment, for everything a
# test starts (notebook kernels, `python -m nbsrc`, torchrun ranks). Two workers with two threads each
# would put four busy threads on two cores. Tests that set a thread count themselves still do;
# `restore_threads` below puts the count back after them.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) if os.environ.get("PYTEST_XDIST_WORKER") else 1
THREADS = 1 if WORKERS > 1 else 2
if WORKERS > 1:
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def restore_threads():
    """A test that sets torch's thread count (a config's ``threads``, ``nbsrc.bench train --threads``)
    does not leave it to the tests after it."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- scheduling under pytest-xdist
_MODULE_FIXTURE = re.compile(r"""scope\s*=\s*["']module["']""")


@functools.cache
def shares_a_module_fixture(path: Path) -> bool:
    """Whether the test module at ``path`` defines a module-scoped fixture (a trained run, the fault
    campaign's results, a 2-process DDP spawn) that its tests share."""
    return path.suffix == ".py" and path.is_file() and bool(_MODULE_FIXTURE.search(path.read_text()))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``pytest -n N`` (xdist's ``--dist load``): each test is scheduled on its own, except that the tests
    of a module with a module-scoped fixture go to one worker together, so that the fixture is computed
    once, as in a serial run (the fault campaign's takes 36 s of a quiet 2-core machine). xdist's own way
    to say this, ``--dist loadgroup`` with ``xdist_group`` marks, groups nothing here, without a word:
    xdist 3.8 writes the group into ``item._nodeid``, which pytest 9's ``nodeid`` no longer reads. Other
    ``--dist`` modes are xdist's."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if shares_a_module_fixture(config.rootpath / module) else nodeid

    config.option.loadscopereorder = False  # keep the order that pytest_collection_modifyitems chose
    return SharedFixtureScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the long work goes first: the tests marked ``slow`` (the notebooks, the
    browser, the kills) that run on their own, then the modules that share a fixture, then the short
    tests, which fill whichever worker finishes first instead of one worker ending on a long test
    while the other idles. A serial run keeps pytest's order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def rank(item) -> int:
        if shares_a_module_fixture(item.path):
            return 1
        return 0 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)  # stable: collection order within each rank


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
    )
