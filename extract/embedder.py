"""A loaded model as an embedder: tokenize, check that padding gives its own numbers, and pool every
stored layer of a padded batch on the device (the loop over batches is `llmembed.extract.stream`)."""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from llmembed.extract.batching import MAX_PADDING, Tokens
from llmembed.extract.pooling import LayerPooler, first_token_index, pool_layers
from llmembed.extract.stats import EmbedStats

log = logging.getLogger(__name__)

SIDES = ("left", "right")
# Families that number positions from the attention mask themselves, offset included (OPT adds 2):
# leaving positions to them is exactly their own rule.
MODEL_MADE_POSITIONS = frozenset({"opt"})
# How far a padded batch may drift from the model's own unpadded forward pass (largest relative
# error of a token's hidden state), per compute dtype. Wrong positions or leaking padding move
# hidden states by tens of percent; bfloat16 rounding between batch shapes stays near 1%.
PADDING_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.05, torch.bfloat16: 0.1}
# Two texts of different lengths for the padding check, so that one of them is padded.
PROBE_TEXTS = ("good", "the movie was not very good but the music was fun")


class UnsupportedModelError(ValueError):
    """Padded batches of this model would not give its own numbers; the message says what to do."""


@dataclass(frozen=True)
class PositionRule:
    """How a family numbers the tokens of a padded batch."""

    # Position id of each text's first real token, the next ones counted over the mask; None:
    # positions are left to the model.
    first: int | None
    sides: tuple[str, ...]  # padding sides under which the model gives its unpadded numbers


def position_rule(model: torch.nn.Module) -> PositionRule:
    """Llama-, GPT-2-, BERT-like models count from 0; RoBERTa-like ones (RoBERTa, XLM-R, CamemBERT,
    MPNet, Longformer) from `padding_idx + 1`, which their position embedding table is built
    around; a model that takes no position ids numbers padding too, so only right padding works."""
    if model.config.model_type in MODEL_MADE_POSITIONS:
        return PositionRule(None, SIDES)
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return PositionRule(None, ("right",))
    pad = _position_padding_idx(model)
    return PositionRule(0 if pad is None else pad + 1, SIDES)


def padding_sides(model: torch.nn.Module) -> tuple[str, ...]:
    """The padding sides under which `model` gives its own unpadded numbers."""
    return position_rule(model).sides


def layer_stack(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of transformer layers (the ModuleList of `num_hidden_layers` blocks run
    in order: `layers`, `h`, `encoder.layer`...), or None where there is no such list."""
    n = model.config.get_text_config().num_hidden_layers
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not n or not stacks:
        return None
    return max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()))


@contextlib.contextmanager
def tapped(stack: torch.nn.ModuleList, sink: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Hand each hidden state to `sink(index, (B, T, H))` as the layers make it: index 0 is the
    input of the first layer, index i the output of layer i - 1. The model keeps none of them."""

    def first(module, args, kwargs):
        sink(0, args[0] if args else kwargs["hidden_states"])

    def after(j: int):
        def hook(module, args, output):
            sink(j, output[0] if isinstance(output, tuple | list) else output)

        return hook

    handles = [stack[0].register_forward_pre_hook(first, with_kwargs=True)]
    handles += [layer.register_forward_hook(after(i + 1)) for i, layer in enumerate(stack)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN equal to NaN (padded positions may hold NaN)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _position_padding_idx(model: torch.nn.Module) -> int | None:
    """`padding_idx` of the position embedding table, where it has one (the RoBERTa family)."""
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, torch.nn.Embedding):
            return module.padding_idx
    return None


@dataclass
class Extractor:
    """Runs a loaded model over texts and returns pooled hidden states of the requested layers.

    Built, it checks once (three forward passes over two short texts) that a padded batch gives the
    model's own unpadded numbers, and refuses the model otherwise."""

    model: torch.nn.Module
    tokenizer: object
    layers: list[int]  # hidden-state indices to keep, 0 = embeddings
    poolings: list[str]
    max_length: int
    prompt: str = "{text}"
    truncation_side: str = "right"
    padding_side: str = "right"
    token_budget: int = 16384  # padded tokens per forward batch; halved on out-of-memory
    max_padding: float = MAX_PADDING  # share of a batch's padded tokens that may be padding
    device: str = "cpu"
    # What `embed` returns: the store dtype (a float16 shard takes half the memory). A pooling with
    # values beyond its range is returned in float32 (see `llmembed.extract.stream`).
    out_dtype: torch.dtype = torch.float32
    _kwargs: dict = field(init=False, default_factory=dict)
    # How the last hidden state is taken while pooling inside the layers: "raw" (the last layer's
    # output) or "final" (the model's last_hidden_state, final norm applied, which is what
    # `hidden_states[-1]` holds for most full decoders); None: this model's hidden states could not
    # be matched inside its layers, so every requested layer is kept until the batch is pooled.
    tap_last: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        assert self.padding_side in SIDES, self.padding_side
        model_type = self.model.config.model_type
        rule = position_rule(self.model)
        if self.padding_side not in rule.sides:
            raise UnsupportedModelError(
                f"{model_type} numbers its positions 0..T-1 whatever the padding (its forward "
                f"takes no position_ids), so {self.padding_side} padding would shift every text; "
                f"set backbone.padding_side={rule.sides[0]}"
            )
        self._first_position = rule.first
        if "use_cache" in inspect.signature(self.model.forward).parameters:
            self._kwargs["use_cache"] = False  # no KV cache is wanted for one pass
        self.tokenizer.truncation_side = self.truncation_side
        vocab = self.model.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocab:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model embeds only {vocab}: "
                "they do not belong together; check backbone.tokenizer"
            )
        self._stack = layer_stack(self.model)
        self._check_padding()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    def layer_counts(self) -> dict[str, int]:
        """How many layers each pooling returns (the pooler: one, of the last layer)."""
        return {p: 1 if p == "pooler" else len(self.layers) for p in self.poolings}

    def tokenize(self, texts: list[str]) -> Tokens:
        """Token ids per text, truncated to max_length, with the prompt applied."""
        if not texts:
            return Tokens.from_lists([], np.zeros(0, dtype=bool))
        enc = self.tokenizer(
            [self.prompt.replace("{text}", t) for t in texts],
            truncation=True,
            max_length=self.max_length,
            return_overflowing_tokens=True,
            return_attention_mask=False,
        )
        # Overflow pieces of a truncated text follow its first piece; keep that first piece only.
        owner = enc["overflow_to_sample_mapping"]
        ids: list[list[int]] = [None] * len(texts)  # type: ignore[list-item]
        for piece, row in zip(enc["input_ids"], owner, strict=True):
            if ids[row] is None:
                ids[row] = piece
        return Tokens.from_lists(ids, np.bincount(owner, minlength=len(texts)) > 1)

    def embed(
        self, texts: list[str], on_batch: Callable[[int, int], None] | None = None
    ) -> tuple[dict[str, np.ndarray], EmbedStats]:
        """{pooling: (len(texts), layers, hidden) of `out_dtype`, or float32 for a pooling with
        values beyond its range} in the order of `texts`, batched as an extraction batches."""
        from llmembed.extract.stream import embed_all

        start = time.perf_counter()
        out, stats = embed_all(self, self.tokenize(texts), self.out_dtype, on_batch)
        stats.seconds = time.perf_counter() - start
        return out, stats

    def _tensors(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, mask) of all `tokens` as one padded batch on the device."""
        ids, mask = tokens.padded(
            np.arange(len(tokens)), self.padding_side, self.tokenizer.pad_token_id
        )
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)

    def _run(self, input_ids: torch.Tensor, mask: torch.Tensor, **extra):
        """The model's forward on a padded batch, positions by the family's rule."""
        kwargs = dict(self._kwargs)
        if self._first_position is not None:
            # Counted over real tokens only, so that left padding does not shift a text.
            kwargs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0) + self._first_position
        return self.model(input_ids=input_ids, attention_mask=mask, **kwargs, **extra)

    def _hidden(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All hidden states of a padded batch, each (B, T, H)."""
        return self._run(input_ids, mask, output_hidden_states=True).hidden_states

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """{pooling: (B, layers, H) float32} of a padded batch, on the device."""
        if self.tap_last is None:
            hidden = self._hidden(input_ids, mask)
            pooled = pool_layers([hidden[layer] for layer in self.layers], mask, self.poolings)
            last = hidden[-1]
        else:
            pooled, last = self._pool_inside(input_ids, mask)
        if "pooler" in self.poolings:
            # The model's pooler reads position 0, which is padding under left padding: hand it the
            # first real token of the last layer instead.
            first = last[torch.arange(len(mask), device=last.device), first_token_index(mask)]
            pooled["pooler"] = self.model.pooler(first[:, None, :]).float()[:, None, :]  # (B, 1, H)
        return pooled

    def _pool_inside(
        self, input_ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Pool each requested hidden state as its layer returns it, so that peak memory is one
        layer's activations whatever the number of stored layers. Same numbers, bit for bit, as
        pooling the model's `hidden_states` (checked at construction)."""
        pooler = LayerPooler(mask, self.poolings, len(self.layers))
        slot = {layer: j for j, layer in enumerate(self.layers)}
        last_index = len(self._stack)
        kept: dict[str, torch.Tensor] = {}

        def sink(index: int, h: torch.Tensor) -> None:
            if index == last_index and self.tap_last != "raw":
                return
            if index in slot:
                pooler.add(slot[index], h)
            if index == last_index and "pooler" in self.poolings:
                kept["last"] = h

        with tapped(self._stack, sink):
            out = self._run(input_ids, mask)
        if self.tap_last == "final":
            if last_index in slot:
                pooler.add(slot[last_index], out.last_hidden_state)
            kept["last"] = out.last_hidden_state
        return pooler.out, kept.get("last")

    @torch.inference_mode()
    def _check_padding(self) -> None:
        """Refuse a model whose padded batch differs from its own forward pass on each text alone
        (with its default positions): this guards the families that no rule above knows."""
        tokens = self.tokenize(list(PROBE_TEXTS))
        input_ids, mask = self._tensors(tokens)
        seqs = [tokens.ids[tokens.starts[i] : tokens.starts[i + 1]].tolist() for i in range(2)]
        seen: dict[int, torch.Tensor] = {}
        if self._stack is not None:
            with tapped(self._stack, lambda index, h: seen.setdefault(index, h)):
                out = self._run(input_ids, mask, output_hidden_states=True)
        else:
            out = self._run(input_ids, mask, output_hidden_states=True)
        batched = out.hidden_states
        self.tap_last = self._tap_mode(seen, batched, out)
        dtype = self.model.get_input_embeddings().weight.dtype
        tolerance = PADDING_TOLERANCE.get(dtype, 0.1)
        for row, seq in enumerate(seqs):
            ids = torch.tensor([seq], device=self.device)
            alone = self.model(input_ids=ids, output_hidden_states=True, **self._kwargs)
            start = batched[0].shape[1] - len(seq) if self.padding_side == "left" else 0
            for layer in self.layers:
                want = alone.hidden_states[layer][0].float()  # (T, H)
                got = batched[layer][row, start : start + len(seq)].float()
                error = ((got - want).norm(dim=-1) / want.norm(dim=-1).clamp(min=1e-6)).max()
                if not error <= tolerance:  # NaN fails too
                    raise UnsupportedModelError(
                        f"{self.model.config.model_type}: under {self.padding_side} padding, "
                        f"hidden state {layer} of a padded batch differs from the model's own "
                        f"forward pass on the text alone by {float(error):.3g} (relative; "
                        f"tolerance {tolerance:g} in {str(dtype).removeprefix('torch.')}), so "
                        "its embeddings would depend on padding and be wrong. llmembed does not "
                        "know how this architecture numbers positions under padding: try "
                        f"backbone.padding_side={'right' if self.padding_side == 'left' else 'left'}"
                        ", or add a rule for it in llmembed.extract.embedder.position_rule"
                    )

    def _tap_mode(self, seen: dict[int, torch.Tensor], hidden, out) -> str | None:
        """Whether the states the layer hooks saw are the model's own `hidden_states`, index for
        index and bit for bit, and where its last one comes from; None (keep every layer until the
        batch is pooled) for a family whose hidden states are not its layers' inputs and outputs."""
        last = len(hidden) - 1
        if (
            self._stack is None
            or len(self._stack) != last
            or not all(j in seen and _same(seen[j], hidden[j]) for j in range(last))
        ):
            mode = None
        elif last in seen and _same(seen[last], hidden[last]):
            mode = "raw"
        elif _same(out.last_hidden_state, hidden[last]):
            mode = "final"
        else:
            mode = None
        if mode is None:
            log.info(
                "%s: hidden states are not the inputs and outputs of its layers; keeping every "
                "requested layer of a batch until it is pooled (memory grows with the layers)",
                self.model.config.model_type,
            )
        return mode
