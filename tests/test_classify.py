"""The training stage on tiny models: features from the cache, sweeps without forward passes,
missing entries, metrics files, saved models, prediction and reports."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from llmembed.classify.cli import predict_main, report_main
from llmembed.classify.predict import predict_texts
from llmembed.classify.train import train
from llmembed.extract.pipeline import MissingEntryError
from llmembed.fuse.features import FeatureError
from tests.conftest import read_rows, sentences, write_csv


def test_train_writes_metrics_predictions_and_a_model(classify_cfg, tmp_path):
    cfg = classify_cfg([("llama", [2], "mean"), ("bert", [2], "first")], "seeds=[0,1]", "head=mlp")
    m = train(cfg, tmp_path / "run")
    assert m["features"] == ["tiny-llama:mean:L2", "tiny-bert:first:L2"] and m["n_features"] == 64
    assert m["rows"] == {"train": 42, "validation": 6, "test": 12}
    assert [r["seed"] for r in m["runs"]] == [0, 1]
    for key in ("accuracy", "macro_f1", "micro_f1"):
        assert 0 <= m["test"][key]["mean"] <= 1 and m["test"][key]["std"] >= 0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["config"]["head"]["name"] == "mlp" and saved["seeds"] == [0, 1]
    assert len(saved["runs"][0]["test"]["confusion_matrix"]) == 2
    rows = read_rows(tmp_path / "run" / "predictions.csv")
    assert len(rows) == 60 and {r["split"] for r in rows} == {"train", "validation", "test"}
    assert (tmp_path / "run" / "model" / "head.safetensors").is_file()


def test_learnable_text_labels_are_learned_and_shuffled_ones_are_not(classify_cfg, tmp_path):
    # The label follows the word "great" / "awful": even a random model's embeddings carry it.
    rows = sentences(400)
    learnable = write_csv(tmp_path / "learnable.csv", rows)
    rng = np.random.default_rng(0)
    control = write_csv(
        tmp_path / "control.csv", [(t, rng.choice(["neg", "pos"])) for t, _ in rows]
    )
    accuracy = {}
    for name, path in (("learnable", learnable), ("control", control)):
        cfg = classify_cfg([("llama", [0], "mean")], f"dataset.path={path}", "save_model=false")
        accuracy[name] = train(cfg, tmp_path / name)["test"]["accuracy"]["mean"]
    assert accuracy["learnable"] >= 0.75 and accuracy["control"] <= 0.62, accuracy


def test_a_sweep_over_every_layer_runs_the_model_once(classify_cfg, tmp_path, forward_calls):
    train(classify_cfg([("llama", [0], "mean")]), tmp_path / "first")
    extraction_batches = len(forward_calls)
    assert extraction_batches > 0
    for layer in range(4):
        for pooling in ("mean", "last"):  # "first" of a decoder with BOS is not stored
            train(classify_cfg([("llama", [layer], pooling)]), tmp_path / f"L{layer}-{pooling}")
    assert len(forward_calls) == extraction_batches  # eight more runs, not one more forward pass


def test_any_scikit_learn_estimator_is_a_head_config(classify_cfg, tmp_path, forward_calls):
    cfg = classify_cfg([("llama", [1], "mean")])
    knn = {"_target_": "sklearn.neighbors.KNeighborsClassifier", "n_neighbors": 3}
    cfg.head = {"name": "knn", "params": knn}  # what a conf/head/knn.yaml of a user's holds
    m = train(cfg, tmp_path / "run")
    assert m["head"] == "knn" and 0 <= m["test"]["accuracy"]["mean"] <= 1
    assert len(read_rows(tmp_path / "run" / "predictions.csv")) == 60
    assert not (tmp_path / "run" / "model").exists()  # nothing to save without pickling


def test_missing_entry_without_extraction_names_the_command(classify_cfg, tmp_path, forward_calls):
    cfg = classify_cfg([("llama", [1], "mean")], "extract_missing=false", "dataset.limit=40")
    with pytest.raises(MissingEntryError, match=r"make it with: llmembed-extract ") as err:
        train(cfg, tmp_path / "run")
    assert forward_calls == []
    command = str(err.value).split("make it with: ")[1]
    assert "dataset.limit=40" in command and "backbone.path=" in command
    # The command, run as written, fills exactly the entry the training run needs.
    root = Path(cfg.cache.root)
    env = {**os.environ, "LLMEMBED_CACHE": str(root)}
    subprocess.run(
        command.replace(
            "llmembed-extract", str(Path(sys.executable).parent / "llmembed-extract"), 1
        ),
        shell=True,
        check=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
    )
    assert train(cfg, tmp_path / "run")["extraction"][0]["hit"]


def test_bad_feature_specs_fail_clearly(classify_cfg, tmp_path):
    with pytest.raises(FeatureError, match="co-occurrence fusion is learned by the paper's head"):
        train(
            classify_cfg([("llama", [1], "mean")], "features.fusion=cooccurrence"), tmp_path / "a"
        )
    cfg = classify_cfg([("llama", [1], "mean")])
    cfg.features.sources[0].backbone = "no-such-backbone"
    with pytest.raises(FeatureError, match="no backbone config 'no-such-backbone'"):
        train(cfg, tmp_path / "b")


def test_paper_head_trains_on_fused_sources(classify_cfg, tmp_path):
    cfg = classify_cfg(
        [("llama", [1, 2, 3], "mean"), ("bert", [2], "pooler")],
        "head=llmembed",
        "head.params.width=16",
        "head.params.hidden=[16]",
        "head.params.max_epochs=20",
    )
    m = train(cfg, tmp_path / "run")
    assert m["fusion"] == "cooccurrence" and m["n_features"] == 4 * 32
    meta = json.loads((tmp_path / "run" / "model" / "model.json").read_text())
    assert meta["params"]["block_sizes"] == [32, 32, 32, 32]
    assert meta["params"]["block_roles"] == ["llm", "llm", "llm", "encoder"]


def test_paper_head_takes_roles_from_the_sources_not_their_order(classify_cfg, tmp_path):
    small = ["head=llmembed", "head.params.width=16", "head.params.hidden=[16]"]
    cfg = classify_cfg(
        [("bert", [2], "pooler"), ("llama", [1, 2], "mean")],
        *small,
        "head.params.max_epochs=3",
    )
    train(cfg, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "model" / "model.json").read_text())
    assert meta["params"]["block_roles"] == ["encoder", "llm", "llm"]
    assert [s["role"] for s in meta["sources"]] == ["encoder", "llm"]
    # A source without a declared role cannot silently become "the LLM" by its position.
    cfg.features.sources[1].role = None
    with pytest.raises(FeatureError, match=r"features.sources\[1\] declare none.*role: llm"):
        train(cfg, tmp_path / "undeclared")
    cfg.features.sources[1].role = "encoder"
    with pytest.raises(FeatureError, match="at least one source with `role: llm`"):
        train(cfg, tmp_path / "no-llm")


@pytest.mark.parametrize("head", ["logreg", "llmembed"])
def test_predict_on_test_texts_equals_training_predictions(
    classify_cfg, tmp_path, data_csv, head, capsys
):
    extra = (
        ["head.params.width=16", "head.params.hidden=[16]", "head.params.max_epochs=20"]
        if head == "llmembed"
        else []
    )
    cfg = classify_cfg([("llama", [1, 3], "mean"), ("bert", [2], "first")], f"head={head}", *extra)
    train(cfg, tmp_path / "run")
    rows = read_rows(tmp_path / "run" / "predictions.csv")
    texts = [r["text"] for r in read_rows(data_csv)]
    test = [r for r in rows if r["split"] == "test"]
    labels, proba, names = predict_texts(
        tmp_path / "run" / "model", [texts[int(r["row_id"])] for r in test]
    )
    assert labels == [r["predicted"] for r in test]
    np.testing.assert_allclose(
        proba, [[float(r[f"p_{n}"]) for n in names] for r in test], atol=1e-5
    )

    # The command-line tool on a plain text file.
    txt = tmp_path / "new.txt"
    txt.write_text("\n".join(texts[int(r["row_id"])] for r in test[:3]) + "\n")
    assert predict_main([str(tmp_path / "run" / "model"), str(txt)]) == 0
    out = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert out[0][:3] == ["predicted", "p_neg", "p_pos"] and [o[0] for o in out[1:]] == labels[:3]


def test_report_table_and_plot(classify_cfg, tmp_path, capsys):
    for layer in range(4):
        train(
            classify_cfg([("llama", [layer], "mean")], "save_model=false"),
            tmp_path / "sweep" / str(layer),
        )
    train(
        classify_cfg([("llama", [1, 2, 3], "mean")], "save_model=false"),
        tmp_path / "sweep" / "fused",
    )
    assert report_main([str(tmp_path / "sweep")]) == 0
    table = (tmp_path / "sweep" / "results.md").read_text().splitlines()
    assert len(table) == 2 + 5
    val = [float(line.split("|")[4]) for line in table[2:]]
    assert val == sorted(val, reverse=True)  # best validation accuracy first
    rows = read_rows(tmp_path / "sweep" / "results.csv")
    assert len(rows) == 5 and {"test_accuracy", "test_macro_f1", "val_accuracy"} <= set(rows[0])
    png = tmp_path / "sweep" / "accuracy_vs_layer_data_logreg.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_hydra_multirun_sweeps_layers(tmp_path, tiny_llama, data_csv):
    conf = tmp_path / "conf" / "features"
    conf.mkdir(parents=True)
    (conf / "tiny_layer.yaml").write_text(
        OmegaConf.to_yaml(
            {
                "fusion": "auto",
                "sources": [
                    {
                        "backbone": {"name": "tiny", "path": str(tiny_llama)},
                        "layers": ["${layer}"],
                        "pooling": "mean",
                    }
                ],
            }
        )
    )
    env = {**os.environ, "LLMEMBED_CACHE": str(tmp_path / "cache")}
    res = subprocess.run(
        [
            str(Path(sys.executable).parent / "llmembed-classify"),
            "-m",
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            "dataset=file",
            f"dataset.path={data_csv}",
            "features=tiny_layer",
            "layer=range(0,4)",
            "extract.progress=false",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("seed(s), ") == 4  # one summary line per job
    assert len(list((tmp_path / "sweep").rglob("metrics.json"))) == 4


@pytest.mark.parametrize("experiment", ["paper", "demo"])
def test_experiment_configs_compose_to_the_papers_setup(experiment):
    from llmembed.fuse.features import parse_sources, resolve_fusion

    with initialize_config_module("llmembed.conf", version_base=None):
        cfg = compose("classify", overrides=[f"experiment={experiment}"])
    sources = parse_sources(cfg.features)
    assert (
        cfg.head.name == "llmembed"
        and resolve_fusion(cfg.features.fusion, cfg.head.name) == "cooccurrence"
    )
    assert (
        cfg.head.params.width == 1024
        and cfg.head.params.lr == 1e-4
        and cfg.head.params.batch_size == 1024
    )
    if experiment == "paper":
        assert [s.role for s in sources] == ["llm", "encoder", "encoder"]
        assert cfg.extract.max_length == 512  # mr: not one of the paper's per-set lengths
        lengths = {}
        for name in ("sst2", "agnews", "r8", "r52"):
            with initialize_config_module("llmembed.conf", version_base=None):
                paper = compose("classify", overrides=["experiment=paper", f"dataset={name}"])
            lengths[name] = paper.extract.max_length
        assert lengths == {"sst2": 128, "agnews": 256, "r8": 1024, "r52": 1024}
        assert [(s.backbone.path, s.layers, s.pooling) for s in sources] == [
            ("meta-llama/Llama-2-7b-chat-hf", (28, 29, 30, 31, 32), "mean"),
            ("google-bert/bert-large-uncased", (24,), "pooler"),
            ("FacebookAI/roberta-large", (24,), "first"),
        ]
    else:
        assert [s.backbone.name for s in sources] == ["smollm2"] * 1 + [
            "minilm"
        ] and cfg.dataset.limit == 4000


def test_report_costs_per_thousand_texts_and_unknowns():
    from llmembed.classify.report import costs

    entry = {"rows_computed": 500, "wall_s": 10.0, "energy_j": None}
    m = {
        "rows": {"train": 700, "validation": 100, "test": 200},
        "extraction": [{"entry_cost": entry}, {"entry_cost": {**entry, "wall_s": 2.0}}],
        "resources": {"wall_s": 3.0, "energy_j": 40.0},
    }
    assert costs(m) == {
        "extract_s_per_1k": 24.0,
        "extract_j_per_1k": None,
        "train_s_per_1k": 3.0,
        "train_j_per_1k": 40.0,
    }
    old = {"rows": m["rows"], "extraction": [{"entry": "x"}]}  # metrics.json of an older llmembed
    assert costs(old) == dict.fromkeys(costs(m), None)


def test_seeds_draw_repeated_splits_without_a_forward_pass(classify_cfg, tmp_path, forward_calls):
    train(classify_cfg([("llama", [1], "mean")], "save_model=false"), tmp_path / "first")
    extraction_batches = len(forward_calls)
    cfg = classify_cfg(
        [("llama", [1], "mean")], "seeds=[0,1,2]", "resplit=true", "save_model=false"
    )
    m = train(cfg, tmp_path / "resplit")
    assert len(forward_calls) == extraction_batches  # every split is served by the same entry
    assert m["resplit"] is True and [r["seed"] for r in m["runs"]] == [0, 1, 2]
    for r in m["runs"]:  # the same split sizes, stratified
        assert r["rows"] == {"train": 42, "validation": 6, "test": 12}
    # Different test sets: the test scores vary across splits, and the interval says so.
    acc = m["test"]["accuracy"]
    assert acc["n"] == 3 and acc["ci"][0] <= acc["mean"] <= acc["ci"][1]
    same = train(
        classify_cfg([("llama", [1], "mean")], "seeds=[0,1,2]", "save_model=false"),
        tmp_path / "fixed",
    )
    assert same["resplit"] is False and same["runs"][0]["rows"] == m["runs"][0]["rows"]
    # One test split: seeds do not move logistic regression, yet the interval is the test set's.
    fixed = same["test"]["accuracy"]
    assert fixed["std"] == 0 and fixed["ci"] == same["runs"][0]["test"]["accuracy_ci"]
    assert fixed["ci"][1] - fixed["ci"][0] > 0.2  # 12 test rows cannot pin accuracy down


def test_metrics_name_the_data_and_the_resolved_layers(classify_cfg, tmp_path):
    m = train(
        classify_cfg([("llama", [-1, 0], "mean")], "dataset.limit=50", "save_model=false"),
        tmp_path / "run",
    )
    assert m["sources"][0]["layers"] == [3, 0] and m["sources"][0]["requested_layers"] == [-1, 0]
    data = m["data"]
    assert data["name"] == "data" and data["limit"] == 50 and data["rows"] == 50
    assert data["path"].endswith("data.csv") and len(data["fingerprint"]) == 12
    whole = train(classify_cfg([("llama", [0], "mean")], "save_model=false"), tmp_path / "all")
    assert whole["data"]["fingerprint"] != data["fingerprint"]
    lo, hi = m["test"]["accuracy"]["ci"]
    assert 0 <= lo <= m["test"]["accuracy"]["mean"] <= hi <= 1
