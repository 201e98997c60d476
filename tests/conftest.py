"""Shared fixtures: tiny random Llama and BERT models with real tokenizers, small labelled files,
and configs composed exactly as the CLI composes them."""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from llmembed.extract.embedder import Extractor

WORDS = (
    "the a film movie was is good bad great awful boring fun plot actors story "
    "ending not very quite really best worst love hate dull bright slow fast long short funny sad music scene"
).split()


BIN = Path(sys.executable).parent


def run_cli(*args, cwd, root, env=None) -> subprocess.CompletedProcess:
    """One of the package's command lines as a user types it, with `root` as the cache."""
    full = {**os.environ, "LLMEMBED_CACHE": str(root), **(env or {})}
    return subprocess.run(
        [str(BIN / args[0]), *map(str, args[1:])],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=600,
    )


def tiny_features(model) -> list[str]:
    """A classify feature set of one layer of a tiny model, as overrides on the command line."""
    return [
        "features=smollm2_l20",
        f"features.sources.0.backbone={{name: tiny, path: {model}}}",
        "features.sources.0.layers=[1]",
    ]


def classify_tiny(tmp_path, model, data_csv, *extra, env=None) -> subprocess.CompletedProcess:
    """`llmembed-classify` on a CSV with one layer of a tiny model, as typed, with `extra`."""
    return run_cli(
        "llmembed-classify",
        "dataset=file",
        f"dataset.path={data_csv}",
        *tiny_features(model),
        "extract.progress=false",
        *extra,
        cwd=tmp_path,
        root=tmp_path / "cache",
        env=env,
    )


def one_line_error(res, prog: str) -> str:
    """The whole of stderr: one `prog: error:` line, no traceback, exit status 2."""
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), res.stderr
    return lines[0]


def _tokenizer(special: list[str], bert_style: bool) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(special + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert_style:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
        )
    # Decoder style: a BOS token in front, no pad token (llmembed pads with EOS).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )


def tiny_llama_config(vocab_size: int, **extra) -> LlamaConfig:
    """The tiny Llama of the tests: 3 layers of width 32 (GQA, 128 positions)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **extra,
    )


def make_tiny_llama(path: Path, seed: int = 0) -> Path:
    tok = _tokenizer(["[UNK]", "<s>", "</s>"], bert_style=False)
    torch.manual_seed(seed)
    cfg = tiny_llama_config(len(tok), bos_token_id=1, eos_token_id=2)
    LlamaModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_bert(path: Path, seed: int = 0) -> Path:
    tok = _tokenizer(["[UNK]", "[PAD]", "[CLS]", "[SEP]"], bert_style=True)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=1,
    )
    BertModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_gguf(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama written as a GGUF file (float32 tensors, a SentencePiece-style
    vocabulary of the test words), which transformers de-quantizes like a real one."""
    import gguf

    pieces = ["<unk>", "<s>", "</s>", "\u2581", *sorted({c for w in WORDS for c in w})]
    for word in ("\u2581" + w for w in WORDS):  # every prefix, so that merges can build each word
        pieces += [word[:i] for i in range(2, len(word) + 1) if word[:i] not in pieces]
    torch.manual_seed(seed)
    cfg = tiny_llama_config(len(pieces))
    names = {"embed_tokens": "token_embd", "norm": "output_norm"}
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in [
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
        ]:
            names[f"layers.{i}.{ours}"] = f"blk.{i}.{theirs}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([-float(i) for i in range(len(pieces))])
    w.add_token_types([2, 3, 3] + [1] * (len(pieces) - 3))  # unknown, control, normal
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, value in LlamaModel(cfg).state_dict().items():
        w.add_tensor(names[name.removesuffix(".weight")] + ".weight", value.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return make_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) rows of varied length; the label follows a word so that it is learnable."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 24))]
        words.insert(rng.randrange(len(words) + 1), "great" if label == "pos" else "awful")
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple], header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def data_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "data.csv", sentences(60))


def file_overrides(root, csv_path, model, *extra: str) -> list[str]:
    """Config overrides for a local CSV and a local model folder, as a user writes them."""
    return [
        f"cache.root={root}",
        "dataset=file",
        f"dataset.path={csv_path}",
        "backbone=local",
        f"backbone.path={model}",
        "extract.progress=false",
        # float32, not auto: the figures tests compare must not hang on the machine's bf16 support.
        "extract.dtype=float32",
        *extra,
    ]


@pytest.fixture
def make_cfg(tmp_path, tiny_llama, data_csv):
    """Compose the `extract` config with the CLI's defaults, on a tiny model and a small file."""

    def make(*overrides: str):
        with initialize_config_module("llmembed.conf", version_base=None):
            return compose(
                "extract",
                overrides=file_overrides(tmp_path / "cache", data_csv, tiny_llama, *overrides),
            )

    return make


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity along the last axis (per text and layer for (rows, layers, hidden))."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture
def classify_cfg(tmp_path, tiny_llama, tiny_bert, data_csv):
    def make(sources, *overrides):
        base = [
            f"cache.root={tmp_path / 'cache'}",
            "dataset=file",
            f"dataset.path={data_csv}",
            "extract.progress=false",
            "extract.dtype=float32",  # as in conftest.file_overrides
        ]
        with initialize_config_module("llmembed.conf", version_base=None):
            cfg = compose("classify", overrides=base + list(overrides))
        named = {
            "llama": {"name": "tiny-llama", "path": str(tiny_llama)},
            "bert": {"name": "tiny-bert", "path": str(tiny_bert)},
        }
        roles = {"llama": "llm", "bert": "encoder"}
        cfg.features.sources = [
            {"backbone": named[b], "layers": layers, "pooling": pooling, "role": roles[b]}
            for b, layers, pooling in sources
        ]
        return cfg

    return make


@pytest.fixture
def forward_calls(monkeypatch):
    """Every batch that reaches a model, wherever it comes from."""
    calls = []
    real = Extractor.forward

    def counting(self, input_ids, mask):
        calls.append(len(input_ids))
        return real(self, input_ids, mask)

    monkeypatch.setattr(Extractor, "forward", counting)
    return calls


@pytest.fixture
def count_loads(monkeypatch):
    """Count model loads: the one expensive step a cache hit must skip."""
    calls = []
    import llmembed.extract.embed as embed

    real = embed.load_model

    def counting(*args, **kwargs):
        calls.append(kwargs["depth"])
        return real(*args, **kwargs)

    monkeypatch.setattr(embed, "load_model", counting)
    return calls
