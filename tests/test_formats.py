"""The data formats researchers hold: parquet, folders written by `datasets`' save_to_disk, pandas
DataFrames and plain lists (the Python API), local files through the `hub` source's data_files, and
llmembed-predict on tables with ids and labels. Every file is written by the test; nothing is
downloaded."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import datasets as hf
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_module

from llmembed.classify.cli import predict_main
from llmembed.classify.metrics import evaluate
from llmembed.classify.train import train
from llmembed.data.datasets import (
    DatasetError,
    dataset_from_frame,
    dataset_from_records,
    load_dataset,
)
from tests.conftest import read_rows, sentences, write_csv
from tests.test_datasets import cfg


def frame(n: int = 40, **extra) -> pd.DataFrame:
    rows = sentences(n)
    return pd.DataFrame({"text": [t for t, _ in rows], "label": [y for _, y in rows], **extra})


def saved(tmp_path: Path, parts: dict[str, pd.DataFrame] | pd.DataFrame, names=None) -> str:
    """A save_to_disk folder: a DatasetDict from a dict of frames, else a single Dataset; with
    `names`, the label column becomes a ClassLabel."""

    def dataset(df: pd.DataFrame) -> hf.Dataset:
        ds = hf.Dataset.from_pandas(df, preserve_index=False)
        return ds.cast_column("label", hf.ClassLabel(names=names)) if names else ds

    folder = tmp_path / "saved"
    if isinstance(parts, dict):
        hf.DatasetDict({k: dataset(v) for k, v in parts.items()}).save_to_disk(str(folder))
    else:
        dataset(parts).save_to_disk(str(folder))
    return str(folder)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' cache of builder outputs inside the test's folder."""
    monkeypatch.setattr(hf.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


# --- one data set, every format ------------------------------------------------------------------
def test_every_format_gives_the_same_data_set(tmp_path):
    df = frame(40, id=list(range(100, 140)))
    write_csv(tmp_path / "d.csv", list(df.itertuples(index=False)), header=tuple(df.columns))
    df.to_parquet(tmp_path / "d.parquet")
    reference = load_dataset(cfg(path=str(tmp_path / "d.csv"), id_column="id"))
    assert reference.row_ids[0] == 100
    for path in (str(tmp_path / "d.parquet"), saved(tmp_path, df)):
        assert load_dataset(cfg(path=path, id_column="id")).fingerprint() == reference.fingerprint()
    api = dataset_from_frame(df, text_column="text", label_column="label", id_column="id")
    assert api.fingerprint() == reference.fingerprint()
    lists = dataset_from_records(list(df.text), list(df.label), ids=np.arange(100, 140))
    assert lists.fingerprint() == reference.fingerprint()


def test_parquet_goes_through_the_same_checks(tmp_path):
    df = frame(20)
    df.loc[5, "text"] = "  \u200b "
    df.to_parquet(tmp_path / "blank.parquet")
    with pytest.raises(
        DatasetError, match=r"1 rows have an empty, blank or missing text \(row 5\)"
    ):
        load_dataset(cfg(path=str(tmp_path / "blank.parquet")))
    df = frame(20)
    df.loc[[3, 7], "label"] = [None, float("nan")]
    df.to_parquet(tmp_path / "nolabel.parquet")
    with pytest.raises(DatasetError, match=r"2 rows have no label .*row 3, row 7"):
        load_dataset(cfg(path=str(tmp_path / "nolabel.parquet")))
    frame(20).to_parquet(tmp_path / "ok.parquet")
    with pytest.raises(DatasetError, match=r"has no column 'review'; its columns are \['text'"):
        load_dataset(cfg(path=str(tmp_path / "ok.parquet"), text_column="review"))


def test_parquet_labels_dedup_and_duplicated_columns(tmp_path):
    texts = [f"t {i}" for i in range(20)] + ["t  0"]  # the last is a copy of the first
    table = pa.table({"text": texts, "label": pa.array([1.0, 2.0] * 10 + [1.0])})
    pq.write_table(table, tmp_path / "n.parquet")
    ds = load_dataset(cfg(path=str(tmp_path / "n.parquet")))
    assert ds.label_names == ["1", "2"] and ds.duplicates_dropped == 1
    dup = pa.Table.from_arrays(
        [pa.array(["a", "b"]), pa.array(["x", "y"]), pa.array(["y", "x"])],
        names=["text", "label", "label"],
    )
    pq.write_table(dup, tmp_path / "dup.parquet")
    with pytest.raises(DatasetError, match=r"names the column\(s\) \['label'\] more than once"):
        load_dataset(cfg(path=str(tmp_path / "dup.parquet")))


def test_parquet_without_pyarrow_or_damaged_names_the_fix(tmp_path, monkeypatch):
    frame(10).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(DatasetError, match=r"bad.parquet could not be read as parquet"):
        load_dataset(cfg(path=str(tmp_path / "bad.parquet")))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if the extra were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DatasetError, match=r"needs pyarrow: pip install 'llmembed\[formats\]'"):
        load_dataset(cfg(path=str(tmp_path / "d.parquet")))


def test_parquet_written_by_datasets_keeps_its_class_names(tmp_path):
    df = frame(30)
    df["label"] = (df.label == "pos").astype(int)
    ds = hf.Dataset.from_pandas(df, preserve_index=False)
    ds = ds.cast_column("label", hf.ClassLabel(names=["negative", "positive"]))
    ds.to_parquet(str(tmp_path / "c.parquet"))
    got = load_dataset(cfg(path=str(tmp_path / "c.parquet")))
    assert got.label_names == ["negative", "positive"]
    assert got.labels.tolist() == df.label.tolist()


# --- save_to_disk folders ------------------------------------------------------------------------
def test_a_dataset_dict_folder_maps_its_splits_and_class_names(tmp_path):
    df = frame(40)
    df["label"] = (df.label == "pos").astype(int)
    parts = {"train": df[:24], "dev": df[24:30], "test": df[30:]}
    ds = load_dataset(cfg(path=saved(tmp_path, parts, names=["neg", "pos"])))
    # ClassLabel order, not sorted names; every split as the folder gives it, none drawn
    assert ds.label_names == ["neg", "pos"] and ds.labels.tolist() == df.label.tolist()
    assert ds.split_counts() == {"train": 24, "validation": 6, "test": 10}
    assert ds.split_plan.drawn == ()


def composed(path: object):
    """The `dataset` config as the command line composes it from conf/dataset/file.yaml."""
    with initialize_config_module("llmembed.conf", version_base=None):
        return compose("extract", overrides=["dataset=file", f"dataset.path={path}"]).dataset


def test_the_file_config_takes_a_folder_and_a_parquet_file(tmp_path):
    df = frame(30)
    df.to_parquet(tmp_path / "d.parquet")
    assert load_dataset(composed(tmp_path / "d.parquet")).texts == list(df.text)
    folder = saved(tmp_path, {"train": df[:20], "validation": df[20:25], "test": df[25:]})
    counts = load_dataset(composed(folder)).split_counts()
    assert counts == {"train": 20, "validation": 5, "test": 5}


def test_a_single_dataset_folder_is_unsplit_and_may_have_a_split_column(tmp_path):
    df = frame(40, part=["test"] * 8 + ["train"] * 32)
    ds = load_dataset(cfg(path=saved(tmp_path, df)))
    assert ds.split_counts() == {"train": 28, "validation": 4, "test": 8}  # drawn, seeded
    ds = load_dataset(cfg(path=saved(tmp_path, df), split_column="part"))
    assert (ds.split[:8] == 2).all() and ds.split_counts()["test"] == 8


@pytest.mark.parametrize(
    ("parts", "kw", "message"),
    [
        (
            {"train": slice(0, 30), "unsupervised": slice(30, 40)},
            {},
            r"split 'unsupervised': unknown split 'unsupervised'; keep only train, validation",
        ),
        (
            {"train": slice(0, 30), "test": slice(30, 40)},
            {"split_column": "label"},
            r"is split already \(its splits: \['test', 'train'\]\).*unset dataset.split_column",
        ),
        (
            {"train": slice(0, 30), "test": slice(30, 40)},
            {"text_column": "sentence"},
            r"split 'train' has no column 'sentence'; its columns are \['text', 'label'\]",
        ),
    ],
)
def test_folder_errors_name_the_fix(tmp_path, parts, kw, message):
    df = frame(40)
    folder = saved(tmp_path, {k: df[v] for k, v in parts.items()})
    with pytest.raises(DatasetError, match=message):
        load_dataset(cfg(path=folder, **kw))


def test_a_hidden_class_label_in_a_folder_is_refused(tmp_path):
    df = frame(40)
    df["label"] = (df.label == "pos").astype(int)
    df.loc[35:, "label"] = -1  # the hub's mark for a hidden test label
    folder = saved(tmp_path, {"train": df[:30], "test": df[30:]}, names=["neg", "pos"])
    with pytest.raises(
        DatasetError,
        match=r"split 'test' has label -1 outside its classes \['neg', 'pos'\] in column 'label' "
        r"\(5 rows: test row 5 \(-1\), test row 6",
    ):
        load_dataset(cfg(path=folder))


def test_a_folder_without_datasets_installed_names_the_extra(tmp_path, monkeypatch):
    folder = saved(tmp_path, frame(20))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DatasetError, match=r"save_to_disk, needs the `hub` extra: pip install"):
        load_dataset(cfg(path=folder))


# --- DataFrames and lists (the Python API) -------------------------------------------------------
def test_a_dataframe_with_splits_and_its_index_in_messages(tmp_path):
    df = frame(40, part=["test"] * 10 + ["train"] * 30)
    ds = dataset_from_frame(df, text_column="text", label_column="label", split_column="part")
    assert ds.name == "frame" and ds.split_counts() == {"train": 26, "validation": 4, "test": 10}
    df.index = [f"doc{i}" for i in range(40)]
    df["label"] = df.label.astype("string")  # pandas' nullable strings: missing is pd.NA
    df.loc["doc7", "label"] = pd.NA
    with pytest.raises(DatasetError, match=r"DataFrame 'frame': 1 rows have no label .*row doc7"):
        dataset_from_frame(df, text_column="text", label_column="label")


@pytest.mark.parametrize(
    ("make", "kw", "message"),
    [
        (lambda df: df, {"text_column": "review"}, r"no column 'review'.*Set text_column"),
        (
            lambda df: pd.concat([df, df[["label"]]], axis=1),
            {},
            r"the DataFrame: the header names the column\(s\) \['label'\] more than once",
        ),
        (lambda df: df.to_dict("list"), {}, r"expected a pandas DataFrame, got dict"),
        (lambda df: df, {"limit": 0}, r"dataset.limit=0: must be a positive integer"),
    ],
)
def test_dataframe_errors(make, kw, message):
    args = {"text_column": "text", "label_column": "label", **kw}
    with pytest.raises(DatasetError, match=message):
        dataset_from_frame(make(frame(20)), **args)


def test_plain_lists_of_texts_and_labels():
    rows = sentences(30)
    texts, labels = [t for t, _ in rows], [y for _, y in rows]
    ds = dataset_from_records(texts, labels, split=["train"] * 20 + ["val"] * 4 + ["test"] * 6)
    assert ds.texts == texts and ds.split_counts() == {"train": 20, "validation": 4, "test": 6}
    with pytest.raises(DatasetError, match=r"lists differ in length \(\{'texts': 30, 'labels': 29"):
        dataset_from_records(texts, labels[:-1])
    with pytest.raises(DatasetError, match=r"records: 1 rows have an empty.*\(row 2\)"):
        dataset_from_records([*texts[:2], " ", *texts[3:]], labels)


# --- the hub source on local data files ----------------------------------------------------------
def test_hub_source_reads_local_data_files(tmp_path):
    df = frame(40)
    write_csv(tmp_path / "a.csv", list(df[:30].itertuples(index=False)))
    write_csv(tmp_path / "b.csv", list(df[30:].itertuples(index=False)))
    files = {"train": str(tmp_path / "a.csv"), "test": str(tmp_path / "b.csv")}
    ds = load_dataset(cfg(name="local", source="hub", hub_id="csv", data_files=files))
    assert ds.texts == list(df.text) and (ds.split[30:] == 2).all()
    assert ds.split_counts() == {"train": 26, "validation": 4, "test": 10}
    # explicit hub_splits, and the json and parquet builders
    df[:30].to_json(tmp_path / "a.jsonl", orient="records", lines=True)
    df[30:].to_parquet(tmp_path / "b.parquet")
    for builder, path in (("json", "a.jsonl"), ("parquet", "b.parquet")):
        one = {"data": str(tmp_path / path)}
        got = load_dataset(
            cfg(
                name="local",
                source="hub",
                hub_id=builder,
                data_files=one,
                hub_splits={"train": "data"},
            )
        )
        assert sorted(got.texts) == sorted(df.text[:30] if builder == "json" else df.text[30:])


def test_hub_source_errors_name_the_fix(tmp_path):
    with pytest.raises(DatasetError, match=r"could not load 'csv'.*HF_HUB_OFFLINE=1"):
        load_dataset(
            cfg(name="x", source="hub", hub_id="csv", data_files={"train": "/nowhere/a.csv"})
        )
    write_csv(tmp_path / "a.csv", sentences(20))
    files = {"train": str(tmp_path / "a.csv")}
    with pytest.raises(DatasetError, match=r"has no split 'test'; its splits are \['train'\]"):
        load_dataset(
            cfg(name="x", source="hub", hub_id="csv", data_files=files, hub_splits={"test": "test"})
        )
    with pytest.raises(DatasetError, match=r"unknown split 'extra'.*dataset.hub_splits"):
        load_dataset(
            cfg(name="x", source="hub", hub_id="csv", data_files={"extra": str(tmp_path / "a.csv")})
        )


# --- llmembed-predict on tables ------------------------------------------------------------------
@pytest.fixture
def model(classify_cfg, tmp_path):
    train(classify_cfg([("llama", [1, 3], "mean")]), tmp_path / "run")
    return tmp_path / "run" / "model"


def new_rows(n: int = 12) -> pd.DataFrame:
    df = frame(n)
    return df.assign(id=[f"doc-{i}" for i in range(n)])


def test_predict_reads_tables_keeps_ids_and_scores_labels(model, tmp_path, capsys):
    df = new_rows()
    df.to_csv(tmp_path / "new.csv", index=False)
    df.to_parquet(tmp_path / "new.parquet")
    df.to_json(tmp_path / "new.jsonl", orient="records", lines=True)
    df.to_json(tmp_path / "new.json", orient="records")
    outputs = {}
    for name in ("new.csv", "new.parquet", "new.jsonl", "new.json"):
        out = tmp_path / f"{name}.out.csv"
        assert predict_main([str(model), str(tmp_path / name), "--output", str(out)]) == 0
        outputs[name] = read_rows(out)
        err = capsys.readouterr().err
    rows = outputs["new.csv"]
    # The columns of llmembed-classify's predictions.csv (without its split column).
    trained = read_rows(model.parent / "predictions.csv")
    assert list(rows[0]) == [c for c in trained[0] if c != "split"]
    assert list(rows[0]) == ["row_id", "label", "predicted", "p_neg", "p_pos", "text"]
    assert [r["row_id"] for r in rows] == list(df.id) and [r["text"] for r in rows] == list(df.text)
    assert all(o == rows for o in outputs.values())  # one reading, whatever the format
    names = ["neg", "pos"]
    m = evaluate(
        [names.index(r["label"]) for r in rows], [names.index(r["predicted"]) for r in rows], names
    )
    lo, hi = m["accuracy_ci"]
    assert (
        f"accuracy {m['accuracy']:.4f} (95% CI {lo:.4f}-{hi:.4f}), macro-F1 {m['macro_f1']:.4f}"
        in err
    )
    assert "on 12 texts labelled in column 'label'" in err


def test_predict_names_labels_the_model_does_not_know(model, tmp_path, capsys):
    df = new_rows(10)
    df.loc[[2, 5], "label"] = "neutral"
    df.to_csv(tmp_path / "new.csv", index=False)
    assert predict_main([str(model), str(tmp_path / "new.csv")]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(captured.out.splitlines()))
    assert (
        "warning: 2 of 10 texts have labels the model was not trained on (['neutral']: "
        "line 4, line 7); its classes are ['neg', 'pos']. They count as errors below"
    ) in captured.err
    right = sum(r["label"] == r["predicted"] for r in rows)
    assert f"accuracy {right / 10:.4f}" in captured.err  # the two unknown rows count as wrong
    df["label"] = df.label.map({"neg": 0, "pos": 1, "neutral": 2})  # the wrong coding of labels
    df.to_csv(tmp_path / "coded.csv", index=False)
    assert predict_main([str(model), str(tmp_path / "coded.csv")]) == 0
    assert "no label in column 'label' is one of the model's classes" in capsys.readouterr().err


def test_predict_column_options(model, tmp_path, capsys):
    df = new_rows(6).rename(columns={"text": "review", "id": "key", "label": "gold"})
    df.to_csv(tmp_path / "r.csv", index=False)
    args = [str(model), str(tmp_path / "r.csv"), "--text-column", "review"]
    assert predict_main([*args, "--id-column", "key", "--label-column", "gold"]) == 0
    captured = capsys.readouterr()
    assert next(csv.reader(captured.out.splitlines()))[:3] == ["row_id", "label", "predicted"]
    assert "labelled in column 'gold'" in captured.err
    # defaults: no `id` or `label` column here, so neither ids nor scores
    assert predict_main(args) == 0
    captured = capsys.readouterr()
    assert next(csv.reader(captured.out.splitlines()))[:3] == ["predicted", "p_neg", "p_pos"]
    assert "accuracy" not in captured.err
    for argv, message in (
        ([*args, "--label-column", "stars"], "has no column 'stars'; its columns: "),
        (
            args[:2],
            "has no column 'text', the text column the model was trained on; its columns: "
            "['review', 'gold', 'key']. Use --text-column",
        ),
    ):
        with pytest.raises(SystemExit) as stop:
            predict_main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    df.loc[3, "gold"] = ""
    df.to_csv(tmp_path / "r.csv", index=False)
    with pytest.raises(SystemExit):
        predict_main([*args, "--label-column", "gold"])
    err = capsys.readouterr().err
    assert "1 rows have no label" in err and "--label-column '' to predict without" in err
    assert predict_main([*args, "--label-column", ""]) == 0  # '' turns scoring off
    (tmp_path / "t.txt").write_text("good film\n")
    with pytest.raises(SystemExit):
        predict_main([str(model), str(tmp_path / "t.txt"), "--label-column", "label"])
    assert "is read as plain text" in capsys.readouterr().err


def test_the_installed_predict_command_on_parquet(model, tmp_path):
    new_rows(8).to_parquet(tmp_path / "new.parquet")
    command = Path(sys.executable).parent / "llmembed-predict"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [str(command), str(model), str(tmp_path / "new.parquet"), "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(done.stdout.splitlines()))
    assert [r["row_id"] for r in rows] == [f"doc-{i}" for i in range(8)]
    assert "on 8 texts labelled in column 'label'" in done.stderr
    bad = subprocess.run(
        [str(command), str(model), str(tmp_path / "absent.csv")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert bad.returncode == 2 and "absent.csv does not exist" in bad.stderr
