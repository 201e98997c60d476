"""Nothing on disk is unpickled, remote code stays off unless asked, long texts are counted."""

import ast
from pathlib import Path

from omegaconf import OmegaConf

import llmembed.extract.backbones as backbones
from llmembed.extract.pipeline import extract
from tests.conftest import read_rows

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    p
    for d in ("extract", "cache", "fuse", "classify", "llmembed", "scripts")
    for p in (ROOT / d).rglob("*.py")
]


def calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_the_package_never_unpickles():
    assert len(SOURCES) > 15
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(
                    n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names
                ), path
        for node, name in calls(tree):
            assert not name.endswith(
                ("pickle.load", "pickle.loads", "joblib.load", "np.load", "numpy.load")
            ), path
            if name.endswith("torch.load"):
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kw.get("weights_only") == "True", (
                    f"{path}: torch.load without weights_only=True"
                )


def test_remote_code_is_off_unless_asked(make_cfg, monkeypatch):
    for path in (ROOT / "conf" / "backbone").glob("*.yaml"):
        assert OmegaConf.load(path).trust_remote_code is False, path
    seen = []
    real = backbones.AutoModel.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(*args, **kwargs)

    monkeypatch.setattr(backbones.AutoModel, "from_pretrained", spy)
    extract(make_cfg())
    extract(make_cfg("backbone.trust_remote_code=true", "extract.max_length=50"))
    assert seen == [False, True]


def test_long_texts_are_truncated_and_counted(make_cfg):
    res = extract(make_cfg("extract.max_length=8"))
    rows = res.entry.manifest.extractions[-1]
    texts = [r["text"] for r in read_rows(make_cfg().dataset.path)]
    longer = sum(1 for t in texts if len(t.split()) + 1 > 8)  # BOS + one token per word
    assert rows["truncated"] == longer > 0
