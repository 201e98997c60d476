"""The README's Python examples run as written.

Each ```python block of README.md may follow a marker line:
- `<!-- readme-test: packaged -->`: runs on the packaged models (MiniLM), in a fresh interpreter
  with an empty cache (`LLMEMBED_CACHE` in a temporary folder): the `slow` test;
- `<!-- readme-test: skip (why) -->`: needs what tests cannot have (a download); only compiled;
- no marker: runs in the fast test.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (\w+)[^>]*-->\n)?```python\n(.*?)```", re.S)


def blocks(kind: str | None) -> list[str]:
    return [code for marker, code in BLOCK.findall(README.read_text()) if (marker or None) == kind]


def run_block(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMEMBED_CACHE": str(tmp_path / "cache"), "LLMEMBED_CONFIG_DIR": ""}
    env.pop("LLMEMBED_CONFIG_DIR")
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_every_python_block_is_marked_or_runs_and_all_compile():
    found = BLOCK.findall(README.read_text())
    assert len(found) == README.read_text().count("```python")  # no block escapes the pattern
    assert {m for m, _ in found} <= {"", "packaged", "skip"}
    for _, code in found:
        compile(code, "README.md", "exec")
    assert len(blocks("packaged")) >= 3 and blocks("skip")


@pytest.mark.parametrize("code", blocks(None) or [None], ids=lambda c: "unmarked")
def test_unmarked_blocks_run(code, tmp_path):
    if code is None:
        pytest.skip("no unmarked python block")
    out = run_block(code, tmp_path)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("code", blocks("packaged"), ids=lambda c: c.splitlines()[1][:40])
def test_packaged_blocks_run(code, tmp_path):
    out = run_block(code, tmp_path)
    assert out.returncode == 0, out.stderr
