import os

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
    """A test that sets torch's thread count (a config's ``threads``, ``bench train --threads``)
    does not leave it to the tests after it."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- scheduling under pytest-xdist
def xdist_group(item) -> str | None:
    """The name of the test's ``xdist_group`` mark, or None. A module whose tests share an expensive
    module-scoped fixture (a trained run, the fault campaign's results, a 2-process DDP spawn) carries
    ``pytestmark = pytest.mark.xdist_group("...")``, so that ``--dist loadgroup`` runs its tests on one
    worker and the fixture is computed once, as in a serial run."""
    names = {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
    return "_".join(sorted(names)) or None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the long work goes first: the tests marked ``slow`` (the notebooks, the
    browser, the kills) that run on their own, then the groups that share a fixture, then the short
    tests, which fill whichever worker finishes first instead of one worker ending on a long test
    while the other idles (``make test`` passes ``--no-loadscope-reorder`` to keep this order). A serial
    run keeps pytest's order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if config.getvalue("loadgroup"):
        _write_groups_into_node_ids(items)

    def rank(item) -> int:
        if xdist_group(item):
            return 1
        return 0 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)  # stable: collection order within each rank


def _write_groups_into_node_ids(items) -> None:
    """``--dist loadgroup`` reads a test's group from a ``@group`` suffix of its node id, which xdist 3.8
    writes into ``item._nodeid``; pytest 9 keeps the node id in ``item._id`` instead, so nothing would be
    grouped, silently (pytest-dev/pytest-xdist#1386). Write the suffix where pytest 9 reads it."""
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest < 9: xdist's own suffix is read
        return
    for item in items:
        group = xdist_group(item)
        if group and not item.nodeid.endswith("@" + group):
            item._id = NodeId.parse(f"{item.nodeid}@{group}")


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
