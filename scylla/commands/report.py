"""``scylla report``: execute the notebooks against the tracking store and render HTML.

Writes ``<out>/<notebook>.html`` for each notebook, ``<out>/index.html`` linking them, and
``<out>/points/``: the points behind each figure (CSV) and ``headline.md`` (the summary
tables, written by the overview notebook). ``--inplace`` also saves the executed notebooks
over the sources (to commit them with their figures, run on the ``paper`` profile).
"""
from __future__ import annotations

import argparse

from scylla.analysis.report import NOTEBOOKS, render_report
from scylla.commands.cli import add_profile_argument
from scylla.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="notebooks/report",
                        help="Output directory (default: notebooks/report/).")
    add_profile_argument(parser, "Sweep profile whose runs the notebooks read")
    parser.add_argument("--simulated", action="store_true",
                        help="Read the runs of `scylla sweep --simulate`.")
    parser.add_argument("--notebooks", default=",".join(NOTEBOOKS),
                        help="Comma-separated notebooks to run.")
    parser.add_argument("--inplace", action="store_true",
                        help="Save the executed notebooks over notebooks/*.ipynb.")
    parser.add_argument("--kernel-per-notebook", action="store_true",
                        help="A fresh kernel for each notebook (slower; default: one kernel, "
                             "its namespace cleared between notebooks).")


def run(args: argparse.Namespace) -> int:
    names = tuple(n.strip() for n in args.notebooks.split(",") if n.strip())
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise ConfigError(f"--notebooks: unknown {unknown}; choose from {', '.join(NOTEBOOKS)}")
    index = render_report(args.out, args.profile, args.simulated, names, args.inplace,
                          one_kernel=not args.kernel_per_notebook)
    print(f"report: {index}")
    return 0
