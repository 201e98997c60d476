"""Saved models that travel: weights checked against the identity recorded at training time,
backbones found by name or by an override on another machine, no code run because model.json
says so, files readable by whoever gets the folder."""

import json
import shutil
import stat

import numpy as np
import pytest

from llmembed.classify.cli import predict_main
from llmembed.classify.predict import predict_texts, resolve_backbone
from llmembed.classify.saved import SavedModelError
from llmembed.classify.train import train
from llmembed.fuse.features import backbone_config
from tests.conftest import make_tiny_llama, read_rows


@pytest.fixture
def trained(classify_cfg, tmp_path, data_csv):
    """A model trained on a tiny Llama kept in its own folder, and the texts of its test split."""
    model = make_tiny_llama(tmp_path / "weights")
    cfg = classify_cfg([("llama", [1, 3], "mean")])
    cfg.features.sources[0].backbone.path = str(model)
    train(cfg, tmp_path / "run")
    texts = [r["text"] for r in read_rows(data_csv)]
    test = [r for r in read_rows(tmp_path / "run" / "predictions.csv") if r["split"] == "test"]
    return tmp_path / "run" / "model", model, [texts[int(r["row_id"])] for r in test], test


def test_model_json_records_the_backbone_identity(trained):
    folder, _, _, _ = trained
    meta = json.loads((folder / "model.json").read_text())
    identity = meta["sources"][0]["identity"]
    assert set(identity) == {"files"} and "model.safetensors" in identity["files"]
    assert meta["sources"][0]["role"] == "llm"


def test_moved_weights_are_found_with_backbone_path(trained, tmp_path):
    folder, model, texts, test = trained
    moved = tmp_path / "elsewhere" / "tiny"
    shutil.move(model, moved)
    with pytest.raises(SavedModelError, match=r"does not exist.*--backbone-path tiny-llama=PATH"):
        predict_texts(folder, texts)
    labels, _, _ = predict_texts(folder, texts, backbone_paths={"tiny-llama": str(moved)})
    assert labels == [r["predicted"] for r in test]


def test_other_weights_at_the_recorded_path_are_refused(trained, tmp_path):
    folder, model, texts, _ = trained
    shutil.rmtree(model)
    make_tiny_llama(model, seed=1)  # same name, same shapes, other numbers
    with pytest.raises(SavedModelError, match=r"not the one this model was trained on.*model"):
        predict_texts(folder, texts)
    labels, proba, _ = predict_texts(folder, texts, allow_other_weights=True)
    assert len(labels) == len(texts) and np.isfinite(proba).all()


def test_trust_remote_code_is_never_taken_from_model_json(trained, tmp_path):
    folder, model, texts, _ = trained
    (model / "modeling_evil.py").write_text("raise SystemExit('ran')\n")
    meta = json.loads((folder / "model.json").read_text())
    meta["sources"][0]["backbone"]["trust_remote_code"] = True
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(SavedModelError, match=r"modeling_evil.py.*--trust-remote-code"):
        predict_texts(folder, texts)


def test_shipped_backbones_are_found_by_name_not_by_the_recorded_path():
    source = {"backbone": {"name": "minilm", "conf": "minilm", "path": "/other/venv/minilm"}}
    bb = resolve_backbone(source, paths={}, trust_remote_code=False)
    assert bb.path == str(backbone_config("minilm").path) != "/other/venv/minilm"
    assert bb.trust_remote_code is False and "conf" not in bb


@pytest.mark.parametrize("group_writable", [False, True])
def test_saved_files_are_readable_by_others(classify_cfg, tmp_path, group_writable):
    cfg = classify_cfg([("llama", [1], "mean")], f"cache.group_writable={group_writable}")
    train(cfg, tmp_path / "run")
    for name in ("head.safetensors", "model.json"):
        mode = stat.S_IMODE((tmp_path / "run" / "model" / name).stat().st_mode)
        assert mode == (0o664 if group_writable else 0o644), (name, oct(mode))


def test_predict_refuses_to_overwrite_its_input_and_empty_inputs(trained, tmp_path, capsys):
    folder, _, _, _ = trained
    texts = tmp_path / "texts.txt"
    texts.write_text("good film\n")
    with pytest.raises(SystemExit) as stop:
        predict_main([str(folder), str(texts), "--output", str(texts)])
    assert stop.value.code == 2 and texts.read_text() == "good film\n"
    assert "is the input file" in capsys.readouterr().err
    texts.write_text("\n  \n")
    with pytest.raises(SystemExit):
        predict_main([str(folder), str(texts)])
    assert "holds no texts" in capsys.readouterr().err
