"""OmegaConf resolvers used by the shipped configs."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from omegaconf import OmegaConf


def asset_path(package: str, relative: str) -> str:
    """A file inside an installed package (the packaged offline models), found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the model package {package!r} is not installed; run `bash scripts/setup.sh`, "
            "or point backbone.path at a model folder, a .gguf file or a hub id"
        )
    return str(Path(spec.submodule_search_locations[0]) / relative)


def path_part(name: object) -> str:
    """`name` made safe as one folder name (Hydra's sweep folders hold data set and backbone
    names): anything but letters, digits, `.`, `_` and `-` becomes `_`, so `/../../x` cannot climb
    out of the run folder."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(name)).strip(".")
    return safe or "_"


def file_stem(path: object) -> str:
    """A data file's name without its suffix (`reviews` for /data/reviews.csv; a save_to_disk
    folder's own name): what `dataset=file` calls the data set unless `dataset.name` is set."""
    p = Path(str(path).rstrip("/"))
    return p.name if p.is_dir() else p.stem


def config_dir() -> str:
    """`hydra.searchpath` entry of the Hydra apps: the folder `$LLMEMBED_CONFIG_DIR` names."""
    from llmembed.clihelp import search_path_entry

    return search_path_entry()


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("llmembed_asset"):
        OmegaConf.register_new_resolver("llmembed_asset", asset_path)
    if not OmegaConf.has_resolver("llmembed_path_part"):
        OmegaConf.register_new_resolver("llmembed_path_part", path_part)
    if not OmegaConf.has_resolver("llmembed_stem"):
        OmegaConf.register_new_resolver("llmembed_stem", file_stem)
    if not OmegaConf.has_resolver("llmembed_config_dir"):
        OmegaConf.register_new_resolver("llmembed_config_dir", config_dir)
