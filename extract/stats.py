"""What an extraction did (texts, tokens, seconds, ...): light, so that a cache hit, which did
nothing, needs no torch to say so."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EmbedStats:
    texts: int = 0
    tokens: int = 0  # real tokens fed to the model
    padded_tokens: int = 0  # tokens including padding
    truncated: int = 0  # texts cut at max_length
    seconds: float = 0.0  # tokenizing and forward passes
    load_seconds: float = 0.0  # loading the model and tokenizer (set by the pipeline)
    oom_retries: int = 0
    forward_calls: int = 0
    widened: set[str] = field(default_factory=set)  # poolings returned in float32: beyond out_dtype
    replanned: dict[int, tuple[int, ...]] = field(
        default_factory=dict
    )  # shard -> batches after OOM

    def add(self, other: EmbedStats) -> None:
        for name in self.__dataclass_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            merged = mine | theirs if isinstance(mine, set | dict) else mine + theirs
            setattr(self, name, merged)
