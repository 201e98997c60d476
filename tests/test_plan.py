"""Extraction settings that would be reinterpreted silently, or fail late, are refused by the plan
before any model is loaded, each with a `ConfigError` that names the setting and the valid values."""

import pytest
import torch

import llmembed.extract.embed as embed
from llmembed.extract.pipeline import extract
from llmembed.extract.plan import ConfigError, plan_from_config


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded or a backbone is even inspected."""
    import llmembed.extract.plan as plan

    def refuse(*args, **kwargs):
        raise AssertionError("the model was touched before the settings were checked")

    monkeypatch.setattr(embed, "load_model", refuse)
    monkeypatch.setattr(plan, "inspect_backbone", refuse)


@pytest.mark.parametrize(
    "override, message",
    [
        ("extract.layers=[1.5,2.7]", r"whole layer indices, got \[1.5, 2.7\]"),
        ("extract.layers=[1,true]", r"whole layer indices, got \[True\]"),
        ("extract.max_length=0", r"extract.max_length must be a positive number of tokens, got 0"),
        ("extract.max_length=-5", r"extract.max_length must be a positive .* got -5"),
        ("extract.max_length=1.5", r"extract.max_length must be a positive .* got 1.5"),
        ("extract.shard_mb=0", r"extract.shard_mb must be auto or a positive number of MB, got 0"),
        (
            "extract.shard_mb=-1",
            r"extract.shard_mb must be auto or a positive number of MB, got -1",
        ),
        ("extract.shard_mb=inf", r"must be auto or a positive number of MB, got inf"),
        ("extract.poolings=[]", r"extract.poolings is empty"),
        ("extract.token_budget=1.5", r"token_budget must be auto or a positive integer, got 1.5"),
        (
            "extract.token_budget=lots",
            r"token_budget must be auto or a positive integer, got 'lots'",
        ),
        ("extract.token_budget=0", r"token_budget must be auto or a positive integer, got 0"),
        ("extract.device=gpu", r"extract.device='gpu': use auto, cpu, cuda, cuda:N or mps"),
        ("extract.device=cuda:x", r"extract.device='cuda:x': use auto, cpu, cuda, cuda:N or mps"),
        ("extract.device=cpu:0", r"extract.device='cpu:0': use auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_bad_settings_are_refused_before_any_model_is_loaded(make_cfg, no_model, override, message):
    with pytest.raises(ConfigError, match=message):
        extract(make_cfg(override))
    with pytest.raises(ConfigError, match=message):
        plan_from_config(make_cfg(override))


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:7"])
def test_cuda_on_a_machine_without_it_is_refused_before_loading(
    make_cfg, no_model, monkeypatch, device
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ConfigError, match=f"extract.device='{device}': this machine has no usable CUDA GPU"
    ):
        extract(make_cfg(f"extract.device={device}"))


def test_a_cuda_index_beyond_the_machine_is_refused(make_cfg, no_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(
        ConfigError, match=r"'cuda:2': this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"
    ):
        extract(make_cfg("extract.device=cuda:2"))


def test_empty_need_poolings_and_fractional_need_layers_are_refused(make_cfg):
    cfg = make_cfg()
    with pytest.raises(ConfigError, match="no pooling requested"):
        plan_from_config(cfg, need=([1], []))
    with pytest.raises(ConfigError, match=r"whole layer indices, got \[1.5\]"):
        plan_from_config(cfg, need=([1.5], ["mean"]))


def test_valid_settings_still_plan(make_cfg):
    plan = plan_from_config(
        make_cfg("extract.layers=[1,-1]", "extract.shard_mb=0.5", "extract.token_budget=64")
    )
    assert plan.layers == (1, 3) and plan.shard_mb == 0.5 and plan.token_budget == 64


def test_a_gpu_the_device_files_do_not_show_is_confirmed_before_computing(make_cfg, monkeypatch):
    """`auto` names the cache entry to look up without importing torch where no GPU leaves a trace;
    before computing, torch's own answer decides the new entry's dtype (and key)."""
    import llmembed.extract.plan as plan

    monkeypatch.setattr(plan, "gpu_hints", lambda: False)
    monkeypatch.setattr(plan, "cpu_flags", lambda: frozenset({"avx512f"}))  # no bf16 on this CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    p = plan_from_config(make_cfg("extract.dtype=auto", "extract.device=auto"))
    assert p.spec.compute_dtype == "float32"  # what a hit looks up first (both dtypes are read)
    assert {s.compute_dtype for s in p.read_specs} == {"float32", "bfloat16"}
    confirmed = p.confirmed()
    assert confirmed.spec.compute_dtype == "bfloat16" and confirmed.key != p.key
    pinned = plan_from_config(make_cfg("extract.dtype=float32", "extract.device=auto"))
    assert pinned.confirmed() is pinned
    monkeypatch.setattr(plan, "gpu_hints", lambda: True)
    assert plan.presumed_device("auto") == "cuda"


@pytest.mark.parametrize(
    "variable",
    [None, "WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "ACCELERATE_MIXED_PRECISION", "PJRT_DEVICE"],
)
def test_a_plain_process_knows_it_is_alone_and_a_launched_one_asks_accelerate(
    monkeypatch, variable
):
    from llmembed.extract.ranks import LAUNCHER_PREFIXES, LAUNCHER_VARIABLES, Ranks

    for name in list(__import__("os").environ):
        if name in LAUNCHER_VARIABLES or name.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(name)
    if variable:
        monkeypatch.setenv(variable, "1" if variable != "PJRT_DEVICE" else "TPU")
    assert Ranks()._alone is (variable is None)
