"""Every figure a reading quotes is a figure of the result files or of the generated page: the
readings of docs/RESULTS.md are written by hand, and this is what keeps them from drifting from
the data (write_results warns, tests/test_experiments.py fails)."""

from __future__ import annotations

import json
import re
from pathlib import Path

NUMBER = re.compile(r"(?<![\w.])[-+−]?\d[\d,]*(?:\.\d+)?%?")


LOOSE = re.compile(r"\d[\d,]*(?:\.\d+)?%?")  # also inside names: smollm2:mean:L15, k=3


def numbers_of(text: str, *, loose: bool = False) -> set[str]:
    """The numbers of `text`, unsigned, without thousands separators."""
    found = (LOOSE if loose else NUMBER).findall(text)
    return {n.lstrip("+-−").replace(",", "").rstrip(",") for n in found}


def json_numbers(results: Path) -> set[str]:
    """Every number of every result file, at every precision the page could quote it."""
    out: set[str] = set()

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                out.update(numbers_of(str(k), loose=True))
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, bool):
            return
        elif isinstance(x, int):
            out.add(str(abs(x)))
        elif isinstance(x, float):  # at the precisions the page prints (an integer is not one)
            v = abs(x)
            out.update({f"{v:.{d}f}" for d in range(1, 5)})
            out.update({f"{100 * v:.{d}f}%" for d in range(3)})
        elif isinstance(x, str):
            out.update(numbers_of(x, loose=True))

    for path in sorted(results.rglob("*.json")):
        walk(json.loads(path.read_text()))
    return out


def unsupported_figures(reading_text: str, page_text: str, results: Path) -> list[str]:
    """Numbers a reading quotes that neither the result files nor the generated page (without its
    readings) hold at the precision quoted."""
    have = json_numbers(results) | numbers_of(page_text, loose=True)
    return sorted(n for n in numbers_of(reading_text) if n not in have)


def page_without_readings(page: str) -> str:
    """The page less its readings (each runs from its "**Reading.**" to the next section)."""
    kept, inside = [], False
    for line in page.splitlines():
        inside = (inside or line.startswith("**Reading.**")) and not line.startswith("## ")
        if not inside:
            kept.append(line)
    return "\n".join(kept)
