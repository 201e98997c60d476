"""Command lines that help, as a user runs them: fast `--help` listing what exists, `--version`, and
a user's own config folder found through Hydra's search path."""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import read_rows, sentences, write_csv

BIN = Path(sys.executable).parent
CLIS = [
    "llmembed-extract",
    "llmembed-classify",
    "llmembed-cache",
    "llmembed-predict",
    "llmembed-push",
    "llmembed-report",
]


def run(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


@pytest.mark.parametrize("cli", CLIS)
def test_help_answers_in_under_a_second(cli):
    times = []
    for _ in range(3):  # the fastest of three: a shared CI core can stall any one run
        t0 = time.perf_counter()
        out = run(cli, "--help")
        times.append(time.perf_counter() - t0)
        assert out.returncode == 0, out.stderr
        assert cli in out.stdout or "usage" in out.stdout.lower()
    assert min(times) < 1.0, times


@pytest.mark.parametrize("cli", ["llmembed-extract", "llmembed-classify"])
def test_help_imports_no_torch(cli):
    module, func = {
        "llmembed-extract": ("llmembed.extract.cli", "main"),
        "llmembed-classify": ("llmembed.classify.cli", "classify_main"),
    }[cli]
    code = (
        f"import sys; sys.argv = [{cli!r}, '--help']\n"
        f"from {module} import {func}\n"
        f"try:\n    {func}()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_extract_help_lists_its_groups_with_comments():
    text = run("llmembed-extract", "--help").stdout
    assert "data sets (dataset=NAME):" in text and "backbones (backbone=NAME):" in text
    assert "  mr " in text and "Movie-review snippets" in text
    assert "  minilm " in text and "all-MiniLM-L6-v2" in text
    assert "heads (head=NAME)" not in text and "feature sets" not in text  # classify's only
    assert "--cfg job" in text and "-sc install=bash" in text
    assert "_split" not in text  # a shared fragment, not a choice


def test_classify_help_lists_datasets_features_heads_experiments():
    text = run("llmembed-classify", "--help").stdout
    for title in ("data sets", "feature sets", "heads", "experiments", "backbones"):
        assert f"\n{title} (" in text
    assert "smollm2_l20" in text and "One layer of SmolLM2" in text
    assert "  logreg " in text and "Logistic regression" in text
    assert "  demo " in text


def test_version_and_hydra_help_stay_available():
    out = run("llmembed-extract", "--version")
    assert out.returncode == 0 and out.stdout.startswith("llmembed-extract 0.")
    hydra = run("llmembed-extract", "--hydra-help")
    assert hydra.returncode == 0 and "shell_completion" in hydra.stdout.replace("-", "_")


def test_cfg_job_prints_the_composed_config():
    out = run("llmembed-extract", "backbone=minilm", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "name: minilm" in out.stdout and "max_length: 512" in out.stdout


def user_folder(tmp_path: Path, csv: Path) -> Path:
    folder = tmp_path / "my-conf"
    (folder / "dataset").mkdir(parents=True)
    (folder / "head").mkdir()
    (folder / "dataset" / "reviews.yaml").write_text(
        f"# My reviews: stars from a CSV of mine.\n"
        f"defaults: [file]\nname: reviews\npath: {csv}\n"
        "text_column: review\nlabel_column: stars\n"
    )
    (folder / "head" / "knn.yaml").write_text(
        "# k nearest neighbours.\nname: knn\nparams:\n"
        "  _target_: sklearn.neighbors.KNeighborsClassifier\n  n_neighbors: 3\n"
    )
    return folder


def test_a_users_config_folder_is_found_through_the_env_var_and_the_searchpath(tmp_path, tiny_bert):
    csv = write_csv(tmp_path / "reviews.csv", sentences(30), header=("review", "stars"))
    folder = user_folder(tmp_path, csv)
    env = {"LLMEMBED_CONFIG_DIR": str(folder), "LLMEMBED_CACHE": str(tmp_path / "cache")}
    listing = run("llmembed-classify", "--help", env=env).stdout
    assert (
        "reviews" in listing
        and "My reviews: stars" in listing
        and "(LLMEMBED_CONFIG_DIR)" in listing
    )
    assert "  knn " in listing

    # dataset=reviews replaces dataset=file dataset.path=... text_column=... label_column=...
    args = [
        "dataset=reviews",
        "backbone=local",
        f"backbone.path={tiny_bert}",
        "extract.progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    out = run("llmembed-extract", *args, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "extracted reviews x " in out.stdout and "30 new texts" in out.stdout

    cfg = run("llmembed-classify", "dataset=reviews", "head=knn", "--cfg", "job", env=env).stdout
    assert "KNeighborsClassifier" in cfg and "label_column: stars" in cfg

    # The same folder on the command line, without the variable.
    plain = {"LLMEMBED_CACHE": str(tmp_path / "cache")}
    out = run(
        "llmembed-extract", *args, f"hydra.searchpath=[file://{folder}]", env=plain, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "cache hit: all 30 texts of reviews" in out.stdout
    assert len(read_rows(csv)) == 30


def test_a_missing_config_folder_is_named():
    out = run("llmembed-extract", "--cfg", "job", env={"LLMEMBED_CONFIG_DIR": "/no/such/folder"})
    assert out.returncode != 0
    assert "LLMEMBED_CONFIG_DIR=/no/such/folder is not a folder" in out.stderr


def test_a_config_of_ones_own_that_is_not_valid_yaml_or_not_utf8_is_one_message(tmp_path):
    folder = tmp_path / "conf"
    (folder / "dataset").mkdir(parents=True)
    (folder / "backbone").mkdir()
    (folder / "dataset" / "bad.yaml").write_text("defaults: [file]\nname: [bad\n")
    (folder / "backbone" / "frbb.yaml").write_bytes(
        "# Modèle français\nname: frbb\n".encode("latin-1")
    )
    env = {"LLMEMBED_CONFIG_DIR": str(folder), "LLMEMBED_CACHE": str(tmp_path / "cache")}
    listing = run("llmembed-extract", "--help", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "frbb" in listing.stdout and "(not UTF-8: save it as UTF-8 to use it)" in listing.stdout
    for choice in ("dataset=bad", "backbone=frbb"):
        out = run("llmembed-extract", choice, "--cfg", "job", env=env)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        # Hydra's error names neither file: the message does, with where and why.
        assert f"{folder}/backbone/frbb.yaml is not UTF-8 (byte 5): save it as UTF-8" in out.stderr
        assert f"{folder}/dataset/bad.yaml is not valid YAML (line 3, column 1)" in out.stderr


def test_a_missing_config_folder_is_named_by_the_api_and_the_export_too(monkeypatch, tmp_path):
    from llmembed.cache.cli import _data_set
    from llmembed.configs import named_backbone
    from llmembed.errors import UserError

    monkeypatch.setenv("LLMEMBED_CONFIG_DIR", "/no/such/folder")
    with pytest.raises(UserError, match="LLMEMBED_CONFIG_DIR=/no/such/folder is not a folder"):
        named_backbone("minilm")  # as llmembed.encode(texts, "minilm") and predict look it up
    args = argparse.Namespace(data=tmp_path / "d.csv", text_column="text", label_column="label")
    with pytest.raises(UserError, match="is not a folder"):
        _data_set(args)  # llmembed-cache export --data


def test_a_data_set_yaml_of_ones_own_without_the_shared_defaults_says_which(tmp_path):
    """Without `defaults: [file]` the split settings are missing, not None: the message names the
    line to add, before any file is read."""
    folder = tmp_path / "conf"
    (folder / "dataset").mkdir(parents=True)
    (folder / "dataset" / "mine.yaml").write_text("name: mine\nsource: file\npath: none.csv\n")
    env = {"LLMEMBED_CONFIG_DIR": str(folder), "LLMEMBED_CACHE": str(tmp_path / "cache")}
    for command in ("llmembed-extract", "llmembed-classify"):
        out = run(command, "dataset=mine", env=env)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert (
            "dataset 'mine' has no seed, test_size, val_size, limit: start its YAML with "
            "`defaults: [file]`"
        ) in out.stderr
