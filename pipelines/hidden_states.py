"""MLproject entry point `hidden_states`: `scylla hidden-states`: the frozen target's features, written to shards.

Thin: parse the `-P` params, reuse a finished run with the same params and code or run the
stage, log. See README.md.
"""
import sys
from pathlib import Path

from scylla.commands.mlproject import stage_entry

if __name__ == "__main__":
    sys.exit(stage_entry("hidden_states", sys.argv[1:], Path(__file__).resolve().parents[1]))
