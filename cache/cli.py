"""`llmembed-cache`: list, verify and clean the embedding cache.

llmembed-cache ls                 entries with data set, backbone, rows, layers, size, status
llmembed-cache verify [--repair]  check every shard against its manifest (exit 1 on damage)
llmembed-cache gc [--dry-run]     remove incomplete entries and leftover temporary files
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from llmembed.cache.maintenance import describe, format_table, gc, remove_shard, verify_entry
from llmembed.cache.store import Cache
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
    sub.add_parser("ls", help="list entries")
    verify = sub.add_parser("verify", help="check shards against manifests")
    verify.add_argument("--repair", action="store_true", help="remove damaged shards for recompute")
    clean = sub.add_parser("gc", help="remove incomplete entries")
    clean.add_argument("--dry-run", action="store_true", help="only say what would be removed")
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
        print(format_table([describe(e) for e in cache.entries()], cache.root))
        return 0
    if args.command == "gc":
        removed = gc(cache, dry_run=args.dry_run)
        for path in removed:
            print(("would remove " if args.dry_run else "removed ") + str(path))
        print(f"{len(removed)} item(s) {'to remove' if args.dry_run else 'removed'}")
        return 0
    damaged = 0
    for entry in cache.entries():
        if not entry.complete:
            print(f"{entry.path}: {describe(entry).status}, resumable")
            continue
        problems = verify_entry(entry)
        damaged += bool(problems)
        for problem in problems:
            print(problem)
        if problems and args.repair:
            for shard in entry.shards():
                if any(str(entry.path / shard.file) in p for p in problems):
                    remove_shard(entry, shard.index)
            print(f"{entry.path}: damaged shards removed; rerun the extraction to recompute them")
        elif not problems:
            print(f"{entry.path}: ok ({len(entry.shards())} shards)")
    if damaged and not args.repair:
        print(
            f"{damaged} damaged entr{'y' if damaged == 1 else 'ies'}: run `llmembed-cache verify --repair`"
        )
    return 1 if damaged and not args.repair else 0


if __name__ == "__main__":
    sys.exit(main())
