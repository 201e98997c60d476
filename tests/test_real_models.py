"""Integration tests on the packaged real models (SmolLM2 GGUF, MiniLM) and real MR texts."""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from llmembed.data.datasets import load_dataset
from llmembed.extract.backbones import inspect_backbone, load_model, load_tokenizer
from llmembed.extract.pipeline import extract
from tests.conftest import cosine, read_rows

pytestmark = pytest.mark.slow


def cfg(tmp_path, *overrides):
    with initialize_config_module("llmembed.conf", version_base=None):
        return compose(
            "extract",
            overrides=[
                f"cache.root={tmp_path}",
                "extract.progress=false",
                "extract.dtype=float32",  # compared with Transformers' float32 forward pass
                "dataset=mr",
                *overrides,
            ],
        )


def probe_accuracy(c, res, pooling, layer):
    x = res.read(pooling, [layer])[:, 0]
    ds = load_dataset(c.dataset)  # labels and splits belong to the data set, joined by text
    y, split = ds.labels, ds.split
    scaler = StandardScaler().fit(x[split == 0])
    clf = LogisticRegression(C=0.05, max_iter=2000).fit(
        scaler.transform(x[split == 0]), y[split == 0]
    )
    return clf.score(scaler.transform(x[split == 2]), y[split == 2])


def hf_hidden_states(c, text):
    info = inspect_backbone(c.backbone, None)
    model = load_model(c.backbone, info, depth=info.num_layers, dtype=torch.float32, device="cpu")
    ids = load_tokenizer(c.backbone, info)(text, return_tensors="pt")
    with torch.inference_mode():
        return [h[0].numpy() for h in model(**ids, output_hidden_states=True).hidden_states]


def test_minilm_on_real_mr_learns_the_labels(tmp_path):
    c = cfg(tmp_path, "backbone=minilm", "dataset.limit=1500")
    res = extract(c)
    m = res.entry.manifest
    assert m.rows == 1500 and m.layers == tuple(range(7)) and "pooler" in m.poolings
    # Labels stay aligned with their embeddings through length sorting: well above chance.
    assert probe_accuracy(c, res, "mean", 4) > 0.7
    # A stored row equals MiniLM run on that text alone (float16 storage).
    k = 123
    hs = hf_hidden_states(c, _text(c, res, k))
    np.testing.assert_allclose(res.read("mean", [6])[k, 0], hs[6].mean(0), rtol=2e-3, atol=2e-3)


def _text(c, res, k):
    """Text of row k of the request."""
    return load_dataset(c.dataset).texts[k]


def test_smollm2_gguf_full_and_cut_models_agree(tmp_path):
    full = extract(cfg(tmp_path, "backbone=smollm2", "dataset.limit=300"))
    m = full.entry.manifest
    assert m.layers == tuple(range(31)) and m.hidden_size == 576
    # A decoder has no pooler, and `all` leaves out `first`: its first token sees nothing else.
    assert sorted(m.poolings) == ["last", "mean"]
    assert m.extractions[-1]["tokens"] > 300 * 10

    c = cfg(tmp_path, "backbone=smollm2", "dataset.limit=300")
    hs = hf_hidden_states(c, _text(c, full, 17))
    for layer in (0, 9, 15, 30):  # 30 is the final-normed last layer, as Transformers returns it
        got = full.read("last", [layer])[17, 0]
        np.testing.assert_allclose(
            got, hs[layer][-1], rtol=5e-3, atol=5e-3 * np.abs(hs[layer]).max()
        )

    # The first four layers from a model cut after layer 4 (real weights, 42.5M parameters).
    cut = extract(
        cfg(tmp_path / "cut", "backbone=smollm2", "dataset.limit=300", "extract.layers=[0,1,2,3,4]")
    )
    assert cut.entry.manifest.layers == (0, 1, 2, 3, 4)
    a, b = cut.read("mean", [1, 4]), full.read("mean", [1, 4])
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())

    # bfloat16 (the default where the CPU has it): every layer within cosine 0.999 on average.
    bf16 = extract(cfg(tmp_path, "backbone=smollm2", "dataset.limit=300", "extract.dtype=bfloat16"))
    cos = cosine(*(e.read("mean", m.layers) for e in (full, bf16)))
    assert cos.mean(axis=0).min() > 0.999, cos.mean(axis=0)


def test_end_to_end_on_real_mr_train_and_predict(tmp_path):
    """Extract both packaged models, train the paper's head on fused features, predict new texts."""
    from llmembed.classify.predict import predict_texts
    from llmembed.classify.train import train

    common = [
        f"cache.root={tmp_path / 'cache'}",
        "dataset=mr",
        "dataset.limit=600",
        "extract.progress=false",
    ]
    with initialize_config_module("llmembed.conf", version_base=None):
        probe = compose("classify", overrides=[*common, "features=smollm2_layer", "layer=15"])
        paper = compose(
            "classify",
            overrides=[
                *common,
                "features=demo_fused",
                "head=llmembed",
                "head.params.width=64",
                "head.params.batch_size=128",
            ],
        )
    single = train(probe, tmp_path / "probe")
    assert single["test"]["accuracy"]["mean"] > 0.7  # chance is 0.5; the full set reaches 0.83
    fused = train(paper, tmp_path / "paper")
    assert fused["fusion"] == "cooccurrence" and all(e["hit"] for e in fused["extraction"][:1])
    assert fused["test"]["accuracy"]["mean"] > 0.7

    rows = [r for r in read_rows(tmp_path / "paper" / "predictions.csv") if r["split"] == "test"][
        :16
    ]
    ds = load_dataset(paper.dataset)
    text_of = dict(zip(ds.row_ids.tolist(), ds.texts, strict=True))
    labels, _, _ = predict_texts(
        tmp_path / "paper" / "model", [text_of[int(r["row_id"])] for r in rows]
    )
    assert labels == [r["predicted"] for r in rows]
