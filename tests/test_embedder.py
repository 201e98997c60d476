"""The forward-pass loop on tiny random models: pooling, batch invariance, truncation, OOM retry."""

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from llmembed.extract.embedder import Extractor
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
    batched = extractor(path, dtype, padding_side=side, token_budget=10_000)  # one padded batch
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
    ids, truncated = ex.tokenize([long_text, "bad", long_text])
    assert truncated == 2
    assert [len(x) for x in ids] == [5, 2, 5]  # BOS + 4 words; BOS + "bad"


def test_prompt_template_wraps_each_text(tiny_llama):
    ex = extractor(tiny_llama, prompt="the movie {text} is")
    ids, _ = ex.tokenize(["good"])
    assert ex.tokenizer.convert_ids_to_tokens(ids[0]) == ["<s>", "the", "movie", "good", "is"]


def test_out_of_memory_halves_the_budget_and_gives_the_same_result(tiny_llama, caplog):
    texts = [t for t, _ in sentences(10)]
    reference, _ = extractor(tiny_llama, token_budget=10_000).embed(texts)
    ex = extractor(tiny_llama, token_budget=10_000)
    real_forward = ex.model.forward

    def forward(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 3:  # pretend a batch of more than 3 texts does not fit
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(*args, **kwargs)

    ex.model.forward = forward
    out, stats = ex.embed(texts)
    assert stats.oom_retries >= 2 and ex.token_budget < 10_000
    assert "token budget halved" in caplog.text
    for name in reference:
        np.testing.assert_allclose(out[name], reference[name], atol=1e-5)


def test_float16_output_is_the_float32_output_rounded(tiny_llama):
    """Shards are built in the store dtype (half the memory): same numbers as rounding at write."""
    texts = [t for t, _ in sentences(8)]
    wide, _ = extractor(tiny_llama).embed(texts)
    half, _ = extractor(tiny_llama, out_dtype=np.float16).embed(texts)
    for name in wide:
        assert half[name].dtype == np.float16
        np.testing.assert_array_equal(half[name], wide[name].astype(np.float16))
