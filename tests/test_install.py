"""llmembed installs beside a GPU node's own torch: its requirements are ranges, the exact versions
live in constraints.txt (used by scripts/setup.sh and CI only)."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
NODE_TORCH = "2.11.0+cu130"  # what the H200 node runs


def _requirements() -> dict[str, Requirement]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name: Requirement(r) for r in project["dependencies"]}


def test_requirements_are_ranges_and_admit_the_nodes_stack():
    reqs = _requirements()
    pinned = [str(r) for r in reqs.values() if any(s.operator == "==" for s in r.specifier)]
    assert pinned == []
    assert reqs["torch"].specifier.contains(NODE_TORCH)
    assert reqs["transformers"].specifier.contains("5.17.0")
    assert reqs["numpy"].specifier.contains("2.5.2")  # the node's numpy


def test_constraints_pin_every_requirement_within_its_range():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    for name, req in _requirements().items():
        key = name.lower().replace("_", "-")
        assert key in pins, f"{name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[key]), f"{name}=={pins[key]} outside {req}"


def _fake_wheel(folder: Path, name: str, version: str) -> Path:
    """A wheel that installs only a distribution's metadata: what pip's resolver looks at."""
    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    files = {
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{dist}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


@pytest.mark.slow
def test_pip_install_keeps_the_torch_a_node_already_has(tmp_path):
    """A fresh environment that holds another torch (here its metadata, as a CUDA build of an
    older release reports it): pip's resolution of `pip install llmembed` installs no torch."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    wheel = _fake_wheel(tmp_path, "torch", NODE_TORCH)
    subprocess.run([*pip, "install", "--no-deps", "--no-index", str(wheel)], check=True)
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [*pip, "install", "--dry-run", "--report", str(report), str(REPO)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    installs = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert "llmembed" in installs and "transformers" in installs
    assert "torch" not in installs  # the node's torch stays
