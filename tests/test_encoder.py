"""`llmembed.Encoder` (a backbone loaded once, encoding many times), and what the Python API refuses
instead of guessing: fractional or boolean layers, a two-column DataFrame, texts that are not
Unicode, no texts at all."""

import numpy as np
import pytest

import llmembed
from llmembed.api import SettingsError
from llmembed.extract import embed


@pytest.fixture
def loads(monkeypatch):
    """Every time a model is loaded (not lent by an Encoder that holds it)."""
    seen = []
    real = embed.fresh_embedder

    def counting(plan, device, **kw):
        seen.append(plan.backbone.name)
        return real(plan, device, **kw)

    monkeypatch.setattr(embed, "fresh_embedder", counting)
    return seen


def test_an_encoder_loads_its_model_once_and_encodes_many_times(tmp_path, tiny_bert, loads):
    kw = {"cache_root": tmp_path / "c", "dtype": "float32"}
    memory = llmembed.Encoder(str(tiny_bert), [1, -1], "mean", cache=False, **kw)
    assert not memory.loaded and loads == []  # checked and planned, nothing loaded yet
    texts = ["a fine film", "a dull one", "the plot was fun"]
    first = memory.encode(texts)
    again = memory.encode(texts[::-1])
    one = memory.encode("a fine film")  # one string: (layers, hidden)
    assert first.shape == (3, 2, 32) and one.shape == (2, 32) and len(loads) == 1
    np.testing.assert_array_equal(again, first[::-1])
    np.testing.assert_array_equal(one, first[0])
    # The cache-backed encoder: misses load the model once, hits load nothing.
    cached = llmembed.Encoder(str(tiny_bert), [1, -1], "mean", **kw)
    np.testing.assert_array_equal(cached.encode(texts), first)
    cached.encode(["something new here", "and more new text"])
    cached.encode([*texts, "a third new one"])
    assert len(loads) == 2 and cached.loaded
    assert cached.encode(texts).shape == (3, 2, 32) and len(loads) == 2


def test_cache_false_writes_nothing(tmp_path, tiny_bert):
    root = tmp_path / "never"
    x = llmembed.encode(["a fine film"], str(tiny_bert), [1], cache=False, cache_root=root)
    assert x.shape == (1, 1, 32) and not root.exists()  # no entry, no hash memo, no folder


@pytest.mark.slow
def test_a_gguf_backbone_without_the_cache_writes_no_converted_copy(tmp_path):
    import time

    root = tmp_path / "never"
    enc = llmembed.Encoder("smollm2", [3], cache=False, cache_root=root, dtype="float32")
    t0 = time.perf_counter()
    first = enc.encode(["a fine film", "a dull one"])
    loaded = time.perf_counter() - t0
    t0 = time.perf_counter()
    np.testing.assert_array_equal(enc.encode(["a fine film", "a dull one"]), first)
    print(
        f"smollm2 without the cache: first call {loaded:.1f} s, second {time.perf_counter() - t0:.2f} s"
    )
    assert not root.exists()  # a 517 MB de-quantized copy was written here before


def test_features_keep_their_encoders(tmp_path, tiny_bert, loads):
    features = llmembed.Features(
        [{"backbone": str(tiny_bert), "layers": [1, 2]}],
        settings={"cache_root": str(tmp_path / "c"), "dtype": "float32"},
    )
    texts = ["a fine film", "a dull one"]
    x = features.transform(texts)
    features.transform(["new text one", "new text two"])
    assert x.shape == (2, 64) and len(loads) == 1
    assert len(features.get_feature_names_out()) == 64


def test_mteb_metadata_is_filled(tmp_path, tiny_bert):
    from llmembed.mteb import LayerEncoder

    enc = LayerEncoder(
        str(tiny_bert), [1, 2], combine="concat", cache_root=tmp_path, dtype="float32"
    )
    meta = enc.mteb_model_meta
    counted = sum(
        p.numel()
        for p in __import__("transformers").AutoModel.from_pretrained(tiny_bert).parameters()
    )
    assert meta.n_parameters == counted and meta.embed_dim == 64 and meta.max_tokens == 64
    assert meta.revision.startswith("files-")  # a local folder: the hash over its files' hashes
    assert enc.encode(["a fine film"]).shape == (1, 64)


@pytest.mark.parametrize(
    "layers",
    [1.5, [1.5], True, [True], "46", "-1", None, [float("nan")], [], [1, "2"]],
    ids=repr,
)
def test_layers_that_are_not_whole_indices_are_refused(tmp_path, tiny_bert, layers):
    kw = {"cache_root": tmp_path, "dtype": "float32"}
    with pytest.raises(SettingsError, match=r"layers"):
        llmembed.encode(["a text"], str(tiny_bert), layers, **kw)
    with pytest.raises(SettingsError, match=r"sources\[0\]: layers"):
        llmembed.Features([{"backbone": str(tiny_bert), "layers": layers}], settings=kw).transform(
            ["a text"]
        )
    assert not list(tmp_path.glob("*/sel-*"))  # refused before anything was computed


@pytest.mark.parametrize(
    ("texts", "says"),
    [
        (None, "texts must be a list of strings, got NoneType"),
        (5, "texts must be a list of strings, got int"),
        (["fine", None], "item 1 is NoneType"),
        (["fine", "bad \ud800 half"], r"text 1 holds a lone surrogate \(U\+D800 at character 4\)"),
    ],
)
def test_texts_that_are_not_texts_are_refused(tmp_path, tiny_bert, texts, says):
    with pytest.raises(SettingsError, match=says):
        llmembed.encode(texts, str(tiny_bert), [1], cache_root=tmp_path)


def test_a_frame_with_a_label_column_is_never_embedded_as_texts(tmp_path, tiny_bert):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"text": ["a fine film", "a dull one"], "label": ["pos", "neg"]})
    kw = {"cache_root": str(tmp_path), "dtype": "float32"}
    source = [{"backbone": str(tiny_bert), "layers": [1]}]
    with pytest.raises(
        SettingsError, match=r"columns \['text', 'label'\]: say which holds the texts"
    ):
        llmembed.Features(source, settings=kw).transform(df)
    named = llmembed.Features(source, column="text", settings=kw).transform(df)
    alone = llmembed.Features(source, settings=kw).transform(df[["text"]])
    assert named.shape == (2, 32)  # two rows, not four
    np.testing.assert_array_equal(
        named, llmembed.Features(source, settings=kw).transform(list(df.text))
    )
    np.testing.assert_array_equal(alone, named)
    with pytest.raises(SettingsError, match=r"column='txt' is not a column of X"):
        llmembed.Features(source, column="txt", settings=kw).transform(df)
