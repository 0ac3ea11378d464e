"""The papers' application, on top of the library: what reproduces IRT and DToP and judges their claims.

- :mod:`nbsrc.paper.grids`: the paper's grids, ``{label: config}`` per table or figure (IRT Tables 3-6, 9,
  Figs. 2, 4; DToP Tables A8-A13);
- :mod:`nbsrc.paper.claims`: the claims C1-C7 and the rule that judges them over seeds;
- :mod:`nbsrc.paper.reporting`: the tables the notebooks print and save;
- :mod:`nbsrc.paper.reproduce`: a preset's grids with the paper's numbers, and the benchmarks beside its row;
- :mod:`nbsrc.paper.demo` (``python -m nbsrc demo``) and :mod:`nbsrc.paper.study` (``python -m nbsrc study``);
- :mod:`nbsrc.paper.notebooks`: the notebooks run headless (``python -m nbsrc notebook``).

The library (every other module of :mod:`nbsrc`) never imports this package (tests/test_layout.py); only the
command line, :mod:`nbsrc.__main__`, calls into both.
"""
