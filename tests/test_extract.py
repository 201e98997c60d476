"""The extraction pipeline on tiny models: cache keys, hits, coverage, resume, locking, truncation."""

import json
import logging

import h5py
import numpy as np
import pytest
import torch
from transformers import AutoModel

import llmembed.extract.plan as plan
from llmembed.cache.format import CacheError
from llmembed.cache.root import Cache
from llmembed.extract.pipeline import extract
from llmembed.extract.plan import ConfigError, resolve_dtype
from tests.conftest import make_tiny_llama, sentences, write_csv


def test_entry_holds_every_layer_and_pooling_and_no_data_set_columns(make_cfg, tiny_llama):
    res = extract(make_cfg("extract.store_dtype=float32"))
    assert not res.hit and res.stats.texts == 60
    m = res.entry.manifest
    assert m.layers == (0, 1, 2, 3) and sorted(m.poolings) == ["last", "mean"]  # no BOS "first"
    assert m.rows == 60 and m.poolings["mean"].dtype == "float32"
    with h5py.File(res.entry.path / m.shards[0].file, "r") as f:
        # Labels, splits and ids belong to the data set, never to the entry.
        assert set(f) == {"emb", "text_sha256"} and f["text_sha256"].shape[1] == 32
        assert f.attrs["key"] == res.entry.key and f.attrs["index"] == 0
    rows = sentences(60)

    # Row 7 against the model run on that text alone: labels and embeddings line up after sorting.
    model = AutoModel.from_pretrained(tiny_llama).eval()
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_llama)(rows[7][0], return_tensors="pt")
    with torch.inference_mode():
        hs = model(**ids, output_hidden_states=True).hidden_states
    mean = res.read("mean", [3, 1])  # the request's rows, in its order
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
]
UNKEYED = [
    "dataset.seed=1",  # another split: the data set's business, not the entry's
    "dataset.test_size=0.3",
    "dataset.limit=40",
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
    assert again.entry.spec.compute_dtype == made
    own = resolve_dtype("auto", "cpu")
    said = f"serving the entry computed in {made} (this machine would compute {own})"
    assert (said in caplog.text) == (made != own), caplog.text


@pytest.mark.parametrize("flags", [{"avx512_bf16"}, {"amx_tile"}, {"avx512f"}, None])
def test_dtype_auto_is_bfloat16_where_the_cpu_has_it(monkeypatch, flags):
    """The CPU's flags from /proc/cpuinfo where it exists (no torch import), else torch's checks."""
    has = flags is not None and bool(flags & {"avx512_bf16", "amx_tile"})
    monkeypatch.setattr(plan, "cpu_flags", lambda: None if flags is None else frozenset(flags))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: flags is None)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    want = "bfloat16" if has or flags is None else "float32"
    assert plan.resolve_dtype("auto", "cpu") == want
    assert plan.resolve_dtype("auto", "cuda:0") == "bfloat16"
    assert plan.resolve_dtype("float32", "cuda:0") == "float32"


def test_the_cpu_flags_agree_with_torch_on_this_machine():
    plan.cpu_flags.cache_clear()
    flags = plan.cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo here")
    assert ("avx512_bf16" in flags) == torch.cpu._is_avx512_bf16_supported()
    assert ("amx_tile" in flags) == torch.cpu._is_amx_tile_supported()


@pytest.mark.parametrize("gpu_host", [False, True], ids=["cpu host", "gpu host"])
def test_a_cache_hit_imports_neither_torch_nor_transformers_nor_scikit_learn(
    tmp_path, data_csv, gpu_host
):
    """What a hit needs (the data set's texts, the backbone's remembered facts, the entry's index)
    is read without the heavy imports: a hit is a sub-second process, not a 4-second one. On a
    host where a GPU's driver shows, `auto` is decided without torch or CUDA too."""
    import subprocess
    import sys

    from tests.conftest import file_overrides, make_tiny_llama

    model = make_tiny_llama(tmp_path / "m")
    device = ["extract.device=auto", "extract.dtype=auto"] if gpu_host else ["extract.device=cpu"]
    args = file_overrides(tmp_path / "c", data_csv, model, *device)
    code = (
        "import sys\n"
        + ("import llmembed.extract.plan as p\np.gpu_hints = lambda: True\n" if gpu_host else "")
        + "sys.argv = ['llmembed-extract', *sys.argv[1:]]\n"
        "from llmembed.extract.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(sorted(m for m in ('torch', 'transformers', 'sklearn', 'accelerate') "
        "if m in sys.modules))\n"
    )
    run = [sys.executable, "-c", code, *args]
    first = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "torch" in first.stdout  # a miss computes
    hit = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert hit.returncode == 0 and "cache hit" in hit.stdout, hit.stderr
    assert hit.stdout.strip().splitlines()[-1] == "[]", hit.stdout


def test_weights_and_tokenizer_are_keyed_but_not_the_data(make_cfg, tmp_path, forward_calls):
    base = extract(make_cfg())
    rows = sentences(60)
    rows[5] = (rows[5][0] + " good", rows[5][1])  # one text changed
    other_text = write_csv(tmp_path / "t.csv", rows)
    rows = sentences(60)
    rows[5] = (rows[5][0], "pos" if rows[5][1] == "neg" else "neg")  # one label changed
    other_label = write_csv(tmp_path / "l.csv", rows)
    forward_calls.clear()
    changed = extract(make_cfg(f"dataset.path={other_text}"))
    assert changed.entry.key == base.entry.key and changed.stats.texts == 1
    assert sum(forward_calls) == 1  # only the changed text ran
    relabelled = extract(make_cfg(f"dataset.path={other_label}"))
    assert relabelled.hit and sum(forward_calls) == 1
    other_weights = make_tiny_llama(tmp_path / "llama-seed1", seed=1)
    # Same weights, a tokenizer that adds no BOS token: other ids, other numbers.
    other_tok = make_tiny_llama(tmp_path / "llama-nobos", seed=0)
    spec = json.loads((other_tok / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (other_tok / "tokenizer.json").write_text(json.dumps(spec))
    keys = {base.entry.key}
    for override in (
        f"backbone.path={other_weights}",
        f"backbone.path={other_tok}",
        f"backbone.tokenizer={other_tok}",
    ):
        res = extract(make_cfg(override))
        assert not res.hit and res.entry.key not in keys, override
        keys.add(res.entry.key)


def test_new_splits_subsets_relabelled_and_extended_files_run_only_new_texts(
    make_cfg, tmp_path, forward_calls
):
    """The issue's measure: after a full extraction, another seed, test size, limit or a relabelled
    copy run the model on no text; a copy with 10 extra rows on exactly those 10."""
    rows = sentences(60)
    full = extract(make_cfg())
    assert sum(forward_calls) == 60
    reference = full.read("mean", [0, 3])
    relabelled = write_csv(tmp_path / "relabelled.csv", [(t, "x" + y) for t, y in rows])
    extra = sentences(70, seed=11)[:10]
    extended = write_csv(tmp_path / "extended.csv", rows + extra)
    runs = {}
    for name, override in [
        ("seed", "dataset.seed=1"),
        ("test_size", "dataset.test_size=0.3"),
        ("limit", "dataset.limit=40"),
        ("relabelled", f"dataset.path={relabelled}"),
        ("extended", f"dataset.path={extended}"),
    ]:
        before = len(forward_calls), sum(forward_calls)
        res = extract(make_cfg(override))
        runs[name] = (res.stats.texts, sum(forward_calls) - before[1])
        assert res.entry.path == full.entry.path  # one entry serves them all
    assert runs == {
        "seed": (0, 0),
        "test_size": (0, 0),
        "limit": (0, 0),
        "relabelled": (0, 0),
        "extended": (10, 10),
    }
    m = full.entry.manifest
    assert m.rows == 70 and len(m.extractions) == 2 and m.extractions[1]["rows_computed"] == 10
    # The first 60 rows of the extended file read the very numbers of the first extraction.
    np.testing.assert_array_equal(
        extract(make_cfg(f"dataset.path={extended}")).read("mean", [0, 3])[:60], reference
    )
    # Each data set named after its file (data.csv, relabelled.csv, extended.csv).
    assert {"data", "relabelled", "extended"} == set(full.entry.usage.datasets)


def test_a_plain_list_of_texts_and_duplicates_are_served_by_text(make_cfg, forward_calls):
    from llmembed.extract.pipeline import extract_texts
    from llmembed.extract.plan import plan_from_config

    cfg = make_cfg("extract.store_dtype=float32")
    full = extract(cfg)
    texts = [t for t, _ in sentences(60)]
    forward_calls.clear()
    p = plan_from_config(cfg)
    picked = extract_texts(p, [texts[9], texts[2], texts[9]], name="mine")
    assert picked.hit and forward_calls == []
    np.testing.assert_array_equal(picked.read("last", [1, 2]), full.read("last", [1, 2])[[9, 2, 9]])
    new = ["a brand new text", "another new one", "a brand new text"]
    res = extract_texts(p, new + texts[:3], name="mine")
    assert res.stats.texts == 2 and sum(forward_calls) == 2  # each distinct new text once
    got = res.read("mean", [3])
    np.testing.assert_array_equal(got[0], got[2])
    assert res.entry.usage.datasets.keys() == {"data", "mine"}


def test_a_shard_from_another_entry_fails_with_a_clear_error(make_cfg, tmp_path):
    a = extract(make_cfg())
    b = extract(make_cfg("extract.max_length=9"))
    victim = a.entry.path / a.entry.shards()[0].file
    victim.write_bytes((b.entry.path / b.entry.shards()[0].file).read_bytes())
    with pytest.raises(CacheError, match=f"{victim} belongs to entry {b.entry.key}"):
        a.read("mean", [0])


def test_a_changed_spec_fails_reads_with_a_clear_error(make_cfg):
    res = extract(make_cfg())
    path = res.entry.path.parent / "spec.json"
    spec = json.loads(path.read_text())
    path.write_text(json.dumps({**spec, "max_length": 9}))
    with pytest.raises(CacheError, match="no longer hashes to the key"):
        type(res.entry)(res.entry.path).read("mean", [0])


def test_entries_of_the_old_format_are_ignored(make_cfg, tmp_path):
    cfg = make_cfg()
    old = tmp_path / "cache" / ("ab" * 16)
    (old / "sel-x").mkdir(parents=True)
    (old / "spec.json").write_text(json.dumps({"format_version": 1}))
    assert Cache(cfg.cache.root).old_format() == [old]
    assert extract(cfg).entry.key != old.name and len(Cache(cfg.cache.root).entries()) == 1


def test_a_full_entry_serves_narrower_requests_but_not_wider_ones(make_cfg, count_loads):
    narrow = extract(make_cfg("extract.layers=[1,-1]", "extract.poolings=[mean]"))
    assert narrow.entry.manifest.layers == (1, 3)
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
    np.testing.assert_allclose(fresh.read("mean", [1]), full.read("mean", [1]), atol=1e-6)


def test_a_killed_run_resumes_with_only_the_missing_shards(make_cfg, monkeypatch):
    reference = extract(
        make_cfg("extract.shard_mb=0.01", "cache.root=" + str(make_cfg().cache.root) + "-ref")
    )
    assert len(reference.entry.shards()) >= 3

    from llmembed.cache.writer import EntryWriter

    real = EntryWriter.write_shard

    def crash_on_third(self, index, **kw):
        if index == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(self, index, **kw)

    monkeypatch.setattr(EntryWriter, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        extract(make_cfg("extract.shard_mb=0.01"))
    monkeypatch.setattr(EntryWriter, "write_shard", real)
    entry = Cache(make_cfg().cache.root).entries()[0]
    pending = EntryWriter(entry, key=entry.key).pending()
    assert not entry.complete
    resumed = extract(make_cfg("extract.shard_mb=0.01"))
    done_before = sum(s.rows for s in pending[:2])
    assert resumed.stats.texts == 60 - done_before
    assert not (entry.path / "pending.h5").exists()
    for pooling in ("mean", "last"):
        np.testing.assert_array_equal(
            resumed.read(pooling, [0, 1, 2, 3]), reference.read(pooling, [0, 1, 2, 3])
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
    assert m.poolings["pooler"].layers == (2,)
    assert res.entry.read("pooler", [2]).shape == (60, 1, 32)
    with pytest.raises(KeyError, match="layers \\[1\\] are not stored for 'pooler'"):
        res.entry.read("pooler", [1])


def test_damaged_shard_is_reported_with_its_file(make_cfg):
    res = extract(make_cfg())
    shard = res.entry.path / res.entry.shards()[0].file
    shard.write_bytes(b"not hdf5")
    with pytest.raises(CacheError, match=f"{shard}.*verify --repair"):
        res.entry.read("mean", [0])
