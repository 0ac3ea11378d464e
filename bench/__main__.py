"""``python -m bench {train,eval,dtop,loader,revisited,embed,demo,jobs} [options]``: run one benchmark,
print its JSON and rewrite its section of bench/RESULTS.md (``--results PATH`` to write elsewhere, ``--note TEXT`` to
record the conditions, e.g. a busy shared machine)."""

from __future__ import annotations

import argparse
import sys

from nbsrc.errors import NbsrcError


def build_parser() -> argparse.ArgumentParser:
    from bench import demo, dtop, embed, jobs, loader, revisited, train
    from bench import eval as eval_bench

    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, module, help_ in (("train", train, "training throughput: nbsrc vs reference loop vs bare backbone"),
                                ("eval", eval_bench, "Recall@K evaluation: time and peak RSS per method"),
                                ("dtop", dtop, "DToP training-step cost relative to the plain ViT"),
                                ("loader", loader, "DataLoader workers needed to keep the training step fed"),
                                ("embed", embed, "embedding an image folder: Index.build vs a direct PIL + timm loop"),
                                ("revisited", revisited, "Revisited mAP: vectorised protocol vs the slow loop"),
                                ("demo", demo, "where `make demo` spends its time, from its log and runs"),
                                ("jobs", jobs, "runs trained at once (run_all jobs=N) against runs trained in turn")):
        s = sub.add_parser(name, help=help_, description=module.__doc__.split("\n\n")[0])
        module.add_arguments(s)
        s.add_argument("--results", default=None, help="markdown file to update (default bench/RESULTS.md)")
        s.add_argument("--note", default="", help="a line recorded with the results (machine conditions)")
        s.set_defaults(module=module)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        a.module.run(a, a.results, a.note)
    except NbsrcError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
