"""The Python API: `llmembed.encode` and `llmembed.Cache`, sharing the command lines' cache."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llmembed
from llmembed.api import SettingsError
from llmembed.errors import UserError
from tests.conftest import read_rows

BIN = Path(sys.executable).parent


def cli_extract(tmp_path, root, csv_path, model) -> subprocess.CompletedProcess:
    """`llmembed-extract` on a local file and model folder, as a user types it."""
    args = [
        str(BIN / "llmembed-extract"),
        "dataset=file",
        f"dataset.path={csv_path}",
        "backbone=local",
        f"backbone.path={model}",
        "extract.dtype=float32",
        "extract.progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "LLMEMBED_CACHE": str(root)}
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out


def test_encode_shape_order_duplicates_and_negative_layers(tmp_path, tiny_bert, forward_calls):
    texts = ["a fine film", "a dull one", "a fine film", "another text here"]
    x = llmembed.encode(texts, str(tiny_bert), [1, -1], cache_root=tmp_path, dtype="float32")
    assert x.shape == (4, 2, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], x[2])
    assert not np.allclose(x[0], x[1])
    last = llmembed.encode(texts[:2], str(tiny_bert), [2], cache_root=tmp_path, dtype="float32")
    np.testing.assert_array_equal(x[:2, 1:], last)  # -1 is layer 2 of this 2-layer model
    calls = len(forward_calls)
    again = llmembed.encode(
        texts[::-1], str(tiny_bert), [-1, 1], cache_root=tmp_path, dtype="float32"
    )
    assert len(forward_calls) == calls  # served from the cache
    np.testing.assert_array_equal(again, x[::-1, ::-1])


def test_encode_without_cache_equals_the_cached_values(tmp_path, tiny_bert):
    texts = ["a fine film", "a dull one", "a fine film"]
    kw = {"cache_root": tmp_path / "c", "dtype": "float32"}
    cached = llmembed.encode(texts, str(tiny_bert), [0, 2], "first", **kw)
    memory = llmembed.encode(texts, str(tiny_bert), [0, 2], "first", cache=False, **kw)
    np.testing.assert_array_equal(cached, memory)  # both in the store dtype, then float32
    no_cache_root = tmp_path / "none"
    llmembed.encode(texts, str(tiny_bert), [1], cache=False, cache_root=no_cache_root)
    assert not llmembed.Cache(no_cache_root).entries()


def test_a_text_extracted_by_the_cli_is_a_hit_for_encode(
    tmp_path, tiny_bert, data_csv, forward_calls
):
    root = tmp_path / "cache"
    assert "extracted " in cli_extract(tmp_path, root, data_csv, tiny_bert).stdout
    texts = [r["text"] for r in read_rows(data_csv)]
    x = llmembed.encode(texts, str(tiny_bert), [0, -1], cache_root=root, dtype="float32")
    assert forward_calls == [] and x.shape == (len(texts), 2, 32)
    (entry,) = llmembed.Cache(root).find(str(tiny_bert), dtype="float32")
    np.testing.assert_array_equal(entry.read(texts, layers=[0, 2], pooling="mean"), x)


def test_a_text_encoded_in_python_is_a_hit_for_the_cli(tmp_path, tiny_bert, data_csv):
    root = tmp_path / "cache"
    texts = [r["text"] for r in read_rows(data_csv)]
    llmembed.encode(texts, str(tiny_bert), [1], cache_root=root, dtype="float32")
    out = cli_extract(tmp_path, root, data_csv, tiny_bert)
    assert "\ncache hit: all 60 texts of data" in out.stdout, out.stdout


def test_encode_then_the_clis_extraction_runs_no_forward_pass(
    tmp_path, tiny_bert, data_csv, forward_calls
):
    from hydra import compose, initialize_config_module

    from llmembed.extract.pipeline import extract
    from tests.conftest import file_overrides

    root = tmp_path / "cache"
    texts = [r["text"] for r in read_rows(data_csv)]
    x = llmembed.encode(texts, str(tiny_bert), [1], "first", cache_root=root, dtype="float32")
    assert forward_calls  # computed once, here
    computed = len(forward_calls)
    with initialize_config_module("llmembed.conf", version_base=None):
        cfg = compose("extract", overrides=file_overrides(root, data_csv, tiny_bert))
    result = extract(cfg)  # what llmembed-extract runs
    assert result.hit and len(forward_calls) == computed
    np.testing.assert_array_equal(result.read("first", [1]), x)


def test_progress_bar_of_a_cache_fill_when_asked(tmp_path, tiny_bert, capsys):
    texts = [f"text number {i}" for i in range(7)]
    llmembed.encode(texts, str(tiny_bert), [1], cache_root=tmp_path, show_progress_bar=True)
    assert "7/7" in capsys.readouterr().err


def test_cache_find_and_read_by_text_hash_or_all(tmp_path, tiny_bert):
    from llmembed.cache.keys import text_hashes

    root = tmp_path / "cache"
    cache = llmembed.Cache(root)
    assert cache.find(str(tiny_bert), dtype="float32") == []
    texts = ["one text", "two texts"]
    x = llmembed.encode(texts, str(tiny_bert), [-1], "last", cache_root=root, dtype="float32")
    (entry,) = cache.find(str(tiny_bert), dtype="float32")
    assert entry.rows == 2 and entry.layers == [0, 1, 2] and "last" in entry.poolings
    np.testing.assert_array_equal(entry.read(texts, layers=[-1], pooling="last"), x)
    np.testing.assert_array_equal(
        entry.read(text_hashes(texts[::-1]), layers=-1, pooling="last"), x[::-1]
    )
    assert entry.read(layers=[2], pooling="last").shape == (2, 1, 32)
    assert entry.holds(["one text", "unseen"]).tolist() == [True, False]
    with pytest.raises(KeyError, match="not stored"):
        entry.read(["unseen"], layers=[1])
    assert cache.find(str(tiny_bert), dtype="float32", max_length=16) == []  # another computation
    # Entry.read(pooling, layers, hashes) of the store is unchanged.
    np.testing.assert_array_equal(entry.entry.read("last", [2], text_hashes(texts)), x)


def test_bad_settings_and_arguments_fail_clearly(tmp_path, tiny_bert):
    with pytest.raises(SettingsError, match="did you mean 'max_length'"):
        llmembed.encode(["x"], str(tiny_bert), [1], max_len=8)
    with pytest.raises(SettingsError, match="pass \\[text\\]"):
        llmembed.encode("x", str(tiny_bert))
    with pytest.raises(UserError, match="hidden states 0-2"):
        llmembed.encode(["x"], str(tiny_bert), [5], cache_root=tmp_path)
    with pytest.raises(UserError, match="no such model folder"):
        llmembed.encode(["x"], str(tmp_path / "missing-model"), [1])
    with pytest.raises(UserError, match="not a conf name"):
        llmembed.encode(["x"], "no-such-model", [1])
    with pytest.raises(UserError, match="truncation_side"):
        llmembed.encode(["x"], str(tiny_bert), [1], cache_root=tmp_path, truncation_side="middle")


def test_progress_bar_only_when_asked_off_a_terminal(tmp_path, tiny_bert, capsys):
    texts = [f"text number {i}" for i in range(5)]
    llmembed.encode(texts, str(tiny_bert), [1], cache=False, cache_root=tmp_path)
    assert "text/s" not in capsys.readouterr().err
    llmembed.encode(
        texts, str(tiny_bert), [1], cache=False, cache_root=tmp_path, show_progress_bar=True
    )
    assert "5/5" in capsys.readouterr().err


def test_import_llmembed_does_not_import_torch():
    code = (
        "import sys, time; t = time.perf_counter(); import llmembed; "
        "print(time.perf_counter() - t); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
        "llmembed.encode; llmembed.Cache; assert 'torch' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 1.0
