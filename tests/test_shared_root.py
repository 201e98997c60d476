"""A cache root shared by several users, each a real uid in a subprocess running the command lines:
members of the root's group append to, `gc` and `rm` each other's entries (issue 21.14); a user
without write access reads, and is refused the rest in one line (no traceback); what one user plants
never changes another's numbers (issue 21.2)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from llmembed.cache.root import Cache
from llmembed.extract.pipeline import extract
from tests.conftest import file_overrides, make_tiny_gguf, make_tiny_llama, sentences, write_csv
from tests.test_security import _tamper

BIN = Path(sys.executable).parent  # the tools of this environment
GROUP = 2100  # the shared node's group


def _private_ancestor(path: Path) -> Path | None:
    """The first folder on the way to `path` that other users may not enter, if any."""
    for folder in [*reversed(path.parents)]:
        if not folder.stat().st_mode & stat.S_IXOTH:
            return folder
    return None


def _switching() -> str | None:
    """Why users cannot be switched here (None: they can)."""
    if os.geteuid() != 0:
        return "switching users needs root (CI and the development machine run as root)"
    missing = [t for t in ("setpriv", "unshare") if shutil.which(t) is None]
    return f"{', '.join(missing)} not installed" if missing else None


@dataclass(frozen=True)
class User:
    uid: int
    gid: int  # primary group: not the shared one, as for most accounts
    groups: tuple[int, ...]
    home: Path

    def run(self, tool: str, *args: str, umask: int = 0o022) -> subprocess.CompletedProcess:
        """`tool args...` as this user types it, from their home folder.

        Where the interpreter lives below a folder other users cannot enter (a private pyenv under
        /root), the command runs in a private mount namespace in which that folder is replaced by
        an enterable one holding only the interpreter's tree: the machine itself is untouched."""
        groups = (
            ["--groups", ",".join(map(str, self.groups))] if self.groups else ["--clear-groups"]
        )
        argv = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", *groups]
        argv += [str(BIN / tool), *args]
        python = Path(sys.base_prefix).resolve()
        hidden = _private_ancestor(python)
        if hidden is not None:
            keep = hidden / python.relative_to(hidden).parts[0]
            stage = Path(tempfile.mkdtemp(prefix="llmembed-ns-"))
            script = " && ".join(
                [
                    f"mount --bind {keep} {stage}",
                    f"mount -t tmpfs -o mode=0755 tmpfs {hidden}",
                    f"mkdir {keep}",
                    f"mount --bind {stage} {keep}",
                    "exec " + shlex.join(argv),
                ]
            )
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        env = {
            **os.environ,
            "HOME": str(self.home),
            "PYTHONDONTWRITEBYTECODE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        env.pop("LLMEMBED_CACHE", None)
        try:
            return subprocess.run(
                argv, env=env, cwd=self.home, capture_output=True, text=True, umask=umask,
                timeout=600,
            )  # fmt: skip
        finally:
            if hidden is not None:
                stage.rmdir()


@pytest.fixture
def node():
    """A folder every user may enter, three users (A and B in the shared group, C not), a tiny
    model and data files readable by all."""
    if (why := _switching()) is not None:
        pytest.skip(why)
    ws = Path(tempfile.mkdtemp(prefix="llmembed-users-"))
    ws.chmod(0o755)
    users = {}
    for name, uid, groups in (("A", 2101, (GROUP,)), ("B", 2102, (GROUP,)), ("C", 2103, ())):
        home = ws / f"home-{name}"
        home.mkdir()
        os.chown(home, uid, uid)
        users[name] = User(uid, uid, groups, home)
    probe = users["C"].run("python", "-c", "print('ok')")
    if probe.returncode != 0:
        shutil.rmtree(ws)
        pytest.skip(f"cannot run a command as another user here: {probe.stderr.strip()[-300:]}")
    rows = sentences(60)
    files = {
        "model": make_tiny_llama(ws / "model"),
        "first30": write_csv(ws / "first30.csv", rows[:30]),
        "all60": write_csv(ws / "all60.csv", rows),
    }
    readable(ws / "model")
    yield ws, users, files
    shutil.rmtree(ws)


def readable(folder: Path) -> None:
    """Let every user read what the tests wrote (transformers saves weights as 0600)."""
    for path in [folder, *folder.rglob("*")]:
        every = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
        every |= stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH if path.is_dir() else 0
        path.chmod(path.stat().st_mode | every)


def extract_args(root: Path, csv: Path, model: Path, *extra: str) -> list[str]:
    return file_overrides(root, csv, model, *extra)


def entry_with(root: Path, max_length: int):
    (entry,) = [e for e in Cache(root).entries() if e.spec.max_length == max_length]
    return entry


def one_line_error(r: subprocess.CompletedProcess, prog: str, text: str) -> None:
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{prog}: error: " in r.stderr and text in r.stderr, r.stderr[-2000:]


def test_a_root_shared_by_a_group_works_for_every_member(node):
    """Issue 21.14: the documented set-up (a root of the group, setgid, `cache.group_writable=true`)
    works for members who do not own the root: B appends to A's entry, removes it and gc's another;
    what B adds keeps the group, so A could go on; C, outside the group, is refused in one line."""
    ws, users, files = node
    a, b, c = users["A"], users["B"], users["C"]
    root = ws / "cache"
    root.mkdir()
    os.chown(root, a.uid, GROUP)  # A's folder, the group's: `chgrp llm root; chmod 2775 root`
    root.chmod(0o2775)
    shared = "cache.group_writable=true"
    model = files["model"]
    made = a.run(
        "llmembed-extract",
        "-m",
        *extract_args(root, files["first30"], model, shared, "extract.max_length=50,100"),
    )
    assert made.returncode == 0, made.stderr[-3000:]
    appended = b.run(
        "llmembed-extract",
        *extract_args(root, files["all60"], model, shared, "extract.max_length=50"),
    )
    assert appended.returncode == 0, appended.stderr[-3000:]
    assert "30 new texts (30 already stored)" in appended.stdout
    entry = entry_with(root, 50)
    assert entry.manifest.rows == 60
    for path in [entry.path.parent, *entry.path.parent.rglob("*")]:
        st = path.lstat()
        assert st.st_gid == GROUP and st.st_mode & stat.S_IWGRP, path  # the next member goes on
        if path.is_dir():
            assert st.st_mode & stat.S_ISGID, path
    assert {p.stat().st_uid for p in entry.path.glob("shard-*.h5")} == {a.uid, b.uid}
    refused = c.run("llmembed-cache", "--root", str(root), "rm", entry.key)
    one_line_error(refused, "llmembed-cache", "may not write it")
    removed = b.run("llmembed-cache", "--root", str(root), "rm", entry.key)
    assert removed.returncode == 0 and not entry.path.exists(), removed.stderr[-2000:]
    other = entry_with(root, 100)
    cleaned = b.run("llmembed-cache", "--root", str(root), "gc", "--older-than", "0")
    assert cleaned.returncode == 0 and not other.path.exists(), cleaned.stderr[-2000:]


def test_a_user_without_write_access_reads_and_is_refused_the_rest_in_one_line(node):
    """Issue 21.14 and 21's tracebacks: in a root anyone may write, an entry made without
    `cache.group_writable` is its owner's: another user reads it, and an append (before any
    model loads), `rm` and `gc` of it say so in one line, without a traceback."""
    ws, users, files = node
    a, b = users["A"], users["B"]
    root = ws / "cache"
    root.mkdir()
    root.chmod(0o777)
    model = files["model"]
    made = a.run("llmembed-extract", *extract_args(root, files["first30"], model))
    assert made.returncode == 0, made.stderr[-3000:]
    (entry,) = Cache(root).entries()
    read = b.run("llmembed-extract", *extract_args(root, files["first30"], model))
    assert read.returncode == 0 and "cache hit" in read.stdout, read.stderr[-3000:]
    append = b.run("llmembed-extract", *extract_args(root, files["all60"], model))
    one_line_error(
        append, "llmembed-extract", f"cannot append to the cache entries of {entry.path.parent}"
    )
    assert f"belongs to uid {a.uid}" in append.stderr and "loaded" not in append.stdout
    rm = b.run("llmembed-cache", "--root", str(root), "rm", entry.key)
    one_line_error(rm, "llmembed-cache", "may not write it")
    gc = b.run("llmembed-cache", "--root", str(root), "gc", "--older-than", "0")
    assert gc.returncode == 0 and "Traceback" not in gc.stderr, gc.stderr[-3000:]
    assert f"kept {entry.path}" in gc.stderr and entry.manifest.rows == 30
    listing = b.run("llmembed-cache", "--root", str(root), "ls")
    assert listing.returncode == 0 and entry.key in listing.stdout, listing.stderr[-2000:]
    # An owner whose umask keeps everything private (077, common on clusters): others cannot even
    # see the entry; their job for that key is refused in one line too.
    private = a.run(
        "llmembed-extract",
        *extract_args(root, files["first30"], model, "extract.max_length=100"),
        umask=0o077,
    )
    assert private.returncode == 0, private.stderr[-3000:]
    hidden = entry_with(root, 100)
    blocked = b.run(
        "llmembed-extract", *extract_args(root, files["first30"], model, "extract.max_length=100")
    )
    one_line_error(blocked, "llmembed-extract", f"cache entries of {hidden.path.parent}")
    for command in (["ls"], ["gc", "--older-than", "0"]):
        seen = b.run("llmembed-cache", "--root", str(root), *command)
        assert seen.returncode == 0 and "Traceback" not in seen.stderr, seen.stderr[-3000:]
    assert hidden.complete
    owner = a.run("llmembed-cache", "--root", str(root), "gc", "--older-than", "0")
    assert owner.returncode == 0 and not entry.path.exists(), owner.stderr[-2000:]
    assert not hidden.path.exists()


def test_a_converted_copy_another_user_planted_never_changes_the_numbers(node, tmp_path):
    """Issue 21.2 with real users: A converts the same GGUF, triples a weight matrix, reseals the
    copy's record and plants it in the shared `converted/` folder and as B's own `converted/<uid>`
    before B's first job. B's job never loads it: its numbers are the GGUF's."""
    ws, users, files = node
    a, b = users["A"], users["B"]
    gguf = make_tiny_gguf(ws / "gguf")
    readable(ws / "gguf")
    reference = tmp_path / "clean"  # the GGUF's own numbers, from a root nobody else touched
    with initialize_config_module("llmembed.conf", version_base=None):
        args = extract_args(reference, files["first30"], gguf, "extract.layers=[1,3]")
        ref = extract(compose("extract", overrides=args))
    (record,) = reference.glob("converted/**/converted.json")
    planted = ws / "planted"
    shutil.copytree(record.parent, planted)
    _tamper(planted, reseal=True)
    readable(planted)
    root = ws / "cache"
    root.mkdir()
    root.chmod(0o777)
    sha = json.loads(record.read_text())["gguf_sha256"]
    plant = (
        "import shutil, sys\nfor place in sys.argv[2:]:\n    shutil.copytree(sys.argv[1], place)\n"
    )
    places = [
        root / "converted" / f"gguf-{sha}-v1",
        root / "converted" / str(b.uid) / record.parent.name,
    ]
    (root / "converted").mkdir(mode=0o777)
    (root / "converted").chmod(0o777)
    planting = a.run("python", "-c", plant, str(planted), *map(str, places))
    assert planting.returncode == 0, planting.stderr[-2000:]
    job = b.run(
        "llmembed-extract",
        *extract_args(root, files["first30"], gguf, "extract.layers=[1,3]"),
    )
    assert job.returncode == 0, job.stderr[-3000:]
    (entry,) = Cache(root).entries()
    np.testing.assert_array_equal(entry.read("mean", [1, 3], ref.hashes), ref.read("mean", [1, 3]))
    assert f"belongs to uid {a.uid}, not to you" in job.stdout + job.stderr
