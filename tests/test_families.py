"""Every architecture family gives, from a padded batch, the numbers of its own forward pass on each
text alone: every hidden state and every pooling, under each padding side the family allows.

One tiny random model per family (hidden 32, 2 layers), built from a config here with a tokenizer made
by the `tokenizers` library: no download. A family missing from this file is still guarded at run
time by `Extractor`'s padding check (tested in tests/test_embedder.py).
"""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModel, PreTrainedTokenizerFast

from llmembed.extract.embedder import Extractor, padding_sides
from tests.conftest import WORDS

# <pad> has id 1: the padding_idx that RoBERTa-family position embeddings are built around.
SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]
# Texts of different lengths, so that a batch of them is padded (one of them down to one word).
TEXTS = [
    "the film was really great fun and the music was bright",
    "bad",
    "a long boring story",
    "the actors were not very good but the ending was",
    "love it",
]
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
# pad_token_id 1 everywhere: a model's zero embedding row is <pad>, not a token that texts use.
DECODER = {**SMALL, "intermediate_size": 64, "max_position_embeddings": 64, "pad_token_id": 1}
ENCODER = DECODER


def tokenizer(style: str) -> PreTrainedTokenizerFast:
    """`bos`: <s> text (Llama, Gemma, Phi-3, OPT); `plain`: no special tokens (GPT-2, Qwen,
    GPT-NeoX); `cls`: <s> text </s> with a pad token (every encoder)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = {"bos": "<s> $A", "plain": "$A", "cls": "<s> $A </s>"}[style]
    specials = [(t, vocab[t]) for t in ("<s>", "</s>") if t in template]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    names = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    if style == "cls":
        names |= {"pad_token": "<pad>", "cls_token": "<s>", "sep_token": "</s>"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    if fast.pad_token is None:  # as llmembed's load_tokenizer does for decoders
        fast.pad_token = fast.eos_token
    return fast


# family -> (config class, config arguments, tokenizer style)
FAMILIES: dict[str, tuple[str, dict, str]] = {
    "llama": ("LlamaConfig", {**DECODER, "num_key_value_heads": 2}, "bos"),
    # A sliding window shorter than the longest text: windows must count real tokens only.
    "mistral": ("MistralConfig", {**DECODER, "num_key_value_heads": 2, "sliding_window": 4}, "bos"),
    "qwen2": ("Qwen2Config", {**DECODER, "num_key_value_heads": 2}, "plain"),
    "qwen3": ("Qwen3Config", {**DECODER, "num_key_value_heads": 2, "head_dim": 8}, "plain"),
    "gemma2": (
        "Gemma2Config",
        {**DECODER, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 4},
        "bos",
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        {**DECODER, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 4},
        "bos",
    ),
    "phi3": ("Phi3Config", {**DECODER, "num_key_value_heads": 2}, "bos"),
    "gpt2": (
        "GPT2Config",
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "pad_token_id": 1},
        "plain",
    ),
    "gpt_neox": ("GPTNeoXConfig", {**DECODER, "rotary_pct": 0.5}, "plain"),
    # OPT's tokenizer puts </s> in front; positions are offset by 2 inside the model.
    "opt": (
        "OPTConfig",
        {**DECODER, "ffn_dim": 64, "word_embed_proj_dim": 32},
        "bos",
    ),
    "bert": ("BertConfig", ENCODER, "cls"),
    "roberta": ("RobertaConfig", {**ENCODER, "max_position_embeddings": 66}, "cls"),
    "xlm-roberta": ("XLMRobertaConfig", {**ENCODER, "max_position_embeddings": 66}, "cls"),
    "camembert": ("CamembertConfig", {**ENCODER, "max_position_embeddings": 66}, "cls"),
    "mpnet": ("MPNetConfig", {**ENCODER, "max_position_embeddings": 66}, "cls"),
    "distilbert": (
        "DistilBertConfig",
        {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4, "pad_token_id": 1},
        "cls",
    ),
    # As DeBERTa-v3 ships: relative attention in log buckets, no absolute position input.
    "deberta-v2": (
        "DebertaV2Config",
        {
            **ENCODER,
            "relative_attention": True,
            "position_biased_input": False,
            "pos_att_type": ["p2c", "c2p"],
            "position_buckets": 8,
            "max_relative_positions": -1,
            "norm_rel_ebd": "layer_norm",
            "share_att_key": True,
        },
        "cls",
    ),
    "electra": ("ElectraConfig", {**ENCODER, "embedding_size": 16}, "cls"),
    # Local attention (window 4) in every other layer, global in the rest.
    "modernbert": (
        "ModernBertConfig",
        {
            **ENCODER,
            "global_attn_every_n_layers": 2,
            "local_attention": 4,
            "cls_token_id": 0,
            "sep_token_id": 2,
        },
        "cls",
    ),
}


# conf/backbone/*.yaml -> the architecture family of its model.
CONF_FAMILIES = {
    "llama2-7b-chat": "llama",
    "smollm2": "llama",
    "bert-large-uncased": "bert",
    "minilm": "bert",
    "roberta-large": "roberta",
}


def build(family: str) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    config_class, kwargs, style = FAMILIES[family]
    tok = tokenizer(style)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config = getattr(tf, config_class)(vocab_size=len(tok), **ids, **kwargs)
    # Eager attention: exact, and fully masked padding rows cannot turn into NaN.
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    assert model.config.model_type == family
    return model, tok


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> tuple[str, torch.nn.Module, PreTrainedTokenizerFast]:
    return request.param, *build(request.param)


def own_forward(model, tok, text: str) -> dict[str, np.ndarray]:
    """The model's own numbers for one text, unpadded and with its default positions:
    {pooling: (layers, hidden)}."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
    hs = torch.stack(out.hidden_states)[:, 0].numpy()  # (layers, T, H)
    pooled = {"mean": hs.mean(1), "last": hs[:, -1], "first": hs[:, 0]}
    if getattr(out, "pooler_output", None) is not None:
        pooled["pooler"] = out.pooler_output.numpy()  # (1, H): stored for the last layer only
    return pooled


def test_every_configured_backbone_has_its_family_tested():
    names = {
        p.name.removesuffix(".yaml")
        for p in (files("llmembed.conf") / "backbone").iterdir()
        if p.name.endswith(".yaml") and p.name != "local.yaml"
    }
    assert names == set(CONF_FAMILIES), "a new conf/backbone file: add its family to CONF_FAMILIES"
    assert set(CONF_FAMILIES.values()) <= set(FAMILIES)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_the_models_own_forward_on_each_text(family, side):
    name, model, tok = family
    if side not in padding_sides(model):
        pytest.skip(f"{name} refuses {side} padding (tested in test_embedder)")
    poolings = ["mean", "last", "first"] + (["pooler"] if hasattr(model, "pooler") else [])
    layers = list(range(model.config.get_text_config().num_hidden_layers + 1))
    ex = Extractor(
        model, tok, layers=layers, poolings=poolings, max_length=64, padding_side=side,
        max_padding=1.0,  # one batch, however much of it is padding
    )  # fmt: skip
    out, stats = ex.embed(TEXTS)
    assert stats.forward_calls == 1 and stats.padded_tokens > stats.tokens  # one padded batch
    for i, text in enumerate(TEXTS):
        expected = own_forward(model, tok, text)
        assert set(expected) == set(out), name
        for pooling, values in expected.items():
            assert np.abs(values).max() > 1e-2  # real numbers, not near-zero noise
            np.testing.assert_allclose(
                out[pooling][i], values, atol=1e-5, rtol=1e-5, err_msg=f"{name} {pooling} {text!r}"
            )
