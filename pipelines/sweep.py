"""MLproject entry point `sweep`: run sweep files (sweeps/*.yaml) stage by stage, with reuse.

Thin: parse the `-P` params and hand them to `scylla sweep`. See README.md.
"""
import sys
from pathlib import Path

from scylla.commands.mlproject import sweep_entry

if __name__ == "__main__":
    sys.exit(sweep_entry(sys.argv[1:], Path(__file__).resolve().parents[1]))
