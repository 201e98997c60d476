"""Merge result folders made by separate processes (or machines), one data set or more each, into one:

    .venv/bin/python -m scripts.experiments.merge /tmp/exp/mr /tmp/exp/trec --into docs/results

Each experiment's JSON files must share the protocol (seeds, resplit, data-set limit); their data
sets are put together (a data set in two folders: the later folder wins, and is named; in
counterparts.json its setups add up, so that prompting and fine-tuning may run in parallel, and so
do one fine-tuning setup's splits run by separate processes), their commands listed in order, and
their plots copied. The page is then written by write_results.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from llmembed.errors import UserError
from scripts.experiments.common import (
    PROTOCOL,
    commands_of,
    device_name,
    over_splits,
    per_dataset,
    read_json,
    run_main,
)


def joined(name: str, earlier: dict | None, later: dict) -> dict:
    """One data set's entry of two result files: the later one, except in counterparts.json,
    whose setups (each run on its own, in parallel) add up, a later setup replacing its namesake
    unless two fine-tuning runs had the same settings on different splits: then their splits add
    up."""
    if name != "counterparts.json" or earlier is None:
        return later
    out = {**earlier, **{k: v for k, v in later.items() if k not in ("prompting", "finetuning")}}
    for kind in ("prompting", "finetuning"):
        if kind in earlier or kind in later:
            a, b = earlier.get(kind, {}), later.get(kind, {})
            if kind == "finetuning":
                b = {k: splits_joined(a.get(k), v) for k, v in b.items()}
            out[kind] = {**a, **b}
    return out


def seeds_of(setup: dict) -> set[int] | None:
    """The splits a setup ran; None for a first-run file that did not record them."""
    seeds = [row["test"]["accuracy"].get("seeds") for row in setup["rows"].values()]
    return None if None in seeds else {s for ss in seeds for s in ss}


def splits_joined(earlier: dict | None, later: dict) -> dict:
    """One fine-tuning setup run on disjoint splits by two processes (its `splits` overridden in
    each): one setup over all of them, every per-split record kept and the summaries taken again.
    Anything else (other settings, other rows, a split run twice, splits not recorded): the later
    run replaces the earlier."""
    if earlier is None or set(earlier["rows"]) != set(later["rows"]):
        return later
    # How a run was executed is not what it computed: its splits, and micro-batches (the same
    # steps in less memory).
    how = {"splits": None, "micro_batch": None}
    same = {**earlier["settings"], **how} == {**later["settings"], **how}
    ran = seeds_of(earlier), seeds_of(later)
    if not same or None in ran or ran[0] & ran[1]:
        return later
    rows = {}
    for label, b in later["rows"].items():
        a = earlier["rows"][label]
        per_split = {m: {} for m in b["test"]}
        for row in (a, b):
            for m, s in row["test"].items():
                per_split[m].update(zip(s["seeds"], s["values"], strict=True))
        rows[label] = {
            **b,
            "test": {
                m: over_splits([v[k] for k in sorted(v)], sorted(v)) for m, v in per_split.items()
            },
            **{k: by_split({**a[k], **b[k]}) for k in ("chosen_per_split",) if k in b},
            **({"runs": by_split({**a.get("runs", {}), **b["runs"]})} if "runs" in b else {}),
            "cost": {
                **b["cost"],
                "per_split": by_split({**a["cost"]["per_split"], **b["cost"]["per_split"]}),
            },
        }
    seeds = sorted(ran[0] | ran[1])
    settings = {**later["settings"], "splits": seeds}
    # the processes micro-batched differently: say which split ran how
    ran_with = {
        s: r["micro_batch"] for row in rows.values() for s, r in row.get("runs", {}).items()
    }
    if len(set(ran_with.values())) > 1:
        settings["micro_batch"] = by_split(ran_with)
    return {**later, "settings": settings, "rows": rows}


def by_split(per_split: dict) -> dict:
    """Per-split records in the order of their splits, whichever process ran first."""
    return dict(sorted(per_split.items(), key=lambda sr: int(sr[0])))


def ran_as(row: dict, setup: dict, dataset: str | None, machine: str | None) -> dict:
    """A row's per-split records, each saying how and where it ran (files written before they
    did: the setup's micro-batch on this data set, the file's machine)."""
    micro = setup["settings"].get("micro_batch")  # once merged, given per split
    return {
        s: {
            "micro_batch": r["micro_batch"] if "micro_batch" in r else per_dataset(micro, dataset),
            "machine": machine,
            **r,
        }
        for s, r in row.get("runs", {}).items()
    }


def stamped(r: dict) -> dict:
    """A counterparts file whose fine-tuning rows' per-split records all say how and where they
    ran, before it is joined with files of other processes or machines."""
    where = device_name(r["machine"]) if r.get("machine") else None
    for ds, d in r.get("datasets", {}).items():
        for setup in d.get("finetuning", {}).values():
            for row in setup["rows"].values():
                if "runs" in row:
                    row["runs"] = ran_as(row, setup, ds, where)
    return r


def merge(sources: list[Path], into: Path) -> list[str]:
    """Everything is read and checked before anything is written."""
    for src in sources:
        if not any(src.glob("*.json")):
            raise UserError(f"{src} holds no result files (*.json): nothing to merge from it")
    said, merged_files = [], {}
    names = sorted({p.name for src in sources for p in src.glob("*.json")})
    for name in names:
        merged = None
        for src in sources:
            path = src / name
            if not path.is_file():
                continue
            r = read_json(path, "merge")
            if name == "counterparts.json":
                r = stamped(r)
            if merged is None:
                merged = {**r, "commands": commands_of(r)}
                continue
            if any(r.get(k) != merged.get(k) for k in PROTOCOL):
                raise UserError(f"{path} has another protocol than the files before it: not merged")
            again = set(r.get("datasets", {})) & set(merged.get("datasets", {}))
            if again:
                what = "setups added or replaced" if name == "counterparts.json" else "taken"
                said.append(f"{name}: {sorted(again)} {what} from {src}")
            earlier = merged.get("datasets", {})
            merged["datasets"] = {
                **earlier,
                **{ds: joined(name, earlier.get(ds), d) for ds, d in r["datasets"].items()},
            }
            merged["commands"] += [c for c in commands_of(r) if c not in merged["commands"]]
            merged["runs"] = [
                *merged.get("runs", []),
                *(x for x in r.get("runs", []) if x not in merged.get("runs", [])),
            ]
        merged_files[name] = merged
        said.append(f"{name}: {sorted(merged.get('datasets', {}))}")
    into.mkdir(parents=True, exist_ok=True)
    for name, merged in merged_files.items():
        (into / name).write_text(json.dumps(merged, indent=1))
    for src in sources:  # plots, and the readings written by hand beside the figures
        for extra in [*src.glob("*.png"), *src.glob("reading_*.md")]:
            if extra.resolve() != (into / extra.name).resolve():
                shutil.copy(extra, into / extra.name)
    return said


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", type=Path, nargs="+")
    ap.add_argument("--into", type=Path, default=Path("docs/results"))
    a = ap.parse_args(argv)
    for line in merge(a.sources, a.into):
        print(line)


if __name__ == "__main__":
    run_main(main)
