"""`--help` of the Hydra command lines: what can be chosen, read from the YAML files alone.

Runs before Hydra and before any heavy import, so `llmembed-extract --help` answers at once. It lists
each config group the command uses (shipped, and from `$LLMEMBED_CONFIG_DIR`) with the first line of
each file's comment. `--hydra-help` stays Hydra's own.
"""

from __future__ import annotations

import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files
from pathlib import Path

CONFIG_DIR_ENV = "LLMEMBED_CONFIG_DIR"

GROUPS = {
    "dataset": "data sets",
    "backbone": "backbones",
    "features": "feature sets",
    "head": "heads",
    "experiment": "experiments",
}


def user_config_dir() -> Path | None:
    value = os.environ.get(CONFIG_DIR_ENV)
    return Path(value).expanduser() if value else None


def search_path_entry() -> str:
    """What conf/*.yaml put in `hydra.searchpath`: the user's config folder when
    `$LLMEMBED_CONFIG_DIR` names one, else the shipped configs again (a no-op)."""
    folder = user_config_dir()
    if folder is None:
        return "pkg://llmembed.conf"
    if not folder.is_dir():
        from llmembed.errors import UserError

        raise UserError(
            f"{CONFIG_DIR_ENV}={folder} is not a folder; point it at a folder holding "
            "dataset/*.yaml, backbone/*.yaml, features/*.yaml or head/*.yaml, or unset it"
        )
    return f"file://{folder.resolve()}"


def first_comment(path: Path) -> str:
    """The first line of a YAML file's leading comment, without `# `."""
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("# @package"):
                continue
            if line.startswith("#"):
                text = line.lstrip("#").strip()
                return text if len(text) <= 90 else text[:89].rstrip() + "…"
            if line.strip():
                return ""
    except OSError:
        return ""
    except UnicodeDecodeError:  # Hydra cannot read it either: say so where it is listed
        return "(not UTF-8: save it as UTF-8 to use it)"
    return ""


def unreadable_configs() -> list[str]:
    """The files of `$LLMEMBED_CONFIG_DIR` Hydra cannot read, each with why: not UTF-8, or not
    YAML (Hydra's own error names neither the file nor, for bytes, the line)."""
    import yaml

    folder, found = user_config_dir(), []
    for path in sorted(folder.rglob("*.yaml")) if folder is not None and folder.is_dir() else []:
        try:
            yaml.safe_load(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            found.append(f"{path} is not UTF-8 (byte {err.start}): save it as UTF-8")
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
            found.append(f"{path} is not valid YAML{at}: {getattr(err, 'problem', None) or err}")
        except OSError:
            continue
    return found


def group_options(group: str) -> list[tuple[str, str, str]]:
    """(name, first comment line, where) of each option. Hydra searches the shipped configs first,
    so a user's file with a shipped name is never chosen: it is not listed."""
    found: dict[str, tuple[str, str, str]] = {}
    shipped = files("llmembed.conf") / group
    for p in sorted(shipped.iterdir(), key=lambda p: p.name):
        if p.name.endswith(".yaml") and not p.name.startswith("_"):
            found[p.name[:-5]] = (p.name[:-5], first_comment(Path(str(p))), "")
    folder = user_config_dir()
    if folder is not None and (folder / group).is_dir():
        for p in sorted((folder / group).glob("*.yaml")):
            if not p.name.startswith("_"):
                found.setdefault(p.stem, (p.stem, first_comment(p), f"({CONFIG_DIR_ENV})"))
    return sorted(found.values())


def package_version() -> str:
    try:
        return version("llmembed")
    except PackageNotFoundError:
        return "unknown"


def render(prog: str, summary: str, usage: list[str], groups: list[str]) -> str:
    lines = [f"{prog} {package_version()}: {summary}", "", "Usage:"]
    lines += [f"  {u}" for u in usage]
    for group in groups:
        options = group_options(group)
        lines += ["", f"{GROUPS[group]} ({group}=NAME):"]
        width = max((len(n) for n, _, _ in options), default=0)
        lines += [f"  {n:<{width}}  {c} {w}".rstrip() for n, c, w in options]
    lines += [
        "",
        "Options:",
        "  --help                this listing",
        "  --version             llmembed's version",
        "  --cfg job             print the composed config and exit (add --resolve to resolve it)",
        "  -m, --multirun        sweep over comma-separated values (dataset=a,b)",
        "  --hydra-help          Hydra's own help (tab completion: --hydra-help, -sc install=bash)",
        "",
        "Every setting is a key=value override (a key no config defines is refused, with or",
        "without +). Your own dataset/, backbone/, features/ and head/ YAML files:",
        f"{CONFIG_DIR_ENV}=/path/to/folder, or",
        "hydra.searchpath=[file:///path/to/folder].",
    ]
    return "\n".join(lines)


def maybe_answer(prog: str, summary: str, usage: list[str], groups: list[str]) -> None:
    """Print the help or the version and exit, when the command line asks for one."""
    argv = sys.argv[1:]
    if "--version" in argv:
        print(f"{prog} {package_version()}")
        sys.exit(0)
    if "--help" in argv or "-h" in argv:
        print(render(prog, summary, usage, groups))
        sys.exit(0)


def bars_on_a_terminal_only(cfg) -> None:
    """`extract.progress: true` draws progress bars on a terminal only: a log file or a SLURM
    output gets the summary lines, not thousands of bar refreshes."""
    if not sys.stderr.isatty():
        cfg.extract.progress = False


def print_and_log(message: str) -> None:
    """`message` on stdout, plain, and in the run folder's log file (Hydra's file handler), so
    the log of a run says what it did, not only its progress."""
    print(message)
    record = logging.LogRecord("llmembed", logging.INFO, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
