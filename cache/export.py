"""`llmembed-cache export`: chosen layers of one entry as parquet or a Hugging Face dataset folder,
one row per text, one column per layer; joined to a data set's texts, labels and splits when given."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmembed.cache.entry import Entry
from llmembed.cache.format import SPLITS
from llmembed.cache.keys import text_hashes
from llmembed.cache.root import Cache
from llmembed.errors import UserError

FORMATS = ("parquet", "hf")


def entry_at(cache: Cache, name: str) -> Entry:
    """The complete entry `<key>/<sel>` (as `llmembed-cache ls` shows it) under the root."""
    matches = [e for e in cache.entries() if str(e.path.relative_to(cache.root)) == name]
    if not matches or not matches[0].complete:
        raise UserError(
            f"no complete entry {name!r} under {cache.root}; `llmembed-cache ls` lists them"
        )
    return matches[0]


def export_columns(entry: Entry, layers: list[int], pooling: str, data=None) -> dict[str, list]:
    """Columns of the export: `text_sha256`, `L<layer>` (a float32 vector per row) and, with a data
    set, `text`, `label`, `split` and `row_id` in the data set's order."""
    num_layers = entry.manifest.num_layers
    wanted = [x + num_layers + 1 if x < 0 else x for x in layers]
    if data is None:
        hashes = None
    else:
        hashes = text_hashes(data.texts)
        missing = int((~entry.holds(hashes)).sum())
        if missing:
            raise UserError(
                f"{entry.path} lacks {missing} of the data set's {len(data)} texts; extract them "
                "first (llmembed-extract with the same backbone and settings)"
            )
    try:
        values = entry.read(pooling, wanted, hashes)  # (rows, layers, hidden)
    except KeyError as err:  # a pooling or layer the entry does not store
        raise UserError(str(err).strip("'\"")) from None
    if hashes is None:
        hashes = entry.hashes()
    out: dict[str, list] = {"text_sha256": [h.hex() for h in np.asarray(hashes).tolist()]}
    if data is not None:
        out["row_id"] = data.row_ids.tolist()
        out["text"] = list(data.texts)
        out["label"] = [data.label_names[i] for i in data.labels]
        out["split"] = [SPLITS[s] for s in data.split]
    for j, layer in enumerate(wanted):
        out[f"L{layer}"] = list(values[:, j].astype(np.float32))
    return out


def check_target(out: Path) -> Path:
    """Where an export may go: a new name in an existing folder (checked before any reading)."""
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} exists; choose another --out (an export never overwrites)")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent} does not exist; create it first or choose another --out")
    return out


def write_export(columns: dict[str, list], out: Path, fmt: str) -> Path:
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {FORMATS}, got {fmt!r}")
    out = check_target(out)
    try:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table(columns), out)
        else:
            from datasets import Dataset

            Dataset.from_dict(columns).save_to_disk(str(out))
    except ImportError as err:
        extra = "formats" if fmt == "parquet" else "hub"
        raise UserError(
            f"--format {fmt} needs {err.name}: pip install 'llmembed[{extra}]'"
        ) from None
    return out
