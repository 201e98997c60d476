"""Nothing on disk is unpickled, remote code stays off unless asked, long texts are counted; a
hostile shared root (planted links, linked folders, tampered metadata) can neither make a job write or
remove outside it nor make it read wrong vectors without an error."""

import ast
import hashlib
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import transformers
from omegaconf import OmegaConf

from llmembed.cache.cli import main as cache_main
from llmembed.cache.entry import Entry
from llmembed.cache.format import CacheError, selection_name
from llmembed.cache.keys import (
    EscapeError,
    create_exclusive,
    file_sha256,
    file_stamp,
    inside,
    write_json_atomic,
)
from llmembed.errors import UserError
from llmembed.extract.pipeline import extract
from llmembed.extract.plan import plan_from_config
from tests.conftest import read_rows

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    p
    for d in ("extract", "cache", "fuse", "classify", "llmembed", "scripts")
    for p in (ROOT / d).rglob("*.py")
]


def calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_the_package_never_unpickles():
    assert len(SOURCES) > 15
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(
                    n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names
                ), path
        for node, name in calls(tree):
            assert not name.endswith(
                ("pickle.load", "pickle.loads", "joblib.load", "np.load", "numpy.load")
            ), path
            if name.endswith("torch.load"):
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kw.get("weights_only") == "True", (
                    f"{path}: torch.load without weights_only=True"
                )


def test_remote_code_is_off_unless_asked(make_cfg, monkeypatch):
    for path in (ROOT / "conf" / "backbone").glob("*.yaml"):
        assert OmegaConf.load(path).trust_remote_code is False, path
    seen = []
    real = transformers.AutoModel.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", spy)
    extract(make_cfg())
    extract(make_cfg("backbone.trust_remote_code=true", "extract.max_length=50"))
    assert seen == [False, True]


def test_long_texts_are_truncated_and_counted(make_cfg):
    res = extract(make_cfg("extract.max_length=8"))
    rows = res.entry.manifest.extractions[-1]
    texts = [r["text"] for r in read_rows(make_cfg().dataset.path)]
    longer = sum(1 for t in texts if len(t.split()) + 1 > 8)  # BOS + one token per word
    assert rows["truncated"] == longer > 0


# --- a hostile shared root: planted links, links as folders, `..` ---------------------------------
REPORT = os.environ.get("LLMEMBED_STRESS_REPORT")


def record(**figures):
    """Figures for scripts/stress.py (only when it runs the suite)."""
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps(figures) + "\n")


def _names(cfg):
    """The root, key folder and selection folder an extraction of `cfg` will write."""
    plan = plan_from_config(cfg)
    root = Path(str(cfg.cache.root))
    kdir = root / plan.key
    return root, kdir, kdir / selection_name(plan.layers, plan.poolings)


def _plants(root, kdir, sel):
    """Every name llmembed writes in a root, as it was predictable before (pid-named temporary
    files) and as it is final: a symbolic link planted at any of them must lead nowhere."""
    pid, uid = os.getpid(), os.geteuid()
    at_root = [f"memo-{uid}.json", f".memo-{uid}.json.{pid}.tmp", f".write-probe-{pid}"]
    at_key = [
        "spec.json",
        f".spec.json.{pid}.tmp",
        ".lock.owner.json",
        f"..lock.owner.json.{pid}.tmp",
    ]
    at_sel = []
    for name in ("manifest.json", "pending.json", "usage.json", "shard-00000.json"):
        at_sel += [name, f".{name}.{pid}.tmp"]
    at_sel += ["shard-00000.h5", f".shard-00000.h5.{pid}.tmp", "shard-00001.h5"]
    return [root / n for n in at_root] + [kdir / n for n in at_key] + [sel / n for n in at_sel]


def _outside_state(outside):
    return {p.name: p.read_bytes() for p in sorted(outside.iterdir())}


@pytest.mark.parametrize("target", ["existing", "dangling"])
def test_links_planted_at_every_name_lead_nowhere(make_cfg, tmp_path, target):
    """A symbolic link planted (by another user of a shared root) at any temporary, lock, manifest
    or shard name: extraction, ls, verify, gc and rm never write, create, truncate or remove
    through it. It either works (the link is replaced as a link) or stops with a UserError."""
    cfg = make_cfg("extract.shard_mb=0.01")
    root, kdir, sel = _names(cfg)
    outside = tmp_path / "outside"
    outside.mkdir()
    sel.mkdir(parents=True)
    plants = _plants(root, kdir, sel)
    for i, link in enumerate(plants):
        victim = outside / f"victim-{i}"
        if target == "existing":
            victim.write_bytes(b"precious")
        link.unlink(missing_ok=True)  # the memo that planning the names just wrote
        link.symlink_to(victim)
    before = _outside_state(outside)
    outcomes = []
    for attempt in range(2):
        try:
            res = extract(cfg)
            outcomes.append("ok")
            assert res.read("mean", [0]).shape == (60, 1, 32)
        except UserError as err:
            outcomes.append(type(err).__name__)
            assert str(root) in str(err)
            cache_main(["--root", str(root), "verify", "--repair"])  # the fix the error names
        for args in (["ls"], ["verify"], ["gc"], ["gc", "--dry-run"]):
            cache_main(["--root", str(root), *args])
        assert _outside_state(outside) == before, (attempt, outcomes)
    cache_main(["--root", str(root), "rm", kdir.name])
    assert _outside_state(outside) == before
    assert not any(p.name.endswith(".lock") for p in outside.iterdir())
    assert outcomes[-1] == "ok"  # after the repair the error named, extraction works
    record(escapes=f"links at {target} targets", tried=len(plants), escaped=0)


def test_a_planted_lock_link_is_refused_not_truncated(make_cfg, tmp_path):
    cfg = make_cfg()
    _, kdir, _ = _names(cfg)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    kdir.mkdir(parents=True)
    (kdir / ".lock").symlink_to(victim)
    with pytest.raises(EscapeError, match=r"\.lock is a symbolic link"):
        extract(cfg)
    assert victim.read_bytes() == b"precious"
    record(escapes="lock link", tried=1, escaped=0)


@pytest.mark.parametrize("level", ["key", "selection"])
def test_a_linked_key_or_selection_folder_is_never_written_through(make_cfg, tmp_path, level):
    cfg = make_cfg()
    root, kdir, sel = _names(cfg)
    outside = tmp_path / "outside"
    outside.mkdir()
    if level == "key":
        root.mkdir(parents=True, exist_ok=True)
        kdir.symlink_to(outside, target_is_directory=True)
    else:
        kdir.mkdir(parents=True)
        sel.symlink_to(outside, target_is_directory=True)
    with pytest.raises(EscapeError, match=r"outside the cache root|symbolic link"):
        extract(cfg)
    assert list(outside.iterdir()) == []  # no spec, no lock, no shard, no manifest
    record(escapes=f"linked {level} folder", tried=1, escaped=0)


def test_dot_dot_names_are_not_entries(make_cfg, tmp_path):
    done = extract(make_cfg())
    root = Path(str(make_cfg().cache.root))
    for name in ("..", "../", "../outside", f"{done.entry.key}/../..", ""):
        assert cache_main(["--root", str(root), "rm", name]) == 1
    assert done.entry.complete
    with pytest.raises(EscapeError):
        inside(root, root / "..")
    with pytest.raises(EscapeError):
        inside(root, root / done.entry.key / ".." / ".." / "x")
    record(escapes="dot-dot names", tried=7, escaped=0)


def test_temporary_files_are_created_exclusively_with_random_names(tmp_path):
    target = tmp_path / "manifest.json"
    names = set()
    for _ in range(20):
        fd, tmp = create_exclusive(target)
        os.close(fd)
        names.add(tmp.name)
        assert tmp.parent == tmp_path and tmp.name.startswith(".manifest.json.")
    assert len(names) == 20
    # A link at the final name is replaced as a link, its target untouched.
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target.symlink_to(victim)
    write_json_atomic(target, {"a": 1}, root=tmp_path)
    assert victim.read_text() == "precious" and not target.is_symlink()
    assert json.loads(target.read_text()) == {"a": 1}


# --- GGUF backbones' converted copies: the GGUF's own, never written through a link -------------
def _gguf_cfg(make_cfg, gguf, root, *extra):
    return make_cfg(f"backbone.path={gguf}", f"cache.root={root}", "extract.layers=[1,3]", *extra)


def _reference(make_cfg, tiny_gguf, tmp_path):
    """What the GGUF's own weights give, from a root nobody else touched."""
    return extract(_gguf_cfg(make_cfg, tiny_gguf, tmp_path / "clean")).read("mean", [1, 3])


def test_a_linked_converted_folder_is_never_written_through(make_cfg, tiny_gguf, tmp_path, caplog):
    """Issue 21.1: `<root>/converted` planted as a link out of the root: the GGUF is de-quantized
    in memory, nothing is written where the link points, the numbers are the GGUF's."""
    expected = _reference(make_cfg, tiny_gguf, tmp_path)
    root, outside = tmp_path / "shared", tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    (root / "converted").symlink_to(outside, target_is_directory=True)
    res = extract(_gguf_cfg(make_cfg, tiny_gguf, root))
    assert list(outside.iterdir()) == []
    np.testing.assert_array_equal(res.read("mean", [1, 3]), expected)
    assert f"{root / 'converted'} is a symbolic link" in caplog.text
    record(escapes="linked converted folder", tried=1, escaped=0)


def _tamper(copy: Path, *, reseal: bool) -> None:
    """Triple one weight matrix of a converted copy; with `reseal`, make its record vouch for the
    new file (what a user with write access to the folder can do)."""
    from safetensors.torch import load_file, save_file

    weights = copy / "model.safetensors"
    tensors = load_file(weights)
    tensors["layers.1.mlp.down_proj.weight"] *= 3
    save_file(tensors, weights, metadata={"format": "pt"})
    if reseal:
        rec = json.loads((copy / "converted.json").read_text())
        rec.setdefault("files", {})["model.safetensors"] = file_sha256(weights)
        (copy / "converted.json").write_text(json.dumps(rec))


def test_a_converted_copy_changed_after_conversion_is_converted_again(
    make_cfg, tiny_gguf, tmp_path, caplog
):
    """Issue 21.2: a copy whose weights no longer match what was recorded at conversion is never
    loaded: it is converted again from the GGUF file."""
    root = tmp_path / "shared"
    expected = extract(_gguf_cfg(make_cfg, tiny_gguf, root)).read("mean", [1, 3])
    (weights,) = root.glob("converted/**/model.safetensors")
    _tamper(weights.parent, reseal=False)
    # Another key of the same backbone (a shorter max_length the texts never reach) loads it again.
    again = extract(_gguf_cfg(make_cfg, tiny_gguf, root, "extract.max_length=100"))
    np.testing.assert_array_equal(again.read("mean", [1, 3]), expected)
    assert "model.safetensors changed since it was converted" in caplog.text


def test_a_converted_copy_planted_by_another_user_is_never_loaded(
    make_cfg, tiny_gguf, tmp_path, caplog
):
    """Issue 21.2: another user converts the same GGUF, triples a weight matrix, reseals the record
    and plants the copy where a job looks for one: the shared `converted/` folder, and (as root
    can show) a folder of theirs at the victim's own `converted/<uid>`. Neither is loaded."""
    expected = _reference(make_cfg, tiny_gguf, tmp_path)
    (record_file,) = (tmp_path / "clean").glob("converted/**/converted.json")
    planted = tmp_path / "planted"
    shutil.copytree(record_file.parent, planted)
    _tamper(planted, reseal=True)
    root = tmp_path / "shared"
    sha = json.loads(record_file.read_text())["gguf_sha256"]
    places = [root / "converted" / f"gguf-{sha}-v1"]  # the shared folder, as copies were kept
    if os.geteuid() == 0:
        places.append(root / "converted" / str(os.geteuid()) / record_file.parent.name)
    for place in places:
        shutil.copytree(planted, place)
    if os.geteuid() == 0:
        for path in [root / "converted" / str(os.geteuid()), *places]:
            for p in [path, *path.rglob("*")]:
                os.chown(p, 12345, 12345)
    res = extract(_gguf_cfg(make_cfg, tiny_gguf, root))
    np.testing.assert_array_equal(res.read("mean", [1, 3]), expected)
    if os.geteuid() == 0:
        assert "belongs to uid 12345, not to you" in caplog.text


# --- metadata that does not match its data: detected, never served -------------------------------
def _reseal(entry, index):
    """Make the manifest vouch again for shard `index` (size and sha256) after it was edited, so
    that only the checks this test is about can find the edit."""
    m = json.loads(entry.manifest_path.read_text())
    path = entry.path / f"shard-{index:05d}.h5"
    for s in m["shards"]:
        if s["index"] == index:
            s["bytes"], s["sha256"] = path.stat().st_size, file_sha256(path)
    entry.manifest_path.write_text(json.dumps(m))


TAMPERING = [
    "reversed_layers",
    "shifted_layers",
    "swapped_shard",
    "shard_index_attribute",
    "shard_layers_attribute",
    "edited_spec",
    "truncated_manifest",
    "manifest_not_json_object",
    "manifest_of_another_entry",
    "duplicate_text_hashes",
]


@pytest.mark.parametrize("case", TAMPERING)
def test_tampered_metadata_is_detected_named_and_repaired(make_cfg, tmp_path, case, capsys):
    few = ("extract.shard_mb=0.01", "extract.token_budget=64", "extract.layers=[1,2,3]")
    cfg = make_cfg(*few)
    res = extract(cfg)
    entry, root = res.entry, str(cfg.cache.root)
    good = {layer: res.read("mean", [layer]) for layer in (1, 2, 3)}
    shards = entry.shards()
    assert len(shards) >= 2
    victim = entry.path / shards[1].file
    m = json.loads(entry.manifest_path.read_text())
    blame = entry.manifest_path  # the file the error must name
    if case in ("reversed_layers", "shifted_layers"):
        new = [3, 2, 1] if case == "reversed_layers" else [2, 3, 4]
        m["layers"] = new
        for p in m["poolings"].values():
            p["layers"] = new
        entry.manifest_path.write_text(json.dumps(m))
    elif case == "swapped_shard":  # another entry's shard of the same index and shape
        other = extract(make_cfg(*few, "extract.max_length=9"))
        shutil.copy(other.entry.path / shards[1].file, victim)
        _reseal(entry, shards[1].index)
        blame = victim
    elif case == "shard_index_attribute":
        with h5py.File(victim, "r+") as f:
            f.attrs["index"] = shards[0].index
        _reseal(entry, shards[1].index)
        blame = victim
    elif case == "shard_layers_attribute":
        with h5py.File(victim, "r+") as f:
            own = json.loads(f["emb"]["mean"].attrs["llmembed"])
            f["emb"]["mean"].attrs["llmembed"] = json.dumps({**own, "layers": [3, 2, 1]})
        _reseal(entry, shards[1].index)
        blame = victim
    elif case == "edited_spec":
        spec = entry.path.parent / "spec.json"
        raw = json.loads(spec.read_text())
        raw["max_length"] = 7
        spec.write_text(json.dumps(raw))
        blame = spec
    elif case == "truncated_manifest":
        entry.manifest_path.write_bytes(entry.manifest_path.read_bytes()[:100])
    elif case == "manifest_not_json_object":
        entry.manifest_path.write_text("[1, 2]")
    elif case == "manifest_of_another_entry":
        m["key"] = "ab" * 16
        entry.manifest_path.write_text(json.dumps(m))
    elif case == "duplicate_text_hashes":
        with h5py.File(victim, "r+") as f, h5py.File(entry.path / shards[0].file, "r") as g:
            f["text_sha256"][0] = g["text_sha256"][0]
        _reseal(entry, shards[1].index)
        blame = victim

    # A read never serves the wrong vectors: it fails, naming the file and the fix.
    if (
        case != "duplicate_text_hashes"
    ):  # the hash index is built anew: a duplicate is only ambiguous
        with pytest.raises(CacheError) as err:  # layer 3: reversed or shifted, another column
            Entry(entry.path).read("mean", [3])
        assert str(blame) in str(err.value) or str(entry.path) in str(err.value)
        assert "verify --repair" in str(err.value) or "llmembed-cache rm" in str(err.value)
    # ls names the entry without a traceback; verify finds it and names the file.
    assert cache_main(["--root", root, "ls"]) == 0
    assert cache_main(["--root", root, "verify"]) == 1
    out = capsys.readouterr().out
    assert str(blame) in out, out
    assert cache_main(["--root", root, "verify", "--repair"]) == 0
    assert cache_main(["--root", root, "verify"]) == 0
    again = extract(cfg)
    for layer in (1, 2, 3):
        np.testing.assert_array_equal(again.read("mean", [layer]), good[layer])
    record(tampering=case, detected=True)


def test_one_damaged_manifest_leaves_the_rest_of_the_root_usable(make_cfg, tiny_bert, capsys):
    a = extract(make_cfg())
    b = extract(make_cfg(f"backbone.path={tiny_bert}"))
    a.entry.manifest_path.write_text('{"key": ')  # truncated
    root = str(make_cfg().cache.root)
    assert cache_main(["--root", root, "ls"]) == 0
    out = capsys.readouterr().out
    assert f"damaged: {a.entry.manifest_path} cannot be read" in out and "complete" in out
    again = extract(make_cfg(f"backbone.path={tiny_bert}"))  # another entry: served as before
    assert again.hit and again.entry.path == b.entry.path
    with pytest.raises(CacheError, match=f"{a.entry.manifest_path}.*verify --repair"):
        extract(make_cfg())
    assert cache_main(["--root", root, "verify", "--repair"]) == 0
    assert not a.entry.manifest_path.exists() and b.entry.complete
    assert not extract(make_cfg()).hit  # the entry was made incomplete, then recomputed


DAMAGED_USAGE = [
    {"datasets": ["mr"], "last_used": 20260101},
    {"datasets": "mr", "last_used": "2026-01-01T00:00:00+0000"},
    {"datasets": {"mr": 5}},
    {"last_used": ["yesterday"]},
    [1, 2],
]


@pytest.mark.parametrize(
    "usage", DAMAGED_USAGE, ids=["list", "str", "int-date", "list-date", "array"]
)
def test_a_damaged_usage_record_is_named_and_the_rest_of_the_root_listed(
    make_cfg, tiny_bert, capsys, usage
):
    """Issue 21 (tracebacks): `usage.json` is anyone's to write in a shared root; fields of the
    wrong type crashed `ls` and `gc --older-than` for the whole root."""
    a = extract(make_cfg())
    b = extract(make_cfg(f"backbone.path={tiny_bert}"))
    (a.entry.path / "usage.json").write_text(json.dumps(usage))
    root = str(make_cfg().cache.root)
    capsys.readouterr()
    assert cache_main(["--root", root, "ls"]) == 0
    out = capsys.readouterr().out
    damaged = next(line for line in out.splitlines() if line.startswith(a.entry.key))
    assert "usage.json damaged" in damaged and b.entry.key in out
    assert cache_main(["--root", root, "ls", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert cache_main(["--root", root, "gc", "--older-than", "30"]) == 0  # both used just now
    assert a.entry.complete and b.entry.complete
    assert cache_main(["--root", root, "gc", "--older-than", "0"]) == 0  # the manifest's date
    assert not a.entry.path.exists() and not b.entry.path.exists()


def test_a_damaged_usage_record_does_not_stop_a_job_that_uses_the_entry(make_cfg):
    a = extract(make_cfg())
    (a.entry.path / "usage.json").write_text(json.dumps({"datasets": ["mr"]}))
    assert extract(make_cfg()).hit
    assert a.entry.usage.damage is None and set(a.entry.usage.datasets) == {"data"}  # afresh


def test_a_truncated_spec_is_named_and_repair_removes_its_key(make_cfg, capsys):
    a = extract(make_cfg())
    spec = a.entry.path.parent / "spec.json"
    spec.write_text('{"backbone": ')
    root = str(make_cfg().cache.root)
    assert cache_main(["--root", root, "ls"]) == 0
    assert f"{spec}: cannot be read" in capsys.readouterr().out
    assert cache_main(["--root", root, "gc"]) == 0
    assert spec.exists()  # not mistaken for an old format and removed by gc
    assert cache_main(["--root", root, "verify"]) == 1
    assert cache_main(["--root", root, "verify", "--repair"]) == 0
    assert not a.entry.path.parent.exists()
    assert not extract(make_cfg()).hit


# --- the hash memo -------------------------------------------------------------------------------
def test_weights_rewritten_with_the_same_size_and_mtime_are_hashed_again(tmp_path, monkeypatch):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"aaaa")
    memo = tmp_path / "memo.json"
    first = file_sha256(f, memo=memo)
    st = f.stat()
    f.write_bytes(b"bbbb")  # in place: same inode, same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size
    second = file_sha256(f, memo=memo)
    assert second != first and second == hashlib.sha256(b"bbbb").hexdigest()
    # Replaced by a rename (a new inode), mtime and size copied.
    new = tmp_path / "new.bin"
    new.write_bytes(b"cccc")
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, f)
    assert file_sha256(f, memo=memo) == hashlib.sha256(b"cccc").hexdigest()
    # LLMEMBED_REHASH=1 ignores the memo altogether.
    stamp = file_stamp(f.resolve())
    memo.write_text(json.dumps({stamp: "0" * 64}))
    assert file_sha256(f, memo=memo) == "0" * 64  # what the memo trusts, it answers
    monkeypatch.setenv("LLMEMBED_REHASH", "1")
    assert file_sha256(f, memo=memo) == hashlib.sha256(b"cccc").hexdigest()


def test_a_memo_that_is_a_link_or_another_users_is_not_trusted(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"aaaa")
    fake = tmp_path / "elsewhere.json"
    fake.write_text(json.dumps({file_stamp(f.resolve()): "0" * 64}))
    memo = tmp_path / "memo.json"
    memo.symlink_to(fake)
    assert file_sha256(f, memo=memo) == hashlib.sha256(b"aaaa").hexdigest()
    assert "0" * 64 in fake.read_text()  # the link was replaced, its target left alone
    if os.geteuid() == 0:  # as root, a file of another owner can be made
        memo.unlink()
        memo.write_text(json.dumps({file_stamp(f.resolve()): "0" * 64}))
        os.chown(memo, 12345, 12345)
        assert file_sha256(f, memo=memo) == hashlib.sha256(b"aaaa").hexdigest()
