"""Errors a user can act on, and how the command lines report them.

Bad data, a bad setting, a missing or damaged cache entry: each raises a `UserError` whose message
names the problem and the fix. The command lines print that message alone and exit with status 2;
any other exception is a bug of ours and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Something the user can fix; the message says what and how."""


EXIT_USER_ERROR = 2


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a job cleanly (while it waited for a lock, or between and inside
    shards: finished shards are kept); the message says how to resume. The command lines print it
    and exit with the shell's convention, 128 + the signal's number."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = int(signal_number)


@contextmanager
def reported(prog: str) -> Iterator[None]:
    """Turn a `UserError` into one line on stderr and exit status 2 (no traceback)."""
    try:
        yield
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
