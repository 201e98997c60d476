"""The command-line tools as a user runs them: Hydra multirun, strict config keys, ls, verify, gc."""

import json
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from llmembed.cache.cli import main as cache_main
from llmembed.cache.root import Cache
from llmembed.extract.pipeline import extract
from tests.conftest import (
    BIN,
    classify_tiny,
    make_tiny_bert,
    read_rows,
    run_cli,
    sentences,
    tiny_features,
    write_csv,
)


def test_multirun_fills_one_entry_per_dataset_and_backbone(
    tmp_path, tiny_llama, tiny_bert, data_csv
):
    other = write_csv(tmp_path / "other.csv", sentences(30, seed=5))
    root = tmp_path / "cache"
    args = [
        "llmembed-extract",
        "-m",
        "dataset=file",
        f"dataset.path={data_csv},{other}",
        "backbone=local",
        f"backbone.path={tiny_llama},{tiny_bert}",
        "extract.progress=false",
    ]
    first = run_cli(*args, cwd=tmp_path, root=root)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("extracted ") == 4
    # One entry per backbone: the second data set's texts are appended to it.
    assert len(Cache(root).entries()) == 2
    again = run_cli(*args, cwd=tmp_path, root=root)
    assert again.stdout.count("cache hit:") == 4

    listing = run_cli("llmembed-cache", "ls", cwd=tmp_path, root=root).stdout
    assert listing.count("complete") == 2 and "2 entries" in listing and " 90 " in listing
    assert "first,last,mean,pooler" in listing  # the BERT entries
    assert "0-3" in listing and "0-2" in listing  # all hidden states of each model


def test_misspelled_config_key_is_rejected(tmp_path):
    res = run_cli("llmembed-extract", "extract.tokn_budget=5", cwd=tmp_path, root=tmp_path / "c")
    assert res.returncode != 0 and "tokn_budget" in res.stderr


def test_cache_root_from_config_overrides_the_environment(make_cfg, tmp_path):
    cfg = make_cfg(f"cache.root={tmp_path / 'explicit'}")
    assert extract(cfg).entry.path.is_relative_to(tmp_path / "explicit")


def test_unwritable_cache_root_fails_before_any_work(make_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match=r"is not writable.*LLMEMBED_CACHE"):
        extract(make_cfg(f"cache.root={blocker / 'sub'}"))


def test_verify_finds_damage_and_repair_recomputes_only_that_shard(make_cfg, capsys):
    cfg = make_cfg("extract.shard_mb=0.01")
    res = extract(cfg)
    root = str(cfg.cache.root)
    assert cache_main(["--root", root, "verify"]) == 0
    shards = res.entry.shards()
    good = res.read("mean", [0, 3])
    victim = res.entry.path / shards[1].file
    with h5py.File(victim, "r+") as f:  # same size, different numbers: only the checksum can tell
        f["emb"]["mean"][0, 0, 0] += 1
    assert cache_main(["--root", root, "verify"]) == 1
    out = capsys.readouterr().out
    assert f"{victim}: checksum mismatch" in out and "verify --repair" in out
    assert cache_main(["--root", root, "verify", "--repair"]) == 0
    # The entry stays complete for the other texts; the damaged shard is dropped from it.
    assert not victim.exists() and res.entry.complete
    assert [s.index for s in res.entry.shards()] == [s.index for s in shards if s.index != 1]
    again = extract(cfg)
    assert not again.hit and again.stats.texts == shards[1].rows
    np.testing.assert_array_equal(again.read("mean", [0, 3]), good)


def test_gc_removes_incomplete_old_and_unused_entries_and_rm_one(make_cfg, tmp_path, capsys):
    import json

    from llmembed.cache.format import EntrySpec

    done = extract(make_cfg())
    root = str(make_cfg().cache.root)
    spec = EntrySpec({"x": 1}, "llama", "float32", "float16", 8, "right", "{text}")
    partial = Cache(root).prepare(spec, [0], ["mean"])
    old = Path(root) / ("cd" * 16)
    (old / "sel-x").mkdir(parents=True)
    (old / "spec.json").write_text(json.dumps({"format_version": 1}))
    cache_main(["--root", root, "ls"])
    out = capsys.readouterr().out
    assert "incomplete (0 shards, resumable)" in out and "old format" in out
    assert " data " in out and "float32/float16" in out  # the data set that used it, the settings
    assert cache_main(["--root", root, "gc", "--dry-run"]) == 0
    assert partial.path.exists() and old.exists()
    assert cache_main(["--root", root, "gc"]) == 0
    assert not partial.path.exists() and not old.exists() and done.entry.complete
    assert cache_main(["--root", root, "gc", "--older-than", "1"]) == 0
    assert done.entry.complete  # used just now
    assert cache_main(["--root", root, "gc", "--older-than", "0"]) == 0
    assert not done.entry.path.exists()
    again = extract(make_cfg())
    assert cache_main(["--root", root, "rm", str(again.entry.path.relative_to(root))]) == 0
    assert not again.entry.path.exists()
    assert cache_main(["--root", root, "rm", "nothing-such"]) == 1


def test_tiny_bert_helper_is_deterministic(tmp_path):
    a = make_tiny_bert(tmp_path / "a")
    b = make_tiny_bert(tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_classify_without_extraction_prints_the_extract_command(tmp_path, tiny_llama, data_csv):
    """The README's SLURM recipe: a CPU sweep over a cache a GPU job fills first."""
    args = [
        "llmembed-classify",
        "dataset=file",
        f"dataset.path={data_csv}",
        *tiny_features(tiny_llama),
        "extract_missing=false",
        "extract.progress=false",
    ]
    res = run_cli(*args, cwd=tmp_path, root=tmp_path / "cache")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "GlobalHydra" not in res.stderr
    command = res.stderr.split("make it with: ")[1].strip()
    assert command.startswith("llmembed-extract ") and f"backbone.path={tiny_llama}" in command
    filled = subprocess.run(
        command.replace("llmembed-extract", str(BIN / "llmembed-extract"), 1),
        shell=True,
        cwd=tmp_path,
        env={**os.environ, "LLMEMBED_CACHE": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
    )
    assert filled.returncode == 0, filled.stderr
    again = run_cli(*args, cwd=tmp_path, root=tmp_path / "cache")
    assert again.returncode == 0 and "test accuracy" in again.stdout
    # Each CLI's Hydra log file is named after the CLI.
    assert list(tmp_path.glob("outputs/classify/*/*/llmembed-classify.log"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["llmembed-extract", "dataset=file", "dataset.path=missing.csv"], "missing.csv"),
        (["llmembed-extract", "backbone=local", "backbone.path=./nowhere"], "does not exist"),
        (  # neither a folder here nor a hub id (owner/name): not sent to the hub
            ["llmembed-extract", "backbone=local", "backbone.path=runs/run1/final"],
            "model path runs/run1/final does not exist",
        ),
        (["llmembed-classify", "head=logreg", "features.fusion=cooccurrence"], "paper's head"),
        (["llmembed-classify", "seeds=oops"], "seeds must be a list of integers"),
        (["llmembed-classify", "seeds=[0,-1]"], "seeds must be a list of integers, 0 or more"),
        (["llmembed-predict", ".", "texts.txt"], "not a saved llmembed model"),
        (["llmembed-cache", "--root", "{root}/x/file", "gc"], "not a directory"),
        (["llmembed-cache", "gc", "--older-than", "-5"], "--older-than -5: give a number of days"),
        (
            ["llmembed-cache", "gc", "--older-than", "nan"],
            "--older-than nan: give a number of days",
        ),
    ],
)
def test_expected_errors_print_one_message_without_a_traceback(tmp_path, args, message):
    (tmp_path / "texts.txt").write_text("a text\n")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("")
    args = [a.replace("{root}", str(tmp_path)) for a in args]
    res = run_cli(*args, cwd=tmp_path, root=tmp_path / "cache")
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and message in res.stderr, res.stderr
    assert res.stderr.startswith(f"{args[0]}: error: "), res.stderr


def test_names_cannot_place_sweep_folders_outside_the_sweep(tmp_path, tiny_llama, data_csv):
    sweep = tmp_path / "runs" / "sweep"
    res = run_cli(
        "llmembed-extract",
        "-m",
        "dataset=file",
        f"dataset.path={data_csv}",
        "dataset.name=/../../outside/X",
        "backbone=local",
        f"backbone.path={tiny_llama}",
        "extract.progress=false",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        root=tmp_path / "cache",
    )
    assert res.returncode == 0, res.stderr
    jobs = [p.name for p in sweep.iterdir() if p.is_dir()]
    assert jobs == ["0__.._.._outside_X_local"], jobs
    assert not (tmp_path / "outside").exists() and not (tmp_path / "runs" / "outside").exists()


def _incomplete(root, key="ef" * 16):
    """A key folder of this format with one incomplete selection (as a killed first run leaves)."""
    from llmembed.cache.format import EntrySpec

    spec = EntrySpec({"x": key}, "llama", "float32", "float16", 8, "right", "{text}")
    return Cache(root).prepare(spec, [0], ["mean"])


def test_gc_dry_run_creates_nothing(make_cfg, tmp_path):
    import json

    root = tmp_path / "root"
    partial = _incomplete(root)
    old = root / ("cd" * 16)
    (old / "sel-x").mkdir(parents=True)
    (old / "spec.json").write_text(json.dumps({"format_version": 1}))
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert cache_main(["--root", str(root), "gc", "--dry-run"]) == 0
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # no .lock anywhere
    assert partial.path.exists() and old.exists()


def test_gc_never_follows_a_linked_key_or_selection_folder(tmp_path, capsys):
    root = tmp_path / "root"
    mine = _incomplete(root, "aa" * 16)
    # Outside the root: what looks like a key with an incomplete entry, and a plain folder.
    elsewhere = tmp_path / "elsewhere"
    looks_like = _incomplete(elsewhere, "bb" * 16)
    victim_dir = tmp_path / "victim"
    (victim_dir / "sub").mkdir(parents=True)
    (victim_dir / "sub" / "data.txt").write_text("precious")
    key_link = root / ("bb" * 16)
    key_link.symlink_to(looks_like.path.parent, target_is_directory=True)
    sel_link = mine.path.parent / "sel-000000000000"
    sel_link.symlink_to(victim_dir, target_is_directory=True)
    # A folder of someone's own under the root, not named as a key: not the cache's to report.
    (root / "project").mkdir()
    (root / "project" / "data").symlink_to(victim_dir, target_is_directory=True)
    outside_before = sorted(str(p) for p in tmp_path.rglob("*") if not p.is_relative_to(root))
    for args in (["gc", "--dry-run"], ["gc"], ["gc", "--older-than", "0"], ["ls"], ["verify"]):
        assert cache_main(["--root", str(root), *args]) in (0, 1)  # no traceback
        out = capsys.readouterr().out
        assert f"{key_link}: a symbolic link" in out and f"{sel_link}: a symbolic link" in out
        assert "project" not in out
    assert sorted(str(p) for p in tmp_path.rglob("*") if not p.is_relative_to(root)) == (
        outside_before
    )
    assert looks_like.path.is_dir() and (victim_dir / "sub" / "data.txt").read_text() == "precious"
    assert not (looks_like.path.parent / ".lock").exists() and not (victim_dir / ".lock").exists()
    assert key_link.is_symlink() and sel_link.is_symlink()  # reported, left for the user


def test_gc_decides_again_under_the_lock(make_cfg, monkeypatch):
    """A job that completes the entry between gc's look and gc's lock keeps its entry."""
    import llmembed.cache.maintenance as maintenance

    done = extract(make_cfg())
    manifest = done.entry.manifest_path
    hidden = manifest.with_name("manifest.json.hidden")
    manifest.rename(hidden)  # incomplete when gc looks
    real = maintenance._holding

    def finishing_meanwhile(kdir, *, wait):
        hidden.rename(manifest)  # the job writes its manifest just before gc takes the lock
        return real(kdir, wait=wait)

    monkeypatch.setattr(maintenance, "_holding", finishing_meanwhile)
    assert cache_main(["--root", str(make_cfg().cache.root), "gc"]) == 0
    assert done.entry.complete and done.entry.path.is_dir()
    assert extract(make_cfg()).hit


def test_gc_leaves_the_temporary_file_of_a_running_job(make_cfg):
    from llmembed.cache.root import Cache as C

    done = extract(make_cfg())
    root = make_cfg().cache.root
    tmp = done.entry.path / ".shard-00009.h5.0123456789abcdef.tmp"
    tmp.write_bytes(b"being written")
    with C(root).lock(done.entry.key):  # a running job holds the key
        assert cache_main(["--root", str(root), "gc"]) == 0
        assert tmp.exists()
    assert cache_main(["--root", str(root), "gc"]) == 0
    assert not tmp.exists()


def test_ls_json_gives_one_object_per_entry(make_cfg, capsys):
    res = extract(make_cfg())
    root = str(make_cfg().cache.root)
    assert cache_main(["--root", root, "ls", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1 and rows[0]["path"] == str(res.entry.path)
    assert rows[0]["rows"] == 60 and rows[0]["status"] == "complete"


def test_no_progress_bars_when_output_is_not_a_terminal(tmp_path, tiny_llama, data_csv):
    res = run_cli(
        "llmembed-extract",
        "dataset=file",
        f"dataset.path={data_csv}",
        "backbone=local",
        f"backbone.path={tiny_llama}",
        cwd=tmp_path,
        root=tmp_path / "cache",
    )
    assert res.returncode == 0, res.stderr
    assert "text/s" not in res.stderr and "extracted " in res.stdout
    assert "Loading weights" not in res.stderr  # nor transformers' own bars


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_export_writes_chosen_layers_joined_to_the_data_set(make_cfg, data_csv, tmp_path, fmt):
    res = extract(make_cfg())
    root = make_cfg().cache.root
    name = str(res.entry.path.relative_to(root))
    out = tmp_path / f"export-{fmt}"
    args = ["llmembed-cache", "--root", str(root), "export", name, "--layers", "1", "-1"]
    done = run_cli(
        *args,
        "--out",
        str(out),
        "--format",
        fmt,
        "--data",
        str(data_csv),
        cwd=tmp_path,
        root=root,
    )
    assert done.returncode == 0, done.stderr
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(out).to_pydict()
    else:
        from datasets import load_from_disk

        table = load_from_disk(str(out)).to_dict()
    texts = [r["text"] for r in read_rows(data_csv)]
    assert table["text"] == texts and set(table["split"]) == {"train", "validation", "test"}
    assert list(table) == ["text_sha256", "row_id", "text", "label", "split", "L1", "L3"]
    np.testing.assert_array_equal(np.array(table["L3"], np.float32), res.read("mean", [3])[:, 0])
    again = run_cli(*args, "--out", str(out), cwd=tmp_path, root=root)  # never overwrites
    assert again.returncode == 2 and "exists" in again.stderr
    bad = run_cli(
        *args[:-2], "--layers", "9", "--out", str(tmp_path / "x"), cwd=tmp_path, root=root
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_an_empty_cache_root_is_refused_not_taken_for_the_current_folder(
    tmp_path, tiny_llama, data_csv
):
    """LLMEMBED_CACHE set but empty read as a path is the current folder, which `gc` would then
    clean: every command refuses it, and so does cache.root=null."""
    empty = {"LLMEMBED_CACHE": ""}
    for args in (["llmembed-cache", "ls"], ["llmembed-predict", "no/model", "x.txt"]):
        res = run_cli(*args, cwd=tmp_path, root=tmp_path, env=empty)
        assert res.returncode == 2 and "the cache root is empty" in res.stderr, res.stderr
    for extra, env in (([], empty), (["cache.root=null"], {})):
        res = classify_tiny(tmp_path, tiny_llama, data_csv, *extra, env=env)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert "the cache root is " in res.stderr and "unset LLMEMBED_CACHE" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "outputs") == [data_csv.name]


def test_gc_takes_only_key_folders_for_cache_entries(tmp_path):
    """A root set by mistake to a project folder: its own folders holding a spec.json are not
    old-format keys, and gc leaves them."""
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "spec.json").write_text('{"openapi": "3.0.0"}')
    old = tmp_path / ("ab" * 16)  # a key of a cache format this llmembed does not read
    old.mkdir()
    (old / "spec.json").write_text('{"format_version": 1}')
    assert cache_main(["--root", str(tmp_path), "gc"]) == 0
    assert (tmp_path / "api" / "spec.json").is_file() and not old.exists()
