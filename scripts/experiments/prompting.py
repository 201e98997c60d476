"""Prompting a causal LM: each class scored by the log-probability of its label word after a fixed
template, zero-shot or with demonstrations (the counterpart of experiment 4a)."""

from __future__ import annotations

import numpy as np
import torch


def render(template: str, text: str) -> str:
    return template.replace("{text}", text)


class PromptScorer:
    """Scores `prompt + " " + word` for every label word: the sum of the word's token log-probs.

    `words[k]` is the label word of class k. When every word is one token (the packaged templates),
    one forward pass per prompt scores every class from the last position's distribution; longer
    words take one pass per class. Batches are right-padded and sorted by length."""

    def __init__(self, model, tokenizer, words: list[str], *, token_budget: int = 2048):
        self.model, self.tok, self.token_budget = model, tokenizer, token_budget
        self.word_ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]
        if len({tuple(w) for w in self.word_ids}) != len(words):
            raise ValueError(f"label words {words} do not tokenize to distinct sequences")
        self.single = all(len(w) == 1 for w in self.word_ids)

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tok(prompt, add_special_tokens=True)["input_ids"]

    @torch.inference_mode()
    def _logprobs_at(self, seqs: list[list[int]], where: list[list[int]]) -> list[torch.Tensor]:
        """Log-softmax over the vocabulary at positions `where[i]` of sequence i ((len(where[i]),
        vocab) float32 each). The LM head runs on those positions only, not on every token."""
        out: list[torch.Tensor | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        start = 0
        while start < len(order):
            n = max(1, self.token_budget // max(len(seqs[order[start]]), 1))
            idx = order[start : start + n]
            while len(idx) > 1 and len(idx) * max(len(seqs[i]) for i in idx) > self.token_budget:
                idx = idx[:-1]  # a batch of padded tokens within the budget
            width = max(len(seqs[i]) for i in idx)
            x = torch.full((len(idx), width), self.tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, i in enumerate(idx):
                x[r, : len(seqs[i])], mask[r, : len(seqs[i])] = torch.tensor(seqs[i]), 1
            dev = self.model.device
            h = decoder(input_ids=x.to(dev), attention_mask=mask.to(dev)).last_hidden_state
            for r, i in enumerate(idx):  # h: (B, T, H), final-normed
                logits = head(
                    h[r, torch.tensor(where[i], device=dev)]
                ).float()  # (positions, vocab)
                out[i] = torch.log_softmax(logits, dim=-1).cpu()
            start += len(idx)
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def scores(self, prompts: list[str]) -> np.ndarray:
        """(prompts, classes) summed log-probabilities of each label word."""
        base = [self.prompt_ids(p) for p in prompts]
        if self.single:
            firsts = torch.tensor([w[0] for w in self.word_ids])
            lps = self._logprobs_at(base, [[len(b) - 1] for b in base])
            return torch.stack([lp[0, firsts] for lp in lps]).numpy()
        out = np.zeros((len(prompts), len(self.word_ids)))
        for k, w in enumerate(self.word_ids):
            seqs = [b + w[:-1] for b in base]
            lps = self._logprobs_at(
                seqs, [list(range(len(b) - 1, len(b) - 1 + len(w))) for b in base]
            )
            for i, lp in enumerate(lps):
                out[i, k] = lp[torch.arange(len(w)), torch.tensor(w)].sum().item()
        return out

    def predict(self, prompts: list[str]) -> np.ndarray:
        return self.scores(prompts).argmax(axis=1)


def truncate(tok, text: str, max_tokens: int) -> str:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tok.decode(ids[:max_tokens])


def few_shot_prefix(
    tok, template: str, words: list[str], shots: list[tuple[str, int]], max_shot_tokens: int
) -> str:
    """Demonstrations, each the template filled with a training text and followed by its label word."""
    return "".join(
        render(template, truncate(tok, text, max_shot_tokens)) + " " + words[label] + "\n\n"
        for text, label in shots
    )


def draw_shots(labels: np.ndarray, train_rows: np.ndarray, per_class: int, seed: int) -> list[int]:
    """`per_class` training rows of every class, in a seeded shuffled order."""
    rng = np.random.default_rng(seed)
    picked = []
    for k in np.unique(labels):
        rows = train_rows[labels[train_rows] == k]
        picked += rng.choice(rows, size=min(per_class, len(rows)), replace=False).tolist()
    return rng.permutation(picked).tolist()
