"""Command-line entry points of the training stage.

llmembed-classify dataset=mr features=smollm2_l20 head=logreg
llmembed-classify -m features=smollm2_layer layer='range(0,31)'   # a sweep over all layers
llmembed-report multirun/classify/2026-11-26/10-00-00
llmembed-predict outputs/classify/.../model texts.txt
"""

from __future__ import annotations

import argparse
import csv
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from llmembed.clihelp import bars_on_a_terminal_only, maybe_answer, print_and_log
from llmembed.errors import UserError, reported
from llmembed.overrides import check_command_line


def classify_main() -> float | None:
    """`--help` and `--version` answer before Hydra starts (and before torch is imported)."""
    maybe_answer(
        "llmembed-classify",
        "train and evaluate a head on cached embeddings",
        [
            "llmembed-classify dataset=mr features=smollm2_l20 head=logreg",
            "llmembed-classify -m features=smollm2_layer layer='range(0,31)'",
            "llmembed-classify -m features=demo_fused head=logreg,mlp,llmembed seeds='[0,1,2]'",
            "llmembed-classify experiment=demo",
        ],
        ["dataset", "features", "head", "experiment", "backbone"],
    )
    with reported("llmembed-classify"):
        check_command_line("classify", sys.argv[1:])
    return classify_hydra_main()


@hydra.main(version_base=None, config_path="../conf", config_name="classify")
def classify_hydra_main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from llmembed.classify.train import train

    bars_on_a_terminal_only(cfg)
    with reported("llmembed-classify"):
        metrics = train(cfg, Path(HydraConfig.get().runtime.output_dir))
    acc, f1 = metrics["test"]["accuracy"], metrics["test"]["macro_f1"]
    lo, hi = acc["ci"]
    print_and_log(
        f"{metrics['head']} on {' + '.join(metrics['features'])}: test accuracy {acc['mean']:.4f}"
        f" (95% CI {lo:.4f}-{hi:.4f}), macro-F1 {f1['mean']:.4f} ({len(metrics['seeds'])} "
        f"seed(s), {metrics['timings']['total_s']:.1f} s)"
    )
    # What a sweeper maximizes: never the test score.
    return metrics["validation"]["accuracy"]["mean"]


@dataclass
class PredictInput:
    """What llmembed-predict reads: texts, where each is (for messages), and a table's optional id
    and label columns."""

    texts: list[str]
    refs: list[str]  # "line 3" (a table's header is line 1), "row 2" (parquet)
    id_column: str | None = None
    ids: list | None = None  # the id column's values as given, written first in the output
    label_column: str | None = None
    labels: list[str] | None = None  # canonical labels (as at training), for scoring


def _input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--text-column",
        help="column holding the texts (default: the one the model was trained on, else text)",
    )
    parser.add_argument(
        "--id-column",
        help="column of row ids copied to the output (default: id, if the table has one; '' for none)",
    )
    parser.add_argument(
        "--label-column",
        help="column of true labels: accuracy and macro-F1 go to stderr (default: the one the "
        "model was trained on, else label, if the table has one; '' for none)",
    )


TEXT_SUFFIXES = (".txt", ".text")  # one text per line


def check_input(path: Path, text_column, id_column, label_column) -> str:
    """The input file's suffix, once the file and the columns asked of it can be read (checked
    before the model is located, which may mean a download)."""
    from llmembed.data.tables import SUFFIXES

    if not path.is_file():  # missing, a folder, or not a regular file (a FIFO, /dev/zero)
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise UserError(
            f"{path} {what}; give a .txt file (one text per line) or a "
            "CSV/TSV/JSONL/JSON/parquet table"
        )
    suffix = path.suffix.lower()
    if suffix not in (*SUFFIXES, *TEXT_SUFFIXES):  # a .ndjson or .dat read line by line would
        raise UserError(  # embed whole records as texts without a word
            f"{path}: llmembed-predict reads .txt (one text per line) and "
            f"{'/'.join(sorted(SUFFIXES))} tables; rename the file to the suffix of its format"
        )
    if is_lines(suffix) and (text_column or id_column or label_column):
        raise UserError(
            f"{path} is read as plain text (one text per line), which has no columns; "
            "--text-column, --id-column and --label-column need a CSV/TSV/JSONL/JSON/parquet"
        )
    if not is_lines(suffix) and text_column == "":
        raise UserError("--text-column '': the texts' column cannot be turned off; name it")
    return suffix


def is_lines(suffix: str) -> bool:
    return suffix in TEXT_SUFFIXES


def read_texts(
    path: Path,
    text_column: str | None = None,
    *,
    id_column: str | None = None,
    label_column: str | None = None,
    trained: dict | None = None,
) -> PredictInput:
    """Texts from a .txt file (one per line, blank lines skipped) or from a CSV/TSV/JSONL/JSON/
    parquet table's text column, with its id and label columns. A column left as None is taken by
    its default name where the table has it (the text and label columns the model was trained on,
    from `trained`, else text and label); '' turns it off. Texts and labels pass the checks of
    training data (a blank text or a missing label is an error naming the row)."""
    from llmembed.data.tables import MissingKeyError, check_texts, read_rows

    if is_lines(check_input(path, text_column, id_column, label_column)):
        return _read_lines(path)
    trained = trained or {}
    default_text = trained.get("text_column") or "text"
    default_label = trained.get("label_column") or "label"
    optional = {  # column read: the option that turns it off
        c or d: option
        for d, c, option in (
            ("id", id_column, "--id-column"),
            (default_label, label_column, "--label-column"),
        )
        if c != ""
    }
    needed = [text_column or default_text, *optional]
    try:
        table = read_rows(path, needed)
    except MissingKeyError as err:  # a column predict can do without: say how
        if err.column not in optional or err.column == needed[0]:
            raise
        raise UserError(f"{err}; or pass {optional[err.column]} '' to do without it") from None
    rows, refs, columns = table.rows, table.refs, table.columns
    if not rows:
        raise UserError(f"{path} holds no texts")
    if text_column is None and default_text not in columns:
        raise UserError(
            f"{path} has no column {default_text!r}, the text column the model was trained on; "
            f"its columns: {columns}. Use --text-column"
        )
    text_column = text_column or default_text
    _require_column(columns, text_column, path, "--text-column")
    texts = [r[text_column] for r in rows]
    check_texts(texts, refs, path)
    id_column = _optional_column(columns, id_column, "id", path, "--id-column")
    label_column = _optional_column(columns, label_column, default_label, path, "--label-column")
    return PredictInput(
        texts,
        refs,
        id_column,
        [r[id_column] for r in rows] if id_column else None,
        label_column,
        _true_labels([r[label_column] for r in rows], refs, path) if label_column else None,
    )


# The longest line a .txt input may hold: a text of megabytes is read; a file without line breaks
# (or a device) is not one text per line.
MAX_LINE_BYTES = 64 * 2**20


def _read_lines(path: Path) -> PredictInput:
    """One text per line: lines end at `\n` (a `\r` before it is dropped) and nowhere else, so
    a form feed, U+2028 or NEL stays inside its text; blank lines are skipped."""
    from llmembed.data.tables import check_texts

    texts, refs = [], []
    with open(path, "rb") as f:
        for i, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise UserError(
                    f"{path}, line {i}: longer than {MAX_LINE_BYTES // 2**20} MB; a .txt input "
                    "holds one text per line (for long documents use a CSV or JSONL table)"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(
                    f"{path}, line {i}: not UTF-8 (byte {err.start}); re-save the file as UTF-8"
                ) from None
            line = line.removeprefix("\ufeff") if i == 1 else line
            line = line.removesuffix("\n").removesuffix("\r")
            if line.strip():
                texts.append(line)
                refs.append(f"line {i}")
    if not texts:
        raise UserError(f"{path} holds no texts")
    check_texts(texts, refs, path)
    return PredictInput(texts, refs)


def _require_column(columns: list, name: str, path: Path, option: str) -> None:
    if name not in columns:
        raise UserError(f"{path} has no column {name!r}; its columns: {columns}. Use {option}")


def _optional_column(
    columns: list, given: str | None, default: str, path: Path, option: str
) -> str | None:
    """The column to read: the one given (which must exist), none for '', else the default name
    where the table has it."""
    if given == "":
        return None
    if given is None:
        return default if default in columns else None
    _require_column(columns, given, path, option)
    return given


def _true_labels(raw: list, refs: list[str], path: Path) -> list[str]:
    from llmembed.data.tables import DatasetError, normalize_labels

    try:
        return normalize_labels(raw, refs, path)
    except DatasetError as err:
        raise UserError(f"{err}; or pass --label-column '' to predict without scoring") from None


def _score_lines(inp: PredictInput, predicted: list[str], names: list[str]) -> list[str]:
    """Accuracy (95% Wilson interval) and macro-F1 (95% bootstrap interval) against the input's
    labels. Labels the model was never trained on are named and count as errors: the model cannot
    give them, and leaving those rows out would flatter the score."""
    from llmembed.classify.metrics import evaluate
    from llmembed.data.tables import shown

    unknown = sorted(set(inp.labels) - set(names))
    every = list(names) + unknown
    code = {name: i for i, name in enumerate(every)}
    m = evaluate(
        np.array([code[y] for y in inp.labels]), np.array([code[y] for y in predicted]), every
    )
    lines = []
    if unknown:
        where = [r for r, y in zip(inp.refs, inp.labels, strict=True) if y in unknown]
        lines.append(
            f"warning: {len(where)} of {m['n']} texts have labels the model was not trained on "
            f"({unknown}: {shown(where)}); its classes are {names}. They count as errors below"
        )
        if len(unknown) == len(set(inp.labels)):
            lines.append(
                f"warning: no label in column {inp.label_column!r} is one of the model's classes; "
                "is it the right column (--label-column) and the right model?"
            )
    (lo, hi), (flo, fhi) = m["accuracy_ci"], m["macro_f1_ci"]
    lines.append(
        f"accuracy {m['accuracy']:.4f} (95% CI {lo:.4f}-{hi:.4f}), macro-F1 {m['macro_f1']:.4f} "
        f"(95% CI {flo:.4f}-{fhi:.4f}) on {m['n']} texts labelled in column {inp.label_column!r}"
    )
    return lines


def _backbone_paths(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--backbone-path takes NAME=PATH, got {pair!r}")
        out[name] = path
    return out


def predict_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmembed-predict", description="Label new texts with a saved model."
    )
    parser.add_argument(
        "model",
        help="a model folder written by llmembed-classify, or a Hugging Face hub repo id "
        "(owner/name[@revision]) holding one",
    )
    parser.add_argument(
        "texts", type=Path, help=".txt (one text per line) or .csv/.tsv/.jsonl/.json/.parquet"
    )
    _input_options(parser)
    parser.add_argument("--output", type=Path, help="write a CSV here instead of printing it")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--backbone-path",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="where a backbone of the model is on this machine (repeatable)",
    )
    parser.add_argument(
        "--allow-other-weights",
        action="store_true",
        help="use backbone weights that differ from those the model was trained on",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code shipped with a backbone (never taken from model.json)",
    )
    args = parser.parse_args(argv)
    with reported("llmembed-predict"):
        return _predict(args)


def check_output(path: Path, texts: Path) -> None:
    """`--output` refused before any work where the table could not be written."""
    target = Path(os.path.realpath(path))  # a link's target is what gets written
    if target == texts.resolve():
        raise UserError(f"--output {path} is the input file; write somewhere else")
    if target.is_dir() or not path.name:
        raise UserError(
            f"--output {path} is a folder; give a file name, e.g. {path / 'predictions.csv'}"
        )
    if target.exists() and not target.is_file():  # /dev/null, a FIFO: written as it is
        if not os.access(target, os.W_OK):
            raise UserError(f"--output {path} is not writable; write elsewhere")
        return
    folder = target.parent
    if not folder.is_dir():
        raise UserError(f"--output {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--output {path}: the folder {folder} is not writable; write elsewhere")


def write_output(path: Path, write) -> None:
    """`write(file)` into `path`: a regular file (or a link's target) whole or not at all, through
    a temporary file beside it (a full disk or a kill leaves no truncated table, and an existing
    file keeps its mode); a device or FIFO (/dev/null, /dev/stdout) as it is."""
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        with open(target, "w", newline="") as out:
            write(out)
        return
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") as out:
            write(out)
        if target.exists():
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _predict(args: argparse.Namespace) -> int:
    from llmembed.classify.hub import locate_model
    from llmembed.classify.predict import default_memo, predict_texts
    from llmembed.classify.saved import load_trained
    from llmembed.extract.plan import check_device

    check_device(args.device, "--device")
    default_memo()  # an empty LLMEMBED_CACHE is refused before the model is looked for
    check_input(args.texts, args.text_column, args.id_column, args.label_column)
    if args.output is not None:
        check_output(args.output, args.texts)
    folder = locate_model(args.model)
    _, meta = load_trained(folder)
    inp = read_texts(
        args.texts,
        args.text_column,
        id_column=args.id_column,
        label_column=args.label_column,
        trained=meta.get("data"),
    )
    labels, proba, names = predict_texts(
        folder,
        inp.texts,
        device=args.device,
        backbone_paths=_backbone_paths(args.backbone_path),
        trust_remote_code=args.trust_remote_code,
        allow_other_weights=args.allow_other_weights,
    )
    if args.output:
        write_output(args.output, lambda out: _write_predictions(out, inp, labels, proba, names))
        print(f"{len(inp.texts)} predictions written to {args.output}", file=sys.stderr)
    else:
        _write_predictions(sys.stdout, inp, labels, proba, names)
    if inp.labels is not None:
        for line in _score_lines(inp, labels, names):
            print(line, file=sys.stderr)
    return 0


def _write_predictions(
    out, inp: PredictInput, labels: list[str], proba: np.ndarray, names: list[str]
) -> None:
    """One CSV row per text, with the columns of llmembed-classify's predictions.csv: [row_id,]
    [label (the true one),] predicted, p_<class>..., text."""
    w = csv.writer(out)
    ids = ["row_id"] if inp.ids is not None else []
    truth = ["label"] if inp.labels is not None else []
    w.writerow([*ids, *truth, "predicted", *[f"p_{n}" for n in names], "text"])
    for i, (text, label, p) in enumerate(zip(inp.texts, labels, proba, strict=True)):
        row_id = [inp.ids[i]] if inp.ids is not None else []
        true = [inp.labels[i]] if inp.labels is not None else []
        w.writerow([*row_id, *true, label, *[f"{x:.6f}" for x in p], text])


def push_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmembed-push",
        description="Upload a saved model folder to a Hugging Face hub model repo (created if "
        "missing); `llmembed-predict OWNER/NAME texts.txt` then runs it anywhere.",
    )
    parser.add_argument("model", type=Path, help="a model folder written by llmembed-classify")
    parser.add_argument("repo_id", help="the hub repo to upload to: owner/name")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="a branch to commit to (created if missing)")
    parser.add_argument("--message", help="the commit message")
    args = parser.parse_args(argv)
    from llmembed.classify.hub import push_model

    with reported("llmembed-push"):
        url = push_model(
            args.model,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            message=args.message,
        )
        print(f"{args.model} pushed to {args.repo_id}: {url}")
    return 0


def report_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmembed-report", description="Tables and plots of classify runs."
    )
    parser.add_argument(
        "runs", type=Path, nargs="+", help="multirun (or run) folders holding metrics.json files"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where to write results.* and plots (default: the folder, when there is one; "
        "needed for a report over several folders)",
    )
    args = parser.parse_args(argv)
    from llmembed.classify.report import write_report

    with reported("llmembed-report"):
        if args.out is None and len(args.runs) > 1:
            raise UserError(
                f"{len(args.runs)} folders make one combined report: say where it goes with "
                "--out DIR (the folders' own results stay as they are)"
            )
        print(write_report(args.runs, args.out or args.runs[0]))
    return 0


if __name__ == "__main__":
    classify_main()
