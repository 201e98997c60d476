"""The `llmembed-extract` command line that fills the entry a composed config asks for."""

from __future__ import annotations

from importlib.resources import files

from omegaconf import ListConfig


def extract_command(cfg) -> str:
    """`llmembed-extract ...` with the config's data set, backbone, extraction and cache settings
    (only those that differ from the defaults)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    def group(name: str, value: str, fallback: str) -> str:
        known = (files("llmembed.conf") / name / f"{value}.yaml").is_file()
        return f"{name}={value if known else fallback}"

    groups = [
        group("dataset", cfg.dataset.name, "file"),
        group("backbone", cfg.backbone.name, "local"),
    ]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app, e.g. llmembed-classify
        default = compose("extract", overrides=groups)
    else:
        with initialize_config_module("llmembed.conf", version_base=None):
            default = compose("extract", overrides=groups)
    args = list(groups)
    for section in ("dataset", "backbone", "extract", "cache"):
        for k, v in cfg[section].items():
            if k not in default[section] or default[section][k] != v:
                args.append(f"{section}.{k}={_cli_value(v)}")
    return "llmembed-extract " + " ".join(args)


def _cli_value(v) -> str:
    if isinstance(v, (ListConfig, list)):
        return "[" + ",".join(map(str, v)) + "]"
    text = "null" if v is None else str(v)
    return f"'{text}'" if any(c in text for c in " {}'\"\\,") else text
