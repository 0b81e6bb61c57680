"""``scylla export``: a draft in the layout vLLM and SGLang load as an EAGLE / EAGLE-3 head
(``scylla.drafts.export``; docs/export.md)."""
from __future__ import annotations

import argparse

from scylla.drafts.card import read_bench, train_metrics
from scylla.drafts.checkpoint import read_checkpoint
from scylla.drafts.export import FORMATS, export_state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft", required=True,
                        help="Draft checkpoint directory (save_draft / `scylla train` output).")
    parser.add_argument("--format", required=True, choices=tuple(FORMATS),
                        help="eagle: EAGLE-1/2 head (from a scylla draft); eagle3: EAGLE-3 head "
                        "(from an eagle3 draft). See docs/export.md.")
    parser.add_argument("--out", required=True, help="Directory to write the export to.")
    parser.add_argument("--bench", default=None, help="A `scylla bench --json` report: adds a "
                        "tau-per-category table to the model card.")


def run(args: argparse.Namespace) -> int:
    path, spec, state = read_checkpoint(args.draft)
    out = export_state(spec, state, args.out, args.format, metrics=train_metrics(path),
                       bench=read_bench(args.bench) if args.bench else None)
    print(f"wrote {args.format} export of {path} to {out} (config.json, model.safetensors, "
          "README.md); see docs/export.md for the vLLM / SGLang command lines")
    return 0
