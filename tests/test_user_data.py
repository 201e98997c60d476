"""A researcher's own configs, data and models, used as they would use them: their own backbone config
everywhere a backbone is named, their CSV with string ids and its own column names, what the
commands say and record, and the inputs that must be refused instead of read."""

import csv
import fcntl
import io
import json
import os
import pty
import stat
import struct
import subprocess
import termios
from pathlib import Path

import pytest

import llmembed
from llmembed.classify.saved import load_trained
from tests.conftest import (
    BIN,
    classify_tiny,
    make_tiny_llama,
    one_line_error,
    read_rows,
    run_cli,
    sentences,
    tiny_features,
    write_csv,
)


def test_a_users_backbone_config_resolves_everywhere(tmp_path, tiny_llama, data_csv, monkeypatch):
    conf = tmp_path / "my-conf" / "backbone"
    conf.mkdir(parents=True)
    # Built on the shipped `local`, as a user's data set config builds on `file`.
    (conf / "mybb.yaml").write_text(
        f"# my model\ndefaults: [local]\nname: mybb\npath: {tiny_llama}\n"
    )
    env = {"LLMEMBED_CONFIG_DIR": str(tmp_path / "my-conf")}
    root = tmp_path / "cache"
    trained = run_cli(
        "llmembed-classify",
        "dataset=file",
        f"dataset.path={data_csv}",
        "features=smollm2_l20",
        "features.sources.0.backbone=mybb",  # a feature source naming the user's config
        "features.sources.0.layers=[1,2]",
        "extract.dtype=float32",
        "extract.progress=false",
        "hydra.run.dir=run",
        cwd=tmp_path,
        root=root,
        env=env,
    )
    assert trained.returncode == 0, trained.stderr
    meta = json.loads((tmp_path / "run" / "model" / "model.json").read_text())
    assert meta["sources"][0]["backbone"]["conf"] == "mybb"
    (tmp_path / "new.txt").write_text("a great film\nan awful plot\n")
    predicted = run_cli(
        "llmembed-predict",
        tmp_path / "run" / "model",
        tmp_path / "new.txt",
        cwd=tmp_path,
        root=root,
        env=env,
    )
    assert predicted.returncode == 0, predicted.stderr
    assert len(list(csv.DictReader(predicted.stdout.splitlines()))) == 2
    # The Python API resolves the name the same way: encode is served by the entry, find finds it.
    monkeypatch.setenv("LLMEMBED_CONFIG_DIR", str(tmp_path / "my-conf"))
    texts = [r["text"] for r in read_rows(data_csv)]
    (entry,) = llmembed.Cache(root).find("mybb", dtype="float32")
    assert entry.backbone == "mybb" and entry.model == str(tiny_llama)
    x = llmembed.encode(texts, "mybb", [1, 2], cache_root=root, dtype="float32")
    assert x.shape == (60, 2, 32)


def test_a_shipped_name_with_another_path_is_refused_and_ls_tells_entries_apart(
    tmp_path, tiny_bert, data_csv
):
    res = run_cli(
        "llmembed-extract",
        "dataset=file",
        f"dataset.path={data_csv}",
        "backbone=minilm",
        f"backbone.path={tiny_bert}",
        cwd=tmp_path,
        root=tmp_path / "cache",
    )
    line = one_line_error(res, "llmembed-extract")
    assert f"backbone.path={tiny_bert} is not the model of the backbone config 'minilm'" in line
    # Two local folders of one name: `ls` and the Python API show which model each entry holds.
    a, b = (
        make_tiny_llama(tmp_path / "a" / "model"),
        make_tiny_llama(tmp_path / "b" / "model", seed=1),
    )
    for model in (a, b):
        llmembed.encode(
            ["a fine film"], str(model), [1], cache_root=tmp_path / "cache", dtype="float32"
        )
    listing = run_cli("llmembed-cache", "ls", cwd=tmp_path, root=tmp_path / "cache").stdout
    header = listing.splitlines()[0].split()
    assert header[:5] == ["entry", "backbone", "model", "identity", "hidden"]
    rows = [line.split() for line in listing.splitlines()[1:3]]
    assert {r[2] for r in rows} == {str(a), str(b)} and {r[1] for r in rows} == {"model"}
    assert len({r[4] for r in rows}) == 2 and {r[5] for r in rows} == {"32"}  # other identities
    entries = llmembed.Cache(tmp_path / "cache").entries()
    assert {e.model for e in entries} == {str(a), str(b)} and {e.hidden_size for e in entries} == {
        32
    }
    assert "model=" in repr(entries[0]) and "identity='files " in repr(entries[0])


def test_export_errors_name_its_own_flags(tmp_path, make_cfg, data_csv):
    from llmembed.extract.pipeline import extract

    res = extract(make_cfg())
    entry = str(res.entry.path.relative_to(tmp_path / "cache"))
    args = ["llmembed-cache", "export", entry, "--layers", "1"]
    missing = run_cli(
        *args,
        "--out",
        tmp_path / "no" / "such" / "x.parquet",
        cwd=tmp_path,
        root=tmp_path / "cache",
    )
    assert "no/such does not exist" in one_line_error(missing, "llmembed-cache")
    wrong = run_cli(
        *args,
        "--out",
        tmp_path / "x.parquet",
        "--data",
        data_csv,
        "--text-column",
        "review",
        cwd=tmp_path,
        root=tmp_path / "cache",
    )
    line = one_line_error(wrong, "llmembed-cache")
    assert "has no column 'review'" in line and "--text-column" in line and "dataset." not in line
    for name in ("text (en)", "2024"):  # a name, not override syntax (nor a number)
        odd = run_cli(
            *args,
            "--out",
            tmp_path / "x.parquet",
            "--data",
            data_csv,
            "--text-column",
            name,
            cwd=tmp_path,
            root=tmp_path / "cache",
        )
        assert f"has no column '{name}'" in one_line_error(odd, "llmembed-cache")


def test_a_users_csv_with_string_ids_and_own_columns(tmp_path, tiny_llama):
    rows = [
        (f"r-{i:03d}", text, {"pos": 5, "neg": 1}[y]) for i, (text, y) in enumerate(sentences(60))
    ]
    write_csv(tmp_path / "reviews.csv", rows, header=("id", "review", "stars"))
    root = tmp_path / "cache"
    args = [
        "llmembed-classify",
        "dataset=file",
        f"dataset.path={tmp_path / 'reviews.csv'}",
        "dataset.text_column=review",
        "dataset.label_column=stars",
        "dataset.id_column=id",
        *tiny_features(tiny_llama),
        "extract.dtype=float32",
        "extract.progress=false",
    ]
    first = run_cli(*args, "hydra.run.dir=one", cwd=tmp_path, root=root)
    assert first.returncode == 0, first.stderr
    # Said before the model runs, and only when it has to.
    assert (
        f"60 texts of reviews are not in the cache: extracting them with tiny ({tiny_llama})"
        in first.stdout
    )
    again = run_cli(*args, "hydra.run.dir=two", cwd=tmp_path, root=root)
    assert again.returncode == 0 and "not in the cache" not in again.stdout
    predictions = read_rows(tmp_path / "one" / "predictions.csv")
    assert sorted(r["row_id"] for r in predictions) == [f"r-{i:03d}" for i in range(60)]
    metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert metrics["dataset"] == "reviews" and metrics["data"]["name"] == "reviews"
    _, meta = load_trained(tmp_path / "one" / "model")
    for record in (metrics["versions"], meta["versions"]):
        assert set(record) == {"llmembed", "torch", "transformers", "scikit-learn"}
    assert "# llmembed model: reviews" in (tmp_path / "one" / "model" / "README.md").read_text()
    # Predict reads the column the model was trained on, and scores against its label column.
    write_csv(tmp_path / "new.csv", [(t, s) for _, t, s in rows[:8]], header=("review", "stars"))
    out = run_cli(
        "llmembed-predict",
        tmp_path / "one" / "model",
        tmp_path / "new.csv",
        cwd=tmp_path,
        root=root,
    )
    assert out.returncode == 0, out.stderr
    assert "labelled in column 'stars'" in out.stderr
    header = next(csv.reader(out.stdout.splitlines()))
    assert header == [c for c in predictions[0] if c not in ("row_id", "split")]


def test_what_the_commands_say_and_keep(tmp_path, tiny_llama, data_csv):
    extracted = run_cli(
        "llmembed-extract",
        "dataset=file",
        f"dataset.path={data_csv}",
        "backbone=local",
        f"backbone.path={tiny_llama}",
        "extract.layers=[1]",  # a model built cut after layer 1
        "extract.progress=false",
        "hydra.run.dir=run",
        cwd=tmp_path,
        root=tmp_path / "cache",
    )
    assert extracted.returncode == 0, extracted.stderr
    assert "LOAD REPORT" not in extracted.stdout + extracted.stderr
    assert "extracted data x local: 60 new texts" in extracted.stdout  # named after data.csv
    log = (tmp_path / "run" / "llmembed-extract.log").read_text()
    assert "extracted data x local: 60 new texts" in log


def test_a_torch_head_shows_its_epochs_on_a_terminal(tmp_path, tiny_llama, data_csv):
    """Run under a pseudo-terminal, as a user at a shell runs it."""
    args = [
        str(BIN / "llmembed-classify"),
        "dataset=file",
        f"dataset.path={data_csv}",
        *tiny_features(tiny_llama),
        "head=mlp",
        "head.params.max_epochs=5",
        "extract.progress=false",
    ]
    env = {**os.environ, "LLMEMBED_CACHE": str(tmp_path / "cache")}
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 40 x 160
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdin=follower, stdout=follower, stderr=follower
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=600) == 0, seen.decode(errors="replace")[-3000:]
    text = seen.decode(errors="replace")
    assert "MLPHead" in text and "epoch" in text and "val_loss=" in text


# --- inputs that are refused instead of read ------------------------------------------------------
@pytest.fixture
def model(classify_cfg, tmp_path):
    from llmembed.classify.train import train

    train(classify_cfg([("llama", [1], "mean")]), tmp_path / "run")
    return tmp_path / "run" / "model"


def test_predict_reads_lines_at_newlines_only(model, tmp_path):
    lines = [
        "a film\fwith a form feed",
        "a plot\u2028with a line separator",
        "music\x85and NEL",
        "fun",
        "dull",
    ]
    (tmp_path / "new.txt").write_bytes(("\r\n".join(lines) + "\n").encode())
    out = run_cli(
        "llmembed-predict", model, tmp_path / "new.txt", cwd=tmp_path, root=tmp_path / "cache"
    )
    assert out.returncode == 0, out.stderr
    texts = [r["text"] for r in csv.DictReader(io.StringIO(out.stdout, newline=""))]
    assert texts == lines  # 5, not 8


def test_predict_refuses_what_is_not_a_regular_file(model, tmp_path):
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    for path in ("/dev/zero", fifo):
        res = run_cli("llmembed-predict", model, path, cwd=tmp_path, root=tmp_path / "cache")
        assert "is not a regular file" in one_line_error(res, "llmembed-predict")


def test_a_line_longer_than_the_cap_is_refused(model, tmp_path, monkeypatch, capsys):
    from llmembed.classify import cli

    monkeypatch.setattr(cli, "MAX_LINE_BYTES", 1000)
    (tmp_path / "long.txt").write_text("fine\n" + "x" * 5000 + "\n")
    with pytest.raises(SystemExit) as stop:
        cli.predict_main([str(model), str(tmp_path / "long.txt")])
    assert stop.value.code == 2 and "long.txt, line 2: longer than" in capsys.readouterr().err


@pytest.mark.parametrize(
    "damage",
    [
        "empty",
        "truncated",
        "link to a non-model",
        "nested model.json",
        "conf is a path",
        "conf edited",
    ],
)
def test_a_damaged_or_edited_model_folder_is_one_line(model, tmp_path, damage):
    weights, meta_path = model / "head.safetensors", model / "model.json"
    meta = json.loads(meta_path.read_text())
    if damage == "empty":
        weights.write_bytes(b"")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-40])
    elif damage == "link to a non-model":
        weights.unlink()
        weights.symlink_to(meta_path)
    elif damage == "nested model.json":
        meta_path.write_text("[" * 100_000 + "]" * 100_000)
    else:  # a model.json naming a config outside the config folders, or another config
        meta["sources"][0]["backbone"]["conf"] = (
            "../../../../elsewhere/evil" if damage == "conf is a path" else "minilm"
        )
        meta_path.write_text(json.dumps(meta))
    (tmp_path / "new.txt").write_text("a fine film\n")
    res = run_cli(
        "llmembed-predict", model, tmp_path / "new.txt", cwd=tmp_path, root=tmp_path / "cache"
    )
    line = one_line_error(res, "llmembed-predict")
    expected = {
        "nested model.json": "nested too deeply",
        "conf is a path": "was edited after training",
        "conf edited": "was edited after training",
    }.get(damage, "damaged or incomplete")
    assert expected in line, line


def test_a_conf_path_is_never_read_even_under_a_matching_contract(model, tmp_path):
    from llmembed.classify.predict import resolve_backbone
    from llmembed.classify.saved import SavedModelError

    _, meta = load_trained(model)
    source = {
        **meta["sources"][0],
        "backbone": {**meta["sources"][0]["backbone"], "conf": "../evil"},
    }
    with pytest.raises(SavedModelError, match=r"which is not a config name"):
        resolve_backbone(source, paths={}, trust_remote_code=False)


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("head.params._target_=no.such.Class", "head.params._target_=no.such.Class: no such class"),
        ("head.params._target_=llmembed.classify.heads.Missing", "no such class"),
        ("head.params._target_=subprocess.Popen", "is not an estimator (it has no fit method)"),
        (
            "+head.params.nonsense=3",
            "head.params.nonsense: llmembed.classify.heads.LogRegHead takes no parameter nonsense",
        ),
        (
            "head.params.Cs=[0.1,-1]",
            "head.params.Cs=[0.1, -1]: give a list of one or more positive",
        ),
        (
            ["head=mlp", "head.params.device=cuda"],
            "head.params.device='cuda': this machine has no usable CUDA GPU",
        ),
        (["head=llmembed", "head.params.lr=0"], "head.params.lr=0: use a positive learning rate"),
        (  # a scikit-learn estimator's own parameter constraints
            [
                "head.params._target_=sklearn.linear_model.LogisticRegression",
                "~head.params.Cs",
                "+head.params.C=-1",
            ],
            "head.params: The 'C' parameter of LogisticRegression must be a float",
        ),
        (
            "extract.shard_mb=inf",
            "extract.shard_mb must be auto or a positive number of MB, got inf",
        ),
    ],
)
def test_bad_heads_and_settings_on_the_command_line_are_one_line(
    tmp_path, tiny_llama, data_csv, override, says
):
    overrides = [override] if isinstance(override, str) else override
    # device=cuda is refused on a GPU machine too
    res = classify_tiny(
        tmp_path, tiny_llama, data_csv, *overrides, env={"CUDA_VISIBLE_DEVICES": ""}
    )
    assert says in one_line_error(res, "llmembed-classify")
    assert not (tmp_path / "cache").exists()  # refused before any extraction


def test_jsonl_line_separators_inside_strings_and_lone_surrogates(tmp_path, tiny_llama):
    rows = [{"text": t, "label": y} for t, y in sentences(20)]
    rows[3]["text"] = "a film\u2028with a line separator\x85 and NEL"
    good = tmp_path / "good.jsonl"
    # json.dumps(ensure_ascii=False) writes U+2028 raw: valid JSON, one object per line
    good.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8"
    )
    args = [
        "llmembed-extract",
        "dataset=file",
        "backbone=local",
        f"backbone.path={tiny_llama}",
        "extract.progress=false",
    ]
    ok = run_cli(*args, f"dataset.path={good}", cwd=tmp_path, root=tmp_path / "cache")
    assert ok.returncode == 0 and "20 new texts" in ok.stdout, ok.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text().replace("a film", "a film \\ud800", 1), encoding="utf-8")
    line = one_line_error(
        run_cli(*args, f"dataset.path={bad}", cwd=tmp_path, root=tmp_path / "cache"),
        "llmembed-extract",
    )
    assert "1 texts hold a lone surrogate" in line and "line 4 (U+D800" in line


def test_labelled_data_has_a_package_of_its_own():
    """Both stages and the API read data sets: llmembed.data, not a corner of extract/."""
    import importlib

    root = Path(__file__).resolve().parents[1]
    assert callable(importlib.import_module("llmembed.data.datasets").load_dataset)
    assert callable(importlib.import_module("llmembed.data.tables").read_rows)
    packages = (root / "pyproject.toml").read_text().split("packages = [", 1)[1].split("]", 1)[0]
    assert '"llmembed.data"' in packages
    assert not any((root / "extract" / f).exists() for f in ("datasets.py", "tables.py"))
    for package in ("classify", "fuse", "extract"):
        assert "arrives with" not in (root / package / "__init__.py").read_text()


def test_a_model_trained_on_a_gpu_predicts_on_a_machine_without_one(classify_cfg, tmp_path):
    """A torch head runs where the model is loaded: the device it trained on is kept in
    model.json (and signed with it) but does not bind the machine that predicts."""
    from llmembed.classify.saved import load_trained, save_trained
    from llmembed.classify.train import train

    small = [
        "head=mlp",
        "head.params.hidden=[8]",
        "head.params.max_epochs=3",
        "head.params.device=cpu",
    ]
    train(classify_cfg([("llama", [1], "mean")], *small), tmp_path / "run")
    model = tmp_path / "run" / "model"
    (tmp_path / "new.txt").write_text("a fine film\na dull plot\n")
    args = ("llmembed-predict", model, tmp_path / "new.txt")
    cpu = {"CUDA_VISIBLE_DEVICES": ""}  # both runs on the CPU, on any machine
    before = run_cli(*args, cwd=tmp_path, root=tmp_path / "cache", env=cpu)
    assert before.returncode == 0, before.stderr
    head, meta = load_trained(model)  # as a GPU node would have written it
    info = {k: v for k, v in meta.items() if k not in ("format", "head", "params")}
    save_trained(model, head.set_params(device="cuda"), head_name=meta["head"], info=info)
    assert json.loads((model / "model.json").read_text())["params"]["device"] == "cuda"
    after = run_cli(*args, cwd=tmp_path, root=tmp_path / "cache", env=cpu)
    assert after.returncode == 0, after.stderr
    assert after.stdout == before.stdout


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--device", "gpu"], "--device 'gpu': use auto, cpu, cuda, cuda:N or mps"),
        (["--device", "cuda"], "--device 'cuda': this machine has no usable CUDA GPU"),
        (["--output", "{tmp}/nowhere/p.csv"], "the folder {tmp}/nowhere does not exist"),
        (["--output", "{tmp}"], "is a folder; give a file name"),
        (
            ["--backbone-path", "tiny-lama=/models/x"],
            "--backbone-path tiny-lama=...: the model has no backbone 'tiny-lama'; its backbones: tiny-llama",
        ),
    ],
)
def test_predict_refuses_a_device_or_output_it_could_not_use_before_any_work(
    model, tmp_path, extra, says
):
    (tmp_path / "new.txt").write_text("a fine film\n")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    res = run_cli(
        "llmembed-predict",
        model,
        tmp_path / "new.txt",
        *extra,
        cwd=tmp_path,
        root=tmp_path / "predict-cache",
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    assert says.replace("{tmp}", str(tmp_path)) in one_line_error(res, "llmembed-predict")
    assert not (tmp_path / "predict-cache").exists()  # nothing embedded, nothing remembered


@pytest.mark.parametrize(
    ("second", "column", "option"),
    [
        ('{"text": "a dull film", "id": 8}', "label", "--label-column"),
        ('{"text": "a dull film", "label": "neg"}', "id", "--id-column"),
    ],
)
def test_predict_says_how_to_do_without_a_column_some_json_lines_lack(
    model, tmp_path, second, column, option
):
    """A column predict can do without (the labels it scores against, the ids it copies) that
    some lines of a JSON-lines file lack: the message offers turning it off, and that works."""
    first = '{"text": "a fine film", "label": "pos", "id": 7}'
    (tmp_path / "new.jsonl").write_text(f"{first}\n{second}\n")

    def predict(*extra):
        args = ("llmembed-predict", model, tmp_path / "new.jsonl", *extra)
        return run_cli(*args, cwd=tmp_path, root=tmp_path / "c")

    assert one_line_error(predict(), "llmembed-predict").endswith(
        f"1 rows have no key {column!r} (line 2); add it to those rows or remove them; "
        f"or pass {option} '' to do without it"
    )
    res = predict(option, "")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("film") == 2, res.stdout  # both texts predicted


@pytest.mark.parametrize("name", ["new.ndjson", "new.dat", "new"])
def test_predict_refuses_a_file_whose_suffix_names_no_format_it_reads(tmp_path, name):
    """Read line by line, a JSON-lines or CSV file under another name would be embedded record by
    record, header and labels included, without a word. Said before the model is looked for (a
    hub model would be downloaded first): here there is none."""
    (tmp_path / name).write_text('{"text": "a fine film", "label": "pos"}\n')
    model = tmp_path / "no-model"
    res = run_cli("llmembed-predict", model, tmp_path / name, cwd=tmp_path, root=tmp_path / "p")
    line = one_line_error(res, "llmembed-predict")
    assert "reads .txt (one text per line) and .csv/.json/.jsonl/.parquet/.tsv tables" in line


def test_predict_refuses_to_turn_off_a_tables_text_column(tmp_path):
    (tmp_path / "new.csv").write_text("text,label\na fine film,pos\n")
    res = run_cli(
        "llmembed-predict",
        tmp_path / "no-model",
        tmp_path / "new.csv",
        "--text-column",
        "",
        cwd=tmp_path,
        root=tmp_path / "p",
    )
    assert "--text-column '': the texts' column cannot be turned off" in one_line_error(
        res, "llmembed-predict"
    )


def test_predict_output_to_a_device_a_link_or_an_existing_file(model, tmp_path):
    """/dev/null is written as it is (only the scores wanted), a link's target is replaced whole
    (the link stays), an existing file keeps its mode."""
    (tmp_path / "new.txt").write_text("a fine film\na dull plot\n")

    def predict(out) -> subprocess.CompletedProcess:
        res = run_cli(
            "llmembed-predict",
            model,
            tmp_path / "new.txt",
            "--output",
            out,
            cwd=tmp_path,
            root=tmp_path / "cache",
        )
        assert res.returncode == 0, res.stderr
        return res

    predict("/dev/null")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    (tmp_path / "runs").mkdir()
    target = tmp_path / "runs" / "pred.csv"
    target.write_text("old\n")
    target.chmod(0o640)
    (tmp_path / "latest.csv").symlink_to(target)
    predict(tmp_path / "latest.csv")
    assert (tmp_path / "latest.csv").is_symlink() and target.read_text().startswith("predicted,")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["pred.csv"]  # no temp left
