"""Overrides as users type them: a key nothing reads is refused with or without Hydra's `+`, Hydra's
own errors are one line, and the typical mistakes of a new user each end in one line and exit 2."""

import shutil

import pytest

from tests.conftest import one_line_error, run_cli, tiny_features


@pytest.mark.parametrize(
    ("args", "says"),
    [
        # Hydra advised `+extract.max_lenght=128`, which then ran with 512 tokens
        (["llmembed-extract", "extract.max_lenght=128"], "(did you mean extract.max_length?)"),
        (
            ["llmembed-extract", "+extract.max_lenght=128", "--cfg", "job"],
            "did you mean extract.max_length",
        ),
        (["llmembed-classify", "+hed=mlp", "--cfg", "job"], "(did you mean head?)"),
        (
            ["llmembed-classify", "+head=mlp", "--cfg", "job"],
            "head is chosen already; write head=mlp",
        ),
        (["llmembed-extract", "+head=mlp", "--cfg", "job"], "this command reads no head"),
        (
            ["llmembed-extract", "~extract.prompt", "--cfg", "job"],
            "set extract.prompt to another value",
        ),
        (["llmembed-classify", "head.params.C=1", "--cfg", "job"], "add it with +head.params.C=1"),
        # Hydra's own errors, as one line
        (["llmembed-extract", "dataset=nope"], "no dataset 'nope'; choose one of: agnews, bbc,"),
        (
            ["llmembed-classify", "-m", "head=logreg,nope"],
            "no head 'nope'; choose one of: llmembed",
        ),
        (["llmembed-extract", "-m", "--cfg", "job"], "--multirun and --cfg cannot be combined"),
        (["llmembed-extract", "backbone=local"], "backbone.path must be set"),
    ],
)
def test_keys_nothing_reads_and_hydra_errors_are_one_line(tmp_path, args, says):
    res = run_cli(*args, cwd=tmp_path, root=tmp_path / "cache")
    line = one_line_error(res, args[0])
    assert says in line, line
    assert "+extract.max_lenght=128" not in line.split(":", 2)[2] or "did you mean" in line
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_a_sweep_with_an_unknown_key_is_refused_before_any_job(tmp_path, tiny_llama, data_csv):
    res = run_cli(
        "llmembed-classify",
        "-m",
        "dataset=file",
        f"dataset.path={data_csv}",
        *tiny_features(tiny_llama),
        "+hed=mlp",
        "extract.progress=false",
        cwd=tmp_path,
        root=tmp_path / "cache",
    )
    assert "(did you mean head?)" in one_line_error(res, "llmembed-classify")
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "cache").exists()


def test_appends_to_open_mappings_and_documented_overrides_still_work(tmp_path):
    ok = run_cli(
        "llmembed-classify",
        "+head.params.tol=0.01",
        "dataset=hub",
        "dataset.hub_id=csv",
        "dataset.data_files={train: a.csv, test: b.csv}",
        "--cfg",
        "job",
        cwd=tmp_path,
        root=tmp_path / "cache",
    )
    assert ok.returncode == 0, ok.stderr
    assert "tol: 0.01" in ok.stdout and "train: a.csv" in ok.stdout


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="this machine has SLURM")
def test_a_slurm_sweep_without_slurm_says_so(tmp_path):
    res = run_cli(
        "llmembed-extract",
        "-m",
        "hydra/launcher=slurm",
        "dataset=mr,trec",
        cwd=tmp_path,
        root=tmp_path / "c",
    )
    assert "SLURM's sbatch, which is not on this machine's PATH" in one_line_error(
        res, "llmembed-extract"
    )


def test_the_ten_typical_mistakes_each_give_one_line(tmp_path, tiny_llama, tiny_bert, data_csv):
    """Issue 22's list: a misspelled key, a `+` key nothing reads, an unknown option, a shipped
    backbone given another path, a backbone without a path, a wrong column, a missing file, a layer
    out of range, a wrong pooling, classify before extract (and a fractional layer)."""
    data = ["dataset=file", f"dataset.path={data_csv}", "extract.progress=false"]
    llama = tiny_features(tiny_llama)
    mistakes = [
        (["llmembed-extract", *data, "extract.max_lenght=128"], "did you mean extract.max_length?"),
        (["llmembed-classify", *data, *llama, "+hed=mlp"], "did you mean head?"),
        (["llmembed-extract", *data, "backbone=minilmm"], "no backbone 'minilmm'; choose one of:"),
        (
            ["llmembed-extract", *data, "backbone=minilm", f"backbone.path={tiny_bert}"],
            "give it a name of its own: backbone=local backbone.name=",
        ),
        (["llmembed-extract", *data, "backbone=local"], "backbone.path must be set"),
        (
            [
                "llmembed-extract",
                *data,
                "dataset.text_column=review",
                "backbone=local",
                f"backbone.path={tiny_llama}",
            ],
            "has no column 'review'",
        ),
        (
            ["llmembed-extract", "dataset=file", "dataset.path=missing.csv"],
            "missing.csv does not exist",
        ),
        (
            ["llmembed-classify", *data, *llama, "features.sources.0.layers=[9]"],
            "layers [9] requested but tiny has hidden states 0-3",
        ),
        (
            ["llmembed-classify", *data, *llama, "features.sources.0.pooling=pooler"],
            "pooling ['pooler'] is not available for tiny",
        ),
        (
            ["llmembed-classify", *data, *llama, "extract_missing=false"],
            "make it with: llmembed-extract ",
        ),
        (
            ["llmembed-classify", *data, *llama, "features.sources.0.layers=[1.5]"],
            "whole layer indices",
        ),
        (  # a single-layer feature set (smollm2_layer, minilm_layer) reads the top-level layer
            ["llmembed-classify", *data, *llama, "features.sources.0.layers=[${layer}]"],
            "layer=20: tiny has hidden states 0-3 (0 = embeddings, 3 = last layer), and this "
            "feature set takes its layer from the top-level key: give layer=0 to layer=3",
        ),
    ]
    for args, says in mistakes:
        res = run_cli(*args, cwd=tmp_path, root=tmp_path / "cache")
        assert says in one_line_error(res, args[0]), (args, res.stderr)
    assert not list((tmp_path / "cache").glob("*/sel-*/manifest.json"))  # nothing was extracted
