"""Every read checks what it reads: a sha256 per chunk (one layer of one pooling, and the hash column)
and a seal per shard over its attributes, recorded at write time; a manifest whose fields disagree
with the shards, or that lists a shard twice, is refused; a commit killed before its plan was
removed is finished, never appended twice; repair never deletes a healthy shard."""

import json

import h5py
import numpy as np
import pytest

from llmembed.cache.cli import main as cache_main
from llmembed.cache.files import ShardFile
from llmembed.cache.format import CacheError
from llmembed.cache.maintenance import verify_entry
from llmembed.cache.root import Cache
from llmembed.cache.writer import EntryWriter
from llmembed.extract.pipeline import extract


@pytest.fixture
def made(make_cfg):
    """An entry of several shards (float16, four layers, mean and last)."""
    res = extract(make_cfg("extract.shard_mb=0.01"))
    assert len(res.entry.shards()) >= 3
    return res


def _shard(res, i=1):
    return res.entry.path / res.entry.shards()[i].file


def _read_all(res):
    return {q: res.read(q, list(res.entry.manifest.layers)) for q in ("mean", "last")}


def test_a_changed_word_fails_the_read_of_its_layer_only(made):
    victim = _shard(made)
    with h5py.File(victim, "r+") as f:  # 0x0000 -> 0xFFFF (a NaN) in layer 2's chunk
        ds = f["emb/mean"]
        row = ds[:, 2, :]
        row.view(np.uint16)[0, 0] = 0xFFFF
        ds[:, 2, :] = row
    with pytest.raises(CacheError, match=rf"{victim}.*chunk 2 of emb/mean does not match"):
        made.read("mean", [2])
    made.read("mean", [1])  # another layer of the same shard: its own chunk is intact
    (damage,) = verify_entry(made.entry)
    assert damage.kind == "checksum" and damage.shard == made.entry.shards()[1].index


def test_values_swapped_far_apart_fail_the_read(made):
    victim = _shard(made)
    with h5py.File(victim, "r+") as f:
        ds = f["emb/last"]
        block = ds[:, 1, :].reshape(-1)
        i, j = 0, min(65535, block.size - 1)
        block[i], block[j] = block[j], block[i]
        ds[:, 1, :] = block.reshape(ds.shape[0], ds.shape[2])
    with pytest.raises(CacheError, match="does not match its recorded sha256"):
        made.read("last", [1])


def test_permuted_rows_or_swapped_text_hashes_are_never_served(made, make_cfg):
    victim = _shard(made)
    with h5py.File(victim, "r+") as f:  # every layer and the hash column permuted alike
        perm = np.roll(np.arange(f["text_sha256"].shape[0]), 1)
        f["text_sha256"][:] = f["text_sha256"][:][perm]
        for q in ("mean", "last"):
            f[f"emb/{q}"][:] = f[f"emb/{q}"][:][perm]
    with pytest.raises(CacheError, match=str(victim)):
        _read_all(made)


def test_chunk_hashes_rewritten_to_match_break_the_seal(made):
    """Whoever rewrites a chunk and its recorded hash with h5py still fails the seal, which the
    manifest holds."""
    import hashlib

    victim = _shard(made)
    with h5py.File(victim, "r+") as f:
        ds = f["emb/mean"]
        layer = ds[:, 0, :] * 2
        ds[:, 0, :] = layer
        record = json.loads(ds.attrs["llmembed"])
        record["chunks"][0] = hashlib.sha256(np.ascontiguousarray(layer).tobytes()).hexdigest()
        ds.attrs["llmembed"] = json.dumps(record, sort_keys=True)
    with pytest.raises(CacheError, match="its seal does not match the manifest"):
        made.read("mean", [0])


def test_a_one_layer_read_reads_one_chunk_per_shard(made, monkeypatch):
    chunks = []
    real = ShardFile._chunk

    def counting(self, name, j):
        chunks.append((name, j))
        return real(self, name, j)

    monkeypatch.setattr(ShardFile, "_chunk", counting)
    made.read("mean", [3])
    shards = len(made.entry.shards())
    assert sorted(set(chunks)) == [("emb/mean", 3), ("text_sha256", 0)]
    assert len(chunks) == 2 * shards


def test_an_edited_num_layers_fails_reads_and_verify(made):
    path = made.entry.manifest_path
    m = json.loads(path.read_text())
    m["num_layers"] = m["num_layers"] - 1  # layer -1 would silently mean another layer
    m["layers"] = [x for x in m["layers"] if x <= m["num_layers"]]
    for info in m["poolings"].values():
        info["layers"] = [x for x in info["layers"] if x <= m["num_layers"]]
    path.write_text(json.dumps(m))
    with pytest.raises(CacheError, match="num_layers"):
        made.read("mean", [0])
    assert verify_entry(made.entry)


def test_a_manifest_listing_a_shard_twice_is_refused(made, tmp_path):
    path = made.entry.manifest_path
    m = json.loads(path.read_text())
    m["shards"].append(m["shards"][0])
    path.write_text(json.dumps(m))
    with pytest.raises(CacheError, match="a shard listed twice"):
        made.read("mean", [0])
    out = tmp_path / "x.parquet"
    name = str(made.entry.path.relative_to(made.entry.root))
    args = ["export", name, "--layers", "1", "--out", str(out)]
    with pytest.raises(SystemExit) as stop:  # one message, exit 2
        cache_main(["--root", str(made.entry.root), *args])
    assert stop.value.code == 2 and not out.exists()  # no duplicated rows exported


def test_a_commit_killed_before_removing_its_plan_is_finished_not_appended_twice(
    made, make_cfg, monkeypatch
):
    """kill -9 between the manifest's rename and the plan's removal: the next append (a miss)
    finds a plan whose shards the manifest lists, drops it, and appends only what is new."""
    from tests.conftest import sentences, write_csv

    real = EntryWriter.commit
    kept = {}

    def keep_plan(self, **kw):
        kept["plan"] = (self.entry.path / "pending.h5").read_bytes()
        real(self, **kw)

    monkeypatch.setattr(EntryWriter, "commit", keep_plan)
    more = write_csv(made.entry.root.parent / "more.csv", sentences(80))  # 60 known, 20 new
    extract(make_cfg("extract.shard_mb=0.01", f"dataset.path={more}"))
    monkeypatch.setattr(EntryWriter, "commit", real)
    (made.entry.path / "pending.h5").write_bytes(kept["plan"])  # as a kill there leaves it
    most = write_csv(made.entry.root.parent / "most.csv", sentences(100))  # 20 new again
    again = extract(make_cfg("extract.shard_mb=0.01", f"dataset.path={most}"))
    assert not again.hit and again.stats.texts == 20
    entry = Cache(made.entry.root).entries()[0]
    m = entry.manifest
    assert m.rows == 100 and len({s.index for s in m.shards}) == len(m.shards)
    assert verify_entry(entry) == []


def test_repair_of_a_manifest_listing_a_shard_twice_keeps_every_shard(made):
    """What a killed commit of the old format left (a shard listed twice): repair lists it once;
    no shard file is deleted, nothing is recomputed."""
    entry = made.entry
    m = json.loads(entry.manifest_path.read_text())
    twice = {**m, "shards": [*m["shards"], m["shards"][0]]}
    entry.manifest_path.write_text(json.dumps(twice))
    before = sorted(p.name for p in entry.path.glob("shard-*.h5"))
    assert [d.kind for d in verify_entry(entry)] == ["unreadable-manifest"]
    assert cache_main(["--root", str(entry.root), "verify", "--repair"]) == 0
    assert sorted(p.name for p in entry.path.glob("shard-*.h5")) == before
    assert json.loads(entry.manifest_path.read_text())["shards"] == m["shards"]
    assert verify_entry(entry) == []
    assert _read_all(made)["mean"].shape[0] == m["rows"]


def test_a_dataset_rewritten_in_another_byte_order_is_refused(made):
    """The same raw chunks and the same recorded hashes, read as big-endian: other numbers under
    the same hashes, so the stored dtype (with its byte order) is part of what is checked."""
    victim = _shard(made)
    with h5py.File(victim, "r+") as f:
        old = f["emb/mean"]
        chunks = [old.id.read_direct_chunk((0, j, 0))[1] for j in range(old.shape[1])]
        record, shape = old.attrs["llmembed"], old.shape
        del f["emb/mean"]
        new = f["emb"].create_dataset(
            "mean", shape=shape, dtype=">f2", chunks=(shape[0], 1, shape[2])
        )
        for j, c in enumerate(chunks):
            new.id.write_direct_chunk((0, j, 0), c)
        new.attrs["llmembed"] = record
    with pytest.raises(CacheError, match=r"emb/mean has dtype >f2 .* written with <f2"):
        made.read("mean", [0])


def test_repair_rebuilds_an_edited_manifest_from_the_intact_shards(made):
    """An edited num_layers or seal is the manifest's fault when the shards' bytes match their
    sha256: repair rebuilds the records from the shards, deletes nothing, recomputes nothing."""
    entry = made.entry
    good = _read_all(made)
    m = json.loads(entry.manifest_path.read_text())
    m["num_layers"] -= 1
    m["layers"] = [x for x in m["layers"] if x <= m["num_layers"]]
    for info in m["poolings"].values():
        info["layers"] = [x for x in info["layers"] if x <= m["num_layers"]]
    m["shards"][1]["seal"] = "0" * 64
    entry.manifest_path.write_text(json.dumps(m))
    before = sorted(p.name for p in entry.path.glob("shard-*.h5"))
    assert {d.kind for d in verify_entry(entry)} == {"record"}
    assert cache_main(["--root", str(entry.root), "verify", "--repair"]) == 0
    assert sorted(p.name for p in entry.path.glob("shard-*.h5")) == before
    assert verify_entry(entry) == []
    for q, values in _read_all(made).items():
        np.testing.assert_array_equal(values, good[q])
