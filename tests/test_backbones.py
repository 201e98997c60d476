"""Backbone sources and identities: local folders, GGUF files, hub ids and their commits."""

import logging
import sys

import pytest
from omegaconf import OmegaConf

from llmembed.extract.backbones import (
    BackboneError,
    hub_commit,
    identity,
    inspect_backbone,
    load_tokenizer,
    resolve_source,
)


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
    assert info.num_layers == 3 and info.poolings == ("mean", "last", "first")
    with caplog.at_level(logging.INFO):
        tok = load_tokenizer(cfg, info)
    assert tok.pad_token == "</s>" and "has no pad token: padding with EOS" in caplog.text
