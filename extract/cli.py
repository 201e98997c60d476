"""`llmembed-extract`: fill the embedding cache for a data set and a backbone (Hydra app).

llmembed-extract dataset=mr backbone=smollm2
llmembed-extract -m dataset=mr,trec backbone=smollm2,minilm
llmembed-extract dataset=file dataset.path=my.csv backbone=local backbone.path=/models/x
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

import hydra
from omegaconf import DictConfig

from llmembed.clihelp import bars_on_a_terminal_only, maybe_answer, print_and_log
from llmembed.errors import reported
from llmembed.overrides import check_command_line


@contextmanager
def stop_on_signals():
    """SIGINT (Ctrl-C) and SIGTERM (what SLURM and `kill` send) stop the work at the next batch: the
    shard being built is discarded, the finished ones stay. Yields `check`, to call between batches.

    The handler only takes note: Python runs handlers between any two bytecodes, also inside a
    garbage-collection callback, where a raised exception is printed and dropped and the run goes on
    (seen in CI). A second signal raises at once. Only the main thread can own signal handlers, and a
    signal the process was started to ignore (SIGINT of a background job) stays ignored. A wait for
    a cache key's lock calls `check` too, so a job queued behind another stops at once."""
    from llmembed.cache.lock import waits_stop_on

    received: list[int] = []

    def check() -> None:
        if received:
            err = KeyboardInterrupt()
            err.signal_name, err.signal_number = signal.Signals(received[0]).name, received[0]
            raise err

    def handler(signum, frame) -> None:
        received.append(signum)
        if len(received) > 1:
            check()

    watched = []
    if threading.current_thread() is threading.main_thread():
        watched = [
            s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) != signal.SIG_IGN
        ]
    previous = {s: signal.signal(s, handler) for s in watched}
    try:
        with waits_stop_on(check):
            yield check
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main() -> None:
    """`--help` and `--version` answer before Hydra starts (and before torch is imported)."""
    maybe_answer(
        "llmembed-extract",
        "embed a data set with a backbone into the cache",
        [
            "llmembed-extract dataset=mr backbone=smollm2",
            "llmembed-extract -m dataset=mr,trec backbone=smollm2,minilm",
            "llmembed-extract dataset=file dataset.path=my.csv backbone=local backbone.path=/models/x",
            "llmembed-extract extract.max_length=256 extract.prompt='Review: {text}'",
        ],
        ["dataset", "backbone"],
    )
    with reported("llmembed-extract"):
        check_command_line("extract", sys.argv[1:])
    hydra_main()


@hydra.main(version_base=None, config_path="../conf", config_name="extract")
def hydra_main(cfg: DictConfig) -> None:
    from llmembed.errors import Interrupted
    from llmembed.extract.pipeline import extract

    bars_on_a_terminal_only(cfg)
    try:
        with reported("llmembed-extract"), stop_on_signals() as check:
            result = extract(cfg, check_stop=check)
    except Interrupted as stop:
        print(stop, file=sys.stderr)
        # The shell's convention: 130 for SIGINT, 143 for SIGTERM.
        sys.exit(128 + stop.signal_number)
    print_and_log(result.summary())


if __name__ == "__main__":
    main()
