"""`llmembed-report` on hand-made metrics.json files: resolved layers on the plot, runs grouped by
their data's identity, failed jobs listed, intervals in the table and as error bars, and macro-F1
over fewer labels said out loud."""

import csv
import json
from pathlib import Path

import matplotlib.axes
import numpy as np
import pytest

from llmembed.classify.cli import report_main
from llmembed.classify.metrics import evaluate, summarize
from llmembed.classify.report import collect, write_report

NAMES = ["neg", "pos", "neutral"]


def scores(right: int, n: int = 100, labels: int = 2) -> dict:
    """evaluate() of `right` correct predictions out of n over the first `labels` labels."""
    y = np.arange(n) % labels
    pred = y.copy()
    pred[: n - right] = (y[: n - right] + 1) % labels
    return evaluate(y, pred, NAMES)


def metrics(*, layers=(3,), requested=None, right=80, data=None, head="logreg", old=False):
    """A metrics.json as train.py writes it (or, with old=True, as before intervals and data)."""
    test, val = scores(right), scores(right)
    src = {"backbone": "smollm2", "layers": list(layers), "pooling": "mean"}
    if requested is not None:
        src["requested_layers"] = list(requested)
    m = {
        "dataset": "mr",
        "rows": {"train": 700, "validation": 100, "test": 100},
        "sources": [src],
        "features": [f"smollm2:mean:L{x}" for x in layers],
        "fusion": "concat",
        "head": head,
        "seeds": [0],
        "test": summarize([test]),
        "validation": summarize([val]),
        "runs": [{"seed": 0, "test": test, "validation": val}],
        "timings": {"fit_s": 1.0, "total_s": 2.0},
    }
    if data is not None:
        m["data"] = data
    if old:  # no intervals, no absent labels, layers as written
        for split in ("test", "validation"):
            for v in m[split].values():
                v.pop("ci"), v.pop("n")
        for key in ("absent_labels", "macro_f1_labels", "accuracy_ci", "macro_f1_ci"):
            test.pop(key)
    return m


def data(**kw):
    base = {"name": "mr", "source": "packaged", "path": None, "limit": None, "seed": 0}
    return {**base, "rows": 10568, "duplicates_dropped": 0, "fingerprint": "a1b2c3d4e5f6", **kw}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write(folder: Path, m: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder


@pytest.fixture
def drawn(monkeypatch):
    """Every errorbar call of the plot: (label, xs, ys, yerr)."""
    calls = []
    real = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, yerr=None, **kw):
        calls.append((kw.get("label"), list(x), list(y), yerr))
        return real(self, x, y, yerr=yerr, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    return calls


def test_negative_layers_are_plotted_at_their_resolved_index(tmp_path, drawn):
    write(tmp_path / "0", metrics(layers=[0], requested=[0]))
    write(tmp_path / "last", metrics(layers=[30], requested=[-1], right=90))
    old = metrics(layers=[-2], old=True)  # an older file: layers as written, ...
    old["features"] = ["smollm2:mean:L29"]  # ... but its block name holds the resolved layer
    write(tmp_path / "old", old)
    odd = metrics(layers=[-3], old=True)
    odd["features"] = ["custom-block"]  # no resolution known: a level, not a point at -3
    write(tmp_path / "odd", odd)
    rows = {Path(r["run"]).name: r for r in collect([tmp_path])}
    assert rows["last"]["layer"] == 30 and rows["old"]["layer"] == 29
    assert rows["odd"]["line"] is None
    write_report([tmp_path], tmp_path)
    [(label, xs, ys, _)] = drawn
    assert label == "smollm2 mean" and xs == [0, 29, 30] and ys == [0.8, 0.8, 0.9]  # never -1


def test_error_bars_are_the_95_percent_interval_not_the_std(tmp_path, drawn):
    write(tmp_path / "a", metrics(layers=[1], requested=[1], right=80))
    write(tmp_path / "b", metrics(layers=[2], requested=[2], right=90))
    write_report([tmp_path], tmp_path)
    [(_, _, _, yerr)] = drawn
    # Wilson 80/100 = [0.7112, 0.8666] and 90/100 = [0.8256, 0.9448], as distances from the mean
    np.testing.assert_allclose(yerr, [[0.0888, 0.0744], [0.0666, 0.0448]], atol=1e-4)


def test_table_shows_test_accuracy_with_its_interval(tmp_path, capsys):
    write(tmp_path / "a", metrics(layers=[1], requested=[1], right=80))
    write(tmp_path / "old", metrics(layers=[2], old=True, right=70))
    assert report_main([str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0].split("|")[5].strip() == "test acc [95% CI]"
    assert table[2].split("|")[5].strip() == "0.8000 [0.7112, 0.8666]"
    assert table[3].split("|")[5].strip() == "0.7000"  # older file: no interval, none invented
    rows = read_csv(tmp_path / "results.csv")
    assert [rows[0]["test_accuracy_ci_lo"][:6], rows[0]["test_accuracy_ci_hi"][:6]] == [
        "0.7111",
        "0.8666",
    ]
    assert "2 finished run(s), 0 failed or interrupted" in capsys.readouterr().out


def test_runs_on_other_subsets_or_files_are_not_merged(tmp_path, drawn):
    for name, d in {
        "full": data(),
        "quick": data(limit=4000, rows=4000, fingerprint="ffff00001111"),
        "file_a": data(name="file", source="file", path="/x/a.csv", fingerprint="aaaa"),
        "file_b": data(name="file", source="file", path="/y/b.csv", fingerprint="bbbb"),
        "split1": data(seed=1),  # the same rows, another split
        "edited": data(seed=1, fingerprint="0123456789ab"),  # another file under the same path
    }.items():
        write(tmp_path / name, metrics(layers=[3], requested=[3], data=d))
    write(tmp_path / "legacy", metrics(layers=[3], old=True))
    labels = {Path(r["run"]).name: r["dataset"] for r in collect([tmp_path])}
    assert labels == {
        "full": "mr seed=0",
        "quick": "mr limit=4000",
        "file_a": "file a.csv",
        "file_b": "file b.csv",
        "split1": "mr seed=1 #a1b2c3d4",
        "edited": "mr seed=1 #01234567",
        "legacy": "mr",  # no data record: its name, as before
    }
    write_report([tmp_path], tmp_path)
    assert len(drawn) == 7  # one figure (one line) per data identity
    assert (tmp_path / "accuracy_vs_layer_mr_limit_4000_logreg.png").is_file()
    assert (tmp_path / "accuracy_vs_layer_file_a_csv_logreg.png").is_file()


def test_failed_or_interrupted_jobs_are_listed_with_their_overrides(tmp_path, capsys):
    write(tmp_path / "0", metrics(layers=[0], requested=[0]))
    job = tmp_path / "1" / ".hydra"
    job.mkdir(parents=True)
    (job / "config.yaml").write_text(
        "dataset: {name: mr}\nhead: {name: mlp}\nfeatures: {fusion: auto}\n"
    )
    (job / "overrides.yaml").write_text("- layer=1\n- head=mlp\n")
    extract_job = tmp_path / "extract" / ".hydra"  # llmembed-extract writes no metrics.json
    extract_job.mkdir(parents=True)
    (extract_job / "config.yaml").write_text("dataset: {name: mr}\nbackbone: {name: x}\n")
    cut = write(tmp_path / "2", metrics(layers=[2], requested=[2]))
    (cut / "metrics.json").write_text('{"dataset": "mr", "he')  # killed while writing
    assert report_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 finished run(s), 2 failed or interrupted (listed with their overrides)" in out
    rows = read_csv(tmp_path / "results.csv")
    failed = {Path(r["run"]).name: r for r in rows if r["status"] != "ok"}
    assert set(failed) == {"1", "2"}
    assert failed["1"]["status"] == "failed or interrupted"
    assert failed["1"]["overrides"] == "layer=1 head=mlp" and failed["1"]["head"] == "mlp"
    assert failed["2"]["status"].startswith("failed or interrupted: unreadable metrics.json")
    md = (tmp_path / "results.md").read_text()
    assert f"| failed or interrupted | mr | mlp | layer=1 head=mlp | {tmp_path / '1'} |" in md


def test_macro_f1_over_fewer_labels_is_said(tmp_path):
    write(tmp_path / "a", metrics(layers=[1], requested=[1]))  # 2 of the 3 labels in the test split
    old = metrics(layers=[2], old=True)
    write(tmp_path / "old", old)
    write_report([tmp_path], tmp_path)
    table = (tmp_path / "results.md").read_text().splitlines()
    cells = {line.split("|")[3].strip(): line.split("|")[6].strip() for line in table[2:]}
    assert cells["smollm2:mean:L1"] == "0.8000 (over 2 of 3 labels)"
    # An older file averaged the absent label in as 0; its confusion matrix shows which it was.
    assert cells["smollm2:mean:L2"].endswith("(1 absent label(s) counted as 0)")
    rows = {Path(r["run"]).name: r for r in read_csv(tmp_path / "results.csv")}
    assert rows["a"]["test_macro_f1_absent_labels"] == "neutral"


def test_one_file_named_relative_or_absolute_is_one_data_set(tmp_path, drawn):
    same = {"name": "reviews", "source": "file", "fingerprint": "cafe12345678"}
    write(
        tmp_path / "rel", metrics(layers=[1], requested=[1], data=data(path="reviews.csv", **same))
    )
    write(
        tmp_path / "abs",
        metrics(layers=[2], requested=[2], data=data(path="/d/reviews.csv", **same)),
    )
    labels = {r["dataset"] for r in collect([tmp_path])}
    assert labels == {"reviews"}  # not "reviews reviews.csv #1..." and "... #2..."
    write_report([tmp_path], tmp_path)
    [(_, xs, _, _)] = drawn  # one figure, one line through both layers
    assert xs == [1, 2]


def test_a_combined_report_goes_to_out_and_leaves_the_folders_alone(tmp_path, capsys):
    write(tmp_path / "a", metrics(layers=[1], requested=[1]))
    write(tmp_path / "b", metrics(layers=[2], requested=[2]))
    with pytest.raises(SystemExit) as stop:
        report_main([str(tmp_path / "a"), str(tmp_path / "b")])
    assert stop.value.code == 2 and "say where it goes with --out DIR" in capsys.readouterr().err
    assert (
        report_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "both")])
        == 0
    )
    assert len(read_csv(tmp_path / "both" / "results.csv")) == 2
    assert not (tmp_path / "a" / "results.csv").exists()


def test_layer_ticks_are_whole_and_bars_at_one_layer_stay_apart(tmp_path):
    from llmembed.classify.report import figure

    for name, backbone in (("s", "smollm2"), ("m", "minilm")):
        for layer in (1, 2, 3):
            m = metrics(layers=[layer], requested=[layer])
            m["sources"][0]["backbone"] = backbone
            write(tmp_path / f"{name}{layer}", m)
    rows = collect([tmp_path])
    fig = figure("mr", "logreg", rows)
    ax = fig.axes[0]
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())
    xs = sorted({tuple(line.get_xdata()) for line in ax.lines})  # each line's points and caps
    assert len(xs) == 2 and all(a != b for a, b in zip(*xs, strict=True))  # offset, not on top
    assert all(abs(a - b) < 0.5 for a, b in zip(*xs, strict=True))  # yet at their layer
