"""Data loading: packaged sets, local files, splits, subsampling, and errors on bad input."""

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from llmembed.extract.datasets import DatasetError, load_dataset
from tests.conftest import sentences, write_csv


def cfg(**kw):
    base = {
        "name": "file",
        "source": "file",
        "text_column": "text",
        "label_column": "label",
        "split_column": None,
        "id_column": None,
        "seed": 0,
        "test_size": 0.2,
        "val_size": 0.1,
        "limit": None,
    }
    return OmegaConf.create({**base, **kw})


def test_packaged_mr_matches_the_documented_counts():
    ds = load_dataset(cfg(name="mr", source="packaged"))
    assert len(ds) == 10_568  # 10,605 snippets less the 37 with a zero score
    assert ds.label_names == ["neg", "pos"]
    assert np.bincount(ds.labels).tolist() == [5_326, 5_242]
    counts = ds.split_counts()
    assert counts == {"train": 7_397, "validation": 1_057, "test": 2_114}
    # Stratified: each split keeps the class balance within a point.
    for code in range(3):
        share = ds.labels[ds.split == code].mean()
        assert abs(share - ds.labels.mean()) < 0.01


def test_packaged_trec_and_bbc():
    trec = load_dataset(cfg(name="trec", source="packaged"))
    assert len(trec) == 5_382 and trec.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    bbc = load_dataset(cfg(name="bbc", source="packaged"))
    assert len(bbc) == 2_225 and len(bbc.label_names) == 5


def test_split_and_subsample_are_seeded_and_stratified():
    a = load_dataset(cfg(name="mr", source="packaged", limit=1000))
    b = load_dataset(cfg(name="mr", source="packaged", limit=1000))
    c = load_dataset(cfg(name="mr", source="packaged", limit=1000, seed=1))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert len(a) == 1000 and abs(a.labels.mean() - 0.496) < 0.01
    assert a.split_counts() == {"train": 700, "validation": 100, "test": 200}
    full = load_dataset(cfg(name="mr", source="packaged"))
    # The subsample keeps its rows' ids, texts, labels and splits from the full set.
    pos = np.searchsorted(full.row_ids, a.row_ids)
    assert [full.texts[i] for i in pos] == a.texts
    np.testing.assert_array_equal(full.split[pos], a.split)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_local_files_of_each_format(tmp_path, suffix):
    rows = sentences(30)
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    else:
        sep = "\t" if suffix == ".tsv" else ","
        path.write_text("text" + sep + "label\n" + "".join(f"{t}{sep}{y}\n" for t, y in rows))
    ds = load_dataset(cfg(path=str(path)))
    assert ds.texts == [t for t, _ in rows] and ds.label_names == ["neg", "pos"]


def test_split_column_is_respected_and_missing_validation_is_carved(tmp_path):
    rows = [(t, y, "test" if i < 10 else "train") for i, (t, y) in enumerate(sentences(50))]
    path = write_csv(tmp_path / "s.csv", rows, header=("text", "label", "part"))
    ds = load_dataset(cfg(path=str(path), split_column="part"))
    assert (ds.split[:10] == 2).all() and ds.split_counts() == {
        "train": 35,
        "validation": 5,
        "test": 10,
    }


def test_bom_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(
        "\ufefftext,label\n".encode() + "".join(f"{t},{y}\n" for t, y in sentences(20)).encode()
    )
    assert len(load_dataset(cfg(path=str(path)))) == 20


@pytest.mark.parametrize(
    ("content", "kw", "message"),
    [
        ("text,label\n,pos\nfine,neg\n", {}, "empty, blank or missing text"),
        ("text,label\n   ,pos\nfine,neg\n", {}, "empty, blank or missing text"),
        (
            "words,label\na,pos\n",
            {},
            "has no column 'text'; its columns are \\['words', 'label'\\]",
        ),
        ("text,y\na,pos\n", {}, "has no column 'label'"),
        ("text,label\na,pos\nb,pos\n", {}, "every row has the label 'pos'"),
        ("text,label\na,\nb,neg\n", {}, "rows have no label"),
        (
            "text,label,id\na,pos,1\nb,neg,1\n",
            {"id_column": "id"},
            "row id 1 appears more than once",
        ),
        ("text,label,s\na,pos,holdout\n", {"split_column": "s"}, "unknown split 'holdout'"),
    ],
)
def test_bad_files_get_a_clear_error(tmp_path, content, kw, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(cfg(path=str(path), **kw))


def test_non_utf8_file_names_the_fix(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9 ok,pos\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"is not UTF-8.*iconv"):
        load_dataset(cfg(path=str(path)))


def hub_cfg(**kw):
    return cfg(name="sst2", source="hub", hub_id="stanfordnlp/sst2", text_column="sentence", **kw)


def test_missing_file_and_hub_extra(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(cfg(path=str(tmp_path / "nope.csv")))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the extra were not installed
    with pytest.raises(DatasetError, match=r"needs the `hub` extra: pip install 'llmembed\[hub\]'"):
        load_dataset(hub_cfg(hub_splits={"train": "train"}))


class FakeSplit:
    """The slice of the `datasets` API the hub loader uses: columns, features, length."""

    def __init__(self, rows, names):
        self.rows = rows
        self.features = {"label": SimpleNamespace(names=names), "sentence": SimpleNamespace()}

    def __getitem__(self, column):
        return [r[column] for r in self.rows]

    def __len__(self):
        return len(self.rows)


def test_hub_sets_map_their_splits_and_class_names(monkeypatch):
    rows = [{"sentence": t, "label": int(y == "pos")} for t, y in sentences(40)]
    calls = []

    def load(hub_id, subset, revision=None):
        calls.append((hub_id, subset, revision))
        return {
            "train": FakeSplit(rows[:30], ["negative", "positive"]),
            "validation": FakeSplit(rows[30:], ["negative", "positive"]),
        }

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load))
    ds = load_dataset(hub_cfg(hub_splits={"train": "train", "test": "validation"}))
    assert calls == [("stanfordnlp/sst2", None, None)]
    assert ds.label_names == ["negative", "positive"]
    assert (ds.split[30:] == 2).all()  # the hub's validation set is our test set
    assert ds.split_counts() == {
        "train": 26,
        "validation": 4,
        "test": 10,
    }  # validation carved from train
    assert ds.labels.tolist() == [r["label"] for r in rows]


def test_null_text_in_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(r) for r in [{"text": None, "label": "a"}, {"text": "x", "label": "b"}]
        )
    )
    with pytest.raises(
        DatasetError, match=r"empty, blank or missing text \(first row indices: \[0\]\)"
    ):
        load_dataset(cfg(path=str(path)))


def test_a_test_label_never_seen_in_training(tmp_path):
    rows = [(f"text {i}", "a" if i % 2 else "b", "train") for i in range(20)] + [
        ("odd one", "c", "test")
    ]
    path = write_csv(tmp_path / "s.csv", rows, header=("text", "label", "part"))
    with pytest.raises(
        DatasetError, match=r"the test split has labels \['c'\] that no training row has"
    ):
        load_dataset(cfg(path=str(path), split_column="part"))
