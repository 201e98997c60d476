"""The `llmembed-extract` command line that fills the entry a composed config asks for."""

from __future__ import annotations

from omegaconf import ListConfig, OmegaConf

from llmembed.configs import is_name, option_names


def extract_command(cfg) -> str:
    """`llmembed-extract ...` with the config's data set, backbone, extraction and cache settings
    (only those that differ from the defaults)."""
    choices = {
        "dataset": _choice("dataset", cfg.dataset, "file"),
        "backbone": _choice("backbone", cfg.backbone, "local"),
    }
    default = _compose([f"{k}={v}" for k, v in choices.items()])
    for group, fallback in (("dataset", "file"), ("backbone", "local")):
        if default[group].get("source") != cfg[group].get("source"):  # a file called mr.csv
            choices[group] = fallback
            default = _compose([f"{k}={v}" for k, v in choices.items()])
    args = [f"{k}={v}" for k, v in choices.items()]
    for section in ("dataset", "backbone", "extract", "cache"):
        # Compared as written: a name made from the path (`${llmembed_stem:...}`) is not repeated.
        mine = OmegaConf.to_container(cfg[section], resolve=False)
        theirs = OmegaConf.to_container(default[section], resolve=False)
        for k, v in mine.items():
            if k not in theirs or theirs[k] != v:
                args.append(f"{section}.{k}={_cli_value(cfg[section][k])}")
    return "llmembed-extract " + " ".join(args)


def _choice(group: str, section, fallback: str) -> str:
    """The config the section was made from: Hydra's own record inside a command line, else the
    config of that name where there is one (a backbone called like a config is that config's
    model: `llmembed.configs.check_backbone`)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and HydraConfig.get().runtime.choices.get(group):
        return HydraConfig.get().runtime.choices[group]
    name = section.get("name")
    return name if is_name(name) and name in option_names(group) else fallback


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app, e.g. llmembed-classify
        return compose("extract", overrides=overrides)
    with initialize_config_module("llmembed.conf", version_base=None):
        return compose("extract", overrides=overrides)


def _cli_value(v) -> str:
    if isinstance(v, (ListConfig, list)):
        return "[" + ",".join(map(str, v)) + "]"
    text = "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    return f"'{text}'" if any(c in text for c in " {}'\"\\,") else text
