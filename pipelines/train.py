"""MLproject entry point `train`: `scylla train`: one draft, on the shards of `upstream_run_id` (a hidden_states run).

Thin: parse the `-P` params, reuse a finished run with the same params and code or run the
stage, log. See README.md.
"""
import sys
from pathlib import Path

from scylla.commands.mlproject import stage_entry

if __name__ == "__main__":
    sys.exit(stage_entry("train", sys.argv[1:], Path(__file__).resolve().parents[1]))
