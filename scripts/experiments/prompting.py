"""Prompting a causal LM: each class scored by the log-probability of its label word after a prompt,
zero-shot or with demonstrations (the counterpart of experiment 4a). A prompt is a plain template
(the label word follows it after a space) or the model's chat template (an instruction as the user's
turn, demonstrations as earlier turns, the label word as the start of the assistant's answer);
scores may be calibrated on content-free inputs (Zhao et al., 2021, "Calibrate before use")."""

from __future__ import annotations

import copy

import numpy as np
import torch


def render(template: str, text: str) -> str:
    return template.replace("{text}", text)


class PromptScorer:
    """Scores `prompt + word_prefix + word` for every label word: the sum of the word's token
    log-probs.

    `words[k]` is the label word of class k. One forward pass per prompt: the last position's
    distribution scores every word's first token; a word of several tokens continues from the
    pass's key/value cache (its remaining tokens placed right after the prompt's last real token),
    so the prompt is never run again per class. Batches are right-padded and sorted by length."""

    def __init__(
        self,
        model,
        tokenizer,
        words: list[str],
        *,
        token_budget: int = 2048,
        word_prefix: str = " ",
        add_special_tokens: bool = True,
    ):
        """`word_prefix`: what separates prompt and word (a space after a plain template, nothing
        at the start of a chat answer); `add_special_tokens=False` for prompts that already hold
        them (a rendered chat template)."""
        self.model, self.tok, self.token_budget = model, tokenizer, token_budget
        self.add_special_tokens = add_special_tokens
        self.word_ids = [
            tokenizer(word_prefix + w, add_special_tokens=False)["input_ids"] for w in words
        ]
        if len({tuple(w) for w in self.word_ids}) != len(words):
            raise ValueError(f"label words {words} do not tokenize to distinct sequences")

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tok(prompt, add_special_tokens=self.add_special_tokens)["input_ids"]

    def _batches(self, seqs: list[list[int]]):
        """Index lists of prompts sorted by length, each batch within the padded-token budget."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        start = 0
        while start < len(order):
            n = max(1, self.token_budget // max(len(seqs[order[start]]), 1))
            idx = order[start : start + n]
            while len(idx) > 1 and len(idx) * max(len(seqs[i]) for i in idx) > self.token_budget:
                idx = idx[:-1]
            yield idx
            start += len(idx)

    @torch.inference_mode()
    def scores(self, prompts: list[str]) -> np.ndarray:
        """(prompts, classes) summed log-probabilities of each label word. The tokens every
        prompt starts with (the demonstrations of a few-shot prompt, a chat template's system
        turn) run once; each batch continues from their key/value cache."""
        seqs = [self.prompt_ids(p) for p in prompts]
        shared = shared_prefix(seqs)
        out = np.zeros((len(prompts), len(self.word_ids)))
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        dev = self.model.device
        prefix = None
        if shared:
            ids = torch.tensor([seqs[0][:shared]], device=dev)
            prefix = decoder(input_ids=ids, use_cache=True).cache
        rests = [s[shared:] for s in seqs]
        for idx in self._batches(rests):
            lengths = torch.tensor([len(rests[i]) for i in idx], device=dev)
            width = int(lengths.max())
            x = torch.full((len(idx), width), self.tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, i in enumerate(idx):
                x[r, : len(rests[i])], mask[r, : len(rests[i])] = torch.tensor(rests[i]), 1
            x, mask = x.to(dev), mask.to(dev)
            if prefix is not None:  # (B, shared + width): the prefix is real for every row
                mask = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, shared), mask], 1)
            cache = None
            if prefix is not None:
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(idx))
            many = any(len(w) > 1 for w in self.word_ids)
            res = decoder(
                input_ids=x,
                attention_mask=mask,
                position_ids=shared + torch.arange(width, device=dev).expand(len(idx), -1),
                cache=cache,
                use_cache=many or cache is not None,
            )
            rows = torch.arange(len(idx), device=dev)
            first = torch.log_softmax(head(res.last_hidden_state[rows, lengths - 1]).float(), -1)
            for k, w in enumerate(self.word_ids):  # first: (B, vocab)
                score = first[:, w[0]]
                if len(w) > 1:  # the rest of the word, after each prompt's last real token
                    rest = torch.tensor(w[:-1], device=dev).expand(len(idx), -1)  # (B, m - 1)
                    more = decoder(
                        input_ids=rest,
                        attention_mask=torch.cat([mask, torch.ones_like(rest)], 1),
                        position_ids=shared
                        + lengths[:, None]
                        + torch.arange(len(w) - 1, device=dev),
                        cache=res.cache,
                        use_cache=True,
                    ).last_hidden_state
                    lp = torch.log_softmax(head(more).float(), -1)  # (B, m - 1, vocab)
                    score = score + lp[:, torch.arange(len(w) - 1), torch.tensor(w[1:])].sum(1)
                    res.cache.crop(-(len(w) - 1))  # back to the prompts alone
                out[idx, k] = score.cpu().numpy()
        return out

    def predict(self, prompts: list[str]) -> np.ndarray:
        return self.scores(prompts).argmax(axis=1)


def shared_prefix(seqs: list[list[int]], least: int = 16) -> int:
    """How many leading tokens every sequence shares, leaving each at least one token of its own;
    0 when fewer than `least` (not worth a cache) or only one sequence."""
    if len(seqs) < 2:
        return 0
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return n if n >= least else 0


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


def chat_prompt(tok, instruction: str, text: str, shots: list[tuple[str, str]]) -> str:
    """The model's chat template: each demonstration a user turn (the instruction filled with its
    text) answered by its label word, then the user turn to classify and the assistant's opening,
    which the label word continues."""
    messages = []
    for shot_text, word in shots:
        messages += [
            {"role": "user", "content": render(instruction, shot_text)},
            {"role": "assistant", "content": word},
        ]
    messages.append({"role": "user", "content": render(instruction, text)})
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def calibrated(scores: np.ndarray, content_free: np.ndarray) -> np.ndarray:
    """Contextual calibration: each prompt's label-word probabilities (normalized over the label
    words) divided by those of content-free inputs ("N/A", "", ...) in the same prompt, averaged;
    returned as log-scores whose argmax is the calibrated prediction. `scores`: (prompts, classes)
    summed log-probabilities; `content_free`: the same for the content-free prompts."""

    def normalized(x: np.ndarray) -> np.ndarray:
        return x - np.logaddexp.reduce(x, axis=1, keepdims=True)

    p_cf = np.exp(normalized(content_free)).mean(axis=0)  # (classes,)
    return normalized(scores) - np.log(p_cf)
