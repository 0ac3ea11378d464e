"""README is a front door (at most 220 lines, its links resolve, every docs page is linked), and every
command block of README and of docs/*.md is run by a test on a CPU, with tiny settings appended where
a block trains, or is listed in :data:`NOT_RUN` with the reason (a GPU, a real dataset, the internet,
or a timing that takes minutes)."""

import json
import re
import shutil
from pathlib import Path

import pytest
from doc_blocks import PAGES, ROOT, block, command_blocks, nbsrc_commands, page_blocks

from nbsrc.__main__ import main

README_MAX_LINES = 220

# Every command block, by (page, heading above it, language, nth such block under that heading): the test
# that runs it ("file.py::name"), or, in NOT_RUN, why no test can.
RUN_BY = {
    ("README.md", "### Notebooks", "bash", 0): "test_docs.py::test_readme_notebook_example_runs",
    ("README.md", "### Command line", "bash", 0): "test_docs.py::test_readme_command_line_example_runs",
    ("README.md", "### Python", "python", 0): "test_docs.py::test_readme_python_example_runs",
    ("docs/cli.md", "## Commands", "bash", 0): "test_cli.py::test_cli_page_commands_run_as_written",
    ("docs/presets.md", "# Presets: the papers' rows by name", "bash", 0):
        "test_docs.py::test_presets_command_prints_the_pages_table",
    ("docs/your-images.md", "## From a folder of photos to an exported model", "bash", 0):
        "test_cli.py::test_your_images_walk_through_runs_as_written",
    ("docs/your-images.md", "## From a folder of photos to an exported model", "python", 0):
        "test_cli.py::test_your_images_walk_through_runs_as_written",
    ("docs/your-images.md", "## From a folder of photos to an exported model", "python", 1):
        "test_cli.py::test_your_images_walk_through_runs_as_written",
    ("docs/your-images.md", "## Index and search", "bash", 0): "test_docs.py::test_index_and_search_commands_run",
    ("docs/your-images.md", "## Index and search", "python", 0): "test_docs.py::test_index_and_search_python_runs",
    ("docs/architecture.md", "## Adding a loss", "python", 0):
        "test_loss_registry.py::test_the_architecture_page_shows_the_toy_loss_as_registered",
}
NOT_RUN = {
    ("README.md", "# nbsrc — training Vision Transformers for image retrieval", "bash", 0):
        "`make demo` is the demo itself (about 25 minutes) and `make test` the whole suite, CI's command "
        "(.ci/run); the demo's notebooks run headless with tiny settings in tests/test_spine.py",
    ("docs/paper-scale.md", "# Real datasets and paper scale", "bash", 0):
        "needs the SOP images, timm's hub weights (the internet) and a GPU for 35,000 iterations; every preset "
        "builds its model, data and optimizer on fixture trees in tests/test_presets.py",
    ("docs/speed.md", "# Speed and scale: `python -m bench`", "bash", 0):
        "timings of minutes each on a quiet machine (no test asserts a time); tests/test_bench.py and "
        "tests/test_bench_demo.py run the benchmarks' code at tiny sizes",
}
# Lines of a run block that its test leaves out, and why.
LINES_NOT_RUN = {
    ("docs/your-images.md", "## Index and search", "bash", 0): {
        "vit_small_patch16_224": "--weights timm downloads from timm's hub (the internet)"},
}
TINY_FIELDS = dict(dataset="digits", img_size=8, patch_size=4, batch_size=16, m_per_class=4, iterations=2,
                   eval_per_class=20, log_every=1, memory_size=0, progress=False, device="cpu")


def test_readme_is_a_front_door_of_at_most_220_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move a section to docs/"
    first = page_blocks("README.md")[0]
    assert first.language == "bash" and [line.split()[:2] for line in first.text.splitlines()] == [
        ["make", "demo"], ["make", "test"]]
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # CI runs the test command README gives


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.lstrip("#").strip().lower())
    return text.replace(" ", "-")


def local_links(page: str) -> list[str]:
    text = re.sub(r"^```.*?^```", "", (ROOT / page).read_text(), flags=re.S | re.M)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES)
def test_every_local_link_resolves(page):
    """Each relative link of README and the docs pages names a file or folder that exists, and an anchor
    into a Markdown page names one of its headings."""
    for link in local_links(page):
        path, _, anchor = link.partition("#")
        target = (ROOT / page).parent / path if path else ROOT / page
        assert target.exists(), f"{page} links {link}: {target.relative_to(ROOT)} does not exist"
        if anchor and target.suffix == ".md":
            headings = re.findall(r"^#+ .*$", re.sub(r"^```.*?^```", "", target.read_text(), flags=re.S | re.M), re.M)
            assert anchor in {slug(h) for h in headings}, f"{page} links {link}: no such heading"


@pytest.mark.parametrize("page", PAGES)
def test_every_module_path_named_exists(page):
    """Each ``nbsrc/...`` or ``bench/...`` path a page names (in prose or in a layout block) is a file or folder
    of the repository, so a module moved or renamed is renamed on the page too."""
    text = (ROOT / page).read_text()
    path = r"(?<![\w./-])((?:nbsrc|bench)/[a-z0-9_/]*[a-z0-9_]+(?:\.py|\.md|\.sh|/)?)"  # NAME: a placeholder
    named = set(re.findall(path, text))
    missing = sorted(n for n in named if not (ROOT / n.rstrip("/")).exists())
    assert not missing, f"{page} names paths that do not exist: {missing}"


def test_readme_links_every_docs_page():
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in local_links("README.md")}
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md")}
    assert pages and pages <= linked, f"not linked from README: {sorted(p.name for p in pages - linked)}"


def test_every_command_block_is_run_or_skipped_with_a_reason():
    """A new or moved block of commands needs an entry here: the test that runs it, or why none can."""
    found = {b.key for b in command_blocks()}
    assert not set(RUN_BY) & set(NOT_RUN)
    assert found == set(RUN_BY) | set(NOT_RUN), (
        f"blocks without an entry: {sorted(found - set(RUN_BY) - set(NOT_RUN))}; "
        f"entries without a block: {sorted((set(RUN_BY) | set(NOT_RUN)) - found)}")
    for test in set(RUN_BY.values()):
        file, name = test.split("::")
        assert re.search(rf"^def {name}\(", (ROOT / "tests" / file).read_text(), re.M), f"{test} does not exist"
    assert all(len(reason) > 20 for reason in NOT_RUN.values())


def test_readme_command_line_example_runs(tmp_path, monkeypatch, capsys):
    """README's two commands, the train command with the tiny settings appended."""
    from test_cli import TINY

    monkeypatch.chdir(tmp_path)
    commands = nbsrc_commands(block("README.md", "### Command line"))
    assert [c[0] for c in commands] == ["train", "eval"]
    for args in commands:
        assert main([*args, *(TINY if args[0] == "train" else [])]) == 0, capsys.readouterr().err
    assert re.search(r"R@1=\d", capsys.readouterr().out)


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """README's Python lines as written, with the tiny settings laid over the config it passes to
    ``run_experiment``."""
    import nbsrc.experiment

    run = nbsrc.experiment.run_experiment
    monkeypatch.setattr(nbsrc.experiment, "run_experiment", lambda cfg, **kw: run(cfg.replace(**TINY_FIELDS), **kw))
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(block("README.md", "### Python", "python"), scope)  # noqa: S102 - README's own lines
    assert scope["result"].run_dir == Path("runs") / "my_python_run" and scope["result"].config.loss.lam == 0.7
    assert "R@1" in capsys.readouterr().out and (tmp_path / "runs" / "my_python_run" / "results.json").is_file()


@pytest.mark.slow
def test_readme_notebook_example_runs(tmp_path, monkeypatch, capsys):
    """README's notebook line, with the smoke run's tiny settings (nbsrc.paper.demo.QUICK) and a small glyph set
    appended as parameters: notebook 02 trains and writes its table."""
    from fixtures_glyphs import tiny_glyph_set

    from nbsrc.config import config_fields
    from nbsrc.paper.demo import QUICK
    from nbsrc.paper.notebooks import notebook_parameters

    (args,) = nbsrc_commands(block("README.md", "### Notebooks"))
    assert args[:2] == ["notebook", "notebooks/02_train.ipynb"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notebooks").symlink_to(ROOT / "notebooks")
    given = set(args[3::3])  # the names of README's -p NAME VALUE
    declared = notebook_parameters(ROOT / args[1])
    fields = {f.name for f in config_fields()}
    extra = {k: v for k, v in QUICK.items() if (k in declared or k in fields) and k not in given}
    extra["data_root"] = str(tiny_glyph_set(tmp_path / "glyph_cache"))  # a config field: into overrides, as lr
    pairs = [x for k, v in extra.items() for x in ("-p", k, v if isinstance(v, str) else json.dumps(v))]
    assert main([*args, *pairs]) == 0, capsys.readouterr().err
    assert "IRT_R" in (tmp_path / QUICK["figures_dir"] / "table3_irt.md").read_text()
    saved = json.loads(next((tmp_path / QUICK["runs_dir"]).glob("glyphs/irt_l*/config.json")).read_text())
    assert saved["optim"]["lr"] == 3e-4  # README's -p lr reached the run


def test_presets_command_prints_the_pages_table(capsys):
    (args,) = nbsrc_commands(block("docs/presets.md", "# Presets"))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("\n| `") >= 10 and out in (ROOT / "docs" / "presets.md").read_text()


@pytest.fixture
def photo_folder(tmp_path, monkeypatch):
    """A fresh directory with ``photos/`` (6 classes of 3 drawn images), ``query.jpg`` (a new drawing of
    class c02) and ``runs/fashion_mnist/irt_r``, the run the page names (make demo-fashion's), here a tiny
    run on the digits."""
    from fixtures_photos import make_drawn_folder
    from PIL import Image
    from test_cli import TINY

    names = make_drawn_folder(tmp_path / "photos", n_classes=6, per_class=3)
    make_drawn_folder(tmp_path / "new", n_classes=6, per_class=1, seed=7)
    Image.open(tmp_path / "new" / names[2] / "0.png").save(tmp_path / "query.jpg")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--runs-dir", "runs/fashion_mnist", "--name", "irt_r", *TINY]) == 0
    return tmp_path


def test_index_and_search_commands_run(photo_folder, capsys):
    """Each ``embed`` line of the page's block into a fresh index (they are alternatives: the page writes
    them to the same folder), each followed by the block's ``search`` line; the hub line is left out
    (:data:`LINES_NOT_RUN`)."""
    key = ("docs/your-images.md", "## Index and search", "bash", 0)
    text = block(*key[:3])
    skipped = [line for line in text.splitlines() if any(s in line for s in LINES_NOT_RUN[key])]
    assert len(skipped) == 1
    commands = nbsrc_commands("\n".join(line for line in text.splitlines() if line not in skipped))
    embeds, (search,) = commands[:-1], commands[-1:]
    assert [c[0] for c in embeds] == ["embed", "embed"] and search[0] == "search"
    for i, args in enumerate(embeds):
        out = args[args.index("--out") + 1]
        assert out == search[1]  # the search reads the index the embed wrote
        if i:
            shutil.rmtree(photo_folder / out)  # the folder is free again
        assert main(args) == 0, capsys.readouterr().err
        assert json.loads((photo_folder / out / "manifest.json").read_text())["n_images"] == 18
        assert main(search) == 0, capsys.readouterr().err
        hits = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\s+\d+\. ", line)]
        assert len(hits) == 10 and (photo_folder / "hits.png").stat().st_size > 0


def test_index_and_search_python_runs(photo_folder):
    scope = {}
    exec(block("docs/your-images.md", "## Index and search", "python"), scope)  # noqa: S102 - the page's lines
    hits = scope["hits"]
    assert len(hits.paths[0]) == 10 and list(hits.scores[0]) == sorted(hits.scores[0], reverse=True)
