"""Configs chosen by name, resolved one way everywhere.

A name is looked up as Hydra looks it up for the command lines: the shipped configs first
(`llmembed.conf`), then the user's folder (`$LLMEMBED_CONFIG_DIR`, or `hydra.searchpath` inside a
command line); a shipped name wins. `llmembed-extract backbone=NAME`, a feature source
`{backbone: NAME}`, `llmembed.encode(texts, NAME)`, `llmembed.Cache().find(NAME)`, a saved
model's `conf` and the `llmembed-extract` command a message suggests all resolve NAME here.

Names are names, never paths: a `conf` of `../../elsewhere/evil` read from a model.json is refused
before any file is looked up.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llmembed.errors import UserError

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


class ConfigNameError(UserError, LookupError):
    """A config name that is not one, or that no config folder holds."""


def is_name(value: object) -> bool:
    """A config file's name: letters, digits, `_ . + -`; no path separator, no `..`."""
    return isinstance(value, str) and bool(_NAME.fullmatch(value)) and ".." not in value


def option_names(group: str) -> list[str]:
    """The options of a config group, shipped and the user's (as `--help` lists them)."""
    from llmembed.clihelp import group_options

    return [name for name, _, _ in group_options(group)]


def backbone_names() -> list[str]:
    """Backbone configs that name a model (`local` takes its path from the caller)."""
    return [n for n in option_names("backbone") if n != "local"]


def named_backbone(name: str) -> DictConfig:
    """The backbone config `name`, composed exactly as `llmembed-extract backbone=NAME` composes
    it (a user's file may build on another with `defaults:`)."""
    if not is_name(name):
        raise ConfigNameError(
            f"backbone {name!r} is not a config name (letters, digits, _ . + -); name a config "
            "of conf/backbone/ or of $LLMEMBED_CONFIG_DIR/backbone/, or give a mapping "
            "{name, path}"
        )
    known = backbone_names()
    if name not in known:
        raise ConfigNameError(
            f"no backbone config {name!r}; the configs are {', '.join(known)} (shipped, and "
            "yours in $LLMEMBED_CONFIG_DIR/backbone/), or give a mapping {name, path}"
        )
    backbone = compose_group("backbone", name)
    return OmegaConf.create(OmegaConf.to_container(backbone, resolve=False))


def compose_group(group: str, name: str) -> DictConfig:
    """The `group` section of the extract config with `group=name`, on the search path of the
    running command line where there is one."""
    import yaml
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from llmembed.overrides import config_error

    overrides = [f"{group}={name}"]
    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its own search path
            if HydraConfig.initialized() and HydraConfig.get().searchpath:
                paths = ",".join(repr(str(p)) for p in HydraConfig.get().searchpath)
                overrides.append(f"hydra.searchpath=[{paths}]")
            return compose("extract", overrides=overrides)[group]
        import llmembed  # noqa: F401  (registers the resolvers the shipped configs use)

        with initialize_config_module("llmembed.conf", version_base=None):
            return compose("extract", overrides=overrides)[group]
    except (HydraException, OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError) as err:
        raise config_error(err) from None


def check_backbone(cfg: DictConfig) -> None:
    """A backbone needs a path, and one called like a config must be that config's model:
    `backbone=minilm backbone.path=/models/tinybert` would store, list and save tinybert's vectors
    as minilm's."""
    if OmegaConf.is_missing(cfg, "path") or not cfg.get("path"):
        raise ConfigNameError(
            f"backbone {cfg.get('name')!r} has no path: set backbone.path to a model folder, a "
            ".gguf file or a hub id (e.g. backbone=local backbone.path=/models/my-model)"
        )
    name, path = cfg.get("name"), str(cfg.get("path"))
    if not is_name(name) or name not in backbone_names():
        return
    try:
        own = str(named_backbone(name).path)
    except Exception:  # its model package is not installed here: any path is another model
        own = None
    if own is not None and _same_location(own, path):
        return
    suggestion = Path(path).stem if path.endswith(".gguf") else Path(path.rstrip("/")).name
    raise ConfigNameError(
        f"backbone.path={path} is not the model of the backbone config {name!r} "
        f"({own or 'not installed here'}), so its vectors would be stored, listed and saved as "
        f"{name}'s; give it a name of its own: backbone=local backbone.name={suggestion} "
        f"backbone.path={path}"
    )


def _same_location(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
