"""Strict readers for local CSV, TSV, JSONL/JSON, parquet files and folders written by Hugging Face
`datasets`' `save_to_disk`, for pandas DataFrames, and the rules for single cells.

Every reader returns a `Table` (rows as dicts, and where each row is for messages); the checks on
columns, texts and labels are made once on it, in `llmembed.data.datasets`, whatever the format.
Every rule here turns a quietly mangled file into one `DatasetError` that names the line and the fix:
a field count that differs from the header's (an unquoted tab or comma inside a text), a broken
quote, a duplicated column (in a header, a parquet schema or a DataFrame), NUL bytes (UTF-16/32
without a byte-order mark), a JSON line that is not an object. UTF-8, UTF-16 and UTF-32 files with a
byte-order mark are read as what they are. Text files name rows by line ("line 7", the header is
line 1); parquet files, DataFrames and `datasets` folders by their 0-based position ("row 6",
"train row 6"), as pyarrow, pandas (`df.index`) and `datasets` index them. Integer labels of a
`datasets` `ClassLabel` feature are read as their class names (in a folder, and in a parquet file
written by `datasets`, which keeps the feature in its metadata).
Cells: when a text is blank (`is_blank`), when two texts are one (`text_key`), and a label's
canonical form (`canonical_label`); the rules are listed in `llmembed.data.datasets`.
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import json
import logging
import math
import re
import sys
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from llmembed.errors import UserError

log = logging.getLogger("llmembed.data.datasets")  # one logger for everything about data sets

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
KINDS = "CSV/TSV/JSONL/JSON/parquet file or a folder written by datasets' save_to_disk"
FORMATS_EXTRA = "pip install 'llmembed[formats]'"  # pyarrow, for parquet
HUB_EXTRA = "pip install 'llmembed[hub]'"  # datasets, for save_to_disk folders and the hub
# Longest first: the UTF-32-LE mark starts with the UTF-16-LE one.
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class DatasetError(UserError, ValueError):
    """The data cannot be used as given; the message says what to change (the command lines print
    it alone and exit 2)."""


class MissingKeyError(DatasetError):
    """Some JSON rows lack a key the others have; `column` names it (a caller may offer to do
    without that column)."""

    def __init__(self, message: str, column: str):
        super().__init__(message)
        self.column = column


@dataclass
class Table:
    rows: list[dict]
    refs: list[str]  # where each row is, for error messages: "line 7" (header is line 1), "row 6"
    header: list | None = None  # every column of the source; None: the keys of the first row
    parts: list[str] | None = None  # each row's named split in a DatasetDict; None: unsplit
    class_names: dict[str, list[str]] = field(default_factory=dict)  # ClassLabel names by column

    @property
    def columns(self) -> list:
        if self.header is not None:
            return list(self.header)
        return list(self.rows[0]) if self.rows else []


def shown(items: Sequence, n: int = 5) -> str:
    """The first `n` items of a list for a message, with how many more there are."""
    head = ", ".join(str(x) for x in items[:n])
    return head + (f" and {len(items) - n} more" if len(items) > n else "")


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets`' `save_to_disk`: a DatasetDict or a single Dataset."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def check_path(path: Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        if is_saved_dataset(path):
            return path
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        hint = f" (it holds {shown(inside)})" if inside else ""
        raise DatasetError(
            f"dataset.path {path} is a directory{hint} but not one written by datasets' "
            f"save_to_disk (no dataset_dict.json or state.json); set dataset.path to one {KINDS}"
        )
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file (a FIFO, device)"
        raise DatasetError(f"dataset file {path} {what}; set dataset.path to a {KINDS}")
    if path.suffix.lower() not in SUFFIXES:
        raise DatasetError(
            f"{path}: unknown file type {path.suffix!r}; use .csv, .tsv, .jsonl, .json or .parquet"
        )
    return path


def decode(path: Path) -> str:
    """The file's text: UTF-8, or UTF-16/32 where a byte-order mark says so."""
    raw = path.read_bytes()
    encoding = next((enc for bom, enc in BOMS if raw.startswith(bom)), "utf-8")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        name = encoding.removesuffix("-sig").upper()
        raise DatasetError(
            f"{path} is not {name} (byte {err.start}); re-save it as UTF-8, e.g. for a "
            f"Latin-1 or Windows-1252 file `iconv -f cp1252 -t utf-8 {path.name} > fixed{path.suffix}`"
        ) from None
    if "\x00" in text:  # UTF-16/32 text read as UTF-8 has a NUL beside every ASCII character
        raise DatasetError(
            f"{path} contains NUL bytes: it looks like UTF-16 or UTF-32 without a byte-order mark; "
            f"re-save it as UTF-8, e.g. `iconv -f utf-16le -t utf-8 {path.name} > fixed{path.suffix}`"
        )
    return text.removeprefix("\ufeff")  # utf-16/32 keep no mark, utf-8-sig none; be sure


@contextmanager
def large_fields() -> Iterator[None]:
    """Lift csv's 128 KB field limit (a long document is one field); sys.maxsize overflows a C long
    on some platforms, so halve until accepted."""
    old = csv.field_size_limit()
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            break
        except OverflowError:
            limit //= 2
    try:
        yield
    finally:
        csv.field_size_limit(old)


def read_rows(path: Path, needed: Sequence[str] = ()) -> Table:
    """Rows of a CSV, TSV, JSONL/JSON or parquet file (by extension), or of a `save_to_disk`
    folder, as dicts, with where each row is.

    `needed` are the columns the caller reads: a duplicated header name is an error where it is one
    of them (or, with none given, any name). Header names are stripped of surrounding spaces.
    Parquet files and folders are read for the `needed` columns only (all of them with none given).
    """
    path = check_path(path)
    if path.is_dir():
        return _read_saved_dataset(path, needed)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, needed)
    text = decode(path)
    if suffix in (".csv", ".tsv"):
        return _read_delimited(text, path, "\t" if suffix == ".tsv" else ",", needed)
    return _read_json_lines(text, path, needed)


def read_table(path: Path) -> list[dict]:
    """Rows of a local file or `save_to_disk` folder, as dicts (see `read_rows`)."""
    return read_rows(path).rows


def _read_delimited(text: str, path: Path, sep: str, needed: Sequence[str]) -> Table:
    # strict: a stray quote (`"Great" film`) or an unclosed one is an error, not a merged field
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    rows, refs, ragged, start = [], [], [], 1
    with large_fields():
        try:
            header = [h.strip() for h in next(reader, [])]
            _check_header(header, path, needed)
            while True:
                start = reader.line_num + 1
                fields = next(reader, None)
                if fields is None:
                    break
                if not fields or (len(fields) == 1 and not fields[0].strip()):  # a blank line
                    continue
                if len(fields) != len(header):
                    ragged.append(f"line {start} ({len(fields)} fields)")
                    continue
                rows.append(dict(zip(header, fields, strict=True)))
                refs.append(f"line {start}")
        except csv.Error as err:
            raise DatasetError(
                f"{path}, the row from line {start}: {err}. A field that starts with a double quote "
                'must end with one, with any quote inside it doubled (`"say ""hi"""`); quote such '
                "texts or remove the stray quote"
            ) from None
    if ragged:
        what = "tab" if sep == "\t" else "comma"
        raise DatasetError(
            f"{path}: {len(ragged)} rows have a different number of fields than the header's "
            f"{len(header)} ({shown(ragged)}): most likely an unquoted {what} inside a text. Quote "
            f"those texts (a CSV/TSV writer such as pandas' to_csv does) or remove the {what}s"
        )
    return Table(rows, refs)


def _check_header(header: list, path: object, needed: Sequence[str]) -> None:
    counts = Counter(header)
    dups = [h for h, c in counts.items() if c > 1 and h != "" and (not needed or h in needed)]
    if dups:
        where = {h: [i + 1 for i, x in enumerate(header) if x == h] for h in dups}
        raise DatasetError(
            f"{path}: the header names the column(s) {dups} more than once (positions {where}); "
            "rename or remove the extra column so that each name is unique"
        )


def _read_json_lines(text: str, path: Path, needed: Sequence[str]) -> Table:
    """JSON Lines (one object per line); a .json file holding one array of objects is read too."""
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        items = _parse_json(text, path, "the file")
        if not isinstance(items, list):
            raise DatasetError(f"{path}: expected a JSON array of objects")
        entries = [(f"item {i + 1}", item) for i, item in enumerate(items)]
    else:
        # Lines end at \n only: a raw U+2028, NEL or form feed inside a JSON string is valid JSON
        # (str.splitlines would cut the object there).
        entries = [
            (f"line {i}", _parse_json(line, path, f"line {i}"))
            for i, line in enumerate(text.split("\n"), start=1)
            if line.strip()
        ]
    bad = [ref for ref, obj in entries if not isinstance(obj, dict)]
    if bad:
        raise DatasetError(
            f"{path}: {shown(bad)} not a JSON object; write one object per line, "
            'e.g. {"text": "...", "label": "pos"}'
        )
    refs = [ref for ref, _ in entries]
    rows = [obj for _, obj in entries]
    for name in needed:  # every object, not just the first, must carry each column read
        lacking = [ref for ref, row in zip(refs, rows, strict=True) if name not in row]
        if lacking and len(lacking) < len(rows):
            raise MissingKeyError(
                f"{path}: {len(lacking)} rows have no key {name!r} ({shown(lacking)}); "
                "add it to those rows or remove them",
                name,
            )
    return Table(rows, refs)


def _parse_json(text: str, path: Path, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"{path}, {where}: not valid JSON ({err.msg}); fix or remove it"
        ) from None


# --- columnar sources: parquet, save_to_disk folders (and the hub), DataFrames --------------------
def _import_pyarrow(path: Path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(
            f"{path} is a parquet file, which needs pyarrow: {FORMATS_EXTRA}"
        ) from None
    return pa, pq


def import_datasets(what: str):
    """The Hugging Face `datasets` library, or an error naming the extra that installs it."""
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"{what} needs the `hub` extra: {HUB_EXTRA}") from None
    return datasets


def _read_parquet(path: Path, needed: Sequence[str]) -> Table:
    pa, pq = _import_pyarrow(path)
    try:
        schema = pq.read_schema(path)
        header = list(schema.names)
        _check_header(header, path, needed)
        wanted = [c for c in dict.fromkeys(needed) if c in header] if needed else header
        rows = pq.read_table(path, columns=wanted).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise DatasetError(
            f"{path} could not be read as parquet ({err}); check that it is a complete parquet "
            "file (e.g. written by pandas' to_parquet or pyarrow)"
        ) from None
    refs = [f"row {i}" for i in range(len(rows))]
    class_names = {c: n for c, n in _parquet_class_names(schema, path).items() if c in wanted}
    _name_classes(rows, refs, class_names, str(path), fix="check the file's ClassLabel names")
    return Table(rows, refs, header, class_names=class_names)


def _parquet_class_names(schema, path: Path) -> dict[str, list[str]]:
    """ClassLabel names that `datasets` keeps in a parquet file's metadata (to_parquet)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return {}
    try:
        features = json.loads(meta)["info"]["features"]
        return {
            column: [str(n) for n in feature["names"]]
            for column, feature in features.items()
            if feature.get("_type") == "ClassLabel"
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        # The rows are still sound: labels stay the integers they are stored as.
        log.warning(
            "%s: unreadable datasets metadata; ClassLabel integers are read as labels", path
        )
        return {}


def _read_saved_dataset(path: Path, needed: Sequence[str]) -> Table:
    """A folder from `save_to_disk`: a DatasetDict's splits by name, a single Dataset unsplit."""
    hf = import_datasets(f"{path}, a folder written by datasets' save_to_disk,")
    try:
        loaded = hf.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise DatasetError(
            f"{path} could not be read with datasets.load_from_disk ({err}); save it again "
            "with save_to_disk"
        ) from None
    parts = dict(loaded) if isinstance(loaded, hf.DatasetDict) else {None: loaded}
    return read_parts(
        parts,
        needed,
        str(path),
        fix="remove that split before save_to_disk, or keep only labelled rows",
    )


def read_parts(
    parts: Mapping[str | None, Any], needed: Sequence[str], where: str, *, fix: str
) -> Table:
    """Rows of `datasets` splits (their name -> a Dataset), in order; the key None marks a single
    unsplit Dataset. Only the `needed` columns are read; ClassLabel integers become class names
    (the same names in every split), and a value outside them (-1, a hidden label) is an error
    ending with `fix`."""
    rows: list[dict] = []
    refs: list[str] = []
    names_of: dict[str, list[str]] = {}
    header = None
    split = [] if None not in parts else None
    for name, part in parts.items():
        have = list(part.features)
        header = have if header is None else header
        lacking = [c for c in needed if c not in have]
        if lacking and len(parts) > 1:
            raise DatasetError(
                f"{where} split {name!r} has no column {lacking[0]!r}; its columns are {have}. "
                "Set dataset.text_column / dataset.label_column"
            )
        wanted = [c for c in dict.fromkeys(needed) if c in have] if needed else have
        # [:]: a whole column as a list at once (iterating a datasets Column is 100x slower)
        values = {c: part[c][:] for c in wanted}
        part_rows = [{c: values[c][i] for c in wanted} for i in range(len(part))]
        prefix = "row" if name is None else f"{name} row"
        part_refs = [f"{prefix} {i}" for i in range(len(part))]
        for column in wanted:
            names = getattr(part.features.get(column), "names", None)
            if names is None:
                continue
            names = [str(n) for n in names]
            if names_of.setdefault(column, names) != names:
                raise DatasetError(
                    f"{where}: split {name!r} names its classes {names}, another split "
                    f"{names_of[column]}; give every split the same ClassLabel (for the hub, "
                    "map splits with the same classes in dataset.hub_splits)"
                )
            label = where if name is None else f"{where} split {name!r}"
            _name_classes(part_rows, part_refs, {column: names}, label, fix=fix)
        rows += part_rows
        refs += part_refs
        if split is not None:
            split += [name] * len(part)
    return Table(rows, refs, header, split, names_of)


def _name_classes(
    rows: list[dict], refs: list[str], class_names: dict[str, list[str]], where: str, *, fix: str
) -> None:
    """Replace ClassLabel integers by their names, in place; -1 (a hidden label) and other values
    outside the names are an error, never read as a class."""
    for column, names in class_names.items():
        bad = []
        for row, ref in zip(rows, refs, strict=True):
            value = row[column]
            if value is None:  # missing: reported with the other missing labels
                continue
            if not isinstance(value, int) or not 0 <= value < len(names):
                bad.append((ref, value))
                continue
            row[column] = names[value]
        if bad:
            raise DatasetError(
                f"{where} has label {bad[0][1]!r} outside its classes {names} in column "
                f"{column!r} ({len(bad)} rows: {shown([f'{r} ({v!r})' for r, v in bad])}); -1 "
                f"marks a hidden test label. {fix[0].upper()}{fix[1:]}"
            )


def frame_table(df: Any, needed: Sequence[str]) -> Table:
    """Rows of a pandas DataFrame, named by its index ("row 7"); pandas' missing values (NaN,
    None, pd.NA) are missing here too."""
    if not (hasattr(df, "columns") and hasattr(df, "index") and hasattr(df, "__getitem__")):
        raise DatasetError(
            f"expected a pandas DataFrame, got {type(df).__name__}; for lists of texts and "
            "labels use dataset_from_records"
        )
    import pandas as pd  # the caller holds a DataFrame, so pandas is installed

    header = list(df.columns)
    _check_header(header, "the DataFrame", needed)
    wanted = [c for c in dict.fromkeys(needed) if c in header] if needed else header
    values = {c: [None if v is pd.NA else v for v in df[c].tolist()] for c in wanted}
    rows = [{c: values[c][i] for c in wanted} for i in range(len(df))]
    return Table(rows, [f"row {i}" for i in df.index], header)


# --- cells: blank texts, the duplicate key, canonical labels ------------------------------------
# Characters that render as nothing although Unicode does not class them as space or format.
_BLANK = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0")
_BLANK_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def is_blank(text: str) -> bool:
    """True for a text with nothing visible: whitespace, controls, zero-width/format characters."""
    return all(
        c.isspace() or c in _BLANK or unicodedata.category(c) in _BLANK_CATEGORIES for c in text
    )


@functools.cache
def _format_chars() -> dict[int, None]:
    """A str.translate table deleting every format character (Cf: U+200B, U+FEFF, U+00AD ...)."""
    return {cp: None for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)) == "Cf"}


def text_key(text: str) -> str:
    """What makes two texts the same for deduplication: NFC, format characters removed,
    whitespace runs collapsed to one space, stripped. Case is kept."""
    if not text.isascii():  # ASCII has no format characters; skip building the table for it
        text = unicodedata.normalize("NFC", text).translate(_format_chars())
    return " ".join(text.split())


def check_texts(texts: Sequence, refs: Sequence[str], where: object) -> None:
    """Reject unusable texts before any model is loaded, naming the first few rows."""
    bad = [
        r
        for t, r in zip(texts, refs, strict=True)
        if t is None or _is_nan(t) or (isinstance(t, str) and is_blank(t))
    ]
    if bad:
        raise DatasetError(
            f"{where}: {len(bad)} rows have an empty, blank or missing text ({shown(bad)}); blank "
            "includes only whitespace or invisible characters such as U+200B. Remove those rows "
            "or fill them in"
        )
    not_text = [
        f"{r} ({type(t).__name__})"
        for t, r in zip(texts, refs, strict=True)
        if not isinstance(t, str)
    ]
    if not_text:
        raise DatasetError(
            f"{where}: {len(not_text)} texts are not strings ({shown(not_text)}); "
            "write them as strings"
        )
    check_unicode(texts, refs, where, "texts")


def lone_surrogate(text: str) -> int | None:
    """Where `text` holds a lone surrogate (e.g. JSON's "\\ud800" escape alone), else None: such
    a string is not Unicode text and has no UTF-8 form to hash, tokenize or write."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def check_unicode(values: Sequence, refs: Sequence[str], where: object, what: str) -> None:
    bad = [
        f"{r} (U+{ord(v[i]):04X} at character {i})"
        for v, r in zip(values, refs, strict=True)
        if isinstance(v, str) and (i := lone_surrogate(v)) is not None
    ]
    if bad:
        raise DatasetError(
            f"{where}: {len(bad)} {what} hold a lone surrogate, which is not Unicode text "
            f"({shown(bad)}); fix the escape (\\udXXX) in the source or remove it"
        )


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_MISSING = frozenset({"", "nan"})


def canonical_label(value: object) -> str | None:
    """A label's canonical string, or None where the label is missing (see the module's rules)."""
    if value is None or _is_nan(value):
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return _number(Decimal(repr(float(value))))
    if not isinstance(value, str):
        raise TypeError(type(value).__name__)
    text = " ".join(unicodedata.normalize("NFC", value).split())
    if text.lower() in _MISSING:
        return None
    return _number(Decimal(text)) if _NUMBER.fullmatch(text) else text


def _number(value: Decimal) -> str:
    if not value.is_finite():
        return str(value).lower()  # inf, -inf
    if value.adjusted() < 100 and value == value.to_integral_value():  # 1e999999 stays a float
        return str(int(value))
    return repr(float(value))


def normalize_labels(raw: Sequence, refs: Sequence[str], where: object) -> list[str]:
    """Canonical label strings (see `canonical_label`); a missing or unusable label is an error."""
    check_unicode(raw, refs, where, "labels")
    out, missing, odd = [], [], []
    for value, ref in zip(raw, refs, strict=True):
        try:
            label = canonical_label(value)
        except TypeError as err:
            odd.append(f"{ref} ({err})")
            continue
        if label is None:
            missing.append(ref)
        out.append(label)
    if odd:
        raise DatasetError(
            f"{where}: {len(odd)} labels are neither strings nor numbers ({shown(odd)}); "
            "write each label as one string or number"
        )
    if missing:
        raise DatasetError(
            f"{where}: {len(missing)} rows have no label (empty, null, NaN or 'nan': "
            f"{shown(missing)}); label those rows or remove them"
        )
    _warn_case_variants(out, where)
    return out


def _warn_case_variants(labels: Sequence[str], where: object) -> None:
    """Labels that differ only in case may be one class written two ways: say so, merge nothing."""
    by_fold = defaultdict(set)
    for label in set(labels):
        by_fold[label.casefold()].add(label)
    variants = [sorted(v) for v in by_fold.values() if len(v) > 1]
    if variants:
        log.warning(
            "%s: labels %s differ only in case and are kept as separate classes; if each group is "
            "one class, write its labels the same way",
            where,
            sorted(variants),
        )
