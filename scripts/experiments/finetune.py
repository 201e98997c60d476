"""Fine-tuning a text model end to end or through LoRA adapters (the counterparts of experiment 4b):
the model, a pooling and a linear layer, AdamW with a linear warm-up and decay on the parameters
that train, early stopping on validation accuracy (the best epoch's weights kept), the test split
scored once at the end."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from llmembed.classify.heads import is_number, is_whole

log = logging.getLogger("results.finetune")
POOLINGS = ("mean", "first", "last")


class SettingError(ValueError):
    """A setting that cannot run: it would crash hours into a run or train nothing without a
    word. `field` names it, `fix` says what to give instead."""

    def __init__(self, field: str, value, fix: str):
        super().__init__(f"{field}={value!r}: {fix}")
        self.field, self.value, self.fix = field, value, fix


def whole(field: str, value, least: int = 1, fix: str = "") -> int:
    """`value` if it is a whole number of at least `least`, else SettingError."""
    if not is_whole(value, least):
        raise SettingError(field, value, fix or f"use a whole number, {least} or more")
    return value


@dataclass
class FineTuneConfig:
    lr: float = 5e-5  # AdamW learning rate (peak, after warm-up)
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    batch_size: int = 32  # texts per step
    # Texts per forward and backward pass, their gradients summed into the step's (None: the
    # whole batch): the same steps in less memory (LoRA on BBC holds ~20 GB at 16 x 512 tokens),
    # with other dropout masks.
    micro_batch: int | None = None
    max_epochs: int = 4  # upper bound; early stopping usually ends sooner
    patience: int = 1  # epochs without a better validation accuracy before stopping
    warmup: float = 0.1  # share of all steps with a linear warm-up, then linear decay to 0
    max_length: int = 128  # tokens per text (truncated)
    pooling: str = "mean"  # mean over real tokens, "first" (CLS) or "last" (a decoder's last token)
    seed: int = 0

    def __post_init__(self):
        for name in ("batch_size", "max_epochs", "patience", "max_length"):
            whole(name, getattr(self, name))
        if self.micro_batch is not None:
            fix = "use a whole number of texts, 1 or more, or null for the whole batch"
            whole("micro_batch", self.micro_batch, fix=fix)
        for name, ok, fix in (
            ("lr", lambda v: v > 0, "use a positive learning rate"),
            ("weight_decay", lambda v: v >= 0, "use 0 or more"),
            ("warmup", lambda v: 0 <= v < 1, "use a share of the steps, from 0 to below 1"),
        ):
            v = getattr(self, name)
            if not (is_number(v) and ok(v)):
                raise SettingError(name, v, fix)
        if self.pooling not in POOLINGS:
            raise SettingError("pooling", self.pooling, f"use one of {', '.join(POOLINGS)}")


class TextClassifier(nn.Module):
    """A text model's last hidden states, pooled, then a linear layer. Under right padding the
    last real token of row i sits at attention_mask[i].sum() - 1."""

    def __init__(self, backbone: nn.Module, n_classes: int, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise SettingError("pooling", pooling, f"use one of {', '.join(POOLINGS)}")
        self.backbone, self.pooling = backbone, pooling
        hidden = backbone.config.get_text_config().hidden_size
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, input_ids, attention_mask):  # (B, T) -> (B, classes) logits
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "first":
            pooled = h[:, 0]
        elif self.pooling == "last":
            pooled = h[torch.arange(len(h), device=h.device), attention_mask.sum(1) - 1]
        else:
            m = attention_mask[:, :, None].to(h.dtype)  # (B, T, 1)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return self.classifier(pooled.float())


@dataclass
class FineTuneResult:
    model: TextClassifier
    best_epoch: int
    history: list[dict] = field(default_factory=list)  # per epoch: train loss, validation accuracy
    train_s: float = 0.0
    params_trained: int = 0


def _encode(tok, texts, rows, cfg: FineTuneConfig):
    """Token ids and attention mask of `texts[rows]`, padded to the longest of them."""
    enc = tok(
        [texts[i] for i in rows],
        padding=True,
        truncation=True,
        max_length=cfg.max_length,
        return_tensors="pt",
    )
    return enc["input_ids"], enc["attention_mask"]


def _batches(tok, texts, labels, idx, cfg: FineTuneConfig):
    for start in range(0, len(idx), cfg.batch_size):
        rows = idx[start : start + cfg.batch_size]
        yield *_encode(tok, texts, rows, cfg), torch.as_tensor(labels[rows])


@torch.inference_mode()
def predict(
    model: TextClassifier, tok, texts: list[str], cfg: FineTuneConfig, batch_size: int = 64
) -> np.ndarray:
    model.eval()
    order = np.argsort([len(t) for t in texts])  # similar lengths together: less padding
    out = np.zeros(len(texts), dtype=np.int64)
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = _encode(tok, texts, rows, cfg)
        dev = model.classifier.weight.device
        logits = model(ids.to(dev), mask.to(dev))
        out[rows] = logits.argmax(1).cpu().numpy()
    return out


def fine_tune(
    backbone,
    tok,
    texts: list[str],
    labels: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    n_classes: int,
    cfg: FineTuneConfig,
) -> FineTuneResult:
    """Train `backbone` + a linear layer on `train_rows` (every parameter of the backbone that
    requires a gradient: all of them, or only LoRA adapters, see lora.py); keep the epoch with the
    best validation accuracy."""
    torch.manual_seed(cfg.seed)
    dev = next(backbone.parameters()).device
    model = TextClassifier(backbone, n_classes, cfg.pooling).float().to(dev).train()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.ndim > 1]
    no_decay = [p for n, p in trained if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    steps = cfg.max_epochs * per_epoch
    warm = max(1, int(cfg.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    rng = np.random.default_rng(cfg.seed)
    best_acc, best_state, best_epoch, history = -1.0, None, -1, []
    t0 = time.perf_counter()
    # A tenth of an epoch at a time in the log: an epoch of LoRA on BBC takes hours on a CPU.
    every = math.ceil(per_epoch / 10)
    for epoch in range(cfg.max_epochs):
        model.train()
        losses, t_epoch = [], time.perf_counter()
        batches = _batches(tok, texts, labels, rng.permutation(train_rows), cfg)
        for step, (ids, mask, y) in enumerate(batches, 1):
            dev = model.classifier.weight.device
            opt.zero_grad()
            loss, size = 0.0, cfg.micro_batch or len(y)
            for start in range(0, len(y), size):
                part = slice(start, start + size)
                logits = model(ids[part].to(dev), mask[part].to(dev))
                # The batch's mean loss: each part weighs by its share of the batch's texts.
                part_loss = nn.functional.cross_entropy(logits, y[part].to(dev)) * (
                    len(y[part]) / len(y)
                )
                part_loss.backward()
                loss += part_loss.item()
            opt.step()
            sched.step()
            losses.append(loss)
            if step % every == 0 and step < per_epoch:
                took = time.perf_counter() - t_epoch
                log.info(
                    "epoch %d: step %d/%d, train loss %.4f, %.0f s, about %.0f s left in the epoch",
                    epoch,
                    step,
                    per_epoch,
                    np.mean(losses[-every:]),
                    took,
                    took / step * (per_epoch - step),
                )
        pred = predict(model, tok, [texts[i] for i in val_rows], cfg)
        acc = float((pred == labels[val_rows]).mean())
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "first_loss": losses[0],
                "last_loss": losses[-1],
                "val_accuracy": acc,
            }
        )
        log.info(
            "epoch %d: train loss %.4f, validation accuracy %.4f",
            epoch,
            history[-1]["train_loss"],
            acc,
        )
        if acc > best_acc:
            # The parameters that train (the rest is frozen): a LoRA run copies MBs, not the model.
            best_state = {n: p.detach().clone() for n, p in trained}
            best_acc, best_epoch = acc, epoch
        elif epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state, strict=False)
    model.eval()
    return FineTuneResult(
        model, best_epoch, history, time.perf_counter() - t0, sum(p.numel() for _, p in trained)
    )
