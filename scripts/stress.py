"""Stress the cache's guarantees with more kills and jobs than the test suite uses, and print the figures.

    .venv/bin/python scripts/stress.py                 # 20 kill -9 points, 4 concurrent jobs
    .venv/bin/python scripts/stress.py --kills 50 --jobs 8 --seed 3

It runs the reliability, security and bad-input tests of the suite with larger settings (they read
LLMEMBED_STRESS_* variables), so the stress run and the suite check the same properties; each test
asserts that no complete data is lost and that resumed results are bit-identical.

    .venv/bin/python scripts/stress.py --only security  # just the hostile-root tests (a minute)

The security figures: symbolic links planted at every temporary, lock, manifest and shard name,
linked key and selection folders and `..` names ("escapes tried / escaped"), and metadata tampering
(a swapped shard, a reversed layer list, an edited spec, a truncated manifest, ...), each of which a
read and `verify` must detect. Last, the hostile cases by issue 21's classes, tried / held: a case
is tried when its test runs (not skipped: the multi-user tests need root), and holds when it passes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BAD_INPUT_TESTS = (
    "bad_files",
    "non_utf8",
    "missing_file",
    "bom",
    "null_text",
    "never_seen",
    "bad_settings",
    "bad_feature",
    "misspelled",
    "unwritable",
    "missing_local",
    "gguf_without",
    "without_pad",
    "missing_entry",
    "hostile_names",
    "long_texts",
)

# Issue 21's classes of hostile cases, by the names of the tests that try them.
CLASSES = {
    "escapes (another user harms your job)": (
        "links_planted",
        "planted_lock_link",
        "linked_key_or_selection",
        "dot_dot",
        "hostile_names",
        "linked_converted",
        "converted_copy",
    ),
    "silent wrong numbers": ("tampered_metadata", "damage_is_found", "kill_9_at_many"),
    "lost data": ("kill_9_during", "disk_full_during", "real_full_disk"),
    "hangs": ("held_lock", "lock_of_a_killed", "sigterm_and_sigint"),
    "a shared node": ("shared_by_a_group", "without_write_access", "group_writable"),
    "tracebacks for user errors": (*BAD_INPUT_TESTS, "damaged_usage", "full_disk_when"),
}


def by_class(outcome: dict[str, str]) -> list[str]:
    """One line per class: test cases tried (run, not skipped) and held (passed)."""
    lines = []
    for name, patterns in CLASSES.items():
        cases = [v for k, v in outcome.items() if any(p in k for p in patterns)]
        tried = [v for v in cases if v != "skipped"]
        held = sum(v == "passed" for v in tried)
        skipped = len(cases) - len(tried)
        known = sum(v == "xfail" for v in tried)
        note = f", {known} a known hole (xfail)" if known else ""
        note += f" ({skipped} skipped: see the test log)" if skipped else ""
        lines.append(f"  {name + ':':40} tried {len(tried):3}, held {held:3}{note}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--only",
        choices=["security"],
        help="run only tests/test_security.py and tests/test_shared_root.py (the hostile root)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report, junit = Path(tmp) / "figures.jsonl", Path(tmp) / "junit.xml"
        env = {
            **os.environ,
            "LLMEMBED_STRESS_KILLS": str(args.kills),
            "LLMEMBED_STRESS_JOBS": str(args.jobs),
            "LLMEMBED_STRESS_SEED": str(args.seed),
            "LLMEMBED_STRESS_REPORT": str(report),
        }
        tests = [
            "tests/test_reliability.py",
            "tests/test_security.py",
            "tests/test_shared_root.py",
            "tests/test_datasets.py",
            "tests/test_backbones.py",
            "tests/test_extract.py",
            "tests/test_cli.py",
            "tests/test_classify.py",
        ]
        if args.only == "security":
            tests = ["tests/test_security.py", "tests/test_shared_root.py"]
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                f"--junitxml={junit}",
                *tests,
            ],
            cwd=ROOT,
            env=env,
        )
        figures = (
            [json.loads(line) for line in report.read_text().splitlines()]
            if report.exists()
            else []
        )
        cases = ET.parse(junit).getroot().iter("testcase")
        outcome = {c.get("name"): _outcome(c) for c in cases}
    kills = next((f for f in figures if "kills" in f), {})
    jobs = next((f for f in figures if "concurrent_jobs" in f), {})
    damage = [f["damage"] for f in figures if "damage" in f]
    signals = [f["signal"] for f in figures if "signal" in f]
    escapes = [f for f in figures if "escapes" in f]
    tampering = [f for f in figures if "tampering" in f]
    bad = Counter(v for k, v in outcome.items() if any(b in k for b in BAD_INPUT_TESTS))
    failed = [k for k, v in outcome.items() if v == "failed"]
    print("\n== llmembed stress figures")
    print(
        f"kill -9 points survived:     {kills.get('kills', 0)} "
        f"(after each: entry absent {kills.get('absent', 0)}, "
        f"incomplete and resumable {kills.get('incomplete', 0)}, complete {kills.get('complete', 0)}; "
        f"resume bit-identical: {kills.get('bit_identical', False)})"
    )
    print(
        f"concurrent jobs on one key:  {jobs.get('concurrent_jobs', 0)} "
        f"(model ran {jobs.get('model_runs', '?')} "
        f"time, all read identical arrays: {jobs.get('identical_arrays', False)})"
    )
    print(
        f"damaged files found:         {len(damage)} of 4 ({', '.join(damage)}), each by verify and by a read"
    )
    full = [
        f"{f['disk_full']}, {f['finished_shards_kept']} finished shards kept"
        for f in figures
        if "disk_full" in f
    ]
    print(f"disk full:                   {'; '.join(full) or 'not run'}")
    print(
        f"signals:                     {', '.join(signals) or 'none'} stopped cleanly and resumed"
    )
    print(
        f"bad inputs tried:            {sum(bad.values())} ({bad['passed']} gave their specific error)"
    )
    tried = sum(f["tried"] for f in escapes)
    escaped = sum(f["escaped"] for f in escapes)
    # A failing escape test records nothing: count its cases as escaped, not as absent.
    escape_failures = [k for k in failed if "link" in k or "dot_dot" in k]
    print(
        f"escapes tried / escaped:     {tried} / {escaped + len(escape_failures)} "
        f"({len(escapes)} cases: {', '.join(sorted({f['escapes'] for f in escapes}))})"
    )
    tamper_cases = [k for k in outcome if "tampered_metadata" in k]
    print(
        f"metadata tampering cases detected: {len(tampering)} of {len(tamper_cases)} "
        f"({', '.join(f['tampering'] for f in tampering)})"
    )
    print(f"data lost:                   {0 if not failed else 'see failures'}")
    print("hostile cases by class (issue 21):")
    print("\n".join(by_class(outcome)))
    if failed:
        print("FAILED: " + ", ".join(failed))
    return run.returncode


def _outcome(case: ET.Element) -> str:
    """passed, failed, skipped, or xfail: a known hole, tried and not held."""
    if case.find("failure") is not None or case.find("error") is not None:
        return "failed"
    skipped = case.find("skipped")
    if skipped is not None:
        return "xfail" if skipped.get("type") == "pytest.xfail" else "skipped"
    return "passed"


if __name__ == "__main__":
    sys.exit(main())
