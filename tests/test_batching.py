"""Batches do not depend on storage: one plan per append (length-sorted, a token budget, a padding
cap), shards cut at batch boundaries, the plan kept in a small binary file, the disk checked first."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmembed.cache.format import CacheRootError
from llmembed.cache.root import Cache
from llmembed.cache.writer import EntryWriter
from llmembed.extract.backbones import BackboneInfo, Source
from llmembed.extract.batching import cut_shards, plan_batches
from llmembed.extract.pipeline import extract
from llmembed.extract.plan import resolve_poolings
from tests.conftest import file_overrides, sentences, write_csv


def test_batches_fill_the_budget_and_cap_the_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=2000)
    batches = plan_batches(lengths, budget=1024, max_padding=0.05)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(2000))  # every text once
    for b in batches:
        width, real = lengths[b].max(), lengths[b].sum()
        assert len(b) * width <= 1024 or len(b) == 1
        assert len(b) * width - real <= 0.05 * len(b) * width  # padding within the cap
    sorted_lengths = lengths[rows]
    assert (np.diff(sorted_lengths) <= 0).all()  # longest first, across the whole append
    # Without a cap the same budget pads more: the cap is what keeps batches tight.
    loose = plan_batches(lengths, budget=1 << 20, max_padding=1.0)
    tight = plan_batches(lengths, budget=1 << 20, max_padding=0.05)

    def padded(bs):
        return sum(len(b) * lengths[b].max() for b in bs)

    assert padded(tight) <= 1.06 * lengths.sum() < padded(loose)


def test_shards_are_cut_at_batch_boundaries():
    assert cut_shards([4, 4, 4, 4, 4], shard_rows=8) == [[0, 1], [2, 3], [4]]
    assert cut_shards([10, 1, 1], shard_rows=4) == [[0], [1, 2]]  # a big batch is its own shard


def _cfg(root, data, model, *extra):
    from hydra import compose, initialize_config_module

    overrides = file_overrides(root, data, model, "extract.token_budget=64", *extra)
    with initialize_config_module("llmembed.conf", version_base=None):
        return compose("extract", overrides=overrides)


@pytest.fixture
def many_csv(tmp_path):
    return write_csv(tmp_path / "many.csv", sentences(120, seed=7))


def test_forward_batches_and_stored_values_do_not_depend_on_the_shard_size(
    tmp_path, tiny_llama, many_csv, forward_calls
):
    """The same forward calls, of the same texts, whatever `shard_mb` (here 0.002, i.e. a few rows,
    against 1024, i.e. one shard); stored values bitwise equal on the CPU."""
    small = extract(_cfg(tmp_path / "small", many_csv, tiny_llama, "extract.shard_mb=0.002"))
    small_calls = list(forward_calls)
    forward_calls.clear()
    large = extract(_cfg(tmp_path / "large", many_csv, tiny_llama, "extract.shard_mb=1024"))
    assert len(small.entry.shards()) >= 5 and len(large.entry.shards()) == 1
    assert forward_calls == small_calls  # batch for batch the same sizes
    assert small.stats.padded_tokens == large.stats.padded_tokens
    layers = list(small.entry.manifest.layers)
    for pooling in ("mean", "last"):
        np.testing.assert_array_equal(
            small.read(pooling, layers), large.read(pooling, layers), err_msg=pooling
        )


def test_the_plan_is_binary_and_small_and_resumes_with_its_batches(
    tmp_path, tiny_llama, many_csv, monkeypatch
):
    """A killed append leaves its plan (32 bytes a text plus a small header, not 73 bytes of JSON);
    the resumed run computes the rest with the recorded batches, whatever the budget is then."""
    real = EntryWriter.write_shard

    def die_on_third(self, index, **kw):
        if index == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(self, index, **kw)

    monkeypatch.setattr(EntryWriter, "write_shard", die_on_third)
    with pytest.raises(KeyboardInterrupt):
        extract(_cfg(tmp_path / "c", many_csv, tiny_llama, "extract.shard_mb=0.002"))
    monkeypatch.setattr(EntryWriter, "write_shard", real)
    (entry,) = Cache(tmp_path / "c").entries()
    plan = EntryWriter(entry, key=entry.key).pending()
    size = (entry.path / "pending.h5").stat().st_size
    assert sum(s.rows for s in plan) == 120 and size < 32 * 120 + 16384
    # Resumed with another token budget: the plan's batches are replayed, not the budget's.
    resumed = extract(
        _cfg(
            tmp_path / "c",
            many_csv,
            tiny_llama,
            "extract.shard_mb=0.002",
            "extract.token_budget=16",
        )
    )
    reference = extract(_cfg(tmp_path / "ref", many_csv, tiny_llama, "extract.shard_mb=0.002"))
    layers = list(reference.entry.manifest.layers)
    for pooling in ("mean", "last"):
        np.testing.assert_array_equal(
            resumed.read(pooling, layers), reference.read(pooling, layers)
        )
    index_files = list(resumed.entry.path.glob("index-*.h5"))
    assert len(index_files) == 1 and index_files[0].stat().st_size < 48 * 120 + 16384


def test_an_append_the_disk_cannot_hold_is_refused_before_the_model_loads(
    tmp_path, tiny_llama, many_csv, monkeypatch, count_loads
):
    real = shutil.disk_usage
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: real(p)._replace(free=1000)
    )  # 1,000 bytes free
    with pytest.raises(CacheRootError, match=r"needs .* more for 120 texts, but the disk .* free"):
        extract(_cfg(tmp_path / "c", many_csv, tiny_llama))
    assert count_loads == []


def test_the_size_is_said_before_the_first_forward(tmp_path, tiny_llama, many_csv):
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "llmembed-extract"),
         *file_overrides(tmp_path / "c", many_csv, tiny_llama)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "120 texts to compute: the entry grows by" in proc.stderr + proc.stdout


def test_poolings_all_leaves_out_the_first_token_of_a_decoder():
    def info(causal, constant_first=False):
        return BackboneInfo(
            source=Source("local", "/x"),
            identity={},
            model_type="m",
            num_layers=2,
            hidden_size=8,
            max_positions=None,
            poolings=("mean", "last") if constant_first else ("mean", "last", "first"),
            constant_first=constant_first,
            causal=causal,
        )

    assert resolve_poolings("all", info(causal=True), "dec") == ["mean", "last"]
    assert resolve_poolings(["first"], info(causal=True), "dec") == ["first"]  # by name: allowed
    assert resolve_poolings("all", info(causal=False), "enc") == ["mean", "last", "first"]


def test_a_large_append_is_planned_and_committed_window_by_window(
    tmp_path, tiny_llama, many_csv, monkeypatch
):
    """The plan's memory is bounded: an append is planned and committed in windows (a million texts;
    here 50), each with its own hash index, so a kill loses at most one window's unfinished work."""
    import llmembed.extract.pipeline as pipeline
    from llmembed.cache.maintenance import verify_entry

    monkeypatch.setattr(pipeline, "WINDOW", 50)
    res = extract(_cfg(tmp_path / "c", many_csv, tiny_llama))
    m = res.entry.manifest
    assert m.rows == 120 and len(m.indexes) == 3 and len(m.extractions) == 3
    assert [e["rows_computed"] for e in m.extractions] == [50, 50, 20]
    assert verify_entry(res.entry) == []
    whole = extract(_cfg(tmp_path / "one", many_csv, tiny_llama))
    layers = list(m.layers)
    # Other batches, float32 compute: the same numbers up to a float16 rounding step.
    np.testing.assert_allclose(
        res.read("mean", layers), whole.read("mean", layers), rtol=2e-3, atol=2e-3
    )


def test_out_of_memory_lowers_the_budget_once_for_the_rest_of_the_run(
    tmp_path, tiny_llama, many_csv, monkeypatch
):
    """A device that holds 40 padded tokens against a plan of 64: one out-of-memory, then every
    later batch is cut to the new cap before it runs, and the new batches are recorded."""
    import torch

    from llmembed.extract.embedder import Extractor

    real = Extractor.forward
    calls = []

    def small_device(self, ids, mask):
        calls.append(ids.numel())
        if ids.numel() > 40:
            raise torch.OutOfMemoryError("simulated")
        return real(self, ids, mask)

    monkeypatch.setattr(Extractor, "forward", small_device)
    res = extract(_cfg(tmp_path / "c", many_csv, tiny_llama, "extract.shard_mb=0.002"))
    record = res.entry.manifest.extractions[-1]
    assert record["oom_retries"] == 1 and sum(c > 40 for c in calls) == 1
    assert record["replanned_batches"]  # the shards whose batches changed, with their batches
    reference = extract(_cfg(tmp_path / "ref", many_csv, tiny_llama, "extract.shard_mb=0.002"))
    layers = list(res.entry.manifest.layers)
    np.testing.assert_allclose(
        res.read("mean", layers), reference.read("mean", layers), rtol=2e-3, atol=2e-3
    )


def _loud_llama(src, dst, word):
    """The tiny Llama with one word's embedding at 1e7: texts holding it pool beyond float16."""
    import torch
    from transformers import AutoTokenizer, LlamaModel

    shutil.copytree(src, dst)
    model = LlamaModel.from_pretrained(dst)
    tok = AutoTokenizer.from_pretrained(dst)
    with torch.no_grad():
        model.embed_tokens.weight[tok.convert_tokens_to_ids(word)] = 1e7
    model.save_pretrained(dst)
    return dst


def test_a_shard_with_values_beyond_float16_stores_the_same_after_a_resume(
    tmp_path, tiny_llama, monkeypatch
):
    """The shard whose batch holds a loud text stores that pooling in float32 (the others stay
    float16), so a run killed right after it and resumed stores what an uninterrupted one does,
    and the manifest says float32 for that pooling."""
    import random

    from llmembed.cache.keys import text_hashes
    from tests.conftest import WORDS

    model = _loud_llama(tiny_llama, tmp_path / "loud", "scene")
    rng = random.Random(3)
    vocab = [w for w in WORDS if w != "scene"]
    rows = [
        (" ".join(rng.choice(vocab) for _ in range(rng.randint(2, 24))), "x") for _ in range(120)
    ]
    rows[5] = ("scene " + " ".join(["film"] * 19), "x")  # long: early in the length order
    data = write_csv(tmp_path / "d.csv", rows)
    ref = extract(_cfg(tmp_path / "ref", data, model, "extract.shard_mb=0.002"))
    idx = ref.entry.index()
    at = int(np.searchsorted(idx.sorted_hashes, text_hashes([rows[5][0]])[0]))
    loud = idx.shards[idx.shard_pos[at]]
    assert loud.wide == ("mean",) and ref.entry.manifest.poolings["mean"].dtype == "float32"
    assert sum(bool(s.wide) for s in ref.entry.shards()) == 1  # only that shard

    real = EntryWriter.write_shard

    def die(self, index, **kw):
        if index == loud.index + 1:
            raise KeyboardInterrupt("simulated kill")
        return real(self, index, **kw)

    monkeypatch.setattr(EntryWriter, "write_shard", die)
    with pytest.raises(KeyboardInterrupt):
        extract(_cfg(tmp_path / "c", data, model, "extract.shard_mb=0.002"))
    monkeypatch.setattr(EntryWriter, "write_shard", real)
    resumed = extract(_cfg(tmp_path / "c", data, model, "extract.shard_mb=0.002"))
    layers = list(ref.entry.manifest.layers)
    np.testing.assert_array_equal(ref.read("mean", layers), resumed.read("mean", layers))
    assert resumed.entry.manifest.poolings["mean"].dtype == "float32"
