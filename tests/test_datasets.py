"""Data loading: packaged sets, local files, splits, subsampling, and errors on bad input."""

import json
import logging
import sys
import unicodedata
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from llmembed.data.datasets import DatasetError, load_dataset, resplit, text_key
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
    # 10,605 snippets less the 37 with a zero score, less 2 repeated sentences
    assert len(ds) == 10_566 and ds.duplicates_dropped == 2
    assert ds.label_names == ["neg", "pos"]
    assert np.bincount(ds.labels).tolist() == [5_325, 5_241]
    counts = ds.split_counts()
    assert counts == {"train": 7_396, "validation": 1_057, "test": 2_113}
    # Stratified: each split keeps the class balance within a point.
    for code in range(3):
        share = ds.labels[ds.split == code].mean()
        assert abs(share - ds.labels.mean()) < 0.01


def test_packaged_trec_and_bbc():
    trec = load_dataset(cfg(name="trec", source="packaged"))
    assert len(trec) == 5_381 and trec.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert trec.duplicates_dropped == 1  # one question under two fine labels of the same class
    bbc = load_dataset(cfg(name="bbc", source="packaged"))
    assert len(bbc) == 2_125 and len(bbc.label_names) == 5 and bbc.duplicates_dropped == 100


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
        DatasetError, match=r"1 rows have an empty, blank or missing text \(line 1\)"
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


# --- A1: duplicate texts ------------------------------------------------------------------------
def write(tmp_path, name, content: str, encoding="utf-8") -> str:
    path = tmp_path / name
    path.write_bytes(content.encode(encoding))
    return str(path)


def test_packaged_bbc_drops_its_repeated_documents_and_no_test_text_is_in_train():
    bbc = load_dataset(cfg(name="bbc", source="packaged"))
    assert bbc.duplicates_dropped == 100
    keys = [text_key(t) for t in bbc.texts]
    assert len(set(keys)) == len(keys)
    train = {k for k, s in zip(keys, bbc.split, strict=True) if s == 0}
    assert not [k for k, s in zip(keys, bbc.split, strict=True) if s == 2 and k in train]


def test_duplicates_after_normalization_keep_the_first_copy_and_are_counted(tmp_path, caplog):
    decomposed = unicodedata.normalize("NFD", "café noir")
    rows = [
        ("café noir", "a"),
        ("a  b ", "a"),
        (decomposed, "a"),  # NFC-equal to row 1
        ("a b", "a"),  # whitespace collapsed: equal to row 2
        ("a\u200b b", "a"),  # an invisible format character: equal too
        ("A B", "a"),  # case is kept: another text
    ] + [(f"text {i}", "ab"[i % 2]) for i in range(20)]
    path = write_csv(tmp_path / "d.csv", rows)
    with caplog.at_level(logging.INFO, logger="llmembed.data.datasets"):
        ds = load_dataset(cfg(path=str(path)))
    assert ds.duplicates_dropped == 3
    assert ds.texts[:3] == ["café noir", "a  b ", "A B"] and ds.row_ids[:3].tolist() == [0, 1, 5]
    assert "3 duplicate texts dropped" in caplog.text


def test_duplicates_with_different_labels_name_their_lines(tmp_path):
    rows = [("same text", "a"), ("other", "b"), ("same  text", "b")] + [
        (f"t {i}", "ab"[i % 2]) for i in range(10)
    ]
    path = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(
        DatasetError,
        match=r"1 texts appear more than once with different labels \(line 2 \('a'\) and "
        r"line 4 \('b'\)\)",
    ):
        load_dataset(cfg(path=str(path)))


def test_a_text_in_two_fixed_splits_keeps_its_test_copy(tmp_path):
    rows = [(f"text {i}", "ab"[i % 2], "train") for i in range(30)]
    rows += [("text 3", "b", "test"), ("text 4", "a", "test"), ("new", "a", "test")]
    path = write_csv(tmp_path / "s.csv", rows, header=("text", "label", "part"))
    ds = load_dataset(cfg(path=str(path), split_column="part"))
    assert ds.duplicates_dropped == 2
    test = [t for t, s in zip(ds.texts, ds.split, strict=True) if s == 2]
    assert test == ["text 3", "text 4", "new"]  # the official test set stays whole
    assert "text 3" not in [t for t, s in zip(ds.texts, ds.split, strict=True) if s != 2]


# --- A2: rare classes ---------------------------------------------------------------------------
def rare_rows(n_common=90, n_rare=8):
    rows = [(f"common text {i}", "ab"[i % 2]) for i in range(n_common)]
    return rows + [(f"rare text {i}", f"rare{i}") for i in range(n_rare)]


def test_rare_classes_stay_in_train_and_the_others_are_stratified(tmp_path):
    path = write_csv(tmp_path / "r.csv", rare_rows())
    for seed in range(5):
        ds = load_dataset(cfg(path=str(path), seed=seed))
        rare = np.isin(ds.labels, [ds.label_names.index(f"rare{i}") for i in range(8)])
        assert (ds.split[rare] == 0).all()
        # a and b, 45 rows each: 20 test rows and 10 validation rows split evenly
        assert np.bincount(ds.labels[ds.split == 2]).tolist()[:2] == [10, 10]
        assert np.bincount(ds.labels[ds.split == 1]).tolist()[:2] == [5, 5]


def test_limit_keeps_a_training_row_of_every_class(tmp_path):
    rows = [(f"row {i}", "c" + str(i % 3)) for i in range(300)]
    rows += [(f"small {i}", f"s{i % 6}") for i in range(24)]  # six classes of 4 rows
    path = write_csv(tmp_path / "r.csv", rows)
    for seed in range(6):
        ds = load_dataset(cfg(path=str(path), seed=seed, limit=30))
        assert len(ds) == 30
        train = set(ds.labels[ds.split == 0].tolist())
        assert set(ds.labels.tolist()) <= train
        assert train == set(range(len(ds.label_names)))


def test_a_limit_below_the_number_of_classes_is_refused(tmp_path):
    path = write_csv(tmp_path / "r.csv", rare_rows())
    with pytest.raises(
        DatasetError, match=r"dataset.limit=5 cannot keep one row of each of the 10"
    ):
        load_dataset(cfg(path=str(path), limit=5))


# --- A3: repeated splits ------------------------------------------------------------------------
def test_resplit_redraws_a_stratified_split_from_the_same_rows():
    ds = load_dataset(cfg(name="trec", source="packaged"))
    again = resplit(ds, 0)
    assert again.fingerprint() == ds.fingerprint()  # the recorded seed reproduces the split
    other = resplit(ds, 7)
    assert other.texts == ds.texts and other.split_counts() == ds.split_counts()
    assert (other.split != ds.split).any() and other.split_plan.seed == 7
    assert other.duplicates_dropped == ds.duplicates_dropped
    for code in range(3):  # stratified: each class's share within a point in every split
        shares = (
            np.bincount(other.labels[other.split == code], minlength=6)
            / (other.split == code).sum()
        )
        assert np.abs(shares - np.bincount(other.labels) / len(other)).max() < 0.01


def test_resplit_keeps_a_fixed_test_split_and_redraws_validation(tmp_path):
    rows = [(t, y, "test" if i < 10 else "train") for i, (t, y) in enumerate(sentences(60))]
    path = write_csv(tmp_path / "s.csv", rows, header=("text", "label", "part"))
    ds = load_dataset(cfg(path=str(path), split_column="part"))
    assert ds.split_plan.drawn == ("validation",)
    other = resplit(ds, 3)
    np.testing.assert_array_equal(other.split == 2, ds.split == 2)
    assert (other.split != ds.split).any() and other.split_counts() == ds.split_counts()
    rows = [
        (t, y, ["train", "validation", "test"][i % 3]) for i, (t, y) in enumerate(sentences(30))
    ]
    fixed = load_dataset(
        cfg(
            path=str(write_csv(tmp_path / "f.csv", rows, ("text", "label", "part"))),
            split_column="part",
        )
    )
    np.testing.assert_array_equal(resplit(fixed, 5).split, fixed.split)
    with pytest.raises(DatasetError, match=r"dataset.seed=-1"):
        resplit(ds, -1)


# --- B4: labels ---------------------------------------------------------------------------------
def test_numeric_labels_and_whitespace_are_one_class(tmp_path):
    rows = [(f"t {i}", ["1", "1.0", " 1 ", "2", "2.0", "+2"][i % 6]) for i in range(30)]
    ds = load_dataset(cfg(path=str(write_csv(tmp_path / "n.csv", rows))))
    assert ds.label_names == ["1", "2"]
    path = tmp_path / "n.jsonl"
    path.write_text(
        "".join(
            json.dumps({"text": f"t {i}", "label": [1, 1.0, 2, 2.0][i % 4]}) + "\n"
            for i in range(20)
        )
    )
    assert load_dataset(cfg(path=str(path))).label_names == ["1", "2"]


def test_labels_differing_only_in_case_are_kept_with_a_warning(tmp_path, caplog):
    rows = [(f"t {i}", ["pos", "pos ", "POS", "neg"][i % 4]) for i in range(40)]
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(cfg(path=str(write_csv(tmp_path / "c.csv", rows))))
    assert ds.label_names == ["POS", "neg", "pos"]
    assert "labels [['POS', 'pos']] differ only in case" in caplog.text


@pytest.mark.parametrize("missing", ["NaN", "nan", " ", ""])
def test_nan_and_empty_labels_are_missing(tmp_path, missing):
    rows = [(f"t {i}", "ab"[i % 2]) for i in range(10)] + [("odd", missing)]
    with pytest.raises(
        DatasetError, match=r"1 rows have no label \(empty, null, NaN or 'nan': line 12\)"
    ):
        load_dataset(cfg(path=str(write_csv(tmp_path / "m.csv", rows))))


def test_null_and_nan_labels_in_jsonl_are_missing(tmp_path):
    lines = [{"text": f"t {i}", "label": "ab"[i % 2]} for i in range(6)]
    lines += [{"text": "x", "label": None}, {"text": "y", "label": float("nan")}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))  # json writes NaN, reads it back
    with pytest.raises(DatasetError, match=r"2 rows have no label .*line 7, line 8"):
        load_dataset(cfg(path=str(path)))


# --- B5: files ----------------------------------------------------------------------------------
def test_a_duplicated_header_column_is_refused(tmp_path):
    path = write(tmp_path, "d.csv", "text,label,label\na,pos,neg\nb,neg,pos\n")
    with pytest.raises(DatasetError, match=r"names the column\(s\) \['label'\] more than once"):
        load_dataset(cfg(path=path))


def test_a_row_with_fewer_fields_than_the_header_is_refused(tmp_path):
    path = write(tmp_path, "f.csv", "text,label,part\na,pos,train\nb,neg\n")
    with pytest.raises(DatasetError, match=r"line 3 \(2 fields\).*unquoted comma"):
        load_dataset(cfg(path=path))


def test_an_unquoted_tab_inside_a_tsv_text_is_refused(tmp_path):
    body = "".join(f"text {i}\t{'ab'[i % 2]}\n" for i in range(10))
    path = write(tmp_path, "d.tsv", "text\tlabel\n" + body + "a tab\there\tpos\n")
    with pytest.raises(
        DatasetError,
        match=r"1 rows have a different number of fields .*line 12 \(3 fields\).*unquoted tab",
    ):
        load_dataset(cfg(path=path))


def test_a_stray_quote_is_refused_not_merged(tmp_path):
    path = write(tmp_path, "q.csv", 'text,label\n"Great" film,pos\nok,neg\n')
    with pytest.raises(DatasetError, match=r"the row from line 2: ',' expected after '\"'"):
        load_dataset(cfg(path=path))
    path = write(tmp_path, "u.csv", 'text,label\na,pos\n"unclosed,neg\nc,pos\n')
    with pytest.raises(DatasetError, match=r"the row from line 3: unexpected end of data"):
        load_dataset(cfg(path=path))  # not one text swallowing the rest of the file


def test_a_two_megabyte_text_is_read(tmp_path):
    long = "word " * 400_000
    rows = [(long, "a")] + [(f"t {i}", "ab"[i % 2]) for i in range(20)]
    ds = load_dataset(cfg(path=str(write_csv(tmp_path / "long.csv", rows))))
    assert ds.texts[0] == long


@pytest.mark.parametrize("blank", ["\u200b", "\u200b\u200c\ufeff", " \u2060\u00ad ", "\u3164"])
def test_a_text_of_invisible_characters_is_empty(tmp_path, blank):
    rows = [(f"t {i}", "ab"[i % 2]) for i in range(10)] + [(blank, "a")]
    with pytest.raises(DatasetError, match=r"empty, blank or missing text \(line 12\)"):
        load_dataset(cfg(path=str(write_csv(tmp_path / "z.csv", rows))))


def test_a_directory_as_path_is_named_a_directory(tmp_path):
    write(tmp_path, "inside.csv", "text,label\n")
    with pytest.raises(DatasetError, match=r"is a directory \(it holds inside.csv\)"):
        load_dataset(cfg(path=str(tmp_path)))


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_files_with_a_byte_order_mark_are_read_in_their_encoding(tmp_path, encoding):
    rows = sentences(20)
    content = "text,label\n" + "".join(f"{t} é,{y}\n" for t, y in rows)
    ds = load_dataset(cfg(path=write(tmp_path, "u.csv", content, encoding)))
    assert ds.texts == [f"{t} é" for t, _ in rows]


def test_utf16_without_a_byte_order_mark_is_named(tmp_path):
    path = write(tmp_path, "u.csv", "text,label\na,pos\nb,neg\n", "utf-16-le")
    with pytest.raises(DatasetError, match="looks like UTF-16 or UTF-32 without a byte-order mark"):
        load_dataset(cfg(path=path))


def test_bad_json_lines_are_named(tmp_path):
    path = write(tmp_path, "b.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(DatasetError, match=r"line 2: not valid JSON"):
        load_dataset(cfg(path=path))
    path = write(tmp_path, "k.jsonl", '{"text": "a", "label": "x"}\n{"label": "y"}\n')
    with pytest.raises(DatasetError, match=r"1 rows have no key 'text' \(line 2\)"):
        load_dataset(cfg(path=path))


# --- B6: settings -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"limit": 0}, r"dataset.limit=0: must be a positive integer"),
        ({"limit": 50.7}, r"dataset.limit=50.7: must be a positive integer"),
        ({"limit": -3}, r"dataset.limit=-3"),
        ({"test_size": 0}, r"dataset.test_size=0: must be a share .* strictly between 0 and 1"),
        ({"test_size": 1.0}, r"dataset.test_size=1.0"),
        ({"val_size": 0}, r"dataset.val_size=0"),
        ({"val_size": 1.5}, r"dataset.val_size=1.5"),
        ({"test_size": 0.6, "val_size": 0.5}, r"leaves no training rows"),
        ({"seed": -1}, r"dataset.seed=-1: must be an integer"),
        ({"seed": 1.5}, r"dataset.seed=1.5"),
    ],
)
def test_settings_are_validated_before_any_work(tmp_path, setting, message):
    # the path does not exist: the settings are refused before the file is looked at
    with pytest.raises(DatasetError, match=message):
        load_dataset(cfg(path=str(tmp_path / "absent.csv"), **setting))


def test_a_whole_float_limit_is_accepted(tmp_path, data_csv):
    assert len(load_dataset(cfg(path=str(data_csv), limit=50.0))) == 50


# --- B7: other bugs -----------------------------------------------------------------------------
def test_hidden_hub_labels_are_refused_not_read_as_the_last_class(monkeypatch):
    rows = [{"sentence": t, "label": int(y == "pos")} for t, y in sentences(30)]
    hidden = [{"sentence": t, "label": -1} for t, _ in sentences(10, seed=1)]

    def load(hub_id, subset, revision=None):
        names = ["negative", "positive"]
        return {"train": FakeSplit(rows, names), "test": FakeSplit(hidden, names)}

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load))
    with pytest.raises(DatasetError, match=r"split 'test' has label -1 .*hidden test label"):
        load_dataset(hub_cfg(hub_splits={"train": "train", "test": "test"}))


def test_string_ids_pass_through_and_missing_or_repeated_ids_are_named(tmp_path):
    ids = ["007", "x2", "r-3", "4", "5", "6", "7", "8", "9", "10"]
    rows = "".join(f"text {i},{'ab'[i % 2]},{x}\n" for i, x in enumerate(ids))
    path = write(tmp_path, "i.csv", "text,label,id\n" + rows)
    ds = load_dataset(cfg(path=path, id_column="id"))
    assert ds.row_ids.tolist() == ids  # as given, none read as a number
    assert load_dataset(cfg(path=path, id_column="id")).fingerprint() == ds.fingerprint()
    rows = "".join(f"text {i},{'ab'[i % 2]}, {i + 7} \n" for i in range(10))
    numbers = write(tmp_path, "n.csv", "text,label,id\n" + rows)
    assert load_dataset(cfg(path=numbers, id_column="id")).row_ids.tolist() == list(range(7, 17))
    gap = write(tmp_path, "g.csv", "text,label,id\na,pos,x\nb,neg,\n")
    with pytest.raises(DatasetError, match=r"1 rows have no id in 'id' \(line 3\)"):
        load_dataset(cfg(path=gap, id_column="id"))
    twice = write(tmp_path, "t.csv", "text,label,id\na,pos,x\nb,neg,x\n")
    with pytest.raises(DatasetError, match=r"row id 'x' appears more than once"):
        load_dataset(cfg(path=twice, id_column="id"))


def test_a_hub_text_in_train_and_test_keeps_its_test_copy(monkeypatch):
    rows = [{"sentence": t, "label": int(y == "pos")} for t, y in sentences(40)]
    leaked = [dict(r) for r in rows[30:]] + [dict(rows[0])]  # row 0 also sits in the test split

    def load(hub_id, subset, revision=None):
        names = ["negative", "positive"]
        return {"train": FakeSplit(rows[:30], names), "test": FakeSplit(leaked, names)}

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load))
    ds = load_dataset(hub_cfg(hub_splits={"train": "train", "test": "test"}))
    assert ds.duplicates_dropped == 1 and ds.split_counts()["test"] == 11
    assert rows[0]["sentence"] not in [t for t, s in zip(ds.texts, ds.split, strict=True) if s != 2]


def test_a_jsonl_text_that_is_not_a_string_is_named(tmp_path):
    path = write(tmp_path, "n.jsonl", '{"text": "a", "label": "x"}\n{"text": 42, "label": "y"}\n')
    with pytest.raises(DatasetError, match=r"1 texts are not strings \(line 2 \(int\)\)"):
        load_dataset(cfg(path=path))


def test_a_small_positive_share_still_makes_a_validation_row(tmp_path):
    rows = [(f"t {i}", "ab"[i % 2]) for i in range(8)]  # 5% of 8 rows rounds to 0
    ds = load_dataset(cfg(path=str(write_csv(tmp_path / "s.csv", rows)), val_size=0.05))
    assert ds.split_counts() == {"train": 5, "validation": 1, "test": 2}


def test_dataset_errors_are_user_errors():
    # the command lines print a UserError's message alone and exit 2, with no traceback
    from llmembed.errors import UserError

    assert issubclass(DatasetError, UserError) and issubclass(DatasetError, ValueError)
