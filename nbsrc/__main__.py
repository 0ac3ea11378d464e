"""Command line: ``python -m nbsrc {train,eval,runs,compare,notebook,demo,study,presets,embed,search,export} ...``.

Every field of :class:`~nbsrc.config.ExperimentConfig` is a flag (``--lr 1e-4``, ``--pooling gem``,
``--dim 128``, ``--ks 1 2 4 8``, ``--no-amp``); ``--preset NAME`` starts from a paper row
(``python -m nbsrc presets`` lists them), ``--config FILE.json`` loads a whole config over it, and
flags override both.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import sys
import typing
from pathlib import Path

from nbsrc.config import ExperimentConfig, RunConfig, config_fields
from nbsrc.errors import ConfigError, NbsrcError

# OSErrors that are the user's environment, not a bug: reported in one line naming the file.
_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC),
                       errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}


# Where each command writes, named as its own flag, for the hint of an OSError (a read-only or full disk).
OUTPUT_HINTS = {"train": ", or choose another --runs-dir", "embed": ", or choose another --out",
                "search": ", or choose another --grid", "export": ", or choose another --out",
                "runs": ", or choose another --csv", "notebook": ", or choose another --out",
                "demo": ", or run it from another folder (it writes runs/ and figures/ there)"}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (``error: ...; see ... --help``)
    rather than the whole usage text followed by the error."""

    def error(self, message: str):
        m = re.fullmatch(r"argument (--[\w-]+): expected one argument", message)
        if m:  # `--train-classes -1-3`: argparse takes a value that starts with '-' for a flag
            message += f" (a value that starts with '-' is written {m.group(1)}=VALUE, e.g. {m.group(1)}=-1)"
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def field_choices(f) -> tuple | None:
    """The values config field ``f`` (:class:`~nbsrc.config.ConfigField`) can take, as its
    :func:`~nbsrc.config.setting` declares them, a registry's keys read from its dotted path (shown by
    ``--help``; ``validate()`` and the registries still check them); ``None`` first where it may be None."""
    import importlib

    choices = f.choices
    if isinstance(choices, str):
        module, attr = choices.rsplit(".", 1)
        choices = tuple(getattr(importlib.import_module(module), attr))
        if type(None) in typing.get_args(f.type):
            choices = (None, *choices)
    return choices


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field (:func:`~nbsrc.config.config_fields`), its help, the paper's value,
    its choices and its default from the field's :func:`~nbsrc.config.setting`. A flag not given leaves
    the field to the preset / config file / default (``argparse.SUPPRESS``: absent from the namespace);
    ``none`` or ``null`` sets an optional field to None (``--dim none``), while a plain string field keeps
    the word (``--weights none``). ``--dtop`` turns the DToP model on (the preset's, else the paper's),
    its fields' flags (``--k``, ``--head-dim``) change it."""
    import nbsrc.losses  # noqa: F401  (registers the pair losses and the hyperparameters they declare)
    from nbsrc.config import SECTIONS, DToPConfig, config_fields, loss_hyperparameter_fields

    doc = {**SECTIONS, "model.dtop": DToPConfig}
    groups = {s: p.add_argument_group(f"{s} (cfg.{s}.*)", doc[s].__doc__.split("\n\n")[0].split(": ", 1)[-1])
              for s in doc}
    for f in (*config_fields(), *loss_hyperparameter_fields()):
        t, flag, g = f.type, "--" + f.name.replace("_", "-"), groups[f.section]
        args = typing.get_args(t)
        optional = bool(args) and type(None) in args
        base = next((a for a in args if a is not type(None)), t) if optional else t
        choices = field_choices(f)
        null = "null" if choices and "none" in choices else "none"  # fusion: 'none' is a name, null is None
        shown = f.default
        shown = null if shown is None else " ".join(map(str, shown)) if isinstance(shown, (list, tuple)) else shown
        if f.name == "name":
            shown = "cli_<dataset>_<loss>_lam<lam>_<hash of the settings>, a name no notebook uses"
        help_ = f.help
        if choices:
            help_ += f"; choices: {', '.join(null if v is None else str(v) for v in choices)}"
        if f.paper is not None:
            help_ += f"; paper: {f.paper}"
        if f.name in ("train_classes", "test_classes"):  # argparse reads `--train-classes -1-3` as two flags
            help_ += f"; a value that starts with '-' is written {flag}=-1-3"
        help_ = (help_ + f" (default: {shown})").replace("%", "%%")
        unset = argparse.SUPPRESS
        if base is bool or f.name == "dtop":
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=unset, help=help_)
        elif f.name in ("ks", "eval_scales"):
            g.add_argument(flag, dest=f.name, type=int if f.name == "ks" else float, nargs="+", default=unset,
                           help=help_)
        else:
            conv = base if base in (int, float, str) else json.loads if base is dict else str
            metavar = "{" + ",".join(null if v is None else str(v) for v in choices) + "}" \
                if choices and f.name != "device" else None
            g.add_argument(flag, dest=f.name, type=_optional(conv, null) if optional else conv, default=unset,
                           help=help_, metavar=metavar)


def _optional(conv, null: str = "none"):
    def parse(s: str):
        return None if s.lower() in ("null", null) else conv(s)

    parse.__name__ = conv.__name__
    return parse


def config_from_args(ns: argparse.Namespace) -> ExperimentConfig:
    """The config of ``train``: the preset, then the ``--config`` file over it, then the flags.

    With ``--resume`` it is the run's own ``runs/<name>/config.json`` (:func:`resume_config`). Without
    ``--name`` (and without a name from the preset or config file) the run is named after what it
    computes (:func:`default_run_name`), never a name a notebook uses."""
    if getattr(ns, "resume", False):
        return resume_config(ns)
    return _config_from_flags(ns)


def _config_from_flags(ns: argparse.Namespace) -> ExperimentConfig:
    layers: list[dict] = []
    if getattr(ns, "preset", None) is not None:
        from nbsrc.presets import preset_dict

        if not ns.preset.strip():
            raise ConfigError("--preset is empty: pass a preset name (python -m nbsrc presets lists them), or drop "
                              "--preset for the defaults")
        layers.append(preset_dict(ns.preset))
    names = _flag_names()
    if getattr(ns, "config", None) is not None:
        layers.append(read_config_file(ns.config, names))
    layers.append({k: v for k, v in vars(ns).items() if k in names})  # only the flags given are in ns
    cfg = ExperimentConfig.from_layers(*layers)
    if any("name" in layer or "name" in (layer.get("run") or {}) for layer in layers):
        return cfg
    return cfg.replace(name=default_run_name(cfg))


def _flag_names() -> set[str]:
    from nbsrc.config import loss_hyperparameter_fields

    return {f.name for f in (*config_fields(), *loss_hyperparameter_fields())}


def default_run_name(cfg: ExperimentConfig) -> str:
    """``cli_<dataset>_<loss>_lam<lam>_<hash>``: the CLI's run name when ``--name`` is not given. The
    hash is of the config's fingerprint (what the run computes), so the same command names the same
    run (and ``--resume`` without ``--name`` finds it), a different one another run; the ``cli_``
    prefix is one no notebook uses (they name runs ``irt_r``, ``dtop``, ``effnet_...``), so
    ``make demo`` and the README's commands never collide. Only the fields that differ from their
    defaults are hashed, so a field added to the config later (with its default) keeps every name."""
    import hashlib

    digest = hashlib.sha1(json.dumps(cfg.changed_fingerprint(), sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"cli_{cfg.data.dataset}_{cfg.loss.name}_lam{cfg.loss.lam:g}_{digest}"


def resume_config(ns: argparse.Namespace) -> ExperimentConfig:
    """The config of ``train --resume``: ``<runs-dir>/<name>/config.json`` as saved. Flags may change
    only how the run is executed (:data:`~nbsrc.config.EXECUTION_FIELDS`: device, num_workers,
    progress, log and checkpoint frequency, ...); a flag that changes what the run computes, or
    ``--preset`` / ``--config``, is a one-line :class:`~nbsrc.errors.ConfigError` naming it. A leftover
    of a start killed before its first checkpoint is not a run (:func:`~nbsrc.train.rundir.is_leftover`):
    the command's own config starts it again."""
    from nbsrc.config import EXECUTION_FIELDS
    from nbsrc.train.rundir import CONFIG, is_leftover, load_run_config

    for opt in ("preset", "config"):
        if getattr(ns, opt, None) is not None:
            raise ConfigError(f"--{opt} cannot be combined with --resume: a resumed run keeps its saved "
                              f"config.json; drop --{opt}")
    given = {k: v for k, v in vars(ns).items() if k in _flag_names()}
    if "name" not in given:
        given["name"] = default_run_name(ExperimentConfig.from_dict(given))
    runs_dir = Path(given.get("runs_dir", RunConfig.runs_dir))
    path = runs_dir / given["name"] / CONFIG
    if not path.exists():
        raise ConfigError(f"--resume: there is no run {runs_dir / given['name']} (no {CONFIG}); pass the "
                          f"--name (and --runs-dir) of an existing run, or drop --resume to start one")
    if is_leftover(path.parent):  # killed before its first checkpoint: not a run, the command starts it anew
        return _config_from_flags(ns)
    saved = load_run_config(path)
    for k, v in given.items():
        if k in ("name", "runs_dir") or k in EXECUTION_FIELDS:
            continue
        old = saved.value(k)
        if saved.replace(**{k: v}).fingerprint() != saved.fingerprint():
            flag = "--" + k.replace("_", "-")
            raise ConfigError(f"{flag} {v!r} cannot change a resumed run (it was made with {k}={old!r}): only "
                              f"execution settings ({', '.join(sorted(EXECUTION_FIELDS - {'runs_dir'}))}) may; "
                              f"drop {flag}, or start a new run with another --name")
    changes = {k: v for k, v in given.items() if k in EXECUTION_FIELDS}
    return saved.replace(**{**changes, "runs_dir": str(runs_dir)})


def read_config_file(path: str, names: set[str]) -> dict:
    """The JSON dict of ``--config FILE`` (fields by name, or a saved ``config.json`` of any version); a
    missing, unreadable or malformed file, or a key that is neither a config field (of ``names``) nor a
    section, is a one-line :class:`~nbsrc.errors.ConfigError` naming the file."""
    from nbsrc.config import SECTIONS

    names = names | set(SECTIONS) | {"format", "model_options"}
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror}); pass an existing config.json") from None
    try:
        d = json.loads(text)
    except ValueError as e:
        where = f"line {e.lineno}, column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)[:80]
        raise ConfigError(f"--config {path} is not valid JSON ({where}); fix the file") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--config {path} holds a JSON {type(d).__name__}; expected an object of config fields")
    unknown = sorted(set(d) - names)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(names), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"--config {path}: unknown parameter {unknown[0]!r}{hint}; its keys must be config fields")
    return d


def cmd_train(ns) -> None:
    cfg = config_from_args(ns)  # a bad config fails here, before torch is imported (seconds)
    from nbsrc.experiment import run_experiment
    from nbsrc.train.distributed import init_distributed

    init_distributed(getattr(ns, "device", None) or "auto")  # no-op unless launched by torchrun
    mode = "overwrite" if ns.overwrite else "resume" if ns.resume else "new"
    run_experiment(cfg, mode=mode)


def cmd_eval(ns) -> None:
    """Print each finished run's saved results and how they were obtained. The evaluation is the one the
    run did when it finished (on its held-out classes, with the model it saved), so printing it is exact
    and instant; re-evaluating on other data is ``nbsrc embed`` + ``nbsrc search`` or
    :func:`nbsrc.experiment.load_run` with ``with_model=True``."""
    from nbsrc.experiment import load_run

    for run in ns.runs:
        res = load_run(Path(run))
        print(describe_evaluation(res.config, res.results))


def describe_evaluation(cfg: ExperimentConfig, results: dict) -> str:
    """Two lines: ``name: R@1=..  R@2=..`` (or mAP) and how that was evaluated (where: the dataset's
    :class:`~nbsrc.data.DatasetSpec`)."""
    from nbsrc.data import DATASETS

    scores = {k: v for k, v in results.items() if k.startswith(("R@", "mAP", "roxford", "rparis"))
              and isinstance(v, (int, float))}
    first = f"{cfg.run.name}: " + "  ".join(f"{k}={v:.2f}" for k, v in scores.items())
    per_class = "all images" if cfg.data.eval_per_class is None else f"at most {cfg.data.eval_per_class} images"
    where = (DATASETS[cfg.data.dataset].evaluated_on if cfg.data.dataset in DATASETS else None) or \
        f"{cfg.data.dataset} classes {cfg.data.test_classes} ({per_class} per class, each query against the rest)"
    how = [f"  evaluated on {where}", f"{'PCA to ' + str(cfg.model.dim) if cfg.model.dim else 'no PCA'}",
           f"after {cfg.optim.iterations} iterations" if cfg.optim.iterations else "off-the-shelf (no training)"]
    if cfg.eval.eval_scales:
        how.append(f"scales {cfg.eval.eval_scales}")
    if cfg.eval.whitening:
        how.append(f"{cfg.eval.whitening} whitening")
    if "device" in results:
        how.append(f"on {results['device']}")
    versions = results.get("versions")
    if isinstance(versions, dict):
        how.append(f"nbsrc {versions.get('nbsrc')}, commit {str(results.get('git_commit', 'unknown'))[:12]}")
    return first + "\n" + ", ".join(how)


def cmd_runs(ns) -> None:
    from nbsrc.runlist import format_table, list_runs, write_csv

    rows = list_runs(ns.runs_dir)
    print(format_table(rows) if rows else f"no runs under {ns.runs_dir}")
    if ns.csv:
        write_csv(rows, ns.csv)
        print(f"wrote {ns.csv}")


def cmd_compare(ns) -> None:
    from nbsrc.runlist import compare_runs, format_table

    print(format_table(compare_runs(ns.runs)))


def cmd_notebook(ns) -> None:
    from nbsrc.paper.notebooks import parse_parameters, run_notebook

    params = parse_parameters(ns.path, ns.param or [])
    out = run_notebook(ns.path, params, ns.out, log_output=ns.log_output)
    print(f"executed {ns.path} -> {out}")


def cmd_presets(ns) -> None:
    from nbsrc.presets import preset_table

    print(preset_table(), end="")


def cmd_study(ns) -> None:
    from nbsrc.paper.study import run_study

    settings = {}
    for key, value in ns.set or []:
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"--set {key} {value}: the value is not JSON; e.g. --set seeds_main '[0, 1, 2, 3, 4]'"
                              ) from None
    run_study(ns.runs_dir, ns.figures_dir, ns.data_root, **settings)


def cmd_demo(ns) -> None:
    from nbsrc.paper.demo import run_demo

    if ns.study:
        return cmd_study(argparse.Namespace(runs_dir="runs/study", figures_dir="figures/study", data_root=None, set=[]))
    run_demo(quick=ns.quick, notebooks_to_run=ns.only, demo=ns.demo, seeds=ns.seeds, full=ns.full)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m nbsrc", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train and evaluate one run into runs/<name>/")
    t.add_argument("--preset", help="a paper row to start from (python -m nbsrc presets lists them)")
    t.add_argument("--config", help="a config.json applied over the preset")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue runs/<name> from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="move an existing runs/<name> aside and start again")
    _add_config_flags(t)
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="print the saved results of finished runs and how they were evaluated")
    e.add_argument("runs", nargs="+", help="run directories, e.g. runs/irt_r")
    e.set_defaults(func=cmd_eval)
    r = sub.add_parser("runs", help="list the runs under a directory: state, iterations, R@1 or mAP, date")
    r.add_argument("runs_dir", nargs="?", default="runs", metavar="DIR", help="runs directory (default: runs)")
    r.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    r.set_defaults(func=cmd_runs)
    c = sub.add_parser("compare", help="the settings that differ between runs, and their results")
    c.add_argument("runs", nargs="+", metavar="RUN", help="run directories, e.g. runs/my_irt_r runs/my_irt_l")
    c.set_defaults(func=cmd_compare)
    n = sub.add_parser("notebook", help="run one notebook headless with papermill")
    n.add_argument("path")
    n.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"))
    n.add_argument("--out")
    n.add_argument("--log-output", action="store_true")
    n.set_defaults(func=cmd_notebook)
    d = sub.add_parser("demo", help="run the notebooks in order on a demo's data and print the table")
    from nbsrc.paper.demo import DEFAULT_DEMO, DEMOS

    d.add_argument("--demo", default=DEFAULT_DEMO, choices=DEMOS,
                   help=f"which demo (nbsrc.paper.demo.DEMO_DATA; default: {DEFAULT_DEMO}); glyphs needs `make glyphs`")
    d.add_argument("--quick", action="store_true", help="tiny parameters (smoke test)")
    d.add_argument("--full", action="store_true",
                   help="also the grids (notebooks 04, 07 and 08: claims C5 and C7, DToP's ablations); about 3x longer")
    d.add_argument("--only", nargs="+", help="notebook file names to run")
    d.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="the seeds of every run a claim needs (default: the notebooks' own, 0 1 2); the verdicts "
                        "need at least 3, e.g. --seeds 0 1 2 3 4")
    d.add_argument("--study", action="store_true",
                   help="the study instead (as `nbsrc study`): the claims where fine-tuning has done its work, ~2 h")
    d.set_defaults(func=cmd_demo)
    st = sub.add_parser("study",
                        help="the claims C1-C7 where fine-tuning has done its work (nbsrc.paper.study; resumable)")
    st.add_argument("--runs-dir", default="runs/study", help="where its runs go (default: runs/study)")
    st.add_argument("--figures-dir", default="figures/study", help="where its results go (default: figures/study)")
    st.add_argument("--data-root", help="the glyph set (a cache folder or a built set's .npz; default: the cache)")
    st.add_argument("--set", nargs=2, action="append", metavar=("KEY", "JSON"),
                    help="a setting of nbsrc.paper.study.STUDY, e.g. --set seeds_other '[0, 1, 2]'")
    st.set_defaults(func=cmd_study)
    sub.add_parser("presets", help="print the table of presets (the paper's rows)").set_defaults(func=cmd_presets)
    from nbsrc.retrieval.cli import add_subcommands as add_retrieval_commands

    add_retrieval_commands(sub)  # embed, search, export
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        ns.func(ns)  # each subcommand's parser names its function (set_defaults)
    except NbsrcError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only runs directory, a full disk, a file where a folder should be
        if err.errno not in _ENVIRONMENT_ERRNOS or err.filename is None:
            raise
        print(f"error: cannot write or read {err.filename}: {err.strerror}; check that the path is a writable "
              f"directory with free space{OUTPUT_HINTS.get(ns.cmd, '')}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
