"""Backbone sources and identities: local folders, GGUF files, hub ids and their commits."""

import json
import logging
import os
import sys

import pytest
import transformers as tf
from omegaconf import OmegaConf

from llmembed.cache.keys import file_sha256
from llmembed.extract.backbones import (
    BackboneError,
    hub_commit,
    identity,
    inspect_backbone,
    is_causal,
    load_tokenizer,
    resolve_source,
)
from llmembed.extract.plan import ConfigError, resolve_poolings
from tests.conftest import run_cli
from tests.test_families import build


def test_sources_are_told_apart(tmp_path, tiny_llama):
    assert resolve_source("meta-llama/Llama-2-7b-chat-hf").kind == "hub"
    assert resolve_source(str(tiny_llama)).kind == "local"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    src = resolve_source(str(gguf))
    assert (src.kind, src.gguf_file) == ("gguf", "m.gguf")


@pytest.mark.parametrize("path", ["/no/such/model", "./missing-folder", "/tmp/x/model.gguf"])
def test_missing_local_model_is_an_error_not_a_hub_lookup(path):
    with pytest.raises(BackboneError, match="does not exist"):
        resolve_source(path)


def test_gguf_without_the_gguf_package_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)
    cfg = OmegaConf.create({"name": "x", "path": str(tmp_path / "m.gguf")})
    with pytest.raises(
        BackboneError, match=r"needs the gguf package: pip install 'llmembed\[gguf\]'"
    ):
        inspect_backbone(cfg, None)


def test_local_identity_hashes_weights_and_tokenizer(tiny_llama):
    ident = identity(resolve_source(str(tiny_llama)), None, None)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(ident["files"])


def test_hub_revision_resolves_to_the_cached_commit(tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    assert hub_commit("org/model", None) == commit
    assert hub_commit("org/model", "f" * 40) == "f" * 40  # a commit given is used as is
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneError, match="cannot resolve org/other@main to a commit"):
        hub_commit("org/other", None)


def test_tokenizer_without_pad_token_pads_with_eos(tiny_llama, caplog):
    cfg = OmegaConf.create({"name": "tiny", "path": str(tiny_llama)})
    info = inspect_backbone(cfg, None)
    assert info.num_layers == 3 and info.poolings == ("mean", "last")  # first: BOS, see below
    with caplog.at_level(logging.INFO):
        tok = load_tokenizer(cfg, info)
    assert tok.pad_token == "</s>" and "has no pad token: padding with EOS" in caplog.text


@pytest.mark.parametrize(
    "config, causal",
    [
        (tf.LlamaConfig(), True),
        (tf.GPT2Config(), True),
        (tf.Gemma3TextConfig(), True),
        (tf.BertConfig(), False),  # has a causal-LM class too, and a masked-LM one: an encoder
        (tf.RobertaConfig(), False),
        (tf.ModernBertConfig(), False),
        (tf.BertConfig(is_decoder=True), True),
        (tf.PretrainedConfig(architectures=["MyModelForCausalLM"]), True),  # remote code
        (tf.PretrainedConfig(architectures=["MyModelForMaskedLM"]), False),
    ],
)
def test_causal_models_are_told_from_encoders(config, causal):
    assert is_causal(config) == causal


def save(family: str, path):
    model, tok = build(family)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return OmegaConf.create({"name": family, "path": str(path)})


def test_first_pooling_is_withheld_only_where_it_is_the_bos_state(tmp_path, tiny_llama, tiny_bert):
    """A causal model whose tokenizer adds BOS (Llama): `first` is one vector for every text, so
    `all` leaves it out and asking for it says why. Encoders, and decoders without BOS (GPT-2),
    keep it."""
    llama = inspect_backbone(OmegaConf.create({"name": "l", "path": str(tiny_llama)}), None)
    assert llama.constant_first and llama.poolings == ("mean", "last")
    assert resolve_poolings("all", llama, "tiny") == ["mean", "last"]
    with pytest.raises(ConfigError, match=r"'first' of tiny \(llama\) is the state of the BOS"):
        resolve_poolings(["mean", "first"], llama, "tiny")
    bert = inspect_backbone(OmegaConf.create({"name": "b", "path": str(tiny_bert)}), None)
    assert bert.poolings == ("mean", "last", "first", "pooler") and not bert.constant_first
    gpt2 = inspect_backbone(save("gpt2", tmp_path / "gpt2"), None)
    assert gpt2.poolings == ("mean", "last", "first") and not gpt2.constant_first


def test_backbone_facts_are_memoized_without_reloading_the_tokenizer(
    tmp_path, tiny_llama, monkeypatch
):
    cfg = OmegaConf.create({"name": "l", "path": str(tiny_llama)})
    memo = tmp_path / "memo.json"
    first = inspect_backbone(cfg, memo)
    assert '"constant_first": true' in memo.read_text()

    def no_loading(*args, **kwargs):
        raise AssertionError("the memo should have answered")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", no_loading)
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", no_loading)
    assert inspect_backbone(cfg, memo) == first


def test_a_gguf_backbone_is_converted_once_and_then_read_from_its_copy(
    tmp_path, tiny_gguf, monkeypatch
):
    import torch

    from llmembed.extract import backbones, converted

    loads = []
    real = converted._load_gguf

    def counted(cfg, info):
        loads.append(info.source.gguf_file)
        return real(cfg, info)

    monkeypatch.setattr(converted, "_load_gguf", counted)
    cfg = OmegaConf.create({"name": "m", "path": str(tiny_gguf)})
    info = inspect_backbone(cfg, None)
    kw = {"depth": 3, "dtype": torch.float32, "device": "cpu"}
    root = tmp_path / "root"
    first = backbones.load_model(cfg, info, **kw, cache_root=root)
    second = backbones.load_model(cfg, info, **kw, cache_root=root)
    tok = backbones.load_tokenizer(cfg, info, cache_root=root)
    direct = backbones.load_model(cfg, info, **kw)  # de-quantized in memory, no copy
    assert loads == ["tiny.gguf"]  # de-quantized once
    # one finished copy in the user's own folder, no temporary folder left
    (copy,) = (root / "converted" / str(os.geteuid())).iterdir()
    assert copy.name == f"gguf-{info.identity['gguf_sha256']}-v2"
    record = json.loads((copy / "converted.json").read_text())
    assert record["files"]["model.safetensors"] == file_sha256(copy / "model.safetensors")
    ids = tok("the film was fun", return_tensors="pt")
    with torch.inference_mode():
        a, b, c = (
            m(**ids, output_hidden_states=True).hidden_states for m in (first, second, direct)
        )
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_gc_removes_converted_copies_no_version_reads_and_keeps_the_current_one(
    tmp_path, tiny_gguf
):
    import torch

    from llmembed.extract import backbones

    cfg = OmegaConf.create({"name": "m", "path": str(tiny_gguf)})
    info = inspect_backbone(cfg, None)
    root = tmp_path / "root"
    backbones.load_model(cfg, info, depth=3, dtype=torch.float32, device="cpu", cache_root=root)
    mine = root / "converted" / str(os.geteuid())
    (current,) = mine.iterdir()
    first_layout = root / "converted" / "gguf-0123-v1"  # before copies were private
    older = mine / "gguf-0123-v1"
    for old in (first_layout, older):
        old.mkdir()
        (old / "model.safetensors").write_bytes(b"x" * 1000)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep").write_text("mine")
    (root / "converted" / "gguf-link-v1").symlink_to(outside, target_is_directory=True)

    res = run_cli("llmembed-cache", "--root", root, "gc", cwd=tmp_path, root=root)
    assert res.returncode == 0, res.stderr
    assert not first_layout.exists() and not older.exists()
    assert str(first_layout) in res.stdout and str(older) in res.stdout
    assert current.is_dir() and (current / "model.safetensors").is_file()
    assert (outside / "keep").read_text() == "mine"  # a link is never followed


def test_a_second_writer_of_the_same_copy_keeps_the_first_ones(tmp_path, tiny_gguf, monkeypatch):
    """Two processes converting at once: the one that renames second drops its own copy."""
    from llmembed.extract import converted

    cfg = OmegaConf.create({"name": "m", "path": str(tiny_gguf)})
    info = inspect_backbone(cfg, None)
    root, calls, real = tmp_path / "root", [], converted._load_gguf

    def racing(cfg, info):
        calls.append(1)
        if len(calls) == 1:  # while this writer works, another one finishes first
            with converted.kept_copy(cfg, info, root):
                pass
        return real(cfg, info)

    monkeypatch.setattr(converted, "_load_gguf", racing)
    with converted.kept_copy(cfg, info, root) as folder:
        mine = root / "converted" / str(os.geteuid())
        assert len(calls) == 2 and [p.name for p in mine.iterdir()] == [folder.name]
        assert (folder / "converted.json").is_file() and (folder / "model.safetensors").is_file()


@pytest.mark.slow
def test_packaged_smollm2_gguf_copy_gives_identical_hidden_states(tmp_path):
    import time

    import torch

    from benchmarks.extract_bench import compose
    from llmembed.extract.backbones import load_model, load_tokenizer

    cfg = compose("extract", ["backbone=smollm2"]).backbone
    info = inspect_backbone(cfg, None)
    kw = {"depth": info.num_layers, "dtype": torch.bfloat16, "device": "cpu"}
    direct, tok = load_model(cfg, info, **kw), load_tokenizer(cfg, info)
    load_model(cfg, info, **kw, cache_root=tmp_path)  # converts
    t = time.perf_counter()
    copy = load_model(cfg, info, **kw, cache_root=tmp_path)
    tok2 = load_tokenizer(cfg, info, cache_root=tmp_path)
    assert time.perf_counter() - t < 5  # 1.4 s measured on 2 cores; GGUF: 11-20 s
    ids = tok("the movie was not very good", return_tensors="pt")
    assert tok2("the movie was not very good")["input_ids"] == ids["input_ids"][0].tolist()
    with torch.inference_mode():
        a = direct(**ids, output_hidden_states=True).hidden_states
        b = copy(**ids, output_hidden_states=True).hidden_states
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
