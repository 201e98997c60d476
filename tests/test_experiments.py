"""The results runners' own parts (scripts/experiments/), on tiny random models: the prompting
scorer, MiniLM-style fine-tuning, the padded / BOS poolings llmembed does not store, choosing on
validation only, and the page generator. Seconds in all."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from transformers import AutoTokenizer, BertModel, LlamaConfig, LlamaForCausalLM, LlamaModel

from llmembed.classify.heads import LLMEmbedHead
from llmembed.errors import UserError
from scripts.experiments.common import (
    Scores,
    choose,
    chosen_test,
    classify,
    machine,
    machines_of,
    over_splits,
    params_trained,
    with_changes,
)
from scripts.experiments.finetune import FineTuneConfig, fine_tune, predict
from scripts.experiments.prompting import PromptScorer, draw_shots, few_shot_prefix, render
from scripts.experiments.recipe import pooled_variants
from scripts.experiments.write_results import write

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_experiment(module: str, *args, timeout: int = 300, env=None) -> subprocess.CompletedProcess:
    """`python -m scripts.experiments.<module> ARGS` as the page's Reproduce paragraph types it,
    offline (no hub here)."""
    return subprocess.run(
        [sys.executable, "-m", f"scripts.experiments.{module}", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **OFFLINE, **(env or {})},
    )


@pytest.fixture(scope="module")
def llama_tok(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.pad_token = tok.eos_token
    return tok


def causal_lm(tiny_llama, bias_word: str | None, tok) -> LlamaForCausalLM:
    """The tiny Llama with an LM head; `bias_word` gets a +8 logit bias at every position."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_llama)).eval()
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        if bias_word is not None:
            head.bias[tok.convert_tokens_to_ids(bias_word)] = 8.0
    model.lm_head = head
    return model


def naive_scores(model, tok, prompts, words) -> np.ndarray:
    """Each (prompt, word) alone through the full model: the sum of the word's token log-probs."""
    out = np.zeros((len(prompts), len(words)))
    with torch.no_grad():
        for i, p in enumerate(prompts):
            base = tok(p)["input_ids"]
            for k, w in enumerate(words):
                wid = tok(" " + w, add_special_tokens=False)["input_ids"]
                lp = torch.log_softmax(model(torch.tensor([base + wid])).logits[0].float(), -1)
                out[i, k] = sum(lp[len(base) - 1 + j, t].item() for j, t in enumerate(wid))
    return out


PROMPTS = ["the film was", "a very long story , not fun", "plot"]


@pytest.mark.parametrize("biased", ["good", "bad"])
def test_prompting_picks_the_label_the_model_is_biased_toward(tiny_llama, llama_tok, biased):
    model = causal_lm(tiny_llama, biased, llama_tok)
    scorer = PromptScorer(model, llama_tok, ["bad", "good"], token_budget=16)
    pred = scorer.predict([render("Review: {text} is", t) for t in PROMPTS])
    assert pred.tolist() == [["bad", "good"].index(biased)] * len(PROMPTS)


def test_prompting_scores_equal_each_prompt_alone(tiny_llama, llama_tok):
    """Batched, right-padded, LM head on the scored positions only: the same log-probs as one
    prompt at a time through the full model, for one-token and two-token label words."""
    model = causal_lm(tiny_llama, None, llama_tok)
    for words in (["bad", "good"], ["very good", "bad", "not fun"]):
        scorer = PromptScorer(model, llama_tok, words, token_budget=12)
        np.testing.assert_allclose(
            scorer.scores(PROMPTS), naive_scores(model, llama_tok, PROMPTS, words), atol=1e-4
        )


def test_prompts_sharing_their_demonstrations_run_them_once_and_score_the_same(
    tiny_llama, llama_tok, monkeypatch
):
    """Few-shot prompts share their leading tokens (the demonstrations): they run once, and each
    batch continues from their cache, with the same log-probs as each prompt alone."""
    from scripts.experiments.prompting import shared_prefix

    model = causal_lm(tiny_llama, None, llama_tok)
    demos = "the film was good . the plot was bad . a very long story , not fun . music "
    prompts = [demos + end for end in ("great", "a dull scene", "the actors were funny and sad")]
    assert shared_prefix([llama_tok(p)["input_ids"] for p in prompts]) >= 16
    seen = []
    decoder = model.get_decoder()
    forward = decoder.forward
    monkeypatch.setattr(
        decoder, "forward", lambda **kw: seen.append(kw["input_ids"].shape) or forward(**kw)
    )
    for words in (["bad", "good"], ["very good", "bad", "not fun"]):
        seen.clear()
        got = PromptScorer(model, llama_tok, words, token_budget=12).scores(prompts)
        ran = list(seen)
        np.testing.assert_allclose(got, naive_scores(model, llama_tok, prompts, words), atol=1e-4)
        assert ran[0][0] == 1 and all(shape[1] < 10 for shape in ran[1:])  # the prefix once


def test_few_shot_demonstrations_come_from_training_rows_of_every_class(llama_tok):
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    train = np.array([0, 1, 2, 3, 4, 5])
    shots = draw_shots(labels, train, 2, seed=3)
    assert sorted(labels[shots].tolist()) == [0, 0, 1, 1, 2, 2] and set(shots) <= set(
        train.tolist()
    )
    assert draw_shots(labels, train, 2, seed=3) == shots  # seeded
    prefix = few_shot_prefix(
        llama_tok, "Review: {text}\nSentiment:", ["bad", "good"], [("great fun film", 1)], 2
    )
    assert prefix == "Review: great fun\nSentiment: good\n\n"  # the text cut to 2 tokens


def toy_texts(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    pos, neg, filler = (
        ["great", "fun", "love", "best"],
        ["awful", "boring", "hate", "worst"],
        ["the", "film", "plot", "was", "a"],
    )
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        words = list(rng.choice(filler, 4)) + list(rng.choice(pos if y else neg, 2))
        texts.append(" ".join(rng.permutation(words)))
        labels.append(y)
    return texts, np.array(labels)


def test_fine_tuning_lowers_the_loss_and_learns_the_task(tiny_bert, caplog):
    caplog.set_level(logging.INFO, logger="results.finetune")
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts, labels = toy_texts(96)
    tr, va = np.arange(64), np.arange(64, 96)
    cfg = FineTuneConfig(
        lr=3e-3, batch_size=16, max_epochs=6, patience=6, max_length=16, warmup=0.0
    )
    res = fine_tune(BertModel.from_pretrained(tiny_bert), tok, texts, labels, tr, va, 2, cfg)
    first, last = res.history[0]["first_loss"], res.history[-1]["train_loss"]
    assert last < 0.5 * first, res.history
    assert res.history[res.best_epoch]["val_accuracy"] >= 0.9
    assert (
        predict(res.model, tok, [texts[i] for i in va], cfg) == labels[va]
    ).mean() == res.history[res.best_epoch]["val_accuracy"]
    assert res.params_trained == sum(
        p.numel() for p in res.model.parameters()
    )  # the whole encoder + head
    # Progress within each epoch of 4 steps: after steps 1, 2 and 3, then the epoch's summary.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 0:")]
    assert [line.split(",")[0] for line in lines[:3]] == [f"epoch 0: step {i}/4" for i in (1, 2, 3)]
    assert "s left in the epoch" in lines[0]
    assert len(lines) == 4 and lines[3].startswith("epoch 0: train loss")


def test_micro_batches_take_the_same_steps_as_the_whole_batch(tiny_bert):
    """Gradients summed over micro-batches, each weighed by its share, equal the whole batch's
    (no dropout, so that both runs compute the same thing); a last batch of 8 texts splits 5 + 3."""
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts, labels = toy_texts(56)
    tr, va = np.arange(40), np.arange(40, 56)
    trained, passes = [], {}
    for micro in (None, 5):
        cfg = FineTuneConfig(lr=3e-3, batch_size=16, max_epochs=2, max_length=16, micro_batch=micro)
        model = BertModel.from_pretrained(
            tiny_bert, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )
        seen = passes.setdefault(micro, [])  # texts per training forward pass
        model.register_forward_pre_hook(
            lambda m, args, kw, seen=seen: (
                seen.append(len(kw["input_ids"])) if m.training else None
            ),
            with_kwargs=True,
        )
        res = fine_tune(model, tok, texts, labels, tr, va, 2, cfg)
        trained.append((res.history, torch.cat([p.flatten() for p in res.model.parameters()])))
    assert passes == {None: [16, 16, 8] * 2, 5: [5, 5, 5, 1, 5, 5, 5, 1, 5, 3] * 2}
    (whole, p_whole), (parts, p_parts) = trained
    assert [h["train_loss"] for h in parts] == pytest.approx(
        [h["train_loss"] for h in whole], rel=1e-4
    )
    fresh = torch.cat([p.flatten() for p in BertModel.from_pretrained(tiny_bert).parameters()])
    assert not torch.allclose(p_whole[: len(fresh)], fresh, atol=1e-3)  # the steps moved it
    torch.testing.assert_close(p_parts, p_whole, rtol=1e-4, atol=1e-5)


def test_padded_and_bos_poolings_match_their_definitions(tiny_llama, llama_tok):
    """Masked means equal each text's own unpadded forward pass; padded means average every one of
    the pad_to positions of the padded forward pass; the BOS variants put a BOS in front."""
    model = LlamaModel.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    texts, pad_to, layers, pad = (
        ["the film was fun", "bad", "a very long story"],
        8,
        [0, 2, 3],
        llama_tok.eos_token_id,
    )
    bos = llama_tok.bos_token_id
    plain = pooled_variants(
        model,
        texts,
        llama_tok,
        pad_to=pad_to,
        pad_id=pad,
        bos_id=None,
        layers=layers,
        token_budget=16,
    )
    with_bos = pooled_variants(
        model,
        texts,
        llama_tok,
        pad_to=pad_to,
        pad_id=pad,
        bos_id=bos,
        layers=layers,
        token_budget=16,
    )
    with torch.no_grad():
        for i, t in enumerate(texts):
            ids = llama_tok(t, add_special_tokens=False)["input_ids"]
            for prefix, out in (([], plain), ([bos], with_bos)):
                seq = prefix + ids
                alone = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
                padded = torch.tensor([seq + [pad] * (pad_to - len(seq))])
                mask = (torch.arange(pad_to) < len(seq)).long()[None]
                full = model(padded, attention_mask=mask, output_hidden_states=True).hidden_states
                for j, layer in enumerate(layers):
                    own, every = alone[layer][0], full[layer][0]
                    if prefix:
                        np.testing.assert_allclose(out["masked_bos"][i, j], own.mean(0), atol=1e-5)
                        np.testing.assert_allclose(
                            out["masked_nobos"][i, j], own[1:].mean(0), atol=1e-5
                        )
                        np.testing.assert_allclose(
                            out["padded_bos"][i, j], every.mean(0), atol=1e-5
                        )
                        np.testing.assert_allclose(
                            out["padded_nobos"][i, j], every[1:].mean(0), atol=1e-5
                        )
                    else:
                        np.testing.assert_allclose(out["masked"][i, j], own.mean(0), atol=1e-5)
                        np.testing.assert_allclose(out["padded"][i, j], every.mean(0), atol=1e-5)
    assert not np.allclose(
        plain["padded"], plain["masked"], atol=1e-3
    )  # padding does change the mean


def scores(name: str, val: list[float], test: list[float]) -> Scores:
    per = {
        s: {"validation": {"accuracy": v, "macro_f1": v}, "test": {"accuracy": t, "macro_f1": t}}
        for s, (v, t) in enumerate(zip(val, test, strict=True))
    }
    return Scores(name, per)


def test_choices_are_made_on_validation_per_split_and_ignore_test():
    a = scores(
        "a", [0.80, 0.70, 0.75], [0.99, 0.99, 0.99]
    )  # best on test, never best on validation...
    b = scores("b", [0.85, 0.60, 0.75], [0.50, 0.50, 0.50])
    c = scores("c", [0.81, 0.90, 0.70], [0.60, 0.70, 0.80])
    picks = {s: choose([a, b, c], s) for s in range(3)}
    assert [picks[s].name for s in range(3)] == [
        "b",
        "c",
        "a",
    ]  # split 2: tie a/b goes to the first
    t = chosen_test(picks)["accuracy"]
    assert t["values"] == [0.50, 0.70, 0.99] and t["mean"] == pytest.approx(0.73)
    assert t["ci"][0] < t["mean"] < t["ci"][1]
    assert over_splits([0.8, 0.8])["ci"] == [0.8, 0.8]


def test_classify_runs_llmembed_over_repeated_splits(classify_cfg, tmp_path):
    """One call of llmembed's train over two resplit seeds: per-split scores and the head's size."""
    cfg = classify_cfg(
        [("llama", [1], "mean")], "head=logreg", "seeds=[0,1]", "resplit=true", "save_model=false"
    )
    s = classify(cfg, tmp_path / "run", "llama L1")
    assert sorted(s.per_split) == [0, 1]
    assert all(0 <= s.validation(seed) <= 1 for seed in (0, 1))
    assert s.per_split[0]["test"] != s.per_split[1]["test"] or s.info["rows"]["test"] > 0
    assert s.info["params_trained"] == 32 + 1  # binary logistic regression on 32 features
    assert s.info["n_seeds"] == 2
    one = classify(with_changes(cfg, seeds=[1]), tmp_path / "one", "llama L1, split 1")
    assert one.per_split[1] == s.per_split[1]  # a split is the same drawn alone or among others


def test_a_finished_run_is_reused_whatever_process_or_data_set_list_made_it(
    classify_cfg, tmp_path, monkeypatch
):
    """A stopped runner resumes, and a run made by `results.datasets=[mr]` in a second process is
    reused by the full command; a change that alters the figures (here C) runs again."""
    import scripts.experiments.common as common

    base = classify_cfg(
        [("llama", [1], "mean")], "head=logreg", "seeds=[0]", "resplit=true", "save_model=false"
    )
    first = base.copy()
    with open_dict(first):
        first.results = {"datasets": ["mr"], "out_dir": "/tmp/a", "head_threads": 1}
    done = classify(first, tmp_path / "run", "llama L1")
    trained = []
    monkeypatch.setattr(common, "train", lambda *a, **k: trained.append(a) or None)
    full = with_changes(first, **{"results.datasets": ["mr", "trec"], "results.out_dir": "docs"})
    again = classify(full, tmp_path / "run", "llama L1")
    assert trained == [] and again.per_split == done.per_split
    with pytest.raises(TypeError):  # the stand-in returns no metrics: it was called to train again
        classify(with_changes(full, **{"head.params.C": 0.5}), tmp_path / "run", "llama L1")
    assert len(trained) == 1


def test_overrides_may_add_head_parameters_but_nothing_else(classify_cfg):
    """Head parameters a head config lacks may be added (a scikit-learn estimator's own); the
    paper-faithful switches are in conf/head/llmembed.yaml; a misspelled key still fails."""
    cfg = classify_cfg([("llama", [1], "mean")], "head=llmembed")
    out = with_changes(cfg, **{"head.params.standardize": False, "seeds": [3]})
    assert (out.head.params.standardize, list(out.seeds), cfg.head.params.standardize) == (
        False,
        [3],
        True,
    )
    extra = with_changes(cfg, **{"head.params.new_knob": 1})
    assert extra.head.params.new_knob == 1 and "new_knob" not in cfg.head.params
    with pytest.raises(Exception, match="parms"):
        with_changes(cfg, **{"head.parms.standardize": False})


def test_parameter_count_of_the_papers_head_matches_the_fitted_module():
    rng = np.random.default_rng(0)
    sizes, roles = (8, 8, 6), ("llm", "llm", "encoder")
    X, y = rng.normal(size=(40, sum(sizes))).astype(np.float32), np.arange(40) % 3
    cfg = OmegaConf.create({"head": {"params": {"width": 8, "hidden": [16, 4]}}})
    for same in (True, False):
        cfg.head.params.project_same_width = same
        head = LLMEmbedHead(
            block_sizes=sizes,
            block_roles=roles,
            width=8,
            hidden=(16, 4),
            max_epochs=1,
            project_same_width=same,
            device="cpu",
        ).fit(X, y)
        metrics = {
            "n_features": sum(sizes),
            "head": "llmembed",
            "runs": [{"test": {"per_class": {"a": 0, "b": 0, "c": 0}}}],
            "sources": [
                {"backbone": "dec", "layers": [1, 2], "role": "llm"},
                {"backbone": "enc", "layers": [3], "role": "encoder"},
            ],
        }
        counted = params_trained(metrics, cfg, widths={"dec": 8, "enc": 6})
        assert counted == sum(p.numel() for p in head.module_.parameters())


def summary(values: list[float]) -> dict:
    """A summary over splits as the runners write it (plain interval from llmembed's t_interval)."""
    from scripts.experiments.common import over_splits

    return over_splits(values, list(range(len(values))))


ROWS = {"train": 700, "validation": 100, "test": 200}  # one split: n_train 800, n_test 200


def fusion_file(rows: dict[str, list[float]], ds: str = "trec") -> dict:
    info = {"rows": ROWS}
    return {
        "command": ".venv/bin/python -m scripts.experiments.fusion",
        "dataset_limit": None,
        "machine": {"cpu": "Test CPU", "cores": 2, "gpu": None, "torch": "x", "torch_threads": 2},
        "datasets": {
            ds: {
                "rows": {
                    name: {
                        "test": {"accuracy": summary(v), "macro_f1": summary(v)},
                        "chosen_per_split": {"0": "smollm2 concat k=3: L14,15,16"},
                        "info": {"0": info},
                    }
                    for name, v in rows.items()
                }
            }
        },
    }


def test_results_page_shows_plain_and_corrected_intervals_paired_tests_and_the_command(tmp_path):
    """Every accuracy with its plain t-interval and Nadeau and Bengio's corrected one; each row's
    paired difference from the reference row with its p-value; † on an interval cut at 1."""
    from scripts.experiments.stats import interval, paired

    results = tmp_path / "docs" / "results"
    results.mkdir(parents=True)
    best = "SmolLM2 best single layer (validation), logreg"
    a, b, top = [0.82, 0.83, 0.81, 0.84, 0.80], [0.80] * 4 + [0.79], [0.99, 1.0, 1.0, 0.97, 1.0]
    (results / "fusion.json").write_text(
        json.dumps(
            fusion_file(
                {best: b, "SmolLM2 concatenation, logreg": a, "near one": top, "one split": [0.9]}
            )
        )
    )
    page = write(results, tmp_path / "docs" / "RESULTS.md")
    plain, corrected = interval(a), interval(a, n_train=800, n_test=200)
    cell = f"0.820 [{plain.lo:.3f}, {plain.hi:.3f}] ⟨{corrected.lo:.3f}, {corrected.hi:.3f}⟩"
    t = paired(a, b, n_train=800, n_test=200)
    vs = f"+{t.diff:.3f} ⟨{t.ci.lo:+.3f}, {t.ci.hi:+.3f}⟩, p {t.p:.3f}"
    assert (
        f"| SmolLM2 concatenation, logreg | {cell} | {cell} | {vs} | 0: smollm2 concat k=3 |"
        in page
    )
    assert corrected.lo < plain.lo  # the plain interval is the optimistic one
    header = "| features and head | test accuracy | test macro-F1 | accuracy − SmolLM2 best single layer ⟨"
    assert header in page and "{'" not in page  # a header names its reference row, no dict
    assert "| near one | 0.992 [0.976, 1.000]† ⟨0.968, 1.000⟩† |" in page
    # One split has no spread: its accuracy stands alone, with no zero-width interval and no test.
    assert "| one split | 0.900 (1 split, no interval) | 0.900 (1 split, no interval) | – |" in page
    assert (
        "`.venv/bin/python -m scripts.experiments.fusion` (config `conf/experiment/results_fusion.yaml`)"
        in page
    )
    assert "Test CPU, 2 cores" in page and "_Not run yet._" in page  # the other experiments
    # The comparison the headline's reading makes, with both p-values.
    assert "SmolLM2 + MiniLM concatenated" not in page.split("## Reproduce")[0]  # not run here
    with open(results / "summary.csv", newline="") as f:
        first = next(csv.DictReader(f))
    assert (first["method"], float(first["accuracy_corrected_lo"]), first["splits"]) == (
        best,
        pytest.approx(interval(b, n_train=800, n_test=200).lo),
        "5",
    )


def test_the_headline_its_comparisons_and_the_readme_come_from_the_results_folder(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    best, concat = (
        "SmolLM2 best single layer (validation), logreg",
        "SmolLM2 + MiniLM concatenation of layers chosen on validation, logreg",
    )
    f = fusion_file(
        {best: [0.80, 0.81, 0.82, 0.81, 0.80], concat: [0.83, 0.84, 0.86, 0.83, 0.84]}, "mr"
    )
    (results / "fusion.json").write_text(json.dumps(f))
    (results / "reading_fusion.md").write_text("Fusion helps on MR.\n")
    (results / "reading_headline.md").write_text("Joining the backbones helps (+0.032).\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\n## Results\n\nintro\n\n<!-- results:begin (generated by scripts.experiments."
        "write_results from docs/results; do not edit by hand) -->\nSTALE TEXT\n"
        "<!-- results:end -->\n\n## Next\n"
    )
    page = write(results, tmp_path / "RESULTS.md", readme)
    assert "| SmolLM2, best single layer and pooling (validation) | 0.808 [" in page
    assert (
        "| prompting SmolLM2, plain template, uncalibrated, zero-shot (texts cut to 256 tokens) | not run |"
        in page
    )
    assert page.index("## Headline") < page.index("## 1. Layer curves")
    assert "(results/headline.png)" in page and (results / "headline.png").stat().st_size > 0
    assert "**Reading.** Fusion helps on MR." in page
    row = "| SmolLM2 + MiniLM concatenated − SmolLM2 best single layer | mr | +0.032 |"
    assert row in page.split("## Reproduce")[0]
    text = readme.read_text()
    assert (
        "STALE TEXT" not in text and row in text and "Joining the backbones helps (+0.032)." in text
    )
    assert text.startswith("# x\n\n## Results\n\nintro\n") and text.endswith(
        "<!-- results:end -->\n\n## Next\n"
    )


def test_every_figure_a_reading_quotes_is_in_the_result_files_or_on_the_page():
    """The committed readings quote nothing the committed JSON and the generated page do not hold
    (a typo such as 0.835 for 0.836, or a figure from a run that is not committed, fails here)."""
    from scripts.experiments.readings import page_without_readings, unsupported_figures

    results = ROOT / "docs" / "results"
    page = page_without_readings((ROOT / "docs" / "RESULTS.md").read_text())
    readings = sorted(results.glob("reading_*.md"))
    assert {p.stem for p in readings} >= {"reading_headline", "reading_fusion", "reading_cost"}
    for path in readings:
        assert unsupported_figures(path.read_text(), page, results) == [], path.name


def test_the_figure_check_catches_a_figure_that_is_not_there(tmp_path):
    from scripts.experiments.readings import unsupported_figures

    (tmp_path / "fusion.json").write_text(
        json.dumps({"x": 0.8364, "n": 507, "s": "smollm2:mean:L15"})
    )
    page = "| row | 0.123 [0.1, 0.2] | 28.5% | 1,488 |"
    ok = "Layer 15 reaches 0.836 (0.84), 0.123, 28.5% and 1,488 rows; dimension 507."
    assert unsupported_figures(ok, page, tmp_path) == []
    assert unsupported_figures("It reaches 0.835 on dimension 247.", page, tmp_path) == [
        "0.835",
        "247",
    ]


def test_committed_page_and_readme_regenerate_from_the_committed_results(tmp_path):
    """docs/RESULTS.md and the README's Results block are what write_results makes of the
    committed result files and readings, byte for byte."""
    import shutil

    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs" / "results", docs / "results")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    write(docs / "results", docs / "RESULTS.md", tmp_path / "README.md")
    assert (docs / "RESULTS.md").read_text() == (ROOT / "docs" / "RESULTS.md").read_text()
    assert (tmp_path / "README.md").read_text() == (ROOT / "README.md").read_text()


def test_result_folders_of_separate_processes_merge(tmp_path):
    from scripts.experiments.merge import merge

    def result(ds: str, seeds=(0, 1)) -> dict:
        return {
            "command": f"run {ds}",
            "seeds": list(seeds),
            "resplit": True,
            "dataset_limit": None,
            "datasets": {ds: {"rows": {}}},
        }

    a, b, into = tmp_path / "a", tmp_path / "b", tmp_path / "into"
    for folder, ds in ((a, "mr"), (b, "trec")):
        folder.mkdir()
        (folder / "fusion.json").write_text(json.dumps(result(ds)))
        (folder / f"layers_{ds}.png").write_bytes(b"png")
    merge([a, b], into)
    merged = json.loads((into / "fusion.json").read_text())
    assert sorted(merged["datasets"]) == ["mr", "trec"]
    assert merged["commands"] == ["run mr", "run trec"]
    assert (into / "layers_trec.png").is_file()
    merge([into, b], into)  # into one of its own sources: again, nothing doubled
    again = json.loads((into / "fusion.json").read_text())
    assert again["commands"] == ["run mr", "run trec"] and sorted(again["datasets"]) == [
        "mr",
        "trec",
    ]
    # Counterparts run in parallel processes: their setups on one data set add up.
    for folder, kind, setup in ((a, "prompting", "chat"), (b, "finetuning", "minilm")):
        cp = {**result("mr"), "datasets": {"mr": {"dataset": "mr", kind: {setup: {"rows": {}}}}}}
        (folder / "counterparts.json").write_text(json.dumps(cp))
    merge([a, b], into)
    both = json.loads((into / "counterparts.json").read_text())["datasets"]["mr"]
    assert (list(both["prompting"]), list(both["finetuning"])) == (["chat"], ["minilm"])
    (b / "fusion.json").write_text(json.dumps(result("trec", seeds=(0,))))
    before = (into / "fusion.json").read_text()
    with pytest.raises(UserError, match="another protocol"):
        merge([a, b], into)
    assert (into / "fusion.json").read_text() == before  # nothing written
    (b / "fusion.json").write_text('{"seeds": [0')  # cut off mid-write: one message, as typed
    res = run_experiment("merge", a, b, "--into", into)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "fusion.json is not a result file" in res.stderr
    assert (into / "fusion.json").read_text() == before


def test_one_setups_splits_run_by_separate_processes_add_up(tmp_path):
    """A fine-tuning setup run on split 0 by one process and on split 1 by another (its `splits`
    overridden in each) merges into one setup over both, summaries taken again; a split run twice
    is not averaged in twice: the later run replaces the earlier. Splits add up when only how
    they ran differs (micro-batches), not when what they computed does (a learning rate)."""
    from scripts.experiments.merge import merge

    def run(folder: Path, seeds: list[int], accuracies: list[float], cpu="CPU A", **settings):
        row = {
            "test": {m: summary(accuracies) | {"seeds": seeds} for m in ("accuracy", "macro_f1")},
            "chosen_per_split": {str(s): f"lr={s}" for s in seeds},
            "runs": {str(s): {"train_s": s} for s in seeds},
            "params_trained": 7,
            "cost": {"per_split": {str(s): {"selection_s": 10.0 + s} for s in seeds}},
        }
        settings = {"lrs": [1e-4], "splits": {"mr": seeds}} | settings
        setup = {"settings": settings, "rows": {"ft": row}}
        folder.mkdir(exist_ok=True)
        (folder / "counterparts.json").write_text(
            json.dumps(
                {
                    "command": f"run {seeds}",
                    "machine": {"cpu": cpu, "gpu": None},
                    "seeds": [0, 1],
                    "resplit": True,
                    "dataset_limit": None,
                    "datasets": {"mr": {"dataset": "mr", "finetuning": {"minilm": setup}}},
                }
            )
        )

    a, b, into = tmp_path / "a", tmp_path / "b", tmp_path / "into"
    run(a, [0], [0.80])
    run(b, [1], [0.90], lrs=[5e-5])  # another method: it replaces split 0's
    merge([a, b], into)
    acc = json.loads((into / "counterparts.json").read_text())["datasets"]["mr"]["finetuning"]
    assert acc["minilm"]["rows"]["ft"]["test"]["accuracy"]["seeds"] == [1]
    # the same steps in less memory (given per data set, as the committed config does): it adds up
    run(b, [1], [0.90], cpu="CPU B", micro_batch={"mr": 4, "bbc": None})
    merge([b, a], into)  # split 1's process first: the records still go by split
    setup = json.loads((into / "counterparts.json").read_text())["datasets"]["mr"]["finetuning"]
    row = setup["minilm"]["rows"]["ft"]
    acc = row["test"]["accuracy"]
    assert (acc["seeds"], acc["values"], acc["n"]) == ([0, 1], [0.80, 0.90], 2)
    assert acc["mean"] == pytest.approx(0.85) and acc["ci"][0] < 0.80
    assert list(row["chosen_per_split"].items()) == [("0", "lr=0"), ("1", "lr=1")]
    assert set(row["cost"]["per_split"]) == {"0", "1"} and set(row["runs"]) == {"0", "1"}
    assert setup["minilm"]["settings"]["splits"] == [0, 1]
    # which split ran how: its record, and the setting per split where they differ
    assert [row["runs"][s]["micro_batch"] for s in ("0", "1")] == [None, 4]
    assert [row["runs"][s]["machine"] for s in ("0", "1")] == ["CPU A", "CPU B"]  # where
    assert list(setup["minilm"]["settings"]["micro_batch"].items()) == [("0", None), ("1", 4)]
    assert list(row["cost"]["per_split"]) == ["0", "1"]
    merge([into], into)  # merged again (a file's machine is its first source's): as recorded
    again = json.loads((into / "counterparts.json").read_text())["datasets"]["mr"]["finetuning"]
    assert again["minilm"]["rows"]["ft"]["runs"] == row["runs"]
    run(b, [0], [0.70])  # split 0 again: the later run wins, nothing counted twice
    merge([a, b], into)
    acc = json.loads((into / "counterparts.json").read_text())["datasets"]["mr"]["finetuning"]
    assert acc["minilm"]["rows"]["ft"]["test"]["accuracy"]["values"] == [0.70]
    # A first run's file did not record its splits: nothing to add up, the later run replaces it.
    first = json.loads((a / "counterparts.json").read_text())
    del first["datasets"]["mr"]["finetuning"]["minilm"]["rows"]["ft"]["test"]["accuracy"]["seeds"]
    (a / "counterparts.json").write_text(json.dumps(first))
    run(b, [1], [0.90])
    merge([a, b], into)
    acc = json.loads((into / "counterparts.json").read_text())["datasets"]["mr"]["finetuning"]
    assert acc["minilm"]["rows"]["ft"]["test"]["accuracy"]["values"] == [0.90]


def test_gpu_cost_takes_the_gpu_extraction_records_and_leaves_the_load_out():
    from scripts.experiments.cost import on_gpu

    cpu = {"smollm2": {"seconds_per_1000": 11.0, "joules_per_1000": None, "device": "cpu"}}
    run = {"load_seconds": 1.0, "energy_note": None}
    records = {
        "smollm2": [
            {
                **run,
                "dataset": "mr",
                "device": "cpu",
                "rows_computed": 2000,
                "wall_s": 22.0,
                "energy_j": None,
            },
            {
                **run,
                "dataset": "trec",
                "device": "cuda:0",
                "rows_computed": 500,
                "wall_s": 3.0,
                "energy_j": 99.0,
            },
            {
                **run,
                "dataset": "mr",
                "device": "cuda:0",
                "rows_computed": 0,
                "wall_s": 2.0,
                "energy_j": 9.0,
            },
            {
                **run,
                "dataset": "mr",
                "device": "cuda:0",
                "rows_computed": 2000,
                "wall_s": 6.0,
                "load_seconds": 4.0,
                "energy_j": 800.0,
            },
        ]
    }
    g = on_gpu(cpu, records, "mr")
    assert g["smollm2"]["seconds_per_1000"] == 1.0  # (6 s - 4 s of load) / 2,000 texts
    assert g["smollm2"]["joules_per_1000"] == 400.0
    assert cpu["smollm2"]["seconds_per_1000"] == 11.0  # the CPU's figures untouched
    with pytest.raises(UserError, match="no GPU extraction of bbc with smollm2"):
        on_gpu(cpu, records, "bbc")


def test_cost_counts_every_fit_a_choice_makes_and_the_extraction_of_every_backbone_it_reads(
    tmp_path,
):
    """A best single layer pays experiment 1's whole sweep on every split; a choice among both
    backbones pays both extractions, though the chosen layer reads one; rows that recorded their
    selection are read as recorded; the first run's rows, which kept only the chosen candidate's
    fit, are estimated from it and say so."""
    from scripts.experiments.cost import llmembed_method

    def info(backbone, fit_s, seeds=1):
        return {
            "rows": ROWS,
            "n_features": 4,
            "params_trained": 5,
            "n_seeds": seeds,
            "timings": {"fit_s": fit_s},
            "extraction": [{"backbone": backbone, "entry": "/nonexistent"}],
        }

    def curve(backbone, fits):  # experiment 1: each run fitted 5 splits
        return [{"info": info(backbone, f * 5, seeds=5)} for f in fits]

    layers = {
        "curves": {
            "smollm2:mean": curve("smollm2", [1.0, 2.0]),
            "minilm:mean": curve("minilm", [0.5]),
        }
    }
    extraction = {
        b: {"seconds_per_1000": s, "joules_per_1000": None}
        for b, s in (("smollm2", 10.0), ("minilm", 2.0))
    }
    acc = {"accuracy": summary([0.8, 0.8]), "macro_f1": summary([0.8, 0.8])}
    either = llmembed_method(
        "SmolLM2 or MiniLM best single layer (validation), logreg",
        {"test": acc, "info": {"0": info("minilm", 0.5, 5), "1": info("minilm", 0.5, 5)}},
        layers,
        extraction,
    )
    # 1,000 rows: both backbones extracted (10 s + 2 s); 3 fits (1 + 2 + 0.5 s) per split, 2 splits
    assert (either["one_time_s"], either["selection_fits_per_split"], either["per_split_s"]) == (
        12.0,
        3,
        3.5,
    )
    assert (either["total_s"], either["estimated"], sorted(either["extraction"])) == (
        19.0,
        False,
        ["minilm", "smollm2"],
    )
    concat = llmembed_method(
        "SmolLM2 concatenation of layers chosen on validation, logreg",
        {
            "test": acc,
            "candidates": 8,
            "info": {"0": info("smollm2", 4.0), "1": info("smollm2", 2.0)},
        },
        layers,
        extraction,
    )
    assert (concat["selection_fits_per_split"], concat["per_split_s"], concat["estimated"]) == (
        2 + 8,
        3.0 + 8 * 3.0,
        True,
    )
    recorded = llmembed_method(
        "SmolLM2 concatenation of layers chosen on validation, logreg",
        {
            "test": acc,
            "candidates": 8,
            "info": {"0": info("smollm2", 4.0), "1": info("smollm2", 2.0)},
            "selection": {
                "0": {"fits": 10, "fit_s": 20.0, "backbones": ["smollm2"]},
                "1": {"fits": 10, "fit_s": 30.0, "backbones": ["smollm2"]},
            },
        },
        layers,
        extraction,
    )
    assert (recorded["per_split_s"], recorded["total_s"], recorded["estimated"]) == (
        25.0,
        10.0 + 50.0,
        False,
    )
    assert recorded["cache_mb_entries"] is None  # the entry is not on this machine: not 0 MB
    entry = tmp_path / "entry"
    (entry / "layers").mkdir(parents=True)
    (entry / "layers" / "shard.h5").write_bytes(b"x" * 2**20)
    here = {**info("smollm2", 4.0), "extraction": [{"backbone": "smollm2", "entry": str(entry)}]}
    sized = llmembed_method(
        "SmolLM2 last layer", {"test": acc, "info": {"0": here}}, layers, extraction
    )
    assert sized["cache_mb_entries"] == 1.0


def test_a_counterparts_cost_is_its_mean_per_split_and_says_when_its_splits_mixed_machines():
    from scripts.experiments.cost import counterpart_method

    acc = summary([0.9, 0.8, 0.85])
    row = {
        "test": {"accuracy": acc, "macro_f1": acc},
        "kind": "finetuning",
        "method": "lora",
        "backbone": "smollm2",
        "params_trained": 10,
        "cost": {
            "per_split": {
                s: {"selection_s": 100.0 * (i + 1), "test_s": 10.0} for i, s in enumerate("012")
            }
        },
        "runs": {
            "0": {"machine": "AMD EPYC"},
            "1": {"machine": "AMD EPYC"},
            "2": {"machine": "Xeon"},
        },
    }
    m = counterpart_method(row, {"train": 700, "validation": 100, "test": 200}, splits=5)
    assert (m["per_split_s"], m["total_s"], m["estimated"]) == (210.0, 1050.0, True)  # 3 of 5
    assert m["machines"] == ["AMD EPYC", "Xeon"]
    row["runs"]["2"]["machine"] = "AMD EPYC"
    assert counterpart_method(row, {"test": 200}, splits=3)["machines"] == ["AMD EPYC"]


def test_the_cost_notes_explain_a_mark_only_where_a_table_shows_it():
    from scripts.experiments.write_results import cost_notes

    def notes(**method) -> str:
        r = {
            "paper_ratios": {"parameters": 0.04, "electricity": 0.018, "runtime": 0.015},
            "datasets": {"mr": {"methods": {"m": {"estimated": False, **method}}}},
        }
        return cost_notes(r)[0]

    plain = notes()
    assert plain.startswith("Seconds per split are the mean over the splits. A logistic")
    assert "≈" not in plain and "‡" not in plain
    estimated = notes(estimated=True)
    assert "; ≈ marks a figure" in estimated and "‡" not in estimated
    both = notes(estimated=True, machines=["AMD EPYC", "Xeon"])
    assert "≈ marks" in both and "; ‡ marks a counterpart whose splits ran on different" in both


def test_cost_run_on_another_machine_keeps_the_experiments_machine_and_figures(tmp_path):
    """Experiment 5 runs no model: rerun elsewhere (without the cache), it names the machine
    that measured its seconds, not its own, and reproduces every committed figure but the cache
    entries' size on disk, which depends on the cache being there."""
    for f in (ROOT / "docs" / "results").glob("*.json"):
        shutil.copy(f, tmp_path)
    layers = json.loads((tmp_path / "layers.json").read_text())
    res = run_experiment("cost", f"results.out_dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    new = json.loads((tmp_path / "cost.json").read_text())
    old = json.loads((ROOT / "docs" / "results" / "cost.json").read_text())
    assert new["machine"] == layers["machine"] and new["written_on"]["cpu"] == machine()["cpu"]
    for ds, d in old["datasets"].items():
        for name, m in d["methods"].items():
            now = new["datasets"][ds]["methods"][name]
            assert {k: v for k, v in now.items() if not k.startswith("cache_mb_entries")} == {
                k: v for k, v in m.items() if not k.startswith("cache_mb_entries")
            } | ({"machines": now["machines"]} if "machines" in now else {})


def claim_method(kind: str, values: list[float], total: float = 1.0, used: int = 1) -> dict:
    """One method as cost.claim reads it: its kind, per-split test accuracies, seconds, parameters."""
    return {
        "kind": kind,
        "test": {"accuracy": summary(values)},
        "total_s": total,
        "params_used": used,
        "estimated": False,
        "machines": [],
    }


def test_the_claims_form_sets_the_cheapest_method_that_reaches_the_counterpart_against_it():
    from scripts.experiments.cost import claim

    methods = {
        "probe, cheap": claim_method("llmembed", [0.70, 0.71, 0.69], 100.0, 10),
        "probe, good": claim_method("llmembed", [0.90, 0.91, 0.92], 300.0, 12),
        "prompting": claim_method("prompting", [0.80, 0.82, 0.81], 1000.0, 10),
        "fine-tuning": claim_method("finetuning", [0.95, 0.96, 0.97], 50.0, 2),
    }
    out = {c["counterpart"]: c for c in claim(methods, ROWS)}
    assert out["prompting"]["llmembed"] == "probe, good" and out["prompting"]["runtime"] == 0.3
    assert out["prompting"]["difference"] == pytest.approx(0.1) and out["prompting"]["p"] < 0.05
    assert out["fine-tuning"]["llmembed"] is None  # nothing reaches it


def test_the_claims_difference_is_rounded_once_as_the_comparisons_table_rounds_it():
    """A difference of 0.011503 was stored as 0.0115 and printed +0.011 on the cost page while
    the comparisons' table printed the same pair's -0.012."""
    from scripts.experiments.cost import claim
    from scripts.experiments.write_results import signed

    ours, theirs = [0.8650, 0.8700, 0.8580], [0.8535, 0.8585, 0.8465]  # each split +0.0115
    ours[0] += 0.000003 * 3  # the mean difference is 0.011503
    methods = {
        "probe": claim_method("llmembed", ours),
        "fine-tuning": claim_method("finetuning", theirs),
    }
    (c,) = claim(methods, ROWS)
    assert signed(c["difference"]) == "+0.012"
    assert signed(-c["difference"]) == "-0.012"


def test_counterparts_of_both_machines_are_shown_and_the_gpu_run_makes_the_headline(tmp_path):
    results = tmp_path / "results"
    (results / "gpu").mkdir(parents=True)

    def acc(mean):
        a = summary([mean - 0.01, mean, mean + 0.01])
        return {"accuracy": a, "macro_f1": a}

    rate = {"per_1000": {"test": {"seconds": 2.0, "joules": None}}}
    zero = "prompting SmolLM2, plain template, uncalibrated, zero-shot"
    prompting = {
        "plain": {
            "settings": {
                "chat": False,
                "calibrate": False,
                "shots": [0],
                "choose_shots": False,
                "max_text_tokens": 256,
                "max_shot_tokens": 64,
            },
            "template": "Review: {text}\nSentiment:",
            "instruction": None,
            "words": {"neg": "negative", "pos": "positive"},
            "rows": {zero: {"test": acc(0.78), "cost": rate, "params_trained": 0}},
        }
    }
    ft = "fine-tuning MiniLM end to end, one learning rate (5e-5), texts cut to 128 / 64 / 256 tokens"
    finetuning = {
        "minilm_one_lr": {
            "settings": {
                "backbone": "minilm",
                "method": "full",
                "lrs": [5e-5],
                "batch_size": 32,
                "max_epochs": 4,
                "max_length": 128,
            },
            "rows": {
                ft: {
                    "test": acc(0.86),
                    "cost": {"per_split": {"0": {"selection_s": 30.0, "test_s": 2.0}}},
                    "params_trained": 22_713_986,
                    "chosen_per_split": {"0": "lr=5e-05"},
                }
            },
        }
    }
    for folder, cpu, gpu, datasets in (
        (results, "CPU", None, {"mr": {"prompting": prompting}}),
        (
            results / "gpu",
            "Xeon",
            "NVIDIA H200",
            {"mr": {"prompting": prompting, "finetuning": finetuning}},
        ),
    ):
        r = {"command": "c", "machine": {"cpu": cpu, "cores": 2, "gpu": gpu}, "datasets": datasets}
        (folder / "counterparts.json").write_text(json.dumps(r))
    page = write(results, tmp_path / "RESULTS.md")
    gpu_at, cpu_at = (
        page.index("On the GPU (Xeon, 2 cores, GPU: NVIDIA H200"),
        page.index("On the CPU"),
    )
    assert gpu_at < page.index(f"| {ft} | 0.860 [", gpu_at) < cpu_at
    assert "| 30.0 + 2.0 | 22,713,986 | 0: lr=5e-05 |" in page  # selection + test seconds
    assert "| rate only: 2.0 s / 1,000 test texts | 0 | fixed |" in page
    assert f"| {ft} | 0.860 [" in page.split("## Reproduce")[0]  # the headline


def test_a_setups_description_names_this_sets_settings_and_only_the_splits_it_left_out(tmp_path):
    from scripts.experiments.common import over_splits

    results = tmp_path / "results"
    results.mkdir()

    def row(seeds: list[int], machines: dict | None = None) -> dict:
        a = over_splits([0.85 + 0.01 * s for s in seeds], seeds)
        return {
            "test": {"accuracy": a, "macro_f1": a},
            "cost": {"per_split": {str(s): {"selection_s": 30.0, "test_s": 2.0} for s in seeds}},
            "runs": {str(s): {"machine": (machines or {}).get(s, "CPU A")} for s in seeds},
            "params_trained": 0,
        }

    shots = {"mr": [0, 1, 2, 4], "bbc": [0, 1]}
    # Merged in any order; the splits are seeds, not positions. BBC's setting names split 3, but
    # that run's seeds left it out: the page names the splits the rows hold.
    lora_splits = {"mr": [3, 5, 1, 2, 4], "bbc": [3, 2, 1]}
    ran = {"mr": lora_splits["mr"], "bbc": [2, 1]}
    datasets = {
        ds: {
            "prompting": {
                "chat": {
                    "settings": {
                        "chat": True,
                        "calibrate": True,
                        "shots": shots,
                        "choose_shots": True,
                        "max_text_tokens": {"mr": 64, "bbc": 512},
                        "max_shot_tokens": 32,
                    },
                    "template": None,
                    "instruction": "{text}",
                    "words": {"a": "a"},
                    "rows": {f"prompting {ds}": row([1, 2, 3, 4, 5])},
                }
            },
            "finetuning": {
                "lora": {
                    "settings": {
                        "backbone": "smollm2",
                        "max_epochs": 1,
                        "splits": lora_splits,
                        "max_length": {"mr": 128, "bbc": 256},
                    },
                    "rows": {f"LoRA {ds}": row(ran[ds], {2: "CPU B"} if ds == "bbc" else None)},
                }
            },
        }
        for ds in ("mr", "bbc")
    }
    r = {"command": "c", "seeds": [1, 2, 3, 4, 5], "machine": {"cpu": "CPU", "cores": 2}}
    (results / "counterparts.json").write_text(json.dumps({**r, "datasets": datasets}))
    page = write(results, tmp_path / "RESULTS.md")
    mr, bbc = page.split("**mr**")[1].split("**bbc**")
    assert "demonstrations per class [0, 1, 2, 4] (chosen" in mr
    assert "demonstrations per class [0, 1] (chosen" in bbc
    assert "one epoch, texts" in mr and "early stopping" not in mr
    assert "splits" not in mr.split("Fine-tuning setup")[1]  # every split ran
    assert "splits [1, 2] only; splits [1] on CPU A, splits [2] on CPU B (‡ its mean" in bbc
    assert "| ‡ 30.0 + 2.0 |" in bbc and "‡" not in mr  # seconds of two machines, marked
    assert "texts cut to 64 tokens, demonstrations to 32." in mr
    assert "texts cut to 512 tokens, demonstrations to 32." in bbc
    assert "texts cut to 128 tokens" in mr and "texts cut to 256 tokens" in bbc


def test_extraction_cost_is_the_data_sets_own_not_the_entrys_running_total(tmp_path):
    from scripts.experiments.cost import dataset_cost

    run = {"energy_j": None, "device": "cpu"}
    records = [
        {**run, "dataset": "mr", "rows_computed": 10000, "wall_s": 100.0},
        {**run, "dataset": "bbc", "rows_computed": 2000, "wall_s": 900.0},
        {**run, "dataset": "bbc", "rows_computed": 0, "wall_s": 1.0},  # resumed, nothing left
    ]
    (tmp_path / "manifest.json").write_text(json.dumps({"extractions": records}))
    total = {"rows_computed": 12000, "wall_s": 1001.0}
    e = {"entry": str(tmp_path), "entry_cost": total}
    assert (dataset_cost(e, "bbc")["rows_computed"], dataset_cost(e, "bbc")["wall_s"]) == (
        2000,
        900.0,
    )
    assert dataset_cost({**e, "entry": str(tmp_path / "elsewhere")}, "bbc") == total


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cost", "results.datasets=[nope]"], "Could not find 'dataset/nope'"),
        (["layers", "seeds=oops"], "seeds must be a list of integers"),
        (
            ["merge", "{tmp}/nothing", "--into", "{tmp}/into"],
            "holds no result files",
        ),
        (["write_results", "--results", "{tmp}/nothing"], "is not a folder"),
        (  # nothing is written: neither the page nor the headline's plot
            [
                "write_results",
                "--results",
                "{tmp}/r",
                "--out",
                "{tmp}/nothing/R.md",
                "--readme",
                "{tmp}/README.md",
            ],
            "README.md is not a file: give the README to write into, or give --readme ''",
        ),
    ],
)
def test_experiment_commands_refuse_bad_input_in_one_message(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    results = tmp_path / "r"  # a copy of the committed results: write_results finds figures
    results.mkdir()
    for f in (ROOT / "docs" / "results").glob("*.json"):
        shutil.copy(f, results)
    res = run_experiment(*args)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    said = [line for line in res.stderr.splitlines() if message in line]
    assert len(said) == 1 and "error: " in said[0], res.stderr  # as every command says it
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "into").exists()
    assert sorted(p.suffix for p in results.iterdir()) == [".json"] * len(list(results.iterdir()))


def test_corrected_resampled_t_test_matches_a_hand_computed_example():
    """Per-split differences 0.02, 0.03, 0.01, 0.04, 0.00 (mean 0.02, sample variance 2.5e-4) on
    800 learning and 200 test rows: Nadeau and Bengio's variance (1/5 + 200/800) * 2.5e-4 =
    1.125e-4, t = 0.02 / 0.0106066 = 1.885618 on 4 degrees of freedom; the plain paired t is
    0.02 / sqrt(2.5e-4 / 5) = 2.828427. Two-sided p from the closed form of Student's t with 4
    degrees of freedom, F(t) = 1/2 + 3/8 x (1 - x^2/12), x = t / sqrt(1 + t^2/4)."""
    from scripts.experiments.stats import interval, p_text, paired

    def p4(t: float) -> float:
        x = t / (1 + t * t / 4) ** 0.5
        return 2 * (1 - (0.5 + 3 / 8 * x * (1 - x * x / 12)))

    a, b = [0.82, 0.83, 0.81, 0.84, 0.80], [0.80] * 5
    r = paired(a, b, n_train=800, n_test=200)
    assert r.diff == pytest.approx(0.02) and r.n == 5
    assert r.p == pytest.approx(p4(1.885618), abs=1e-6)  # 0.1324: not significant ...
    assert r.p_plain == pytest.approx(p4(2.828427), abs=1e-6)  # ... though the plain t says 0.047
    half = 2.7764451 * 1.125e-4**0.5  # t(0.975, 4) x corrected standard error
    assert (r.ci.lo, r.ci.hi) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    assert paired(b, a, n_train=800, n_test=200).diff == pytest.approx(-0.02)
    assert (p_text(r.p), p_text(0.0004)) == ("0.132", "< 0.001")

    plain, corrected = interval(a), interval(a, n_train=800, n_test=200)
    assert plain.hi - plain.lo == pytest.approx(2 * 2.7764451 * (2.5e-4 / 5) ** 0.5)
    assert corrected.lo < plain.lo and corrected.hi > plain.hi  # the plain one is optimistic
    top = interval([0.99, 1.0, 1.0, 0.97, 1.0])
    assert top.hi == 1.0 and top.clipped and not plain.clipped
    with pytest.raises(ValueError, match="same splits"):
        paired(a, b[:4], n_train=800, n_test=200)


def test_contextual_calibration_divides_by_the_content_free_prediction():
    """Label-word probabilities normalized over the words, divided by the content-free inputs'
    (averaged): a model that says "positive" to everything is corrected toward the text's own
    evidence (Zhao et al., 2021)."""
    from scripts.experiments.prompting import calibrated

    scores = np.log(np.array([[0.2, 0.6], [0.05, 0.75], [0.1, 0.1]]))  # unnormalized log-probs
    content_free = np.log(np.array([[0.1, 0.9], [0.3, 0.7]]))  # mean normalized: [0.2, 0.8]
    out = calibrated(scores, content_free)
    expected = np.array([[0.25 / 0.2, 0.75 / 0.8], [0.0625 / 0.2, 0.9375 / 0.8], [2.5, 0.625]])
    np.testing.assert_allclose(np.exp(out), expected, rtol=1e-9)
    assert scores.argmax(1).tolist() == [1, 1, 0] and out.argmax(1).tolist() == [0, 1, 0]


def test_chat_prompts_put_demonstrations_as_earlier_turns(tiny_llama, llama_tok):
    from scripts.experiments.prompting import chat_prompt

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    prompt = chat_prompt(tok, "Sentiment of: {text}", "a dull plot", [("great fun", "good")])
    assert prompt == (
        "<user>Sentiment of: great fun\n<assistant>good\n<user>Sentiment of: a dull plot\n<assistant>"
    )


def test_lora_starts_at_the_model_trains_only_its_adapters_and_learns(tiny_llama, llama_tok):
    """Wrapped layers compute W x + (alpha / r) B A x with B = 0 at first: the wrapped model's
    outputs equal the original's; fine-tuning then moves only A, B and the classifier, and the
    last-token classifier learns the toy task."""
    from scripts.experiments.lora import LoRALinear, add_lora

    torch.manual_seed(0)
    model = LlamaModel.from_pretrained(tiny_llama, dtype=torch.float32)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.tensor([llama_tok("the film was fun")["input_ids"]])
    before = model(x).last_hidden_state
    assert add_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8, dropout=0.0) == 2 * 3
    assert torch.allclose(model(x).last_hidden_state, before)  # B = 0: nothing changed yet
    layer = model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.scale == 2.0
    with torch.no_grad():
        layer.B.normal_()
    a, b = layer.A, layer.B
    h = torch.randn(3, layer.base.in_features)
    torch.testing.assert_close(layer(h), layer.base(h) + 2.0 * h @ a.T @ b.T)
    with torch.no_grad():
        layer.B.zero_()
    with pytest.raises(ValueError, match=r"no nn\.Linear named"):
        add_lora(LlamaModel.from_pretrained(tiny_llama), ["query"], rank=2, alpha=2)

    texts, labels = toy_texts(96)
    cfg = FineTuneConfig(
        lr=1e-2, batch_size=16, max_epochs=8, patience=8, max_length=16, warmup=0.0, pooling="last"
    )
    res = fine_tune(model, llama_tok, texts, labels, np.arange(64), np.arange(64, 96), 2, cfg)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".A", ".B")))
    assert res.params_trained == lora_params + (32 + 1) * 2  # adapters + the classifier
    for n, p in res.model.backbone.named_parameters():
        if n.endswith((".A", ".B")):
            continue
        assert torch.equal(p, frozen[n.replace(".base.", ".")]), n  # the model itself is frozen
    assert res.history[res.best_epoch]["val_accuracy"] >= 0.9, res.history


def test_reuse_of_earlier_runs_is_counted_and_the_command_names_run_dir_and_resume(
    classify_cfg, tmp_path
):
    """A result file says how many llmembed runs its command fitted and how many it took from
    results.run_dir, and its printed command spells out the settings that decide it."""
    import scripts.experiments.common as common

    cfg = classify_cfg(
        [("llama", [1], "mean")], "head=logreg", "seeds=[0]", "resplit=true", "save_model=false"
    )
    with open_dict(cfg):
        cfg.results = {"run_dir": str(tmp_path / "runs"), "resume": True, "head_threads": 1}
    common.RUNS.update(fitted=0, reused=0)
    first = classify(cfg, tmp_path / "runs" / "a", "llama L1")
    again = classify(cfg, tmp_path / "runs" / "a", "llama L1")
    assert (first.info["reused"], again.info["reused"]) == (False, True)
    line = common.command_line("scripts.experiments.layers", ["seeds=[0]"], cfg)
    assert line == (
        f".venv/bin/python -m scripts.experiments.layers seeds=[0] "
        f"results.run_dir={tmp_path / 'runs'} results.resume=true"
    )
    told = common.command_line("m", ["results.resume=false"], cfg)
    assert told.count("results.resume") == 1  # what the user typed is not repeated
    done = common.finish(
        {"command": line, "runs": [{"command": "earlier", "fitted": 3, "reused": 0}]}
    )
    assert done["runs"] == [
        {"command": "earlier", "fitted": 3, "reused": 0},
        {"command": line, "fitted": 1, "reused": 1},
    ]


def test_massive_dimensions_name_the_largest_dimension_per_layer():
    from scripts.experiments.recipe import massive_dimensions

    X = np.ones((4, 2, 6), dtype=np.float32)
    X[:, 0, 5] = -300.0  # layer 3: dimension 5, 300 times the median magnitude
    X[:, 1, 2] = 40.0
    assert massive_dimensions(X, [3, 7]) == {
        "3": {"dimension": 5, "times_median": 300.0},
        "7": {"dimension": 2, "times_median": 40.0},
    }


def test_run_to_run_variation_compares_a_clean_rerun_cell_by_cell():
    from scripts.experiments.write_results import Page, rerun_variation

    def run(values: list[list[float]], picks: list[str]) -> dict:
        curve = [{"test": {"accuracy": summary(v)}} for v in values]
        best = {"per_split": dict(enumerate(picks)), "test": {"accuracy": summary(values[0])}}
        trec = {"curves": {"smollm2:mean": curve}, "chosen_on_validation": {"smollm2": best}}
        return {"command": "c", "datasets": {"trec": trec}}

    first = run([[0.80, 0.82, 0.84], [0.70, 0.70, 0.70]], ["L1", "L2", "L3"])
    again = run([[0.80, 0.82, 0.86], [0.70, 0.70, 0.70]], ["L1", "L2", "L4"])
    page = Page({"trec": {"train": 70, "validation": 10, "test": 20}}, splits=3)
    text = "\n".join(rerun_variation(first, again, page))
    assert "| trec | 5 of 6 | 0.020 | 0.007 |" in text
    # The quoted figure in both runs: 0.820 then 0.827, two of three splits picking the same layer.
    # Printed as every figure on the page: mean [plain] ⟨corrected⟩.
    assert re.search(
        r"\| trec \| smollm2 best \(layer, pooling\) on validation \| 0\.820 \[[\d., ]+\] ⟨", text
    )
    assert "| +0.007 | 2 of 3 |" in text


@pytest.mark.parametrize(
    ("module", "messages"),
    [
        ("layers", ["error: could not load 'stanfordnlp/sst2'"]),
        ("recipe", ["error: could not load 'stanfordnlp/sst2'"]),
        # Before loading: the committed config has no settings for it, all said in one try.
        (
            "counterparts",
            [
                "error: results.counterparts.prompting.setups.chat.shots names no 'sst2'",
                "error: results.counterparts.prompting.templates has no 'sst2': add its template",
                "error: results.counterparts.finetuning.setups.minilm.splits names no 'sst2'",
                "error: results.counterparts.finetuning.setups.smollm2_lora.splits names no 'sst2'",
            ],
        ),
    ],
)
def test_a_data_set_that_cannot_run_is_one_message_not_a_traceback(tmp_path, module, messages):
    """sst2 comes from the hub: offline, with an empty data-set cache, it cannot load."""
    res = run_experiment(
        module,
        "results.datasets=[sst2]",
        f"results.out_dir={tmp_path / 'out'}",
        env={"HF_DATASETS_CACHE": str(tmp_path / "hf")},
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    for message in messages:
        assert message in res.stderr, res.stderr[-2000:]


LORA = "results.counterparts.finetuning.setups.smollm2_lora"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (f"{LORA}.micro_batch=0", f"{LORA}.micro_batch=0: use a whole number of texts, 1 or more"),
        (f"{LORA}.micro_batch={{mr:4,trec:-2}}", f"{LORA}.micro_batch.trec=-2: use a whole number"),
        (f"{LORA}.splits.trec=0", f"{LORA}.splits.trec=0: give a list of the splits to run, from"),
        (f"{LORA}.max_length={{mr:128}}", f"{LORA}.max_length names no 'trec'"),
        (f"{LORA}.method=qlora", f"{LORA}.method='qlora': use full or lora"),
    ],
)  # fmt: skip
def test_a_counterpart_setup_that_cannot_run_is_refused_before_any_work(
    tmp_path, override, message
):
    """A negative micro_batch would train nothing without a word, a split given as a number or
    a setting given per data set without this one would stop at its turn, after the prompting."""
    out = tmp_path / "out"
    res = run_experiment(
        "counterparts",
        "results.counterparts.run=[prompting.plain,prompting.chat,finetuning.smollm2_lora]",
        "results.datasets=[trec]",
        f"results.out_dir={out}",
        override,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert message in res.stderr, res.stderr[-2000:]
    assert not out.exists()  # the prompting before it did not run either


def committed_counterparts():
    """The committed results.counterparts config, composed afresh (tests change it)."""
    from scripts.experiments.common import compose_cfg

    return compose_cfg("classify", ["experiment=results_counterparts"]).results.counterparts


def test_a_data_set_without_a_prompt_template_or_its_own_setting_is_refused():
    """A user's own data set config (its name in no per-data-set setting of the committed one):
    one message naming what to add. Hydra merges a dict override, so this is built in Python."""
    from scripts.experiments.counterparts import setup_problems

    c = committed_counterparts()
    OmegaConf.set_struct(c, False)
    del c.prompting.templates["trec"]
    [said] = setup_problems(c, "prompting", "plain", "trec", SEEDS)
    assert "templates has no 'trec': add its template" in said
    del c.prompting.setups.chat.shots["trec"]
    said = setup_problems(c, "prompting", "chat", "trec", SEEDS)
    assert (
        "results.counterparts.prompting.setups.chat.shots names no 'trec': give one value"
        in said[0]
    )
    assert "templates has no 'trec'" in said[1]  # all of a setup's at once
    assert setup_problems(c, "prompting", "plain", "mr", SEEDS) == []  # mr has both


SEEDS = [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("kind", "setting", "value", "message"),
    [
        ("finetuning", "micro_batch", True, "micro_batch=True: use a whole number of texts"),
        ("finetuning", "micro_batch", 4.0, "micro_batch=4.0: use a whole number of texts"),
        ("finetuning", "micro_batch", "4", "micro_batch='4': use a whole number of texts"),
        ("finetuning", "batch_size", 0, "batch_size=0: use a whole number, 1 or more"),
        ("finetuning", "max_epochs", 0, "max_epochs=0: use a whole number, 1 or more"),
        ("finetuning", "lrs", [], "lrs=[]: give a list of one or more positive learning rates"),
        ("finetuning", "lrs", [1e-4, -1e-4], "lrs=[0.0001, -0.0001]: give a list of one or more"),
        ("finetuning", "lrs", 5e-5, "lrs=5e-05: give a list of one or more"),
        ("finetuning", "warmup", 1.0, "warmup=1.0: use a share of the steps, from 0 to below 1"),
        ("finetuning", "pooling", "cls", "pooling='cls': use one of mean, first, last"),
        ("finetuning", "splits", [7], "splits=[7]: give a list of the splits to run, from"),
        ("finetuning", "splits", [0, "1"], "splits=[0, '1']: give a list of the splits to run"),
        ("finetuning", "splits", {"trec": [True]}, "splits.trec=[True]: give a list of the splits"),
        ("prompting", "shots", [0, -1], "shots=[0, -1]: give a list of demonstrations per class"),
        ("prompting", "shots", 2, "shots=2: give a list of demonstrations per class"),
        ("prompting", "max_text_tokens", {"trec": 0}, "max_text_tokens.trec=0: use a whole number"),
    ],
)  # fmt: skip
def test_a_setting_that_would_fail_hours_in_is_refused_naming_it(kind, setting, value, message):
    """Each of these crashed at its setup's turn (after the prompting had run), or, for a
    negative count or a boolean, trained something else than asked without a word."""
    from scripts.experiments.counterparts import setup_problems

    c = committed_counterparts()
    name = "smollm2_lora" if kind == "finetuning" else "chat"
    assert setup_problems(c, kind, name, "trec", SEEDS) == []  # the committed setting runs
    c[kind].setups[name][setting] = value
    [said] = setup_problems(c, kind, name, "trec", SEEDS)
    assert said.startswith("error: ") and f"setups.{name}.{message}" in said


def test_a_setups_own_splits_run_where_they_were_drawn():
    """A quick run over fewer seeds keeps the committed setups' own splits that it drew."""
    from scripts.experiments.counterparts import own_splits

    c = committed_counterparts()
    lora = c.finetuning.setups.smollm2_lora
    lora.splits.trec = [0, 1]
    assert own_splits(lora, "trec", [0]) == [0]
    assert own_splits(lora, "trec", [1, 0]) == [1, 0]  # in the order drawn
    lora.splits.bbc = []
    assert own_splits(lora, "bbc", SEEDS) == []  # not run there
    lora.splits = None
    assert own_splits(lora, "trec", SEEDS) == SEEDS


def test_a_fine_tuning_setting_is_checked_where_it_is_made_too():
    """Whoever builds a FineTuneConfig in Python gets the same refusal as the command line."""
    from scripts.experiments.finetune import SettingError

    with pytest.raises(SettingError, match=r"micro_batch=-2: use a whole number of texts"):
        FineTuneConfig(micro_batch=-2)
    with pytest.raises(SettingError, match=r"lr=0.0: use a positive learning rate"):
        FineTuneConfig(lr=0.0)


@pytest.mark.slow
def test_counterparts_run_as_typed_on_the_packaged_models(tmp_path):
    """Every counterpart path (chat prompting with calibration and k chosen on validation, plain
    prompting, MiniLM fine-tuning with a learning-rate sweep, LoRA on SmolLM2) through the command
    a user types, on 60 TREC rows and one split (LoRA in micro-batches): rows, choices and
    per-split costs are written."""
    out = tmp_path / "out"
    res = run_experiment(
        "counterparts",
        "dataset.limit=60", "results.datasets=[trec]", "seeds=[0]", f"results.out_dir={out}",
        f"results.run_dir={tmp_path / 'runs'}",
        "results.counterparts.run=[prompting.chat,prompting.plain,finetuning.minilm,finetuning.smollm2_lora]",
        "results.counterparts.prompting.setups.chat.shots.trec=[0,1]",
        "results.counterparts.finetuning.setups.minilm.lrs=[5e-5,1e-4]",
        "results.counterparts.finetuning.setups.minilm.max_epochs=1",
        "results.counterparts.finetuning.setups.smollm2_lora.lrs=[1e-3]",
        "results.counterparts.finetuning.setups.smollm2_lora.max_epochs=1",
        "results.counterparts.finetuning.setups.smollm2_lora.micro_batch=5",
        timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    d = json.loads((out / "counterparts.json").read_text())["datasets"]["trec"]
    chat = d["prompting"]["chat"]["rows"]
    chosen = chat[
        "prompting SmolLM2, chat template, calibrated, demonstrations per class chosen on validation"
    ]
    assert chosen["chosen_per_split"]["0"] in ("k=0", "k=1") and chosen["candidates"] == [0, 1]
    assert chosen["cost"]["per_split"]["0"]["selection_s"] > 0
    assert set(d["prompting"]["plain"]["rows"]) == {
        "prompting SmolLM2, plain template, uncalibrated, zero-shot",
        "prompting SmolLM2, plain template, uncalibrated, 1 demonstration per class",
    }
    (ft,) = d["finetuning"]["minilm"]["rows"].values()
    assert [x["lr"] for x in ft["runs"]["0"]["lrs"]] == [5e-5, 1e-4]
    (lora,) = d["finetuning"]["smollm2_lora"]["rows"].values()
    assert d["finetuning"]["smollm2_lora"]["settings"]["micro_batch"] == 5
    assert 0 < lora["params_trained"] < 2_000_000  # adapters and a classifier, not the model


def test_a_fine_tuning_sweep_resumes_per_split_and_rate_and_says_what_it_reused(tmp_path):
    """A sweep stopped after one learning rate (here: run with that rate alone) goes on from its
    record in results.run_dir: the second command fits only the new rate, chooses among both on
    validation with the record's figures (marked here so that only the record can supply them),
    counts its training and only the chosen rate's test scoring as cost, and records how many runs
    it fitted and reused; another setting (resume=false, or another max_epochs) fits again."""
    runs = tmp_path / "runs"

    def sweep(out: str, *extra, epochs: int = 1):
        res = run_experiment(
            "counterparts",
            "dataset.limit=60", "results.datasets=[trec]", "seeds=[0]",
            f"results.out_dir={tmp_path / out}", f"results.run_dir={runs}",
            "results.counterparts.run=[finetuning.minilm]",
            f"results.counterparts.finetuning.setups.minilm.max_epochs={epochs}", *extra,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        d = json.loads((tmp_path / out / "counterparts.json").read_text())
        (row,) = d["datasets"]["trec"]["finetuning"]["minilm"]["rows"].values()
        return d, row

    lrs = "results.counterparts.finetuning.setups.minilm.lrs"
    d, first = sweep("a", f"{lrs}=[1e-4]")
    assert d["runs"] == [{"command": d["command"], "fitted": 1, "reused": 0}]
    (record,) = (runs / "finetuning" / "trec" / "minilm").iterdir()
    assert record.name == "split0-lr0.0001.json"
    kept = json.loads(record.read_text())
    assert kept["test"]["accuracy"] == first["test"]["accuracy"]["values"][0]
    assert kept["machine"] == first["runs"]["0"]["machine"]
    # Marked: the best validation accuracy there can be, a test accuracy no run of 12 rows gives.
    kept["val_accuracy"], kept["test"]["accuracy"] = 1.0, 0.123
    kept["machine"] = "a CPU elsewhere"  # a record taken from another machine's run
    record.write_text(json.dumps(kept))

    d, both = sweep("b", f"{lrs}=[5e-5,1e-4]")
    assert d["runs"][-1] == {"command": d["command"], "fitted": 1, "reused": 1}
    assert "results.resume=true" in d["command"]
    fresh = json.loads((record.parent / "split0-lr5e-05.json").read_text())
    assert fresh["val_accuracy"] < 1.0  # (a tie would go to the smaller rate)
    assert both["chosen_per_split"] == {"0": "lr=0.0001"}
    assert both["test"]["accuracy"]["values"] == [0.123]
    (again,) = [r for r in both["runs"]["0"]["lrs"] if r["lr"] == 1e-4]
    assert again["train_s"] == kept["train"]["wall_s"]
    assert both["params_trained"] == kept["params_trained"] > 20_000_000  # all of MiniLM
    # Its seconds add two machines': the split says so, and the page marks its mean (‡).
    assert both["runs"]["0"]["machine"] is None
    assert both["runs"]["0"]["machines"] == sorted(["a CPU elsewhere", fresh["machine"]])
    assert machines_of(both) == both["runs"]["0"]["machines"]
    cost = both["cost"]["per_split"]["0"]
    assert cost["selection_s"] == pytest.approx(
        kept["train"]["wall_s"] + fresh["train"]["wall_s"], abs=0.01
    )
    assert cost["test_s"] == pytest.approx(kept["inference"]["wall_s"], abs=0.01)

    d, redone = sweep("c", f"{lrs}=[1e-4]", "results.resume=false")
    assert d["runs"][-1]["fitted"] == 1 and d["runs"][-1]["reused"] == 0
    assert redone["test"]["accuracy"]["values"] != [0.123]
    d, _ = sweep("d", f"{lrs}=[1e-4]", epochs=2)
    assert d["runs"][-1]["fitted"] == 1 and d["runs"][-1]["reused"] == 0
