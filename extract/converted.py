"""GGUF backbones de-quantized once and kept in the cache root, private to the user who converted them.

De-quantizing a GGUF file takes 11-20 s for SmolLM2; the copy saved once as safetensors reloads in
about 1 s. That copy decides a job's numbers, so in a shared root it must be the GGUF's and nobody
else's:
- it lives in `<root>/converted/<uid>/`, a folder only its user can write, reached from the root
  without following any link and held open while it is read, so that nobody can swap it meanwhile;
- the sha256 of each of its files is recorded at conversion and checked before every load (the
  user's hash memo spares reading unchanged files again);
- a copy that fails a check is converted again; where no private folder can be had (a link planted
  at `converted`, a folder of another user at `converted/<uid>`, a read-only root) the GGUF file is
  de-quantized in memory, as without a cache.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmembed.cache.keys import file_sha256, fsync_dir, memo_path, open_folder
from llmembed.errors import UserError

log = logging.getLogger(__name__)

# Bump when the copies' layout changes, so that old copies are not read. 2: per-user private
# folders, every file's sha256 recorded.
VERSION = 2
RECORD = "converted.json"


class NotPrivateError(UserError, PermissionError):
    """A folder that should be the user's own is not: a copy there could be anyone's."""


@contextmanager
def kept_copy(
    cfg, info, root: Path | None, *, group_writable: bool = False, make: bool = True
) -> Iterator[Path | None]:
    """The verified converted copy of a GGUF backbone, as a folder to load from inside the `with`;
    made first when missing or failing its checks (with `make`). None when the backbone is not a
    GGUF file, `root` is None, or no copy can be kept: then de-quantize in memory."""
    if info.source.kind != "gguf" or root is None:
        yield None
        return
    root = Path(root).expanduser()
    try:
        folder = _private_folder(root, group_writable)
    except OSError as err:  # a link, another user's folder, a read-only root
        log.warning(
            "no converted copy of %s is kept in %s (%s); de-quantizing it in memory",
            info.source.gguf_file,
            root / "converted",
            err,
        )
        yield None
        return
    # The copy's name in the private folder; this path names it in messages.
    shown = (
        root / "converted" / str(os.geteuid()) / f"gguf-{info.identity['gguf_sha256']}-v{VERSION}"
    )
    try:
        copy = _checked(folder, shown, memo_path(root))
        if copy is None and make:
            try:
                copy = _convert(cfg, info, folder, shown, memo_path(root))
            except OSError as err:  # a full disk: de-quantize in memory instead
                log.warning("cannot keep a converted copy of %s (%s)", info.source.gguf_file, err)
        yield copy
    finally:
        os.close(folder)


def stale_copies(root: Path) -> list[Path]:
    """Converted copies that this version never reads, for `llmembed-cache gc`: the first layout's
    `converted/gguf-*` (one folder for all users) and this user's copies of another version. Links
    are never listed; a copy's owner is whoever may remove it (gc keeps what it may not)."""
    base = Path(root) / "converted"
    if base.is_symlink() or not base.is_dir():
        return []
    stale = list(base.glob("gguf-*"))
    mine = base / str(os.geteuid())
    if not mine.is_symlink() and mine.is_dir() and mine.stat().st_uid == os.geteuid():
        stale += [p for p in mine.glob("gguf-*") if not p.name.endswith(f"-v{VERSION}")]
    return sorted(p for p in stale if p.is_dir() and not p.is_symlink())


def _at(fd: int) -> Path:
    """A path to the folder open as `fd` that stays on that very folder if it is renamed or
    replaced meanwhile (Linux's /proc/self/fd)."""
    path = Path(f"/proc/self/fd/{fd}")
    if not os.path.samestat(os.stat(path), os.fstat(fd)):  # no /proc: not Linux
        raise NotPrivateError(f"cannot pin the folder open as descriptor {fd} on this system")
    return path


def _private_folder(root: Path, group_writable: bool) -> int:
    """A descriptor of `<root>/converted/<uid>/`, made when missing, owned by this user and
    writable by nobody else. `converted/` itself is shared (group-writable and setgid with
    `group_writable`, so that every member can make their own folder in it)."""
    root.mkdir(parents=True, exist_ok=True)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        shared = open_folder(root_fd, "converted", shown=root / "converted", mode=0o777)
    finally:
        os.close(root_fd)
    uid = os.geteuid()
    shown = root / "converted" / str(uid)
    try:
        st = os.fstat(shared)
        if group_writable and st.st_uid == uid:
            os.fchmod(shared, stat.S_IMODE(st.st_mode) | stat.S_IRWXG | stat.S_ISGID)
        mine = open_folder(shared, str(uid), shown=shown, mode=0o755)
    finally:
        os.close(shared)
    st = os.fstat(mine)
    if st.st_uid != uid:
        os.close(mine)
        raise NotPrivateError(
            f"{shown} belongs to uid {st.st_uid}, not to you (uid {uid}): a converted copy there "
            "could be anyone's; remove that folder"
        )
    if st.st_mode & 0o022:  # ours: made writable by others somehow; take that back
        os.fchmod(mine, 0o755)
    return mine


def _checked(folder: int, shown: Path, memo: Path) -> Path | None:
    """The copy `shown.name` in the private `folder` if it passes every check; a copy that fails
    one is removed (it is converted again)."""
    name = shown.name
    try:
        copy = open_folder(folder, name, shown=shown)
    except FileNotFoundError:
        return None
    except OSError as err:
        problem = str(err)
    else:
        try:
            problem = _problem(copy, memo)
        finally:
            os.close(copy)
    if problem is None:
        return _at(folder) / name
    log.warning("the converted copy %s %s: converting it again", shown, problem)
    _remove(folder, name)
    return None


def _problem(copy: int, memo: Path) -> str | None:
    """What is wrong with the copy open as `copy`, or None: it must be this user's alone, hold
    exactly the files its record names, each with its recorded sha256."""
    st = os.fstat(copy)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return "is not private to you"
    at = _at(copy)
    try:
        record = json.loads((at / RECORD).read_text())
        files = record["files"]
        if not isinstance(files, dict) or not files:
            raise TypeError("no files")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"has no readable record of its files' hashes ({type(err).__name__})"
    present = {p.name for p in at.iterdir()} - {RECORD}
    if present != set(files):
        return f"holds other files than it recorded: {sorted(present ^ set(files))}"
    for file, digest in sorted(files.items()):
        path = at / file
        if path.is_symlink() or not path.is_file():
            return f"has {file} as something other than a regular file"
        if file_sha256(path, memo=memo) != digest:
            return f"has {file} changed since it was converted"
    return None


def _remove(folder: int, name: str) -> None:
    """Remove `name` from the private `folder` (a link as a link)."""
    path = _at(folder) / name
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _convert(cfg, info, folder: int, shown: Path, memo: Path) -> Path:
    """De-quantize the GGUF backbone into `folder`/`shown.name` (the base model in float32 safetensors,
    which holds every de-quantized value exactly, its tokenizer, and the record of every file's
    sha256) and return that folder.

    Crash-safe: the copy is written into a temporary folder beside it, fsynced and renamed into
    place in one step, the record inside marking it finished. Two processes of the user converting
    at once each write their own temporary folder; the first rename wins, the second writer drops
    its copy and uses the winner's, so a reader never sees a half-written copy."""
    t0 = time.perf_counter()
    name = shown.name
    model, tok = _load_gguf(cfg, info)
    tmp = f".{name}.tmp-{secrets.token_hex(8)}"
    os.mkdir(tmp, 0o700, dir_fd=folder)
    at = _at(folder)
    try:
        model.save_pretrained(at / tmp)
        tok.save_pretrained(at / tmp)
        files = {f.name: file_sha256(f) for f in sorted((at / tmp).iterdir())}
        (at / tmp / RECORD).write_text(
            json.dumps(
                {
                    "gguf_file": info.source.gguf_file,
                    "gguf_sha256": info.identity["gguf_sha256"],
                    "version": VERSION,
                    "seconds": round(time.perf_counter() - t0, 2),
                    "files": files,
                }
            )
        )
        for f in (at / tmp).iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(at / tmp)
        os.chmod(at / tmp, 0o755)
        try:
            os.rename(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)  # fails if already there
        except OSError:
            if _checked(folder, shown, memo) is None:
                raise
            log.info("another process converted %s first: using its copy", info.source.gguf_file)
        else:
            os.fsync(folder)
    finally:
        shutil.rmtree(at / tmp, ignore_errors=True)
    log.info(
        "de-quantized %s once into %s in %.1f s",
        info.source.gguf_file,
        shown,
        time.perf_counter() - t0,
    )
    return at / name


def _load_gguf(cfg, info):
    """The whole base model de-quantized to float32, and its tokenizer, from the GGUF file."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    kw = info.source.load_kwargs(None, cfg.get("trust_remote_code", False))
    model = AutoModel.from_pretrained(info.source.location, dtype=torch.float32, **kw)
    tok = AutoTokenizer.from_pretrained(info.source.location, **kw)
    # A GGUF-loaded model refuses to save while it carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok
