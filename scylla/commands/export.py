"""``scylla export``: a draft in the layout vLLM and SGLang load as an EAGLE / EAGLE-3 head
(``scylla.drafts.export``; docs/export.md)."""
from __future__ import annotations

import argparse

from scylla.drafts.card import read_bench, train_metrics
from scylla.drafts.checkpoint import read_checkpoint
from scylla.drafts.export import FORMATS, export_state
from scylla.drafts.io import ship

SHIPPED = "shipped"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft", required=True,
                        help="Draft checkpoint directory (save_draft / `scylla train` output).")
    parser.add_argument("--format", required=True, choices=(*FORMATS, SHIPPED),
                        help="eagle: EAGLE-1/2 head (from a scylla draft); eagle3: EAGLE-3 head "
                        "(from an eagle3 draft). See docs/export.md. shipped: our checkpoint "
                        "with bfloat16 weights, as `--draft default` loads it from "
                        "scylla/drafts/shipped/<target>/.")
    parser.add_argument("--out", required=True, help="Directory to write the export to.")
    parser.add_argument("--bench", default=None, help="A `scylla bench --json` report: adds a "
                        "tau-per-category table to the model card.")


def run(args: argparse.Namespace) -> int:
    if args.format == SHIPPED:
        out = ship(args.draft, args.out, bench=read_bench(args.bench) if args.bench else None)
        print(f"wrote {out} (draft.json, draft.safetensors in bfloat16, README.md)")
        return 0
    path, spec, state = read_checkpoint(args.draft)
    out = export_state(spec, state, args.out, args.format, metrics=train_metrics(path),
                       bench=read_bench(args.bench) if args.bench else None)
    print(f"wrote {args.format} export of {path} to {out} (config.json, model.safetensors, "
          "README.md); see docs/export.md for the vLLM / SGLang command lines")
    return 0
