"""llmembed: frozen language models as text classifiers (LLMEmbed, ACL 2024).

Stage one, `llmembed.extract`, runs backbones once per text and caches pooled hidden states of every
layer (`llmembed.cache`); stage two fuses cached layers and trains light classifiers on them.

The Python API, imported on first use so that `import llmembed` stays light (no torch):
`llmembed.Encoder` (a backbone loaded once, texts -> per-layer embeddings through the cache, or
not), `llmembed.encode` (one call of it), `llmembed.Features` (a scikit-learn transformer),
`llmembed.Cache` (read what the cache holds) and `llmembed.mteb`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llmembed.resolvers import register_resolvers

register_resolvers()

if TYPE_CHECKING:
    from llmembed.api import Cache, CachedEntry, encode
    from llmembed.encoder import Encoder
    from llmembed.transformer import Features

_LAZY = {
    "encode": "llmembed.api",
    "Encoder": "llmembed.encoder",
    "Cache": "llmembed.api",
    "CachedEntry": "llmembed.api",
    "Features": "llmembed.transformer",
}
__all__ = ["Cache", "CachedEntry", "Encoder", "Features", "encode", "mteb"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "mteb":
        return importlib.import_module("llmembed.mteb")
    raise AttributeError(f"module 'llmembed' has no attribute {name!r}")
