"""nbsrc.retrieval: Index.build / load / search on generated photo folders with the one real
pretrained network here (EfficientNet-Lite0, ImageNet), checked against a brute-force search;
resume after a crash, bad images skipped and reported, nothing overwritten, the index searchable
without its run directory, and the "query with your own image" widget."""

import base64
import datetime
import io
import json
import shutil

import numpy as np
import pytest
import torch
from fixtures_photos import make_photo_folder
from PIL import Image

from nbsrc.data.images import load_image
from nbsrc.errors import ConfigError, DatasetError, RunDirError, WeightsError
from nbsrc.retrieval import Index, load_embedding_model, search_image

pytestmark = pytest.mark.xdist_group("retrieval")  # its tests share module-scoped fixtures: one worker

IMG = 64  # EfficientNet-Lite0 (a convnet) takes any size; 64 px keeps the tests quick on a CPU


@pytest.fixture(scope="module")
def lite0():
    return load_embedding_model("efficientnet_lite0", img_size=IMG)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos") / "photos"
    queries = make_photo_folder(root)
    return root, queries


@pytest.fixture(scope="module")
def built(photos, lite0, tmp_path_factory):
    root, _ = photos
    out = tmp_path_factory.mktemp("idx") / "index"
    return Index.build(lite0, root, out, batch_size=4, num_workers=0, progress=False, log=None)


# ----------------------------------------------------------------------------- what an index holds and finds
def test_index_files_and_classes(built, photos):
    root, _ = photos
    m = json.loads((built.path / "manifest.json").read_text())
    assert m["n_images"] == 12 and m["n_skipped"] == 0 and m["dim"] == 1280
    assert m["model"]["source"] == "timm" and m["model"]["build_model"]["backbone"] == "tf_efficientnet_lite0"
    assert m["preprocessing"]["img_size"] == IMG and m["preprocessing"]["crop"] == "center"
    assert built.classes == ["china", "flower", "hopper"] and len(built) == 12
    assert (built.path / "skipped.tsv").read_text() == "path\treason\n"
    assert not (built.path / "skipped.partial.jsonl").exists()
    import timm

    from nbsrc.provenance import provenance  # the same record as a run's results.json
    assert m["versions"]["timm"] == timm.__version__ and m["versions"] == provenance()["versions"]
    assert m["git_commit"] and m["machine"]["cpu"]


def test_embeddings_equal_the_model_on_each_image(built, photos, lite0):
    """Slow reference: each image read, transformed and embedded on its own."""
    root, _ = photos
    emb = np.load(built.path / "embeddings.npy")
    tf = lite0.preprocessing.transform()
    with torch.no_grad():
        for row in range(len(built.listing.paths)):
            ref = lite0.model(tf(load_image(built.listing.path(row)))[None]).numpy()[0]
            np.testing.assert_allclose(emb[row].astype(np.float32), ref, atol=2e-3)  # stored as float16
            assert abs(np.linalg.norm(ref) - 1) < 1e-5


def test_a_batch_of_mixed_image_modes_embeds_each_as_its_rgb_form(tmp_path, lite0):
    """Grayscale (read as one channel), 16-bit grayscale, RGBA and RGB files in one batch: each row
    equals the model on the file's RGB form, embedded on its own."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8), "L").save(folder / "a_gray.png")
    Image.fromarray(rng.integers(0, 65536, (40, 40), dtype=np.uint16)).save(folder / "b_gray16.png")
    Image.fromarray(rng.integers(0, 256, (60, 45, 4), dtype=np.uint8), "RGBA").save(folder / "c_rgba.png")
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "RGB").save(folder / "d_rgb.jpg")
    idx = Index.build(lite0, folder, tmp_path / "idx", batch_size=4, num_workers=0, progress=False, log=None)
    emb = np.load(idx.path / "embeddings.npy").astype(np.float32)
    tf = lite0.preprocessing.transform()
    with torch.no_grad():
        for row, name in enumerate(idx.listing.paths):
            ref = lite0.model(tf(load_image(folder / name))[None]).numpy()[0]  # the RGB form
            np.testing.assert_allclose(emb[row], ref, atol=2e-3, err_msg=name)  # stored as float16


def test_search_equals_brute_force(built, photos):
    root, queries = photos
    res = built.search(list(queries.values()), k=5)
    z = built.embed(list(queries.values()))
    g = np.load(built.path / "embeddings.npy").astype(np.float32)
    for q in range(len(queries)):
        sims = g @ z[q]
        order = sorted(range(len(g)), key=lambda r: (-sims[r], r))[:5]
        assert res.rows[q].tolist() == order
        np.testing.assert_allclose(res.scores[q], sims[order], atol=1e-5)
        assert [p for p in res.paths[q]] == [built.listing.path(r) for r in order]


def test_realistic_queries_find_their_photograph(built, photos):
    """A new crop of each photograph retrieves crops of that photograph first (ImageNet features)."""
    _, queries = photos
    res = built.search([str(p) for p in queries.values()], k=3)
    for q, name in enumerate(queries):
        assert [built.classes[lab] for lab in res.labels[q]] == [name] * 3, res.lines()
    assert (res.query_labels == -1).all()  # the queries lie outside the indexed folder


def test_an_indexed_image_finds_itself_and_knows_its_class(built, photos):
    root, _ = photos
    res = built.search(root / "flower" / "2.jpg", k=2)
    assert res.paths[0][0] == root / "flower" / "2.jpg" and res.scores[0, 0] > 0.999
    assert built.classes[res.query_labels[0]] == "flower"
    fig = res.figure()
    assert len(fig.axes) == 3
    assert "flower" in res.lines()[0] and res.lines()[1].strip().startswith(("1. 1.000", "1. 0.999"))


def test_query_forms_agree(built, photos):
    _, queries = photos
    p = queries["china"]
    raw = p.read_bytes()
    arr = np.array(Image.open(p).convert("RGB"))
    z = [built.embed([x])[0] for x in (p, raw, Image.open(p), arr, torch.from_numpy(arr).permute(2, 0, 1))]
    for other in z[1:]:
        np.testing.assert_allclose(other, z[0], atol=1e-6)


def test_search_errors(built, lite0, photos):
    _, queries = photos
    with pytest.raises(ConfigError, match="k=0 is invalid"):
        built.search(queries["china"], k=0)
    with pytest.raises(DatasetError, match="does not exist"):
        built.search("/no/such/image.jpg")
    with pytest.raises(DatasetError, match="the uploaded image"):
        built.search(b"not an image")
    with pytest.raises(ConfigError, match="do not fit index"):
        built.search_embeddings(np.zeros((1, 7), np.float32))
    other = load_embedding_model("efficientnet_lite0", img_size=IMG, pooling="avg").model
    torch.nn.init.zeros_(other.backbone.conv_stem.weight)
    with pytest.raises(ConfigError, match="not the one index .* was built with"):
        built.search(queries["china"], model=other)
    assert built.search(queries["china"], k=100).rows.shape == (1, 12)  # k capped at the index size


# ----------------------------------------------------------------------------- bad images
def test_bad_images_are_skipped_and_reported(tmp_path, lite0):
    root = tmp_path / "mixed"
    make_photo_folder(root, per_class=2, seed=1)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "china" / "truncated.jpg").write_bytes(buf.getvalue()[:400])
    (root / "flower" / "empty.png").write_bytes(b"")
    (root / "hopper" / "notes.jpg").write_text("not a picture")
    Image.new("1", (14_000, 14_000)).save(root / "hopper" / "bomb.png")
    Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)).save(root / "gray16.png")
    idx = Index.build(lite0, root, tmp_path / "idx", batch_size=3, num_workers=0, progress=False, log=None)
    skipped = {p.name: reason for p, reason in idx.skipped}
    assert set(skipped) == {"truncated.jpg", "empty.png", "notes.jpg", "bomb.png"}
    assert "truncated" in skipped["truncated.jpg"].lower() and "empty" in skipped["empty.png"]
    assert "Mpx" in skipped["bomb.png"]
    assert idx.manifest["n_images"] == 7 and idx.manifest["n_skipped"] == 4  # 6 photos + the 16-bit PNG
    res = idx.search(root / "gray16.png", k=len(idx))
    assert not {p.name for p in res.paths[0]} & set(skipped)  # never returned


def test_all_images_bad_is_an_error(tmp_path, lite0):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_text("x")
    with pytest.raises(DatasetError, match="none of the 1 images"):
        Index.build(lite0, tmp_path / "bad", tmp_path / "idx", num_workers=0, progress=False, log=None)


# ----------------------------------------------------------------------------- resume, reuse, nothing overwritten
class Crash(Exception):
    pass


def watched(real, seen: list, crash_at: int | None = None):
    """``embed_to_memmap`` that appends ``(first row, batch size)`` of each batch it writes to ``seen`` and
    raises :class:`Crash` once ``seen`` holds ``crash_at`` of them (None: never)."""
    def embed(*args, on_batch=None, **kw):
        def hook(first, batch):
            on_batch(first, batch)
            seen.append((first, kw["batch_size"]))
            if len(seen) == crash_at:
                raise Crash("killed")
        return real(*args, on_batch=hook, **kw)
    return embed


def test_interrupted_build_resumes_and_matches_a_fresh_one(tmp_path, photos, lite0, built, monkeypatch):
    import nbsrc.retrieval.index as index_module

    root, queries = photos
    real = index_module.embed_to_memmap
    seen = []
    out = tmp_path / "idx"
    monkeypatch.setattr(index_module, "embed_to_memmap", watched(real, seen, crash_at=2))
    with pytest.raises(Crash):
        Index.build(lite0, root, out, batch_size=4, num_workers=0, progress=False, log=None)
    with pytest.raises(RunDirError, match="did not finish .* run the same nbsrc embed command again"):
        Index.load(out)
    seen.clear()
    monkeypatch.setattr(index_module, "embed_to_memmap", watched(real, seen))
    notes = []
    idx = Index.build(lite0, root, out, batch_size=4, num_workers=0, progress=False, log=notes.append)
    # batch 0 not recomputed
    assert [first for first, _ in seen] == [4, 8] and "resuming" in notes[0] and "4 of 12" in notes[0]
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), np.load(built.path / "embeddings.npy"))
    a, b = idx.search(list(queries.values()), 4), built.search(list(queries.values()), 4)
    np.testing.assert_array_equal(a.rows, b.rows)


def test_resumed_build_keeps_the_batch_size_it_started_with(tmp_path, photos, lite0, built, monkeypatch):
    """Resumed without batch_size, a build takes the one in its progress file (the default may differ,
    e.g. after an upgrade); given another one explicitly, it is refused in one line. A crash before
    the first batch is recorded leaves a build that resumes (from row 0), not a refused file."""
    import nbsrc.retrieval.index as index_module

    root, _ = photos
    seen = []
    monkeypatch.setattr(index_module, "embed_to_memmap", watched(index_module.embed_to_memmap, seen, crash_at=1))
    out = tmp_path / "idx"
    with pytest.raises(Crash):
        Index.build(lite0, root, out, batch_size=4, num_workers=0, progress=False, log=None)
    with pytest.raises(ConfigError, match="different batch size"):
        Index.build(lite0, root, out, batch_size=6, num_workers=0, progress=False, log=None)
    idx = Index.build(lite0, root, out, num_workers=0, progress=False, log=None)
    assert seen == [(0, 4), (0, 4), (4, 4), (8, 4)] and len(idx) == 12
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), np.load(built.path / "embeddings.npy"))


def test_nothing_is_overwritten(tmp_path, photos, lite0, built):
    root, _ = photos
    notes = []
    again = Index.build(lite0, root, built.path, num_workers=0, progress=False, log=notes.append)
    assert len(again) == len(built) and "nothing to do" in notes[0]
    before = {p.name: p.read_bytes() for p in built.path.iterdir()}
    other = load_embedding_model("efficientnet_lite0", img_size=IMG + 32)
    with pytest.raises(RunDirError, match="already holds an index of other images or another model"):
        Index.build(other, root, built.path, num_workers=0, progress=False, log=None)
    assert {p.name: p.read_bytes() for p in built.path.iterdir()} == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("keep me")
    with pytest.raises(RunDirError, match="not empty and not an index"):
        Index.build(lite0, root, busy, num_workers=0, progress=False, log=None)
    assert (busy / "thesis.tex").read_text() == "keep me" and len(list(busy.iterdir())) == 1


def test_load_errors(tmp_path, built):
    with pytest.raises(RunDirError, match="not an index directory .*does not exist"):
        Index.load(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RunDirError, match="not an index directory .*no manifest.json"):
        Index.load(tmp_path / "plain")
    broken = tmp_path / "broken"
    shutil.copytree(built.path, broken)
    (broken / "manifest.json").write_text("{ half")
    with pytest.raises(RunDirError, match="cannot read .*manifest.json"):
        Index.load(broken)
    shutil.copy(built.path / "manifest.json", broken / "manifest.json")
    (broken / "index.faiss").unlink()
    with pytest.raises(RunDirError, match="incomplete .*index.faiss"):
        Index.load(broken)


def test_an_index_with_another_models_weights_is_detected(tmp_path, built, photos):
    """model.pt replaced by other weights (of the same or another network) after the build: searching
    is a one-line error, never a search of the old embeddings with a new model."""
    _, queries = photos
    swapped = tmp_path / "swapped"
    shutil.copytree(built.path, swapped)
    state = torch.load(swapped / "model.pt", weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 1.0
    torch.save(state, swapped / "model.pt")
    with pytest.raises(RunDirError, match="is not the model the index was built with"):
        Index.load(swapped).search(queries["china"])
    torch.save({"weight": torch.zeros(3)}, swapped / "model.pt")
    with pytest.raises(WeightsError, match="does not fit its model reference.*rebuild the index"):
        Index.load(swapped).search(queries["china"])


def test_folder_without_classes_and_list_of_paths(tmp_path, lite0, photos):
    root, queries = photos
    flat = tmp_path / "flat"
    flat.mkdir()
    for name, q in queries.items():
        shutil.copy(q, flat / f"{name}.jpg")
    idx = Index.build(lite0, flat, tmp_path / "i1", num_workers=0, progress=False, log=None)
    assert idx.classes == [] and (idx.listing.labels == -1).all()
    res = idx.search(flat / "hopper.jpg", k=3)
    assert res.paths[0][0].name == "hopper.jpg" and "[" not in res.lines()[1]
    res.figure()  # neutral frames: correctness unknown
    idx2 = Index.build(lite0, sorted(flat.iterdir()), tmp_path / "i2", num_workers=0, progress=False, log=None)
    assert idx2.listing.root is None and len(idx2) == 3


# ----------------------------------------------------------------------------- a trained run, searchable without it
def test_index_of_a_run_is_searchable_without_the_run(tmp_path):
    from nbsrc.config import ExperimentConfig
    from nbsrc.experiment import run_experiment
    from nbsrc.retrieval import export_split_images

    cfg = ExperimentConfig(name="tiny", runs_dir=str(tmp_path / "runs"), dataset="digits", img_size=8, patch_size=4,
                           iterations=2, batch_size=16, m_per_class=4, lr=1e-3, log_every=2, ckpt_every=3,
                           eval_per_class=6, progress=False, dim=16, memory_size=32)
    run = run_experiment(cfg)
    folder = export_split_images(run, tmp_path / "digits_png")
    assert sorted(p.name for p in folder.iterdir()) == [str(c) for c in range(5, 10)]
    idx = Index.build(run.run_dir, folder, tmp_path / "idx", num_workers=0, progress=False, log=None)
    assert idx.dim == 16 and idx.manifest["model"]["source"] == "run"
    query = sorted((folder / "7").iterdir())[0]
    before = idx.search(query, k=4)
    shutil.rmtree(run.run_dir)
    again = Index.load(tmp_path / "idx")
    after = again.search(query, k=4)
    np.testing.assert_array_equal(before.rows, after.rows)
    np.testing.assert_allclose(before.scores, after.scores, atol=1e-6)
    assert after.paths[0][0] == query and again.classes[after.query_labels[0]] == "7"
    # the run's own embeddings of these images: the PNG round trip is lossless
    np.testing.assert_allclose(np.linalg.norm(np.load(tmp_path / "idx" / "embeddings.npy").astype(np.float32), axis=1),
                               1, atol=2e-3)


def test_embedding_model_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown model 'no_such_net'"):
        load_embedding_model("no_such_net")
    with pytest.raises(ConfigError, match="unknown model .*does not exist"):
        load_embedding_model(str(tmp_path / "runs" / "nope"))
    with pytest.raises(RunDirError, match="not a run directory"):
        load_embedding_model(tmp_path)
    with pytest.raises(ConfigError, match="brings its own weights"):
        (tmp_path / "config.json").write_text("{}")
        load_embedding_model(tmp_path, weights="timm")


# ----------------------------------------------------------------------------- the upload widget
def test_query_browser_widget(built, photos):
    from nbsrc.widgets import query_browser

    root, queries = photos
    w = query_browser(built.path, k=3, static=False)
    first = built.listing.path(int(built.indexed_rows[0]))
    assert w.current.paths[0][0] == first  # before any upload: the first indexed image finds itself
    png = base64.b64decode(w.output.outputs[0]["data"]["image/png"])
    assert png.startswith(b"\x89PNG")
    content = queries["hopper"].read_bytes()
    w.upload.value = ({"name": "mine.jpg", "type": "image/jpeg", "size": len(content), "content": memoryview(content),
                       "last_modified": datetime.datetime(2026, 1, 1)},)
    assert w.current.queries == ["mine.jpg"] and "mine.jpg" in w.info.value
    assert [built.classes[lab] for lab in w.current.labels[0]] == ["hopper"] * 3
    w.k.value = 5
    assert w.current.rows.shape == (1, 5)
    w.upload.value = ({"name": "bad.jpg", "type": "image/jpeg", "size": 3, "content": memoryview(b"abc"),
                       "last_modified": datetime.datetime(2026, 1, 1)},)
    assert w.output.outputs[0]["text"].startswith("error: cannot decode image the uploaded image")
    res, fig = search_image(built, queries["china"], k=2)
    assert res.rows.shape == (1, 2) and len(fig.axes) == 3


# ----------------------------------------------------------------------------- notebook 10, headless
@pytest.mark.slow
def test_notebook_10_query_widget_runs_headless(tmp_path):
    """Notebook 10 under papermill: the upload widget's default view is drawn statically and saved,
    and a second run reuses the index it built (the notebook's own call, ``index_of_run``, made again
    here: a second kernel would cost 15-40 s for the same line)."""
    import nbformat

    from nbsrc.config import ExperimentConfig
    from nbsrc.experiment import run_experiment
    from nbsrc.paper.notebooks import NOTEBOOKS_DIR, run_notebook
    from nbsrc.retrieval import index_of_run

    runs = tmp_path / "runs"
    run_experiment(ExperimentConfig(name="tiny0", runs_dir=str(runs), dataset="digits", img_size=8, patch_size=4,
                                    iterations=0, lam=0.0, batch_size=16, m_per_class=4, eval_per_class=6,
                                    progress=False))
    params = {"runs_dir": str(runs), "demo": "", "figures_dir": str(tmp_path / "figs"), "k": 4}
    out = run_notebook(NOTEBOOKS_DIR / "10_explore.ipynb", params, tmp_path / "10.ipynb", cwd=tmp_path)
    cells = nbformat.read(out, as_version=4).cells
    query_cell = next(c for c in cells if c.cell_type == "code" and "query_browser(" in c.source)
    assert "index_of_run(query_run or list_finished_runs(runs_dir)[0].run_dir)" in query_cell.source
    text = "".join(o.get("text", "") for o in query_cell.outputs)
    assert "Index(" in text and "30 images" in text  # 5 unseen digits x 6
    assert any("image/png" in o.get("data", {}) for o in query_cell.outputs)
    assert (tmp_path / "figs" / "explore_query.png").stat().st_size > 1000
    index_dir = runs / "tiny0.query_index"
    assert (index_dir / "index" / "manifest.json").exists()
    built = {p: p.stat().st_mtime_ns for p in index_dir.rglob("*")}
    again = index_of_run(runs / "tiny0")  # what the notebook's query cell does on a second run
    assert "Index(" in str(again) and "30 images" in str(again)
    assert {p: p.stat().st_mtime_ns for p in index_dir.rglob("*")} == built  # found, opened, nothing rebuilt
