"""`llmembed.mteb.LayerEncoder` run by mteb itself, on a small classification task built in memory
(mteb's own mock task with our texts: no download)."""

import numpy as np
import pytest

from llmembed.api import SettingsError
from llmembed.mteb import LayerEncoder
from tests.conftest import sentences

mteb = pytest.importorskip("mteb")


def local_task():
    from datasets import Dataset, DatasetDict
    from mteb.mocks.mock_tasks.classification import MockClassificationTask

    class LocalReviews(MockClassificationTask):
        def load_data(self, num_proc=None, **kwargs):
            rows = sentences(60, seed=1)
            texts, labels = [t for t, _ in rows], [int(y == "pos") for _, y in rows]
            self.dataset = DatasetDict(
                {
                    "train": Dataset.from_dict({"text": texts[:40], "label": labels[:40]}),
                    "test": Dataset.from_dict({"text": texts[40:], "label": labels[40:]}),
                }
            )
            self.data_loaded = True

    return LocalReviews()


def test_mteb_evaluates_the_encoder_from_the_cache(tmp_path, tiny_bert, forward_calls):
    from mteb.models.models_protocols import EncoderProtocol

    enc = LayerEncoder(str(tiny_bert), [1, -1], cache_root=tmp_path, dtype="float32")
    assert isinstance(enc, EncoderProtocol)
    result = mteb.evaluate(enc, tasks=[local_task()], cache=None, show_progress_bar=False)
    assert not result.exceptions
    assert result.task_results[0].get_score() > 0.6  # the label word is learnable
    assert result.model_name == "llmembed/tiny-bert0-L1--1-mean"
    # A second run, and another combination of the same layers, read the cache only.
    computed = len(forward_calls)
    concat = LayerEncoder(
        str(tiny_bert), [1, 2], combine="concat", cache_root=tmp_path, dtype="float32"
    )
    mteb.evaluate(concat, tasks=[local_task()], cache=None, show_progress_bar=False)
    assert len(forward_calls) == computed


def test_encode_takes_batches_or_texts_and_combines_layers(tmp_path, tiny_bert):
    import llmembed

    texts = ["a fine film", "a dull one", "more words here"]
    kw = {"cache_root": tmp_path, "dtype": "float32"}
    layers = llmembed.encode(texts, str(tiny_bert), [1, 2], **kw)
    mean = LayerEncoder(str(tiny_bert), [1, 2], **kw)
    np.testing.assert_allclose(mean.encode(texts), layers.mean(axis=1), rtol=1e-6)
    batches = [{"text": texts[:2]}, {"text": texts[2:]}]  # what mteb's DataLoader yields
    np.testing.assert_array_equal(
        mean.encode(batches, task_metadata=None, hf_split="test"), mean.encode(texts)
    )
    concat = LayerEncoder(str(tiny_bert), [1, 2], combine="concat", normalize=True, **kw)
    x = concat.encode(texts)
    assert x.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, rtol=1e-5)
    sim = concat.similarity(x, x)
    np.testing.assert_allclose(np.diag(sim), 1, rtol=1e-5)
    np.testing.assert_allclose(
        concat.similarity_pairwise(x, x[::-1]), np.diag(sim[:, ::-1]), rtol=1e-5
    )


def test_bad_arguments_fail_clearly():
    with pytest.raises(SettingsError, match="combine must be one of"):
        LayerEncoder("minilm", [4], combine="sum")
    with pytest.raises(SettingsError, match="did you mean 'max_length'"):
        LayerEncoder("minilm", [4], max_lenght=3)
