"""`usage.json`: which data sets used an entry, and when; for people (`ls`) and `gc --older-than`.

Anyone with write access to a shared root can write this file, so it is read as untrusted data: a
field of the wrong type makes the record damaged (named by `ls`, and `gc` falls back to the
manifest's date), never a crash of the command that reads the whole root.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from llmembed.cache.keys import inside

STAMP = "%Y-%m-%dT%H:%M:%S%z"  # how uses are dated


def parse_stamp(stamp: object) -> float | None:
    """Seconds since the epoch of a use's date; None when it is not one."""
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.strptime(stamp, STAMP).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class Usage:
    datasets: dict[str, str] = field(default_factory=dict)  # data set name -> its last use
    last_used: str | None = None
    damage: str | None = None  # why the file was not understood (then the fields are empty)

    @classmethod
    def from_json(cls, raw: object) -> Usage:
        """The record, or an empty one naming what is wrong with `raw`."""
        if not isinstance(raw, dict):
            return cls(damage=f"a JSON {type(raw).__name__}, not an object")
        datasets, last = raw.get("datasets", {}), raw.get("last_used")
        if not isinstance(datasets, dict) or not all(
            isinstance(k, str) and parse_stamp(v) is not None for k, v in datasets.items()
        ):
            return cls(damage="`datasets` is not a mapping of names to dates")
        if last is not None and parse_stamp(last) is None:
            return cls(damage=f"`last_used` is not a date ({last!r:.40})")
        return cls(dict(datasets), last)


def read_usage(root: Path, path: Path) -> Usage:
    """The usage record at `path` inside `root`: empty when there is none, damaged (with the
    reason) when it cannot be understood."""
    try:
        raw = json.loads(inside(root, path, follow=True).read_text())
    except FileNotFoundError:
        return Usage()
    except (OSError, ValueError, RecursionError) as err:  # a link out of the root included
        return Usage(damage=f"cannot be read ({type(err).__name__}: {err})"[:200])
    return Usage.from_json(raw)
