"""`llmembed-cache`: list, verify, clean and remove entries of the embedding cache.

llmembed-cache ls                      entries: backbone, settings, texts, layers, poolings, size,
                                       last use, data sets that used them, status
llmembed-cache verify [--repair]       check every shard against its manifest (exit 1 on damage)
llmembed-cache gc [--dry-run] [--older-than DAYS]
                                       remove incomplete and old-format entries, leftover temporary
                                       files, and entries unused for DAYS days
llmembed-cache rm ENTRY                remove one entry (as `ls` names it), with its lock held
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path

from llmembed.cache.export import FORMATS, check_target, entry_at, export_columns, write_export
from llmembed.cache.maintenance import (
    describe,
    describe_link,
    describe_old,
    format_table,
    gc,
    repair,
    repair_key,
    rm,
    verify_entry,
)
from llmembed.cache.root import Cache
from llmembed.errors import UserError, reported

DEFAULT_ROOT = "~/.cache/llmembed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmembed-cache", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--root",
        default=os.environ.get("LLMEMBED_CACHE", DEFAULT_ROOT),
        help="cache root (default: $LLMEMBED_CACHE, else %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("ls", help="list entries")
    listing.add_argument(
        "--json", action="store_true", help="one JSON object per entry, for scripts"
    )
    verify = sub.add_parser("verify", help="check shards against manifests")
    verify.add_argument("--repair", action="store_true", help="remove damaged shards for recompute")
    clean = sub.add_parser(
        "gc", help="remove incomplete, old-format or unused entries, old GGUF copies"
    )
    clean.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    clean.add_argument(
        "--older-than", type=float, metavar="DAYS", help="also remove entries unused for DAYS days"
    )
    export = sub.add_parser("export", help="write layers of one entry as parquet or a HF dataset")
    export.add_argument("entry", help="<key>/<sel> as `ls` shows it")
    export.add_argument("--layers", type=int, nargs="+", required=True, help="e.g. 4 6 -1")
    export.add_argument("--pooling", default="mean")
    export.add_argument("--out", type=Path, required=True, help="a new .parquet file or folder")
    export.add_argument("--format", choices=FORMATS, default="parquet")
    export.add_argument(
        "--data",
        type=Path,
        help="a CSV/TSV/JSONL/parquet file: join its texts, labels and splits (rows in its order)",
    )
    export.add_argument("--text-column", default="text")
    export.add_argument("--label-column", default="label")
    remove = sub.add_parser("rm", help="remove one entry")
    remove.add_argument("entry", help="<key>/<sel> as `ls` shows it, or a key (all its selections)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with reported("llmembed-cache"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    cache = Cache(args.root)
    if cache.root.exists() and not cache.root.is_dir():
        raise UserError(
            f"cache root {cache.root} is not a directory; pass --root or set LLMEMBED_CACHE"
        )

    if args.command == "ls":
        rows = [describe(e) for e in cache.entries()] + [
            describe_old(k) for k in cache.old_format()
        ]
        if args.json:
            for row in rows:
                print(json.dumps({**dataclasses.asdict(row), "path": str(row.path)}))
            return 0
        print(format_table(rows, cache.root))
        for kdir in cache.damaged_keys():
            print(
                f"{kdir / 'spec.json'}: cannot be read; `llmembed-cache verify --repair` removes {kdir}"
            )
        for link in cache.links():
            print(describe_link(link))
        return 0
    if args.command == "gc":
        days = args.older_than
        if days is not None and not (math.isfinite(days) and days >= 0):
            raise UserError(f"--older-than {days:g}: give a number of days, 0 or more")
        removed = gc(cache, dry_run=args.dry_run, older_than_days=args.older_than)
        for path in removed:
            print(("would remove " if args.dry_run else "removed ") + str(path))
        for link in cache.links():
            print("kept " + describe_link(link))
        print(f"{len(removed)} item(s) {'to remove' if args.dry_run else 'removed'}")
        return 0
    if args.command == "export":
        check_target(args.out)
        data = _data_set(args) if args.data else None
        columns = export_columns(entry_at(cache, args.entry), args.layers, args.pooling, data)
        out = write_export(columns, args.out, args.format)
        print(f"{len(columns['text_sha256'])} rows x {len(args.layers)} layers written to {out}")
        return 0
    if args.command == "rm":
        try:
            for path in rm(cache, args.entry):
                print(f"removed {path}")
        except LookupError as err:
            print(err, file=sys.stderr)
            return 1
        return 0
    damaged = 0
    for kdir in cache.damaged_keys():
        damaged += 1
        print(f"{kdir / 'spec.json'}: cannot be read (truncated or not JSON)")
        if args.repair:
            repair_key(cache, kdir)
            print(f"{kdir}: removed; rerun the extraction to recompute its entries")
    for link in cache.links():
        print(describe_link(link))
    for entry in cache.entries():
        if not entry.complete:
            print(f"{entry.path}: {describe(entry).status}")
            continue
        damage = verify_entry(entry)
        damaged += bool(damage)
        for d in damage:
            print(d)
        if damage and args.repair:
            repair(entry, damage)
            print(f"{entry.path}: damage removed; rerun the extraction to recompute those texts")
        elif not damage:
            print(f"{entry.path}: ok ({len(entry.shards())} shards)")
    if damaged and not args.repair:
        print(
            f"{damaged} damaged entr{'y' if damaged == 1 else 'ies'}: run `llmembed-cache verify --repair`"
        )
    return 1 if damaged and not args.repair else 0


def _data_set(args: argparse.Namespace):
    """The data set of a file, split as `llmembed-classify dataset=file` splits it; messages name
    this command's own flags."""
    from llmembed.configs import compose_group
    from llmembed.data.datasets import build_dataset, check_settings, load_file

    cfg = compose_group("dataset", "file")
    # Set, not passed as overrides: a column named "text (en)" or "2024" is a name, not syntax.
    cfg.path, cfg.text_column = str(args.data), args.text_column
    cfg.label_column = args.label_column
    flags = {"text_column": "--text-column", "label_column": "--label-column"}
    source = load_file(cfg, options=flags)
    return build_dataset(source, cfg.name, cfg.path, check_settings(cfg))


if __name__ == "__main__":
    sys.exit(main())
