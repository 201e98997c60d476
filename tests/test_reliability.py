"""Crashes, concurrent jobs, damaged files, a full disk, signals and hostile names: the cache either
holds a complete, verified entry, or an incomplete one that the next run finishes, and never a wrong one."""

import errno
import json
import os
import random
import select
import shutil
import signal
import stat
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from llmembed.cache.format import CacheError
from llmembed.cache.lock import key_lock
from llmembed.cache.maintenance import verify_entry
from llmembed.cache.root import Cache
from llmembed.cache.writer import EntryWriter
from llmembed.extract.cli import stop_on_signals
from llmembed.extract.pipeline import extract
from llmembed.extract.plan import plan_from_config
from tests.conftest import file_overrides, sentences, write_csv

POOLINGS = ("mean", "last")  # a decoder with BOS stores no "first"

# A job as a separate process: slowed down (5 ms a batch) so that it can be killed mid-work.
JOB = """
import hashlib, logging, sys, time
logging.basicConfig(level=logging.INFO)
import numpy as np
from llmembed.extract.embedder import Extractor
real = Extractor.forward
def slow(self, input_ids, mask):
    time.sleep(0.005)
    return real(self, input_ids, mask)
Extractor.forward = slow
if sys.argv[1] == "cli":
    sys.argv = ["llmembed-extract", *sys.argv[2:]]
    print("READY", flush=True)
    from llmembed.extract.cli import main
    main()
else:
    from hydra import compose, initialize_config_module
    import llmembed.extract.pipeline as p
    with initialize_config_module("llmembed.conf", version_base=None):
        cfg = compose("extract", overrides=sys.argv[2:])
    print("READY", flush=True)
    sys.stdin.readline()  # wait for "go", so that several jobs start together
    res = p.extract(cfg)
    digest = hashlib.sha256(b"".join(res.read(q, res.entry.manifest.layers).tobytes()
                                     for q in ("mean", "last"))).hexdigest()
    print("HIT" if res.hit else "RAN", res.stats.texts, res.entry.path, digest, flush=True)
"""


def job_args(root, csv_path, model, *extra):
    return file_overrides(
        root, csv_path, model, "extract.token_budget=1", "extract.shard_mb=0.002", *extra
    )


def launch(mode, args, **kw):
    return subprocess.Popen(
        [sys.executable, "-c", JOB, mode, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A runner started in the background inherits SIGINT ignored (a shell convention); give the
        # job the default disposition, as in an interactive terminal, so that Ctrl-C reaches it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kw,
    )


def start(mode, args, n=1, **kw):
    """Start n jobs, wait until all have imported everything, then let them go at once."""
    procs = [launch(mode, args, **kw) for _ in range(n)]
    for p in procs:
        assert p.stdout.readline().strip() == "READY"
    for p in procs:
        if mode == "api":
            p.stdin.write("go\n")
            p.stdin.flush()
    return procs if n > 1 else procs[0]


def arrays(res):
    """Every pooling and layer of a request's texts, in request order."""
    return {q: res.read(q, res.entry.manifest.layers) for q in POOLINGS}


def digest(res) -> str:
    import hashlib

    return hashlib.sha256(b"".join(a.tobytes() for a in arrays(res).values())).hexdigest()


def assert_cache_sound(root):
    """Every entry is complete and verified (plus, during an append, finished new shards), or
    incomplete and resumable (never half-valid)."""
    for entry in Cache(root).entries():
        if entry.complete:
            assert verify_entry(entry) == [], entry.path
        if (entry.path / "pending.h5").is_file():  # a readable plan of this entry
            assert EntryWriter(entry, key=entry.key).pending()
        for side in entry.path.glob("shard-*.json"):  # every sidecar vouches for a whole file
            info = json.loads(side.read_text())
            assert (entry.path / f"shard-{info['index']:05d}.h5").stat().st_size == info["bytes"]


@pytest.fixture
def big_csv(tmp_path):
    return write_csv(tmp_path / "big.csv", sentences(160, seed=3))


# scripts/stress.py raises these; the suite's defaults keep it quick.
KILLS = int(os.environ.get("LLMEMBED_STRESS_KILLS", "10"))
JOBS = int(os.environ.get("LLMEMBED_STRESS_JOBS", "4"))
SEED = int(os.environ.get("LLMEMBED_STRESS_SEED", "0"))
REPORT = os.environ.get("LLMEMBED_STRESS_REPORT")


def record(**figures):
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps(figures) + "\n")


def test_kill_9_at_many_moments_then_resume_is_bit_identical(tmp_path, tiny_llama, big_csv):
    reference = extract(_cfg(tmp_path / "ref", big_csv, tiny_llama))
    expected = arrays(reference)
    assert len(reference.entry.shards()) >= 10
    root = tmp_path / "killed"
    rng = random.Random(SEED)
    states = []
    total = len(reference.entry.shards())
    for i in range(KILLS):
        p = start("api", job_args(root, big_csv, tiny_llama))
        # Kill moments follow the job's own progress, not the clock, so that they land mid-work on
        # a machine of any speed: every fourth kill comes early (before or while the plan is
        # written), the others after a random number of new whole shards plus part of a batch.
        if i % 4 == 0:
            time.sleep(rng.uniform(0.0, 0.2))
        else:
            done = len(list(root.glob("*/*/shard-*.json")))
            wait_for_shards(p, root, done + rng.randint(1, max(1, (total - done) // 2)))
            time.sleep(rng.uniform(0.0, 0.01))
        p.kill()
        p.wait()
        assert_cache_sound(root)
        entries = Cache(root).entries()
        states.append(
            "absent" if not entries else "complete" if entries[0].complete else "incomplete"
        )
        if states[-1] == "complete":
            shutil.rmtree(entries[0].path)  # start over, so that later kills land mid-work again
    resumed = extract(_cfg(root, big_csv, tiny_llama))
    assert states.count("incomplete") >= KILLS // 3, states  # most kills landed mid-work
    for q in POOLINGS:
        np.testing.assert_array_equal(arrays(resumed)[q], expected[q])
    assert not list(resumed.entry.path.glob(".*.tmp"))
    record(
        kills=KILLS,
        **{s: states.count(s) for s in ("absent", "incomplete", "complete")},
        resumed_rows=resumed.stats.texts,
        bit_identical=True,
    )


def wait_for_shards(proc, root, n, timeout=120):
    """Return once a job has finished n shards under root (or has exited)."""
    deadline = time.monotonic() + timeout
    while len(list(root.glob("*/*/shard-*.json"))) < n and proc.poll() is None:
        assert time.monotonic() < deadline, f"the job finished fewer than {n} shards in {timeout} s"
        time.sleep(0.002)


def _cfg(root, csv_path, model, *extra):
    from hydra import compose, initialize_config_module

    with initialize_config_module("llmembed.conf", version_base=None):
        return compose("extract", overrides=job_args(root, csv_path, model, *extra))


def test_many_jobs_on_one_key_one_computes_all_read_the_same(tmp_path, tiny_llama, big_csv):
    args = job_args(tmp_path / "c", big_csv, tiny_llama)
    procs = start("api", args, n=JOBS)
    outs = [p.communicate(timeout=300) for p in procs]
    lines = [o[0].split() for o in outs]
    assert sorted(line[0] for line in lines) == ["HIT"] * (JOBS - 1) + ["RAN"]
    assert sum(int(line[1]) for line in lines) == 160  # the rows were computed once in all
    assert len({line[2] for line in lines}) == 1 and len({line[3] for line in lines}) == 1
    readers = [o[1] for o, line in zip(outs, lines, strict=True) if line[0] == "HIT"]
    assert all("waiting for cache key" in err and "held by pid" in err for err in readers)
    record(concurrent_jobs=JOBS, model_runs=1, identical_arrays=True)


def test_kill_9_during_an_append_keeps_the_entry_readable_and_resumes_bit_identical(
    tmp_path, tiny_llama, big_csv
):
    first = write_csv(tmp_path / "first.csv", sentences(160, seed=3)[:80])
    root = tmp_path / "c"
    before = arrays(extract(_cfg(root, first, tiny_llama)))
    reference = extract(_cfg(tmp_path / "ref", big_csv, tiny_llama))
    p = start("api", job_args(root, big_csv, tiny_llama))
    wait_for_shards(p, root, len(list(root.glob("*/*/shard-*.json"))) + 2)
    p.kill()
    p.wait()
    assert_cache_sound(root)
    (entry,) = Cache(root).entries()
    assert entry.complete and (entry.path / "pending.h5").is_file()  # killed mid-append
    served = extract(_cfg(root, first, tiny_llama), allow_extract=False)  # no data lost
    for q in POOLINGS:
        np.testing.assert_array_equal(arrays(served)[q], before[q])
    resumed = extract(_cfg(root, big_csv, tiny_llama))
    assert 0 < resumed.stats.texts < 80  # the finished new shards were kept
    for q in POOLINGS:
        np.testing.assert_array_equal(arrays(resumed)[q], arrays(reference)[q])
    assert verify_entry(resumed.entry) == [] and resumed.entry.manifest.rows == 160


def test_two_jobs_appending_different_texts_at_once(tmp_path, tiny_llama):
    rows = sentences(120, seed=5)
    base = write_csv(tmp_path / "base.csv", rows[:40])
    a = write_csv(tmp_path / "a.csv", rows[:40] + rows[40:80])
    b = write_csv(tmp_path / "b.csv", rows[:40] + rows[80:])
    root = tmp_path / "c"
    extract(_cfg(root, base, tiny_llama))
    procs = [launch("api", job_args(root, path, tiny_llama)) for path in (a, b)]
    for p in procs:
        assert p.stdout.readline().strip() == "READY"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    lines = [p.communicate(timeout=300)[0].split() for p in procs]
    # One writer at a time; the second then computes only what is still missing: its own 40.
    assert [(line[0], line[1]) for line in lines] == [("RAN", "40"), ("RAN", "40")]
    assert lines[0][2] == lines[1][2]  # one entry
    for path, line in zip((a, b), lines, strict=True):
        assert line[3] == digest(extract(_cfg(tmp_path / f"ref-{path.stem}", path, tiny_llama)))
    (entry,) = Cache(root).entries()
    assert entry.manifest.rows == 120 and verify_entry(entry) == []


def test_a_reader_during_an_append_reads_on(tmp_path, tiny_llama, big_csv):
    first = write_csv(tmp_path / "first.csv", sentences(160, seed=3)[:80])
    root = tmp_path / "c"
    before = arrays(extract(_cfg(root, first, tiny_llama)))
    p = start("api", job_args(root, big_csv, tiny_llama))
    reads = during = 0
    while p.poll() is None:
        pending = list(root.glob("*/*/pending.h5"))
        got = extract(_cfg(root, first, tiny_llama), allow_extract=False)  # never waits
        for q in POOLINGS:
            np.testing.assert_array_equal(arrays(got)[q], before[q])
        reads += 1
        during += bool(pending)
    out, err = p.communicate()
    assert p.returncode == 0 and out.startswith("RAN 80"), err[-2000:]
    assert during >= 1, reads


def test_jobs_on_different_keys_do_not_wait_for_each_other(tmp_path, tiny_llama, big_csv):
    a = launch("api", job_args(tmp_path / "c", big_csv, tiny_llama, "extract.max_length=30"))
    b = launch("api", job_args(tmp_path / "c", big_csv, tiny_llama, "extract.max_length=31"))
    for p in (a, b):
        assert p.stdout.readline().strip() == "READY"
    for p in (a, b):
        p.stdin.write("go\n")
        p.stdin.flush()
    (out_a, err_a), (out_b, err_b) = a.communicate(timeout=300), b.communicate(timeout=300)
    assert out_a.startswith("RAN 160") and out_b.startswith("RAN 160")
    assert "waiting for cache key" not in err_a + err_b


def test_lock_of_a_killed_process_does_not_block(tmp_path, tiny_llama, data_csv):
    first = extract(_cfg(tmp_path / "c", data_csv, tiny_llama))
    shutil.rmtree(first.entry.path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from llmembed.cache.root import Cache\n"
            "with Cache(sys.argv[1]).lock(sys.argv[2]):\n    print('LOCKED', flush=True); input()",
            str(tmp_path / "c"),
            first.entry.key,
        ],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "LOCKED"
    holder.kill()
    holder.wait()
    t = time.perf_counter()
    again = extract(_cfg(tmp_path / "c", data_csv, tiny_llama))
    assert not again.hit and time.perf_counter() - t < 30


@pytest.mark.parametrize("damage", ["truncated", "flipped", "missing", "manifest_shape"])
def test_damage_is_found_by_verify_and_reads_and_repaired_shard_by_shard(
    tmp_path, tiny_llama, data_csv, damage
):
    from llmembed.cache.cli import main as cache_main

    cfg = _cfg(tmp_path / "c", data_csv, tiny_llama)
    res = extract(cfg)
    shards = res.entry.shards()
    good = arrays(res)
    victim = res.entry.path / shards[1].file
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[: shards[1].bytes // 2])
    elif damage == "flipped":  # raw bytes inside the stored numbers, size unchanged
        with h5py.File(victim, "r") as f:
            offset = f["emb"]["mean"].id.get_chunk_info(0).byte_offset
        data = bytearray(victim.read_bytes())
        data[offset + 10] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "missing":
        victim.unlink()
    else:
        m = json.loads(res.entry.manifest_path.read_text())
        m["hidden_size"] = 48
        res.entry.manifest_path.write_text(json.dumps(m))

    found = verify_entry(res.entry)
    every = {s.index for s in shards}
    assert {d.shard for d in found} == (every if damage == "manifest_shape" else {shards[1].index})
    problems = [str(d) for d in found]
    assert problems and all(str(res.entry.path) in p for p in problems)
    blame = res.entry.manifest_path if damage == "manifest_shape" else victim
    assert all(str(blame) in p for p in problems)
    with pytest.raises(CacheError, match="verify --repair"):
        arrays(res)
    assert cache_main(["--root", str(tmp_path / "c"), "verify", "--repair"]) == 0
    again = extract(cfg)
    # An edited manifest is rebuilt from the intact shards: nothing to recompute.
    recomputed = 0 if damage == "manifest_shape" else shards[1].rows
    assert again.hit == (recomputed == 0) and again.stats.texts == recomputed
    for q in POOLINGS:
        np.testing.assert_array_equal(arrays(again)[q], good[q])
    record(damage=damage, found=True, recomputed_rows=again.stats.texts)


def test_disk_full_during_a_write_loses_nothing_and_resumes(
    tmp_path, tiny_llama, data_csv, monkeypatch
):
    cfg = _cfg(tmp_path / "c", data_csv, tiny_llama)
    real = h5py.Group.create_dataset
    calls = {"emb": 0}

    def full_disk(self, name, *args, **kwargs):
        if self.name == "/emb":
            calls["emb"] += 1
            if calls["emb"] == 4:  # the first embedding dataset of the second shard
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", full_disk)
    with pytest.raises(
        CacheError, match=r"no space left on the device .* the 1 finished shards are kept"
    ):
        extract(cfg)
    entry = Cache(tmp_path / "c").entries()[0]
    assert not entry.complete and not list(entry.path.glob(".*.tmp"))
    assert sorted(p.name for p in entry.path.glob("shard-*.h5")) == ["shard-00000.h5"]
    monkeypatch.setattr(h5py.Group, "create_dataset", real)
    resumed = extract(cfg)
    first = json.loads((entry.path / "shard-00000.json").read_text())
    assert resumed.stats.texts == 60 - first["rows"]
    assert verify_entry(resumed.entry) == []
    record(disk_full="ENOSPC injected at the HDF5 write", finished_shards_kept=1)


def test_a_slow_writer_does_not_stop_the_forward_passes(
    tmp_path, tiny_llama, data_csv, monkeypatch
):
    """Storage off the critical path: while the first shard is written (slowly), the model goes on
    with the next batches, which can only happen when writes run beside the computation (a write on
    the computing thread would wait out its timeout). At most one write is in flight."""
    import threading

    from llmembed.extract.embedder import Extractor

    real_write, real_forward = EntryWriter.write_shard, Extractor.forward
    calls, seen = [0], {"writers": set(), "overlapped": None}
    in_flight, most = [0], [0]
    lock = threading.Lock()

    def forward(self, *args, **kwargs):
        calls[0] += 1
        return real_forward(self, *args, **kwargs)

    def write(self, index, **kwargs):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        seen["writers"].add(threading.current_thread().name)
        if index == 0:
            before, deadline = calls[0], time.monotonic() + 20
            while calls[0] < before + 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            seen["overlapped"] = calls[0] >= before + 2
        try:
            return real_write(self, index, **kwargs)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(Extractor, "forward", forward)
    monkeypatch.setattr(EntryWriter, "write_shard", write)
    res = extract(_cfg(tmp_path / "c", data_csv, tiny_llama))
    assert len(res.entry.shards()) >= 3 and seen["overlapped"] is True
    assert most[0] == 1 and all(name.startswith("llmembed-write") for name in seen["writers"])
    assert res.entry.complete and verify_entry(res.entry) == []


def test_a_second_interrupt_while_a_shard_is_written_still_keeps_it_whole(tiny_llama):
    """Stopping waits for the shard being written; Ctrl-C pressed again meanwhile does not break
    out of that wait (the stop then ends with its resume message, not a traceback)."""
    import threading

    from llmembed.extract.stream import Stream, _Buffer
    from tests.test_embedder import extractor

    written = []
    stream = Stream(extractor(tiny_llama), torch.float16, lambda shard, arrays: None)
    stream._ring = [_Buffer()]
    stream._ring[0].writing = stream._pool.submit(
        lambda: (time.sleep(1.0), written.append("shard"))
    )
    main = threading.get_ident()

    def press_ctrl_c_twice():
        for _ in range(2):
            time.sleep(0.2)
            signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=press_ctrl_c_twice).start()
    stream.close()
    assert written == ["shard"]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_stop_cleanly_with_a_resume_message(
    tmp_path, tiny_llama, big_csv, sig, code
):
    root = tmp_path / "c"
    p = start("cli", job_args(root, big_csv, tiny_llama), cwd=tmp_path)
    deadline = time.time() + 60
    while not list(root.glob("*/*/shard-00000.json")):  # in the middle of the shards
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.02)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err[-2000:]
    assert f"interrupted ({sig.name})" in err and "rerun the same command to resume" in err
    entry = Cache(root).entries()[0]
    assert not entry.complete and not list(entry.path.glob(".*.tmp"))
    assert_cache_sound(root)
    assert extract(_cfg(root, big_csv, tiny_llama)).entry.complete
    record(signal=sig.name, exit_code=code, resumed=True)


def _output_until(stream, p, text: str, timeout: float) -> str:
    """What process `p` wrote on `stream` until a line holding `text` (fails after `timeout` s)."""
    seen, deadline = "", time.time() + timeout
    while text not in seen:
        left = deadline - time.time()
        assert left > 0 and p.poll() is None, seen[-2000:]
        if select.select([stream], [], [], left)[0]:
            seen += stream.readline()
    return seen


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_job_waiting_for_a_held_lock_stops_at_once_and_names_the_live_holder(
    tmp_path, tiny_llama, data_csv, sig, code
):
    """Issue 21.12: a job queued behind another (or behind `gc`/`rm`) ends its wait at once on
    SIGTERM or Ctrl-C, before loading the model, with the resume message; while it waits it names
    the process that holds the lock now, not one that held it before."""
    root = tmp_path / "c"
    kdir = root / plan_from_config(_cfg(root, data_csv, tiny_llama)).key
    kdir.mkdir(parents=True)
    stale = {"pid": 999999, "host": "elsewhere", "since": "long ago"}  # a holder that left
    (kdir / ".lock").write_text(json.dumps(stale))
    (kdir / ".lock.owner.json").write_text(json.dumps(stale))
    holder = subprocess.Popen(  # holds the lock without saying who it is
        [sys.executable, "-c", HOLD, str(kdir / ".lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    procs = [holder]
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        procs.append(p := start("cli", job_args(root, data_csv, tiny_llama), cwd=tmp_path))
        # Hydra logs to stdout
        waiting = _output_until(p.stdout, p, "waiting for cache key", timeout=120)
        assert f"held by pid {holder.pid} " in waiting and "999999" not in waiting, waiting
        t = time.perf_counter()
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
        assert time.perf_counter() - t < 10  # at once, not once the lock is free
        assert p.returncode == code, err[-2000:]
        assert f"interrupted ({sig.name}) while waiting for cache key" in err
        assert "rerun the same command to resume" in err and "Traceback" not in err
        assert "loaded" not in waiting + out + err  # the model was never loaded
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    resumed = extract(_cfg(root, data_csv, tiny_llama, "extract.token_budget=4096"))
    assert resumed.entry.complete and resumed.stats.texts == 60  # and the job resumes


HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("LOCKED", flush=True)
sys.stdin.readline()
"""


def test_a_signal_during_garbage_collection_still_stops_the_run():
    """Python drops an exception raised inside __del__ or a weakref callback; a handler that raised
    there let a SIGTERMed run finish (seen in CI). The signal is noted and acted on between batches."""

    class SignalsWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, inside __del__

    with stop_on_signals() as check:
        SignalsWhileCollected()
        with pytest.raises(KeyboardInterrupt) as first:
            check()
        with pytest.raises(KeyboardInterrupt):  # asked twice: stops at once, without waiting
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert first.value.signal_name == "SIGTERM" and first.value.signal_number == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_hostile_names_cannot_write_outside_the_cache_root(tmp_path, tiny_llama, data_csv):
    outside = tmp_path / "evil"
    res = extract(
        _cfg(
            tmp_path / "c",
            data_csv,
            tiny_llama,
            f"dataset.name=../../{outside.name}",
            f"backbone.name={outside}/abs",
        )
    )
    assert res.entry.path.is_relative_to(tmp_path / "c") and not outside.exists()
    # Kept as data, never used as a path.
    assert f"../../{outside.name}" in res.entry.usage.datasets


def test_group_writable_cache(tmp_path, tiny_llama, data_csv):
    res = extract(
        _cfg(
            tmp_path / "c",
            data_csv,
            tiny_llama,
            "+cache.group_writable=true" if False else "cache.group_writable=true",
        )
    )
    for path in [res.entry.path, res.entry.path.parent, *res.entry.path.iterdir()]:
        mode = path.stat().st_mode
        assert mode & stat.S_IWGRP, path
        if path.is_dir():
            assert mode & stat.S_ISGID, path


def test_a_reader_without_write_access_reads_a_complete_entry(tmp_path, tiny_llama, data_csv):
    made = extract(_cfg(tmp_path / "rw", data_csv, tiny_llama))
    ro = tmp_path / "ro"
    ro.mkdir()
    # A read-only bind mount: even root cannot write there, as a reader on a shared node.
    mounted = subprocess.run(
        ["mount", "--bind", str(tmp_path / "rw"), str(ro)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        with pytest.raises(OSError, match="Read-only file system"):
            (ro / "probe").touch()
        got = extract(_cfg(ro, data_csv, tiny_llama))
        assert got.hit and got.entry.path == ro / made.entry.path.relative_to(tmp_path / "rw")
        for q in POOLINGS:
            np.testing.assert_array_equal(arrays(got)[q], arrays(made)[q])
        with pytest.raises(PermissionError, match="is not writable"):  # a miss would need to write
            extract(_cfg(ro, data_csv, tiny_llama, "extract.max_length=9"))
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_a_real_full_disk_on_a_small_tmpfs(tmp_path, tiny_llama, big_csv):
    root = tmp_path / "small"
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(root)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(CacheError, match="no space left on the device"):
            extract(_cfg(root, big_csv, tiny_llama))
        entry = Cache(root).entries()[0]
        kept = sorted(p.name for p in entry.path.glob("shard-*.h5"))
        assert kept and not entry.complete and not list(entry.path.glob(".*.tmp"))
        assert_cache_sound(root)
        subprocess.run(["mount", "-o", "remount,size=8m", str(root)], check=True)  # space is back
        resumed = extract(_cfg(root, big_csv, tiny_llama))
        assert resumed.entry.complete and verify_entry(resumed.entry) == []
        assert resumed.stats.texts < 160  # the shards written before the disk filled were kept
        record(disk_full="real ENOSPC on a 320 KiB tmpfs", finished_shards_kept=len(kept))
    finally:
        subprocess.run(["umount", str(root)], check=False)


def test_a_full_disk_when_taking_the_lock_is_no_traceback(tmp_path):
    """Issue 21 (tracebacks): the lock's holder says who it is only where the disk has room; a
    full disk no longer fails the job there (it is reported where data is written), and a
    waiter still names the holder, from the kernel's lock table."""
    root = tmp_path / "small"
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(root)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        key = "ab" * 16
        (root / key).mkdir()
        fd = os.open(root / "filler", os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError) as full:
            while True:
                os.write(fd, b"x" * 4096)
        os.close(fd)
        assert full.value.errno == errno.ENOSPC
        with Cache(root).lock(key):
            assert key_lock(root / key).holder().startswith(f"held by pid {os.getpid()} ")
    finally:
        subprocess.run(["umount", str(root)], check=False)
