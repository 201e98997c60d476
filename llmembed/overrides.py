"""The command line's overrides, checked before Hydra runs them.

Hydra accepts `+key=value` for any key and then nothing reads it (`+extract.max_lenght=128` ran
with 512 tokens; `+hed=mlp` trained logistic regression), and reports its own errors in several
lines that advise exactly that `+`. Here every override is checked against the config the command
composes: a key that no config file defines is refused with the closest valid key, with or
without `+`; only the mappings handed on whole (`OPEN`: a head's constructor arguments, a hub data
set's files and splits) take new keys. Hydra's own errors (an unknown data set, backbone, head)
become one line. A sweep (`-m dataset=a,b`) is checked for each option of each swept group.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import re
import shutil
from collections.abc import Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from llmembed.errors import UserError

# Mappings whose keys are passed on as they are, so `+` may add to them: the estimator's
# constructor arguments (head.params -> hydra.utils.instantiate) and datasets.load_dataset's
# data_files and the hub split mapping.
OPEN = ("head.params", "dataset.data_files", "dataset.hub_splits")


class OverrideError(UserError, ValueError):
    """An override names a key no config defines, or Hydra cannot apply it."""


def check_command_line(config_name: str, argv: Sequence[str]) -> None:
    """Check the overrides of a Hydra command line (`argv` without the program) before Hydra
    starts. Command lines Hydra answers itself (--hydra-help, --info, shell completion) and those
    that bring their own config folder (--config-dir, --config-path) are left to Hydra."""
    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(list(argv))
    except SystemExit:  # Hydra says what is wrong with the arguments themselves
        return
    if (
        args.hydra_help
        or args.info
        or args.shell_completion
        or args.config_dir
        or args.config_path
        or args.experimental_rerun
    ):
        return
    modes = [m for m in ("run", "multirun", "cfg", "info", "shell_completion") if getattr(args, m)]
    if len(modes) > 1:
        raise OverrideError(
            f"--{' and --'.join(modes)} cannot be combined; give one of them (`--cfg job` prints "
            "the config of one run)"
        )
    check_overrides(
        args.config_name or config_name,
        args.overrides,
        multirun=args.multirun,
        complete=not args.cfg,  # `--cfg job` may show a config that still lacks a value
    )


def check_overrides(
    config_name: str, overrides: Sequence[str], *, multirun: bool = False, complete: bool = True
) -> None:
    """Refuse overrides that set a key no config defines or that Hydra cannot compose, and (with
    `complete`) a config that leaves a required value (`???`) unset."""
    import yaml
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    import llmembed  # noqa: F401  (registers the resolvers the shipped configs use)

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app or compose: nothing to add
        return
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as err:
        raise OverrideError(one_line(err)) from None
    with initialize_config_module("llmembed.conf", version_base=None):
        loader = GlobalHydra.instance().config_loader()
        search = [o.input_line for o in parsed if o.key_or_group == "hydra.searchpath"]
        try:

            def is_group(name: str) -> bool:
                options = loader.get_group_options(name, config_name=config_name, overrides=search)
                return "/" in name or bool(options)

            groups = [o for o in parsed if "." not in o.key_or_group and is_group(o.key_or_group)]
            values = [o for o in parsed if o not in groups]
            for o in groups:
                if (o.is_add() or o.is_force_add()) and not o.key_or_group.startswith("hydra/"):
                    _refuse_group_append(o, compose(config_name, overrides=search), is_group)
            choices = _group_choices(groups, loader, config_name, search)
            for choice in choices:
                cfg = compose(
                    config_name, overrides=[*search, *choice], return_hydra_config=multirun
                )
                try:
                    for o in values:
                        _check_key(o, cfg)
                    if complete:
                        _check_complete(cfg, values)
                except OverrideError as err:
                    if len(choices) == 1:
                        raise
                    raise OverrideError(
                        f"{err} (in the sweep's job with {' '.join(choice)})"
                    ) from None
                if multirun:
                    _check_launcher(cfg)
            # Everything at once (a sweep at its first value): what Hydra itself will compose.
            compose(config_name, overrides=[_first(o) for o in parsed])
        except UserError:
            raise
        except (HydraException, OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError) as err:
            raise config_error(err) from None


def config_error(err: BaseException) -> UserError:
    """What composing a config failed on, as one message: the user's error Hydra wraps (e.g.
    LLMEMBED_CONFIG_DIR is not a folder), a config file that is not valid UTF-8 YAML (Hydra reads
    the files as it goes), else Hydra's own message on one line."""
    import yaml

    cause = err
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return cause
    if isinstance(err, (yaml.YAMLError, UnicodeDecodeError)):
        from llmembed.clihelp import unreadable_configs

        if found := unreadable_configs():
            return OverrideError(f"{'; '.join(found)}; fix it")
        return OverrideError(
            "a config file this command reads (one of yours in LLMEMBED_CONFIG_DIR?) is not "
            f"valid UTF-8 YAML ({type(err).__name__}: {one_line(err)}); fix it"
        )
    return OverrideError(one_line(err))


def _refuse_group_append(override, cfg: DictConfig, is_group) -> None:
    """`+group=option` either repeats a group the command chooses already or adds one it never
    reads (`llmembed-extract +head=mlp`): both are refused."""
    group = override.key_or_group
    if group in cfg:
        raise OverrideError(
            f"{override.input_line}: {group} is chosen already; write {group}="
            f"{override.input_line.split('=', 1)[1]} (without +)"
        )
    used = [k for k in cfg if k != "hydra" and is_group(k)]
    raise OverrideError(
        f"{override.input_line}: this command reads no {group}{_closest(group, cfg)}; its "
        f"groups are {', '.join(used)}"
    )


def _first(override) -> str:
    """The override with a sweep replaced by its first value."""
    if not override.is_sweep_override():
        return override.input_line
    prefix = override.input_line.split(override.key_or_group, 1)[0]  # "", "+", "++" or "~"
    return f"{prefix}{override.key_or_group}={next(iter(override.sweep_string_iterator()))}"


def _group_choices(groups, loader, config_name: str, search: list[str]) -> list[list[str]]:
    """The group overrides to compose: each swept group at each of its options in turn (the other
    sweeps at their first option), so an option with keys of its own is checked with its keys."""
    fixed = [_first(o) if o.is_sweep_override() else o.input_line for o in groups]
    choices = [fixed]
    for i, o in enumerate(groups):
        if not o.is_sweep_override():
            continue
        prefix = o.input_line.split(o.key_or_group, 1)[0]
        for value in _sweep_values(o, loader, config_name, search)[1:]:
            choices.append([*fixed[:i], f"{prefix}{o.key_or_group}={value}", *fixed[i + 1 :]])
    return choices


def _sweep_values(override, loader, config_name: str, search: list[str]) -> list[str]:
    from hydra.core.override_parser.types import Glob

    value = override.value()
    if isinstance(value, Glob):
        options = loader.get_group_options(
            override.key_or_group, config_name=config_name, overrides=search
        )
        return list(value.filter(options))
    return list(override.sweep_string_iterator())


def _check_key(override, cfg: DictConfig) -> None:
    key, line = override.key_or_group, override.input_line
    if key == "hydra" or key.startswith("hydra."):
        return  # Hydra checks its own settings
    parent = key.rpartition(".")[0]
    open_section = any(parent == p or parent.startswith(p + ".") for p in OPEN)
    if override.is_delete():
        if open_section and _exists(cfg, key):
            return
        raise OverrideError(
            f"{line}: only keys under {', '.join(OPEN)} may be removed; set {key} to another "
            "value instead"
        )
    if _exists(cfg, key):
        return
    if open_section:
        if override.is_add() or override.is_force_add():
            return
        raise OverrideError(
            f"{line}: {parent} has no {key.rpartition('.')[2]!r} yet; add it with +{line}"
        )
    plus = "; a key that nothing reads is refused, with or without +" if "+" in line else ""
    raise OverrideError(
        f"{line}: no setting {key!r}{_closest(key, cfg)}{plus} (`--cfg job` lists every setting)"
    )


def _check_complete(cfg: DictConfig, values) -> None:
    """A required value (`???`, e.g. backbone=local's path) that no override sets."""
    given = {o.key_or_group for o in values}
    unset = sorted(k for k in _unset(cfg) if k not in given)
    if unset:
        examples = {
            "dataset.path": "dataset.path=reviews.csv",
            "backbone.path": "backbone.path=/models/my-model (a folder, a .gguf file or a hub id)",
            "dataset.hub_id": "dataset.hub_id=stanfordnlp/sst2",
        }
        hint = "; ".join(examples.get(k, f"{k}=...") for k in unset)
        raise OverrideError(f"{', '.join(unset)} must be set: {hint}")


def _unset(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Keys whose value is `???`, read without resolving anything."""
    out = []
    for k in cfg:
        if prefix == "" and k == "hydra":
            continue
        node = cfg._get_node(k)
        if isinstance(node, DictConfig):
            out += _unset(node, f"{prefix}{k}.")
        elif node._is_missing():
            out.append(f"{prefix}{k}")
    return out


def _exists(cfg, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if isinstance(node, DictConfig) and part in list(node):  # `in node` is False for ???
            node = node._get_node(part)
        elif isinstance(node, ListConfig) and re.fullmatch(r"-?\d+", part):
            if not -len(node) <= int(part) < len(node):
                return False
            node = node._get_node(int(part))
        else:
            return False
    return True


def _keys(cfg, prefix: str = "") -> list[str]:
    """Every dotted key of the config (Hydra's own section left out)."""
    out = []
    if isinstance(cfg, DictConfig):
        for k in cfg:
            if prefix == "" and k == "hydra":
                continue
            full = f"{prefix}{k}"
            out.append(full)
            node = cfg._get_node(k)
            if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
                out += _keys(node, full + ".")
    return out


def _closest(key: str, cfg) -> str:
    """A close key of the same section, else of the same depth."""
    keys = _keys(cfg)
    parent, _, last = key.rpartition(".")
    section = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
    close = [
        f"{parent}.{c}" if parent else c for c in difflib.get_close_matches(last, section, n=1)
    ]
    if not close:
        depth = [k for k in keys if k.count(".") == key.count(".")]
        close = difflib.get_close_matches(key, depth, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _check_launcher(cfg: DictConfig) -> None:
    """SLURM sweeps submit with sbatch: where there is none, say so before Hydra tries."""
    target = str(OmegaConf.select(cfg, "hydra.launcher._target_", default="") or "")
    if target.endswith("SlurmLauncher") and shutil.which("sbatch") is None:
        raise OverrideError(
            "hydra/launcher=slurm submits every job with SLURM's sbatch, which is not on this "
            "machine's PATH; run the sweep on a SLURM login node, or use hydra/launcher=local "
            "(the same jobs as local processes) or no launcher"
        )


def one_line(err: BaseException) -> str:
    """Hydra's multi-line message as one line, without its search path dump or its advice to add
    a `+` (which would make a misspelled key silently ignored)."""
    text = str(err).split("\nConfig search path:")[0]
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if missing:
        group, name = missing.groups()
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        shown = ", ".join(o for o in options if not o.startswith("_"))
        return f"no {group} {name!r}; choose one of: {shown}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("To append to your config")]
    if not lines and (err.__cause__ or err.__context__) is not None:  # Hydra's empty wrapper
        return one_line(err.__cause__ or err.__context__)
    return "; ".join(lines) or type(err).__name__
