"""MLproject entry point `fit`: `scylla fit`: one log-linear law fitted to runs of `experiment`.

Thin: parse the `-P` params, reuse a finished run with the same params and code or run the
stage, log. See README.md.
"""
import sys
from pathlib import Path

from scylla.commands.mlproject import stage_entry

if __name__ == "__main__":
    sys.exit(stage_entry("fit", sys.argv[1:], Path(__file__).resolve().parents[1]))
