"""The forward-pass loop on tiny random models: pooling, batch invariance, truncation, OOM retry,
the padding check that refuses wrong numbers, and float32 for values beyond float16."""

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from llmembed.extract import embedder
from llmembed.extract.embedder import Extractor, UnsupportedModelError
from tests.conftest import cosine, sentences


def load(path, dtype=torch.float32):
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModel.from_pretrained(path, dtype=dtype).eval(), tok


def extractor(path, dtype=torch.float32, **kw):
    model, tok = load(path, dtype)
    n = model.config.num_hidden_layers
    kw.setdefault(
        "poolings", ["mean", "last", "first"] + (["pooler"] if hasattr(model, "pooler") else [])
    )
    return Extractor(model, tok, layers=list(range(n + 1)), max_length=64, **kw)


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_bert"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_does_not_depend_on_batch_neighbours(which, side, dtype, request):
    path = request.getfixturevalue(which)
    texts = [t for t, _ in sentences(12)]
    texts[3] = "good"  # one very short text among long ones
    alone = extractor(path, dtype, padding_side=side, token_budget=1)  # one text per batch
    # one padded batch, however much of it is padding
    batched = extractor(path, dtype, padding_side=side, token_budget=10_000, max_padding=1.0)
    a, sa = alone.embed(texts)
    b, sb = batched.embed(texts)
    assert sa.forward_calls == len(texts) and sb.forward_calls == 1
    assert sb.padded_tokens > sb.tokens  # the batch really was padded
    for name in a:
        if dtype == torch.float32:
            np.testing.assert_allclose(a[name], b[name], atol=1e-5, rtol=0, err_msg=name)
        else:  # bfloat16 rounds each op to 8 bits: batch shapes change the last bits only
            assert np.isfinite(b[name]).all() and cosine(a[name], b[name]).min() > 0.999, name


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_bert"])
def test_poolings_match_the_models_own_hidden_states(which, request):
    path = request.getfixturevalue(which)
    model, tok = load(path)
    text = "the film was really great fun"
    ids = tok(text, return_tensors="pt")
    with torch.inference_mode():
        hs = model(**ids, output_hidden_states=True).hidden_states
    out, _ = extractor(path).embed([text, "bad"])
    for layer, h in enumerate(hs):
        h = h[0].numpy()  # (T, H)
        np.testing.assert_allclose(out["mean"][0, layer], h.mean(0), atol=1e-5)
        np.testing.assert_allclose(out["last"][0, layer], h[-1], atol=1e-5)
        np.testing.assert_allclose(out["first"][0, layer], h[0], atol=1e-5)
    if "pooler" in out:
        with torch.inference_mode():
            expected = model(**ids).pooler_output[0].numpy()
        np.testing.assert_allclose(out["pooler"][0, 0], expected, atol=1e-5)


def test_truncation_is_counted_and_keeps_the_first_tokens(tiny_llama):
    ex = extractor(tiny_llama)
    ex.max_length = 5
    long_text = " ".join(["good"] * 20)
    tokens = ex.tokenize([long_text, "bad", long_text])
    assert tokens.truncated.tolist() == [True, False, True]
    assert tokens.lengths.tolist() == [5, 2, 5]  # BOS + 4 words; BOS + "bad"


def test_prompt_template_wraps_each_text(tiny_llama):
    ex = extractor(tiny_llama, prompt="the movie {text} is")
    ids = ex.tokenize(["good"]).ids.tolist()
    assert ex.tokenizer.convert_ids_to_tokens(ids) == ["<s>", "the", "movie", "good", "is"]


def test_out_of_memory_splits_the_batch_and_gives_the_same_result(tiny_llama, caplog):
    texts = [t for t, _ in sentences(10)]
    reference, _ = extractor(tiny_llama, token_budget=10_000, max_padding=1.0).embed(texts)
    ex = extractor(tiny_llama, token_budget=10_000, max_padding=1.0)
    real_forward = ex.model.forward

    def forward(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 3:  # pretend a batch of more than 3 texts does not fit
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(*args, **kwargs)

    ex.model.forward = forward
    out, stats = ex.embed(texts)
    assert stats.oom_retries >= 1 and stats.forward_calls > 1
    assert "out of memory on a batch of 10 texts" in caplog.text
    for name in reference:
        np.testing.assert_allclose(out[name], reference[name], atol=1e-5)


def test_float16_output_is_the_float32_output_rounded(tiny_llama):
    """Shards are built in the store dtype (half the memory): same numbers as rounding at write."""
    texts = [t for t, _ in sentences(8)]
    wide, _ = extractor(tiny_llama).embed(texts)
    half, _ = extractor(tiny_llama, out_dtype=torch.float16).embed(texts)
    for name in wide:
        assert half[name].dtype == np.float16
        np.testing.assert_array_equal(half[name], wide[name].astype(np.float16))


def test_a_model_whose_positions_ignore_the_padding_is_refused(tiny_bert):
    """A family no rule knows, which numbers positions 0..T-1 whatever it is given: under left
    padding every text would be shifted. The check at construction refuses it, naming the fix."""
    model, tok = load(tiny_bert)
    real = model.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return real(input_ids=input_ids, attention_mask=attention_mask, **kwargs)  # ignored

    model.forward = forward
    with pytest.raises(
        UnsupportedModelError,
        match=r"bert: under left padding, hidden state 0 of a padded batch differs from the "
        r"model's own forward pass on the text alone by [0-9.]+ .*backbone.padding_side=right",
    ):
        Extractor(
            model, tok, layers=[0, 1, 2], poolings=["mean"], max_length=64, padding_side="left"
        )
    # Right padding keeps real tokens at 0..n-1: accepted, and gives the model's own numbers.
    Extractor(model, tok, layers=[0, 1, 2], poolings=["mean"], max_length=64)


def test_roberta_positions_counted_from_zero_are_caught(monkeypatch):
    """The old rule (positions 0, 1, ... for every model) on RoBERTa, whose positions start at
    padding_idx + 1: the check refuses it under either padding side."""
    from tests.test_families import build

    model, tok = build("roberta")
    monkeypatch.setattr(
        embedder, "position_rule", lambda m: embedder.PositionRule(0, ("left", "right"))
    )
    for side in ("left", "right"):
        with pytest.raises(UnsupportedModelError, match=rf"roberta: under {side} padding"):
            Extractor(
                model, tok, layers=[0, 1, 2], poolings=["mean"], max_length=64, padding_side=side
            )


def test_a_model_without_position_ids_refuses_left_padding(tiny_bert):
    model, tok = load(tiny_bert)
    real = model.forward
    model.forward = lambda input_ids=None, attention_mask=None, **kw: real(
        input_ids=input_ids, attention_mask=attention_mask, **kw
    )
    assert embedder.padding_sides(model) == ("right",)
    with pytest.raises(
        UnsupportedModelError,
        match=r"bert numbers its positions 0..T-1 .*backbone.padding_side=right",
    ):
        Extractor(model, tok, layers=[0], poolings=["mean"], max_length=64, padding_side="left")


def test_the_padding_check_costs_three_small_forward_passes(tiny_llama):
    model, tok = load(tiny_llama)
    real, calls = model.forward, []

    def forward(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return real(*args, **kwargs)

    model.forward = forward
    Extractor(model, tok, layers=[0, 3], poolings=["mean"], max_length=64)
    # One padded batch of both texts, then each text alone.
    assert len(calls) == 3 and calls[0][0] == 2 and max(s[1] for s in calls) <= 12


def massive(path, scale: float = 1e8):
    """The model at `path` with a BOS embedding `scale` times larger: its BOS state reaches 5e6,
    far past float16's 65,504, as the "massive activations" of real LLMs do."""
    model, tok = load(path)
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.bos_token_id] *= scale
    return model, tok


def test_values_beyond_float16_come_back_in_float32_for_that_pooling_only(tiny_llama):
    model, tok = massive(tiny_llama)
    texts = [t for t, _ in sentences(8)]
    kw = {"layers": [0, 1, 2, 3], "poolings": ["mean", "last", "first"], "max_length": 64}
    wide, _ = Extractor(model, tok, token_budget=40, **kw).embed(texts)
    ex = Extractor(model, tok, token_budget=40, out_dtype=torch.float16, **kw)
    half, stats = ex.embed(texts)
    assert stats.forward_calls > 1 and stats.widened == {"mean", "first"}
    assert np.abs(half["first"]).max() > 1e6  # not clipped
    for name in ("mean", "first"):  # lossless: exactly the float32 numbers
        assert half[name].dtype == np.float32
        np.testing.assert_array_equal(half[name], wide[name])
    # The last token's state stays in range (the last layer is normed): float16 as before.
    assert half["last"].dtype == np.float16
    np.testing.assert_array_equal(half["last"], wide["last"].astype(np.float16))


def test_massive_activations_extract_with_default_settings(tmp_path, tiny_llama, data_csv):
    """End to end with the default float16 store: no error, the out-of-range poolings stored in
    float32 (recorded per pooling in the manifest), never clipped; the others stay float16."""
    from hydra import compose, initialize_config_module

    from llmembed.extract.pipeline import extract
    from tests.conftest import file_overrides

    model, tok = massive(tiny_llama)
    model.save_pretrained(tmp_path / "massive")
    tok.save_pretrained(tmp_path / "massive")

    def cfg(*extra):
        overrides = file_overrides(tmp_path / "cache", data_csv, tmp_path / "massive", *extra)
        with initialize_config_module("llmembed.conf", version_base=None):
            return compose("extract", overrides=overrides)

    half = extract(cfg("extract.shard_mb=0.02"))  # several shards, default store_dtype float16
    m = half.entry.manifest
    assert half.entry.spec.store_dtype == "float16" and len(m.shards) > 1
    assert {p: v.dtype for p, v in m.poolings.items()} == {"mean": "float32", "last": "float16"}
    wide = extract(cfg("extract.store_dtype=float32"))
    assert wide.entry.manifest.poolings["mean"].dtype == "float32"
    layers = list(m.layers)
    mean = half.read("mean", layers)
    assert np.abs(mean).max() > 1e5
    # Shards (and so batches) differ between the two entries: float32 rounding apart, not more.
    np.testing.assert_allclose(mean, wide.read("mean", layers), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(
        half.read("last", layers), wide.read("last", layers), rtol=1e-3, atol=1e-4
    )


def test_every_family_pools_inside_its_layers():
    """Each family's hidden states are its layers' inputs and outputs (the last one raw or final-
    normed, as the family's own `hidden_states` holds it): none falls back to keeping them all."""
    from tests.test_families import FAMILIES, build

    for family in sorted(FAMILIES):
        model, tok = build(family)
        side = embedder.padding_sides(model)[0]
        ex = Extractor(
            model, tok, layers=[0, 1, 2], poolings=["mean"], max_length=64, padding_side=side
        )
        assert ex.tap_last in ("raw", "final"), family


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_bert"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooling_inside_the_layers_gives_the_same_bits_as_keeping_hidden_states(
    which, side, dtype, request
):
    path = request.getfixturevalue(which)
    texts = [t for t, _ in sentences(12)]
    inside = extractor(path, dtype, padding_side=side, token_budget=64)
    kept = extractor(path, dtype, padding_side=side, token_budget=64)
    kept.tap_last = None  # the old path: output_hidden_states=True, pooled after the forward
    a, _ = inside.embed(texts)
    b, _ = kept.embed(texts)
    assert inside.tap_last is not None and set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_peak_activation_memory_does_not_grow_with_the_stored_layers():
    """31 stored layers within 1.2x of 1 at the same token budget (the old path kept them all)."""
    from transformers import LlamaConfig

    from benchmarks.activation_memory import LiveTensors
    from tests.test_families import tokenizer

    tok = tokenizer("bos")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=30,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    words = [t for t, _ in sentences(96)]
    texts = [" ".join(words[i : i + 4]) for i in range(0, 96, 4)]  # about 40 tokens each, as MR
    peak = {}
    for tap in (True, False):
        for layers in ([30], list(range(31))):
            ex = Extractor(model, tok, layers=layers, poolings=["mean", "last"], max_length=64)
            if not tap:
                ex.tap_last = None
            with LiveTensors() as live:
                ex.embed(texts)
            peak[tap, len(layers)] = live.peak
    assert peak[True, 31] <= 1.2 * peak[True, 1], peak
    assert peak[False, 31] > 2 * peak[True, 31], peak  # what keeping every layer cost
