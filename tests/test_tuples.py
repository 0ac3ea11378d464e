"""SfM-120k tuple training (IRT §4.2): the tuple loss against eq. (1) written as a loop, mining with
the model of the epoch's start, exact resume, and the end-to-end Revisited Oxford/Paris run, on
generated fixtures with a tiny ViT (timm's test_vit: 64-d, img 32, patch 8)."""

import json
import math

import numpy as np
import pytest
import torch
from fixtures_benchmarks import make_revisited, make_sfm120k

from nbsrc.config import ExperimentConfig
from nbsrc.data.sfm import SfMSplit, TupleDataset, TupleSampler, collate_tuples, load_sfm120k_db
from nbsrc.data.transforms import particular_object_transform
from nbsrc.errors import ConfigError, DatasetError, NonFiniteLossError
from nbsrc.eval import extract_embeddings
from nbsrc.eval.evaluators import find_revisited_root
from nbsrc.experiment import run_experiment
from nbsrc.losses.tuples import tuple_contrastive_loss, tuple_loss_terms
from nbsrc.models import data_config, model_from_config
from nbsrc.train import load_checkpoint, read_metrics
from nbsrc.train.checkpoint import PREVIOUS
from nbsrc.train.loop import fit
from nbsrc.train.tuple_task import TupleTask, batches_per_epoch, epoch_batches, mine_epoch

pytestmark = pytest.mark.xdist_group("tuples")  # its tests share module-scoped fixtures: one worker


def loss_reference(z, tuple_size, beta):
    """IRT eq. (1) on each tuple (q, p, n_1..n_K), straight from the formula, in float64 Python."""
    z = [[float(v) for v in row] for row in z]
    norm = lambda a: [v / math.sqrt(sum(x * x for x in a)) for v in a]  # noqa: E731
    dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
    per_tuple = []
    for s in range(0, len(z), tuple_size):
        q, p, negs = norm(z[s]), norm(z[s + 1]), [norm(n) for n in z[s + 2 : s + tuple_size]]
        loss = 1.0 - dot(q, p)
        for n in negs:
            loss += max(0.0, dot(q, n) - beta)
        per_tuple.append(loss)
    return per_tuple


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors this small gain nothing from intra-op threads, and on a busy machine the threads'
    synchronisation made each step ~30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("tuple_size,beta", [(3, 0.85), (7, 0.85), (4, 0.0), (7, 1.0)])
def test_tuple_loss_equals_the_reference(tuple_size, beta):
    g = torch.Generator().manual_seed(tuple_size)
    z = torch.randn(5 * tuple_size, 6, generator=g, dtype=torch.float64)
    z[2] = z[0] * 3 + 0.01  # a negative almost on its query: above any margin < 1
    ref = loss_reference(z, tuple_size, beta)
    per = tuple_contrastive_loss(z, tuple_size, beta, reduce=False)
    assert per.shape == (5,)
    np.testing.assert_allclose(per.numpy(), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(float(tuple_contrastive_loss(z, tuple_size, beta)), sum(ref) / 5, rtol=1e-12)


def test_tuple_loss_hand_case():
    # q = (1, 0); p at s = 0.6; negatives at s = 0.9 (0.05 over beta), s = 0 and s = 0.85 (on the margin)
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.9, math.sqrt(1 - 0.81)], [0.0, 2.0], [0.85, math.sqrt(1 - 0.85**2)]],
                     dtype=torch.float64)
    assert float(tuple_contrastive_loss(z, 5, beta=0.85)) == pytest.approx(0.4 + 0.05, abs=1e-12)


def test_koleo_runs_over_the_distinct_images_of_the_batch():
    from nbsrc.losses import koleo_loss

    g = torch.Generator().manual_seed(1)
    z = torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=-1)
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 2, 6])  # image 2 is a negative of both tuples
    z[6] = z[2]
    terms = tuple_loss_terms(z, idx, 4, 0.5, lam=0.3)
    keep = [0, 1, 2, 3, 4, 5, 7]
    assert float(terms["koleo"]) == pytest.approx(float(koleo_loss(z[keep])), rel=1e-6)
    assert float(terms["total"]) == pytest.approx(float(terms["contrastive"] + 0.3 * terms["koleo"]), rel=1e-6)
    assert float(tuple_loss_terms(z, idx, 4, 0.5, lam=0.0)["koleo"]) == 0.0


def test_tuple_loss_errors():
    with pytest.raises(ConfigError, match="whole tuples of 7"):
        tuple_contrastive_loss(torch.randn(10, 4), 7)
    with pytest.raises(ConfigError, match="at least one negative"):
        tuple_contrastive_loss(torch.randn(4, 4), 2)


# ----------------------------------------------------------------------------- epochs
def test_epochs_and_batches():
    many = SfMSplit(paths=["x"] * 10, cluster=np.zeros(10, dtype=np.int64),
                    qidxs=np.zeros(3000, dtype=np.int64), pidxs=np.zeros(3000, dtype=np.int64))
    paper = ExperimentConfig(dataset="sfm120k")  # IRT's tuple settings (TupleConfig's defaults)
    assert batches_per_epoch(paper, many) == 2000 // 5  # so 100 epochs are 40,000 iterations
    few = SfMSplit(paths=["x"] * 10, cluster=np.zeros(10, dtype=np.int64),
                   qidxs=np.zeros(24, dtype=np.int64), pidxs=np.zeros(24, dtype=np.int64))
    assert batches_per_epoch(paper, few) == math.ceil(24 / 5)
    batches = epoch_batches(paper, 3, 12)
    assert [len(b) for b in batches] == [5, 5, 2]
    assert sorted(t for b in batches for t, _ in b) == list(range(12))
    assert batches == epoch_batches(paper, 3, 12)
    assert batches != epoch_batches(paper, 4, 12)


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sfm")
    root = make_sfm120k(tmp, n_clusters=8, per_cluster=4)
    oxford, paris = make_revisited(tmp, "roxford5k"), make_revisited(tmp, "rparis6k")
    return {"tmp": tmp, "root": root, "db": load_sfm120k_db(root), "roxford": oxford, "rparis": paris}


def tuple_cfg(runs_dir, name="t", **kw):
    base = dict(name=name, runs_dir=str(runs_dir), dataset="sfm120k", img_size=32, patch_size=8,
                backbone="test_vit", pairs_per_epoch=4, tuples_per_batch=2, negatives_per_tuple=2,
                negative_pool=16, iterations=4, optimizer="adam", lr=1e-4, weight_decay=1e-6, beta=0.85, lam=0.1,
                memory_size=0, log_every=1, ckpt_every=0, progress=False, batch_size=4, m_per_class=2,
                eval_batch_size=64, device="cpu")
    if kw.get("sfm_training") == "classes":  # the tuple fields apply only to tuple training
        base = {k: v for k, v in base.items() if k not in ("pairs_per_epoch", "tuples_per_batch", "negatives_per_tuple",
                                                          "negative_pool")}
    return ExperimentConfig(**{**base, **kw})


def fresh_model(cfg):
    torch.manual_seed(cfg.run.seed)
    return model_from_config(cfg)


def test_resume_equals_uninterrupted_and_epochs_train_on_their_own_mining(data, tmp_path):
    db = data["db"]
    cfg = tuple_cfg(tmp_path / "runs")
    assert batches_per_epoch(cfg, db) == 2  # 2 epochs of 2 steps
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir(), cut_dir.mkdir()
    init = {k: v.clone() for k, v in fresh_model(cfg).state_dict().items()}
    full = fit(cfg, fresh_model(cfg), TupleTask(cfg, db), full_dir)
    assert any(not torch.equal(init[k], v) for k, v in full.state_dict().items())  # the model was trained

    fit(cfg, fresh_model(cfg), TupleTask(cfg, db), cut_dir, stop_after=2)  # the end of epoch 0
    fit(cfg, fresh_model(cfg), TupleTask(cfg, db), cut_dir, resume=True, stop_after=3)  # one step into epoch 1
    # epoch 1 trains on the tuples mined with the model of the end of epoch 0
    at_boundary, inside = torch.load(cut_dir / PREVIOUS, weights_only=False), load_checkpoint(cut_dir)
    assert (at_boundary["iteration"], inside["iteration"]) == (2, 3)
    m1 = fresh_model(cfg)
    m1.load_state_dict(at_boundary["model"])
    m1.eval()
    norm = data_config(m1)
    eval_tf = particular_object_transform(32, norm["mean"], norm["std"])  # IRT §4.2: what tuple training mines with
    z, _, _ = extract_embeddings(m1, db.images(eval_tf), progress=False)  # all images, independently
    sampler = TupleSampler(db, cfg.tuples.pairs_per_epoch, cfg.tuples.negative_pool, cfg.tuples.negatives_per_tuple,
                           cfg.run.seed)
    pairs, pool = sampler.draw(1)
    tuples = inside["tuples"]
    # the uninterrupted run did the same: its epoch-0-end checkpoint and its epoch-1 tuples
    full_boundary, full_last = torch.load(full_dir / PREVIOUS, weights_only=False), load_checkpoint(full_dir)
    assert (full_boundary["iteration"], full_last["iteration"]) == (2, 4)
    assert all(torch.equal(v, at_boundary["model"][k]) for k, v in full_boundary["model"].items())
    np.testing.assert_array_equal(full_last["tuples"], tuples)
    np.testing.assert_array_equal(tuples[:, 0], db.qidxs[pairs])
    np.testing.assert_array_equal(tuples[:, 1], db.pidxs[pairs])
    for t in tuples:  # hardest first, one per cluster, none from the query's, each its cluster's hardest
        sims = z[pool] @ z[t[0]]
        pool_c = db.cluster[pool]
        best = {c: pool[np.flatnonzero(pool_c == c)[np.argmax(sims[pool_c == c])]] for c in set(pool_c.tolist())}
        best.pop(int(db.cluster[t[0]]), None)
        ranked = sorted(best.values(), key=lambda i: -float(z[i] @ z[t[0]]))
        assert t[2:].tolist() == ranked[: cfg.tuples.negatives_per_tuple]
    np.testing.assert_array_equal(tuples, mine_epoch(m1, sampler, 1, eval_tf, cfg, "cpu"))
    # ... and its first step's loss is that of the epoch's first batch of those tuples under m1
    ds = TupleDataset(db, eval_tf, tuples)  # training without augmentation (IRT §4.2)
    x, _, idx = collate_tuples([ds[key] for key in epoch_batches(cfg, 1, len(tuples))[0]])
    m1.train()
    with torch.no_grad():
        expected = tuple_loss_terms(m1(x), idx, 4, cfg.loss.beta, cfg.loss.lam, cfg.loss.tuple_loss)["total"]
    logged = [r for r in read_metrics(cut_dir, "train") if r["iteration"] == 3]
    assert len(logged) == 1 and logged[0]["total"] == pytest.approx(float(expected), rel=1e-5)

    resumed = fit(cfg, fresh_model(cfg), TupleTask(cfg, db), cut_dir, resume=True)  # to the end, mid-epoch resume
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    train_rows = lambda d: [(r["iteration"], r["total"]) for r in read_metrics(d, "train")]  # noqa: E731
    assert train_rows(cut_dir) == train_rows(full_dir)
    assert [r["epoch"] for r in read_metrics(full_dir, "mine")] == [0, 1]


def test_non_finite_loss_and_bad_settings(data, tmp_path, monkeypatch):
    cfg = tuple_cfg(tmp_path / "runs", iterations=1)
    with pytest.raises(ConfigError, match="loss='contrastive'"):
        bad = cfg.replace(loss="snca")
        fit(bad, fresh_model(cfg), TupleTask(bad, data["db"]), tmp_path)
    with pytest.raises(ConfigError, match="memory_size=0"):
        bad = cfg.replace(memory_size=8)
        fit(bad, fresh_model(cfg), TupleTask(bad, data["db"]), tmp_path)
    from nbsrc.losses import TUPLE_LOSSES

    monkeypatch.setitem(TUPLE_LOSSES, cfg.loss.tuple_loss, lambda z, *a, **k: z.sum() * float("nan"))
    with pytest.raises(NonFiniteLossError, match="iteration 0"):
        fit(cfg, fresh_model(cfg), TupleTask(cfg, data["db"]), tmp_path)


# ----------------------------------------------------------------------------- end to end
def test_run_sfm_experiment_end_to_end(data, tmp_path):
    cfg = tuple_cfg(tmp_path / "runs", name="sfm", data_root=str(data["root"]), iterations=2, dim=8)
    res = run_experiment(cfg, mode="new", roxford_root=data["roxford"], rparis_root=data["rparis"])
    saved = json.loads((res.run_dir / "results.json").read_text())
    for name in ("roxford5k", "rparis6k"):
        for setup in ("easy", "medium", "hard"):
            values = saved[name][setup]
            assert set(values) == {"mAP", "mP@1", "mP@5", "mP@10"}
            assert all(0.0 <= v <= 100.0 for v in values.values()), values
    assert bool(res.model.pca.fitted)
    emb = res.embeddings()
    assert emb["roxford5k_query"].shape == (3, 8) and emb["rparis6k_database"].shape == (12, 8)
    # the ranking behind the numbers: recomputed from the saved embeddings with the protocol
    from nbsrc.eval.revisited_map import load_revisited_gnd, revisited_map_reference

    gnd = load_revisited_gnd(data["roxford"] / "gnd_roxford5k.pkl")
    q, x = emb["roxford5k_query"].astype(np.float64), emb["roxford5k_database"].astype(np.float64)
    ref = revisited_map_reference(q @ x.T, gnd)
    assert ref["hard"]["mAP"] == pytest.approx(saved["roxford5k"]["hard"]["mAP"], abs=1e-9)
    again = run_experiment(cfg, mode="reuse")  # a finished run is reused, data not needed
    assert again.reused and again.results == saved


def test_revisited_roots_are_found_beside_the_sfm_folder(data, tmp_path):
    assert find_revisited_root(data["root"], "roxford5k") == data["roxford"]
    assert find_revisited_root(data["root"] / "retrieval-SfM-120k.pkl", "rparis6k") == data["rparis"]
    lone = make_sfm120k(tmp_path, n_clusters=6, per_cluster=3)
    assert find_revisited_root(lone, "roxford5k") is None
    cfg = tuple_cfg(tmp_path / "runs", data_root=str(lone))
    with pytest.raises(DatasetError, match="roxford_root="):
        run_experiment(cfg, mode="new")
    assert not (tmp_path / "runs" / "t").exists()  # nothing written for a run that cannot start
    with pytest.raises(DatasetError, match="expected .*retrieval-SfM-120k.pkl"):  # the data root named first
        run_experiment(tuple_cfg(tmp_path / "runs", data_root=str(tmp_path / "missing")), mode="new")


def test_sfm_class_training_trains_arcface_on_the_3d_models(data, tmp_path, monkeypatch):
    """sfm_training='classes' (DToP): the ordinary loop on the training images labelled by cluster,
    with ArcFace, then the same Revisited evaluation; the tuple loop is not used."""
    import nbsrc.experiment as experiment_mod
    from nbsrc.experiment import class_dataset

    ds = class_dataset(data["db"], None)
    assert len(ds) == len(data["db"]) and np.array_equal(ds.labels, data["db"].cluster)
    seen = {}
    real_task = experiment_mod.PairTask

    def spy(cfg, train_ds, *a, **k):
        seen["labels"] = np.asarray(train_ds.labels)
        return real_task(cfg, train_ds, *a, **k)

    monkeypatch.setattr(experiment_mod, "PairTask", spy)
    monkeypatch.setattr(experiment_mod, "TupleTask", lambda *a, **k: pytest.fail("tuple task used for class training"))
    cfg = tuple_cfg(tmp_path / "runs", name="dtop_cls", data_root=str(data["root"]), sfm_training="classes",
                    loss="arcface", arcface_scale=16.0, lam=0.0, optimizer="sgd", lr=1e-3, iterations=3,
                    batch_size=8, m_per_class=2)
    res = run_experiment(cfg, mode="new", roxford_root=data["roxford"])
    assert set(np.unique(seen["labels"])) == set(np.unique(data["db"].cluster))
    train_rows = [r for r in read_metrics(res.run_dir) if r["kind"] == "train"]
    assert [r["iteration"] for r in train_rows] == [1, 2, 3] and "arcface" in train_rows[0]
    assert 0.0 <= res.results["roxford5k"]["medium"]["mAP"] <= 100.0


def test_sfm_class_training_needs_two_3d_models_with_pairs(tmp_path):
    from nbsrc.data.sfm import SfMSplit
    from nbsrc.experiment import class_dataset

    db = SfMSplit(paths=["a", "b", "c"], cluster=np.array([0, 0, 1]), qidxs=np.array([0]), pidxs=np.array([1]))
    with pytest.raises(DatasetError, match="2 or more"):
        class_dataset(db, None)
    with pytest.raises(ConfigError, match="sfm_training"):
        ExperimentConfig(sfm_training="pairs").validate()


def test_tuple_batches_must_divide_among_the_ranks(data, tmp_path, monkeypatch):
    from nbsrc.train import distributed
    from nbsrc.train.tuple_task import check_world_size

    check_world_size(tuple_cfg(tmp_path), data["db"], 2)  # 4 pairs, 2 tuples a batch: 1 each
    with pytest.raises(ConfigError, match="tuples_per_batch=3 .* among the 2 processes"):
        check_world_size(tuple_cfg(tmp_path, tuples_per_batch=3), data["db"], 2)
    with pytest.raises(ConfigError, match="last batch of 1 tuples"):  # 5 pairs in batches of 2: 2, 2, 1
        check_world_size(tuple_cfg(tmp_path, pairs_per_epoch=5), data["db"], 2)
    monkeypatch.setattr(distributed, "current", lambda: distributed.DistInfo(rank=0, world_size=2))
    cfg = tuple_cfg(tmp_path / "runs", tuples_per_batch=3)
    with pytest.raises(ConfigError, match="among the 2 processes"):
        fit(cfg, fresh_model(cfg), TupleTask(cfg, data["db"]), tmp_path / "run")


def _tuple_ddp_worker(rank: int, port: int, cfg_dict: dict, root: str, out: str) -> None:
    """One rank of the 2-process tuple run: gloo, tuple training, dump the weights and this rank's mining."""
    import os

    import torch.distributed as dist

    from nbsrc.train.distributed import init_distributed

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    init_distributed("cpu")
    try:
        cfg = ExperimentConfig.from_dict(cfg_dict)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        model = fit(cfg, fresh_model(cfg), TupleTask(cfg, load_sfm120k_db(root)), cfg.run_dir)
        torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_tuple_training_equals_one_process_on_the_global_batch(data, tmp_path):
    """torchrun-style tuple training on 2 gloo ranks (1 tuple each of a global batch of 2, mining
    sharded over the ranks) gives the single process's losses, tuples and weights."""
    import socket

    import torch.multiprocessing as mp

    kw = dict(optimizer="sgd", lr=0.5, weight_decay=0.0, lam=0.5, iterations=4, ckpt_every=0)  # 2 epochs: mining twice
    ddp_cfg, one_cfg = tuple_cfg(tmp_path / "runs", "ddp", **kw), tuple_cfg(tmp_path / "runs", "one", **kw)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_tuple_ddp_worker, args=(port, ddp_cfg.to_dict(), str(data["root"]), str(tmp_path)), nprocs=2, join=True)
    one_cfg.run_dir.mkdir(parents=True)
    one = fit(one_cfg, fresh_model(one_cfg), TupleTask(one_cfg, data["db"]), one_cfg.run_dir).state_dict()

    ddp_rows, one_rows = read_metrics(ddp_cfg.run_dir), read_metrics(one_cfg.run_dir)
    assert [(r["kind"], r["iteration"]) for r in ddp_rows] == [(r["kind"], r["iteration"]) for r in one_rows]
    assert [r["kind"] for r in ddp_rows].count("mine") == 2  # logged once, by rank 0
    for a, b in zip(ddp_rows, one_rows, strict=True):
        if a["kind"] == "train":
            for key in ("contrastive", "koleo", "total"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["iteration"], key)
    assert np.array_equal(load_checkpoint(ddp_cfg.run_dir)["tuples"], load_checkpoint(one_cfg.run_dir)["tuples"])
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    init = fresh_model(one_cfg).state_dict()
    moved = max(float((one[k] - init[k]).abs().max()) for k in one if one[k].is_floating_point())
    assert moved > 1e-3
    for k, v in one.items():
        torch.testing.assert_close(ranks[0][k], ranks[1][k], rtol=0, atol=0)  # DDP keeps the ranks identical
        torch.testing.assert_close(ranks[0][k], v, rtol=0, atol=1e-5, msg=f"weights {k}")


TRAINING_FLAGS = {
    "classes": ["--loss", "arcface", "--arcface-scale", "16", "--lam", "0", "--optimizer", "sgd", "--lr", "0.001",
                "--batch-size", "8", "--m-per-class", "2"],
    "tuples": ["--loss", "contrastive", "--lam", "0.1", "--optimizer", "adam", "--lr", "1e-4", "--pairs-per-epoch", "4",
               "--tuples-per-batch", "2", "--negatives-per-tuple", "2", "--negative-pool", "16"],
}


@pytest.mark.slow
@pytest.mark.parametrize("training", ["classes", "tuples"])
def test_sfm_training_under_torchrun_writes_the_run_once(data, tmp_path, training):
    """``torchrun --nproc_per_node=2 -m nbsrc train --dataset sfm120k --sfm-training T``: both ranks
    train, rank 0 alone creates the run directory, evaluates on Revisited Oxford and Paris and writes
    the results."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "nbsrc", "train",
           "--name", "sfm_ddp", "--runs-dir", str(tmp_path), "--dataset", "sfm120k", "--data-root", str(data["root"]),
           "--sfm-training", training, "--backbone", "test_vit", "--img-size", "32", "--patch-size", "8",
           *TRAINING_FLAGS[training], "--iterations", "3", "--memory-size", "0",
           "--device", "cpu", "--no-progress", "--log-every", "1", "--ckpt-every", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sfm_ddp"]  # no second, racing directory
    results = json.loads((tmp_path / "sfm_ddp" / "results.json").read_text())
    assert set(results) >= {"roxford5k", "rparis6k"} and 0.0 <= results["roxford5k"]["medium"]["mAP"] <= 100.0
    its = [r["iteration"] for r in read_metrics(tmp_path / "sfm_ddp") if r["kind"] == "train"]
    assert its == [1, 2, 3]  # each iteration logged once, by rank 0
    assert proc.stdout.count("sfm_ddp roxford5k: mAP") == 1  # evaluated and reported once
