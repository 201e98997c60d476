"""Saved models that travel: weights checked against the identity recorded at training time,
backbones found by name or by an override on another machine, no code run because model.json
says so, files readable by whoever gets the folder."""

import csv
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from llmembed.classify.cli import predict_main, push_main
from llmembed.classify.hub import MODEL_FILES, repo_ref
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


def test_the_model_card_states_the_run_and_its_scores(trained):
    folder = trained[0]
    metrics = json.loads((folder.parent / "metrics.json").read_text())
    card = (folder / "README.md").read_text()
    _, header, body = card.split("---\n", 2)
    meta = yaml.safe_load(header)  # the hub reads this header
    assert meta["library_name"] == "llmembed" and meta["pipeline_tag"] == "text-classification"
    scores = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert scores["accuracy"] == round(metrics["test"]["accuracy"]["mean"], 4)
    assert scores["f1"] == round(metrics["test"]["macro_f1"]["mean"], 4)
    lo, hi = metrics["test"]["accuracy"]["ci"]
    assert f"95% CI {lo:.4f}-{hi:.4f}" in body
    # which model (path or hub id), what pins its weights, its width
    weights = trained[1]
    assert f"| tiny-llama | `{weights}` | files " in body and "| 32 | llm | [1, 3] | mean |" in body
    assert stat.S_IMODE((folder / "README.md").stat().st_mode) == 0o644


# --- models on the Hugging Face hub --------------------------------------------------------------

BIN = Path(sys.executable).parent


def cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / args[0]), *map(str, args[1:])],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})},
        cwd=cwd,
    )


def into_hub_cache(hub: Path, repo_id: str, folder: Path, commit: str = "a" * 40) -> str:
    """What `snapshot_download` leaves in a hub cache after downloading `folder` from `repo_id`."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in MODEL_FILES:
        shutil.copy(folder / name, snapshot / name)
    return commit


def test_predict_takes_a_hub_repo_id_from_the_local_hub_cache(trained, tmp_path):
    folder, _, texts, test = trained
    hub = tmp_path / "hub"
    commit = into_hub_cache(hub, "alice/sentiment", folder)
    (tmp_path / "new.txt").write_text("\n".join(texts) + "\n")
    env = {"HF_HUB_CACHE": str(hub)}
    for ref in ("alice/sentiment", f"alice/sentiment@{commit}"):
        done = cli("llmembed-predict", ref, tmp_path / "new.txt", "--device", "cpu", env=env)
        assert done.returncode == 0, done.stderr
        rows = list(csv.DictReader(done.stdout.splitlines()))
        assert [r["predicted"] for r in rows] == [r["predicted"] for r in test]
    missing = cli("llmembed-predict", "alice/other", tmp_path / "new.txt", env=env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "HF_HUB_OFFLINE=1 is set and it is not in the local hub cache" in missing.stderr


def test_a_folder_here_wins_over_a_repo_id_of_the_same_name(trained, tmp_path):
    folder, _, texts, _ = trained
    (tmp_path / "alice").mkdir()
    shutil.copytree(folder, tmp_path / "alice" / "sentiment")
    (tmp_path / "new.txt").write_text(texts[0] + "\n")
    done = cli("llmembed-predict", "alice/sentiment", "new.txt", "--device", "cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert repo_ref("alice/sentiment") == ("alice/sentiment", None)  # not a folder from here
    assert repo_ref("alice/sentiment@v1") == ("alice/sentiment", "v1")
    for path in ("./alice/x", "alice/x/y", "/abs/x", "../x/y", "run--1/model", "a/b."):
        assert repo_ref(path) is None, path  # a missing folder, not a hub repo the hub would refuse
    typo = cli("llmembed-predict", "run--1/model", "new.txt", cwd=tmp_path)
    assert (
        typo.returncode == 2 and "is not a folder" in typo.stderr and "Traceback" not in typo.stderr
    )


def test_push_uploads_the_model_files_and_predict_runs_them_from_the_hub(
    trained, tmp_path, monkeypatch
):
    """The hub is unreachable here, so HfApi is replaced by one that stores each upload the way a
    later download lays it out in the hub cache; predicting from the repo id then runs the upload."""
    import huggingface_hub
    from huggingface_hub import constants

    folder, _, texts, test = trained
    (folder / "notes.txt").write_text("not part of the model")
    hub, calls = tmp_path / "hub", []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def repo_info(self, repo_id):
            return SimpleNamespace(private=repo_id != "alice/public")

        def create_branch(self, repo_id, **kw):
            calls.append(("create_branch", repo_id, kw))

        def upload_folder(self, *, repo_id, folder_path, allow_patterns, **kw):
            calls.append(("upload_folder", repo_id, kw))
            assert allow_patterns == MODEL_FILES
            into_hub_cache(hub, repo_id, Path(folder_path))
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/x")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert push_main([str(folder), "alice/sentiment", "--private", "--revision", "v1"]) == 0
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][2]["private"] is True and calls[2][2]["revision"] == "v1"
    snapshot = next((hub / "models--alice--sentiment" / "snapshots").iterdir())
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(MODEL_FILES)
    (tmp_path / "new.txt").write_text("\n".join(texts) + "\n")
    done = cli(
        "llmembed-predict",
        "alice/sentiment",
        tmp_path / "new.txt",
        "--device",
        "cpu",
        env={"HF_HUB_CACHE": str(hub)},
    )
    assert done.returncode == 0, done.stderr
    assert [r["predicted"] for r in csv.DictReader(done.stdout.splitlines())] == [
        r["predicted"] for r in test
    ]
    assert "model alice/sentiment from the Hugging Face hub" in done.stderr
    calls.clear()
    with pytest.raises(SystemExit):  # an existing public repo is not made private by --private
        push_main([str(folder), "alice/public", "--private"])
    assert [c[0] for c in calls] == ["create_repo"]


def test_push_refuses_before_sending_anything(trained, tmp_path):
    folder = trained[0]
    offline = cli("llmembed-push", folder, "alice/sentiment")
    assert offline.returncode == 2 and "HF_HUB_OFFLINE=1 is set" in offline.stderr
    not_a_model = cli("llmembed-push", tmp_path, "alice/sentiment")
    assert not_a_model.returncode == 2 and "not a saved llmembed model" in not_a_model.stderr
    for bad in ("sentiment", "alice/senti--ment", "alice/-x", "a/" + "b" * 97):
        bad_id = cli("llmembed-push", folder, bad)
        assert bad_id.returncode == 2 and "is not a hub repo id" in bad_id.stderr, bad
    # A hub that cannot be reached: one message, no traceback.
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_x"}
    down = cli("llmembed-push", folder, "alice/sentiment", env=env)
    assert down.returncode == 2 and "Traceback" not in down.stderr, down.stderr
    assert "pushing" in down.stderr and "failed" in down.stderr
