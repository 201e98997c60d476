"""The extraction pipeline on tiny models: cache keys, hits, coverage, resume, locking, truncation."""

import json
import logging

import numpy as np
import pytest
import torch
from transformers import AutoModel

import llmembed.extract.pipeline as pipeline
from llmembed.cache.store import Cache, CacheError
from llmembed.extract.pipeline import ConfigError, extract, resolve_dtype
from tests.conftest import make_tiny_llama, sentences, write_csv


@pytest.fixture
def count_loads(monkeypatch):
    """Count model loads: the one expensive step a cache hit must skip."""
    calls = []
    real = pipeline.load_model

    def counting(*args, **kwargs):
        calls.append(kwargs["depth"])
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "load_model", counting)
    return calls


def test_entry_holds_every_layer_and_pooling_in_dataset_order(make_cfg, tiny_llama, data_csv):
    res = extract(make_cfg("extract.store_dtype=float32"))
    assert not res.hit and res.stats.texts == 60
    m = res.entry.manifest
    assert m["layers"] == [0, 1, 2, 3] and sorted(m["poolings"]) == [
        "last",
        "mean",
    ]  # no BOS "first"
    assert m["rows"] == 60 and m["dataset"]["label_names"] == ["neg", "pos"]
    assert sum(m["dataset"]["splits"].values()) == 60 and m["dataset"]["splits"]["test"] == 12

    row_id, label = res.entry.column("row_id"), res.entry.column("label")
    np.testing.assert_array_equal(row_id, np.arange(60))  # file line order
    rows = sentences(60)
    np.testing.assert_array_equal(label, [r[1] == "pos" for r in rows])

    # Row 7 against the model run on that text alone: labels and embeddings line up after sorting.
    model = AutoModel.from_pretrained(tiny_llama).eval()
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_llama)(rows[7][0], return_tensors="pt")
    with torch.inference_mode():
        hs = model(**ids, output_hidden_states=True).hidden_states
    mean = res.entry.read("mean", [3, 1])
    assert mean.shape == (60, 2, 32) and mean.dtype == np.float32
    np.testing.assert_allclose(mean[7, 0], hs[3][0].mean(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(mean[7, 1], hs[1][0].mean(0).numpy(), atol=1e-5)


def test_second_run_is_a_hit_without_loading_the_model(make_cfg, count_loads):
    first = extract(make_cfg())
    second = extract(make_cfg())
    assert len(count_loads) == 1 and second.hit
    assert second.entry.path == first.entry.path
    np.testing.assert_array_equal(first.entry.read("last", [2]), second.entry.read("last", [2]))


KEYED = [
    "extract.max_length=7",
    "extract.prompt='Review: {text}'",
    "extract.truncation_side=left",
    "extract.store_dtype=float32",
    "extract.dtype=bfloat16",
    "dataset.seed=1",  # another split
    "dataset.test_size=0.3",
    "dataset.limit=40",
]
UNKEYED = [
    "extract.token_budget=7",
    "backbone.padding_side=left",
    "extract.shard_mb=0.001",
    "extract.progress=true",
    "backbone.name=renamed",
    "dataset.name=renamed",
    "extract.layers=[0,3]",
    "extract.poolings=[mean]",
]


@pytest.mark.parametrize("override", KEYED)
def test_changing_a_keyed_field_makes_a_new_entry(make_cfg, override):
    base = extract(make_cfg())
    changed = extract(make_cfg(override))
    assert not changed.hit and changed.entry.key != base.entry.key


@pytest.mark.parametrize("override", UNKEYED)
def test_changing_an_unkeyed_field_is_a_hit(make_cfg, override):
    extract(make_cfg())
    again = extract(make_cfg(override))
    assert again.hit, override


@pytest.mark.parametrize("made", ["float32", "bfloat16"])
def test_dtype_auto_reads_an_entry_of_either_dtype(make_cfg, count_loads, made, caplog):
    """A GPU job's bfloat16 entry serves a CPU sweep with `dtype: auto`, and the other way round;
    the log says when the served entry's dtype is not the one this machine would compute."""
    first = extract(make_cfg(f"extract.dtype={made}"))
    with caplog.at_level(logging.INFO, logger="llmembed"):
        again = extract(make_cfg("extract.dtype=auto"), allow_extract=False)
    assert again.hit and again.entry.path == first.entry.path and len(count_loads) == 1
    assert again.entry.spec["compute_dtype"] == made
    own = resolve_dtype("auto", "cpu")
    said = f"serving the entry computed in {made} (this machine would compute {own})"
    assert (said in caplog.text) == (made != own), caplog.text


@pytest.mark.parametrize("avx512_bf16", [True, False])
def test_dtype_auto_is_bfloat16_where_the_cpu_has_it(monkeypatch, avx512_bf16):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert pipeline.resolve_dtype("auto", "cpu") == ("bfloat16" if avx512_bf16 else "float32")
    assert pipeline.resolve_dtype("auto", "cuda:0") == "bfloat16"
    assert pipeline.resolve_dtype("float32", "cuda:0") == "float32"


def test_data_weights_and_tokenizer_are_keyed(make_cfg, tmp_path):
    base = extract(make_cfg())
    rows = sentences(60)
    rows[5] = (rows[5][0] + " good", rows[5][1])  # one text changed
    other_text = write_csv(tmp_path / "t.csv", rows)
    rows = sentences(60)
    rows[5] = (rows[5][0], "pos" if rows[5][1] == "neg" else "neg")  # one label changed
    other_label = write_csv(tmp_path / "l.csv", rows)
    other_weights = make_tiny_llama(tmp_path / "llama-seed1", seed=1)
    # Same weights, a tokenizer that adds no BOS token: other ids, other numbers.
    other_tok = make_tiny_llama(tmp_path / "llama-nobos", seed=0)
    spec = json.loads((other_tok / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (other_tok / "tokenizer.json").write_text(json.dumps(spec))
    keys = {base.entry.key}
    for override in (
        f"dataset.path={other_text}",
        f"dataset.path={other_label}",
        f"backbone.path={other_weights}",
        f"backbone.path={other_tok}",
        f"backbone.tokenizer={other_tok}",
    ):
        res = extract(make_cfg(override))
        assert not res.hit and res.entry.key not in keys, override
        keys.add(res.entry.key)


def test_a_full_entry_serves_narrower_requests_but_not_wider_ones(make_cfg, count_loads):
    narrow = extract(make_cfg("extract.layers=[1,-1]", "extract.poolings=[mean]"))
    assert narrow.entry.manifest["layers"] == [1, 3]
    wide = extract(make_cfg())  # needs layers and poolings the narrow entry lacks
    assert not wide.hit and wide.entry.path != narrow.entry.path
    again = extract(make_cfg("extract.layers=[0,2]", "extract.poolings=[last]"))
    assert again.hit and again.entry.path == wide.entry.path
    assert count_loads == [3, 3]


def test_a_cut_model_gives_the_full_models_hidden_states(make_cfg, count_loads):
    full = extract(make_cfg("extract.store_dtype=float32"))
    assert extract(make_cfg("extract.store_dtype=float32", "extract.layers=[1]")).hit
    fresh = extract(
        make_cfg(
            "extract.store_dtype=float32",
            "extract.layers=[1]",
            "extract.poolings=[mean]",
            f"cache.root={full.entry.path.parents[2] / 'fresh'}",
        )
    )
    assert count_loads == [3, 1]  # the second load built only the first layer
    np.testing.assert_allclose(
        fresh.entry.read("mean", [1]), full.entry.read("mean", [1]), atol=1e-6
    )


def test_a_killed_run_resumes_with_only_the_missing_shards(make_cfg, monkeypatch):
    reference = extract(
        make_cfg("extract.shard_mb=0.01", "cache.root=" + str(make_cfg().cache.root) + "-ref")
    )
    assert len(reference.entry.shards()) >= 3

    from llmembed.cache.store import EntryWriter

    real = EntryWriter.write_shard

    def crash_on_third(self, index, **kw):
        if index == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(self, index, **kw)

    monkeypatch.setattr(EntryWriter, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        extract(make_cfg("extract.shard_mb=0.01"))
    monkeypatch.setattr(EntryWriter, "write_shard", real)
    plan = json.loads((Cache(make_cfg().cache.root).entries()[0].path / "plan.json").read_text())
    resumed = extract(make_cfg("extract.shard_mb=0.01"))
    done_before = sum(b - a for a, b in plan["shards"][:2])
    assert resumed.stats.texts == 60 - done_before
    for pooling in ("mean", "last"):
        np.testing.assert_array_equal(
            resumed.entry.read(pooling, [0, 1, 2, 3]), reference.entry.read(pooling, [0, 1, 2, 3])
        )


def test_bad_settings_fail_before_loading_the_model(make_cfg, count_loads):
    with pytest.raises(ConfigError, match=r"layers \[9\] requested but .* has hidden states 0-3"):
        extract(make_cfg("extract.layers=[0,9]"))
    with pytest.raises(ConfigError, match=r"pooling \['pooler'\] is not available"):
        extract(make_cfg("extract.poolings=[pooler]"))
    with pytest.raises(ConfigError, match="must contain"):
        extract(make_cfg("extract.prompt=no-placeholder"))
    assert count_loads == []


def test_pooler_is_stored_for_an_encoder(make_cfg, tiny_bert):
    res = extract(make_cfg(f"backbone.path={tiny_bert}"))
    m = res.entry.manifest
    assert m["poolings"]["pooler"]["layers"] == [2]
    assert res.entry.read("pooler", [2]).shape == (60, 1, 32)
    with pytest.raises(KeyError, match="layers \\[1\\] are not stored for 'pooler'"):
        res.entry.read("pooler", [1])


def test_damaged_shard_is_reported_with_its_file(make_cfg):
    res = extract(make_cfg())
    shard = res.entry.path / res.entry.shards()[0].file
    shard.write_bytes(b"not hdf5")
    with pytest.raises(CacheError, match=f"{shard}.*verify --repair"):
        res.entry.read("mean", [0])
