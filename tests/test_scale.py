"""Scale-out: accelerate multi-process extraction, Hydra's submitit launcher, runtime and energy."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llmembed.cache.root import Cache
from llmembed.extract.pipeline import extract
from llmembed.extract.ranks import process_group_backend
from tests.conftest import file_overrides, sentences, write_csv

BIN = Path(sys.executable).parent
POOLINGS = ("mean", "last")  # a decoder with BOS stores no "first"
TIMINGS = {
    "seconds",
    "load_seconds",
    "tokens_per_s",
    "wall_s",
    "cpu_s",
    "peak_rss_mb",
    "peak_gpu_mb",
    "energy_j",
    "energy_source",
    "energy_note",
    "processes",
    "device",
}

# The extraction CLI, slowed down (5 ms a batch) so that a rank can be killed mid-work, and
# leaving its pid where the test can find it.
SLOW_CLI = """
import os, sys, time
from pathlib import Path
from llmembed.extract.embedder import Extractor
real = Extractor.forward
def slow(self, input_ids, mask):
    time.sleep(0.005)
    return real(self, input_ids, mask)
Extractor.forward = slow
Path(sys.argv[1], f"rank{os.environ.get('RANK', '0')}.pid").write_text(str(os.getpid()))
sys.argv = ["llmembed-extract", *sys.argv[2:]]
from llmembed.extract.cli import main
main()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate(n: int, *args: str, cwd: Path) -> list[str]:
    # On a CPU-only machine accelerate forms a gloo group (llmembed asks for cpu=True).
    return [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(n),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *args,
    ]


def overrides(root, csv_path, model, *extra):
    return file_overrides(root, csv_path, model, "extract.shard_mb=0.004", *extra)


def compose_cfg(*args):
    from hydra import compose, initialize_config_module

    with initialize_config_module("llmembed.conf", version_base=None):
        return compose("extract", overrides=list(args))


def arrays(entry):
    return {q: entry.read(q, entry.manifest.layers) for q in POOLINGS}


def without_timings(manifest) -> dict:
    m = json.loads(json.dumps(manifest.to_json()))
    m.pop("created")
    m.pop("updated")
    m["extractions"] = [
        {k: v for k, v in e.items() if k not in TIMINGS | {"at"}} for e in m["extractions"]
    ]
    for shard in m["shards"]:
        shard.pop(
            "sha256"
        )  # HDF5 files carry no timestamps, but be safe: arrays are compared below
        shard.pop("bytes")
    return m


def test_two_processes_make_the_entry_one_process_makes(tmp_path, tiny_llama):
    data = write_csv(tmp_path / "d.csv", sentences(120, seed=7))
    # Same threads per process on both sides: floating-point sums depend on how work is split.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [str(BIN / "llmembed-extract"), *overrides(tmp_path / "one", data, tiny_llama)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    (single,) = Cache(tmp_path / "one").entries()
    res = subprocess.run(
        accelerate(
            2,
            "-m",
            "llmembed.extract",
            *overrides(tmp_path / "two", data, tiny_llama),
            cwd=tmp_path,
        ),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (entry,) = Cache(tmp_path / "two").entries()
    assert entry.complete and entry.path.relative_to(tmp_path / "two") == single.path.relative_to(
        tmp_path / "one"
    )
    m = entry.manifest
    assert m.extractions[-1]["processes"] == 2 and m.extractions[-1]["rows_computed"] == 120
    assert len(m.shards) >= 4
    assert without_timings(m) == without_timings(single.manifest)
    for q in POOLINGS:
        np.testing.assert_array_equal(arrays(entry)[q], arrays(single)[q])


@pytest.mark.parametrize(
    ("gpus", "local", "backend"),
    [(1, 2, "gloo"), (2, 4, "gloo"), (1, 1, None), (4, 4, None), (8, 2, None), (0, 2, None)],
)
def test_processes_sharing_a_gpu_talk_over_gloo(gpus, local, backend):
    """NCCL refuses two ranks on one GPU: more processes on a node than GPUs (accelerate launch
    --num_processes 2 on one card) form a gloo group; one GPU each, or no GPU, keep accelerate's."""
    assert process_group_backend(gpus, local) == backend


def test_killing_one_rank_leaves_a_resumable_entry(tmp_path, tiny_llama):
    data = write_csv(tmp_path / "d.csv", sentences(160, seed=8))
    reference = extract(compose_cfg(*overrides(tmp_path / "ref", data, tiny_llama)))
    root = tmp_path / "c"
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    launcher = subprocess.Popen(
        accelerate(2, str(script), str(tmp_path), *overrides(root, data, tiny_llama), cwd=tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (list(root.glob("*/*/shard-00000.json")) and (tmp_path / "rank1.pid").exists()):
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.02)
    os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGKILL)
    launcher.communicate(timeout=300)
    assert launcher.returncode != 0
    (entry,) = Cache(root).entries()
    assert not entry.complete and list(entry.path.glob("shard-*.json"))
    resumed = extract(compose_cfg(*overrides(root, data, tiny_llama)))
    assert not resumed.hit and 0 < resumed.stats.texts < 160  # only the missing shards
    for q in POOLINGS:
        np.testing.assert_array_equal(arrays(resumed.entry)[q], arrays(reference.entry)[q])


def test_submitit_local_multirun_fills_the_cache_like_the_basic_launcher(
    tmp_path, tiny_llama, tiny_bert
):
    data = write_csv(tmp_path / "d.csv", sentences(40, seed=9))
    args = [
        "-m",
        "dataset=file",
        f"dataset.path={data}",
        "backbone=local",
        f"backbone.path={tiny_llama},{tiny_bert}",
        "extract.progress=false",
    ]
    for launcher, root in (("hydra/launcher=local", "submitit"), ("hydra/launcher=basic", "basic")):
        env = {**os.environ, "LLMEMBED_CACHE": str(tmp_path / root)}
        res = subprocess.run(
            [str(BIN / "llmembed-extract"), *args, launcher],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-3000:]
    made = {
        str(e.path.relative_to(tmp_path / "submitit")): e
        for e in Cache(tmp_path / "submitit").entries()
    }
    ref = {
        str(e.path.relative_to(tmp_path / "basic")): e for e in Cache(tmp_path / "basic").entries()
    }
    assert len(made) == 2 and made.keys() == ref.keys()
    for name, entry in made.items():
        for q in POOLINGS:
            np.testing.assert_array_equal(arrays(entry)[q], arrays(ref[name])[q])
    assert list((tmp_path / "multirun").rglob("*_log.out"))  # submitit's per-job logs


def test_runtime_and_energy_are_recorded_honestly(make_cfg, tmp_path):
    res = extract(make_cfg())
    ex = res.entry.manifest.extractions[-1]
    assert ex["processes"] == 1 and ex["wall_s"] > 0 and ex["cpu_s"] > 0 and ex["peak_rss_mb"] > 100
    if (
        ex["energy_j"] is None
    ):  # no counter readable here: null with the reason, never a made-up figure
        assert ex["energy_source"] is None and "RAPL" in ex["energy_note"]
    else:
        assert ex["energy_j"] > 0 and ex["energy_source"] in ("rapl", "nvml")


def test_device_map_auto_gives_the_same_entry(make_cfg, tmp_path):
    plain = extract(make_cfg())
    mapped = extract(make_cfg("backbone.device_map=auto", f"cache.root={tmp_path / 'mapped'}"))
    assert (
        not mapped.hit and mapped.entry.key == plain.entry.key
    )  # placement is not part of the key
    for q in POOLINGS:
        np.testing.assert_array_equal(arrays(mapped.entry)[q], arrays(plain.entry)[q])
