"""Feature sources read from the cache and fused into what a classifier head consumes.

A feature spec is a list of sources, each (backbone, layers, pooling). Every (source, layer) gives one
block of shape (rows, hidden). Fusion turns blocks into features:

- `concat`: all blocks side by side;
- `mean`: per source, the mean of its layers; sources side by side (the paper's "mean of the last
  five layers");
- `cooccurrence`: blocks are kept apart for the paper's head, which learns the fusion (see
  `llmembed.classify.heads.LLMEmbedHead`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.resources import files

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from llmembed.configs import ConfigNameError, named_backbone
from llmembed.data.datasets import TextDataset
from llmembed.errors import UserError

log = logging.getLogger(__name__)

FUSIONS = ("concat", "mean", "cooccurrence")


class FeatureError(UserError, ValueError):
    """A feature spec cannot be served as written; the message says what to change."""


ROLES = ("llm", "encoder")


@dataclass(frozen=True)
class Source:
    backbone: DictConfig  # a resolved backbone config (name, path, ...)
    layers: tuple[int, ...]
    pooling: str
    role: str | None = None  # "llm" (layers averaged and joined by the paper's head) or "encoder"
    conf_name: str | None = None  # the conf/backbone/ file it came from, if any (portable by name)


def backbone_config(ref) -> DictConfig:
    """A source's backbone: a config name (shipped or the user's, as `backbone=NAME` on the
    command line), or an inline mapping {name, path, ...}."""
    if isinstance(ref, str):
        try:
            return named_backbone(ref)
        except ConfigNameError as err:
            raise FeatureError(str(err)) from None
    base = OmegaConf.load(str(files("llmembed.conf") / "backbone" / "local.yaml"))
    return OmegaConf.merge(base, ref)


def parse_sources(spec: DictConfig) -> list[Source]:
    if not spec.sources:
        raise FeatureError(
            "features.sources is empty: name at least one (backbone, layers, pooling)"
        )
    out = []
    for i, src in enumerate(spec.sources):
        layers = src.layers
        layers = [layers] if _is_int(layers) else layers
        if not isinstance(layers, (list, ListConfig)) or not layers:
            raise FeatureError(
                f"features.sources[{i}].layers must be a layer or a list, got {layers!r}"
            )
        odd = [x for x in layers if not _is_int(x)]
        if odd:  # 1.5 is not layer 1, True is not layer 1, '46' is not 46
            raise FeatureError(
                f"features.sources[{i}].layers must be whole layer indices, got {odd[0]!r} in "
                f"{list(layers)}; e.g. layer=4 or features.sources.{i}.layers=[4,-1]"
            )
        role = src.get("role")
        if role is not None and role not in ROLES:
            raise FeatureError(f"features.sources[{i}].role must be one of {ROLES}, got {role!r}")
        out.append(
            Source(
                backbone_config(src.backbone),
                tuple(int(x) for x in layers),
                src.pooling,
                role=role,
                conf_name=src.backbone if isinstance(src.backbone, str) else None,
            )
        )
    return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def block_roles(sources: list[Source], source_of_block: list[int]) -> tuple[str, ...]:
    """The role of every block, for the paper's head; every source must declare one."""
    undeclared = [i for i, s in enumerate(sources) if s.role is None]
    if undeclared:
        raise FeatureError(
            f"the paper's head needs each source's role, but features.sources{undeclared} declare "
            "none; add `role: llm` (its layers are averaged and joined to the fused features) or "
            "`role: encoder` to each source"
        )
    if not any(s.role == "llm" for s in sources):
        raise FeatureError("the paper's head needs at least one source with `role: llm`")
    return tuple(sources[s].role for s in source_of_block)


@dataclass
class Features:
    """Blocks of one data set's rows, aligned across sources."""

    blocks: list[np.ndarray]  # each (rows, hidden) float32
    block_names: list[str]
    source_of_block: list[int]  # index into `sources`
    layers: list[list[int]]  # per source, its layer indices (negative ones resolved)
    sources: list[Source]
    labels: np.ndarray  # (rows,)
    split: np.ndarray  # (rows,) 0 train, 1 validation, 2 test
    row_ids: np.ndarray
    label_names: list[str]
    entries: list = field(default_factory=list)  # per source, what served it (entry, hit, stats)

    def fuse(self, fusion: str) -> np.ndarray:
        return fuse_blocks(self.blocks, self.source_of_block, fusion)

    @property
    def block_sizes(self) -> list[int]:
        return [b.shape[1] for b in self.blocks]


def fuse_blocks(blocks: list[np.ndarray], owners: list[int], fusion: str) -> np.ndarray:
    """(rows, features) for a head. `cooccurrence` lays the blocks side by side like `concat`: the
    paper's head splits them again by their sizes and learns the fusion."""
    if fusion in ("concat", "cooccurrence"):
        return np.concatenate(blocks, axis=1)
    if fusion == "mean":
        per_source = [
            np.mean([b for b, o in zip(blocks, owners, strict=True) if o == s], axis=0)
            for s in dict.fromkeys(owners)
        ]
        return np.concatenate(per_source, axis=1)
    raise FeatureError(f"fusion must be one of {FUSIONS}, got {fusion!r}")


def resolve_fusion(fusion: str, head: str) -> str:
    """`auto`: the paper's co-occurrence fusion for its head, concatenation for the others."""
    if fusion == "auto":
        return "cooccurrence" if head == "llmembed" else "concat"
    if (fusion == "cooccurrence") != (head == "llmembed"):
        raise FeatureError(
            f"fusion {fusion!r} with head {head!r}: co-occurrence fusion is learned by the paper's head, "
            "so use it with head=llmembed (and that head with it), or fusion=auto"
        )
    if fusion not in FUSIONS:
        raise FeatureError(f"fusion must be auto or one of {FUSIONS}, got {fusion!r}")
    return fusion


def load_features(sources: list[Source], stored: list, dataset: TextDataset) -> Features:
    """Read every source's layers for the data set's texts, from the cache entries `stored` (one per
    source, each with `.read(pooling, layers)` in the data set's row order and `.entry`, as the
    extraction stage returns them). Labels, splits and ids come from the data set: the cache
    holds none. Nothing here runs a model or writes to the cache."""
    blocks, names, owners, all_layers = [], [], [], []
    for s, (src, rows) in enumerate(zip(sources, stored, strict=True)):
        num_layers = rows.entry.manifest.num_layers
        layers = [x + (num_layers + 1 if x < 0 else 0) for x in src.layers]
        values = rows.read(src.pooling, layers)  # (rows, layers, hidden)
        if len(values) != len(dataset):
            raise FeatureError(
                f"{rows.entry.path} served {len(values)} rows for {len(dataset)} texts"
            )
        all_layers.append(layers)
        for j, layer in enumerate(layers):
            blocks.append(values[:, j])
            names.append(f"{src.backbone.name}:{src.pooling}:L{layer}")
            owners.append(s)
    return Features(
        blocks=blocks,
        block_names=names,
        source_of_block=owners,
        layers=all_layers,
        sources=sources,
        labels=dataset.labels,
        split=dataset.split,
        row_ids=dataset.row_ids,
        label_names=dataset.label_names,
        entries=list(stored),
    )
