"""Labelled text sets, read by both stages and the Python API: the packaged offline sets, the hub,
local CSV/TSV/JSONL/JSON/parquet files, `save_to_disk` folders, DataFrames and plain lists.

`datasets.py` turns any source into a checked, deduplicated, split `TextDataset` (its rules are in
its docstring); `tables.py` reads files into rows and holds the rules for single cells (blank
texts, duplicate keys, canonical labels).
"""
