import numpy as np
import pytest

from llmembed.cache.keys import file_sha256, fingerprint


def test_fingerprint_is_order_independent_for_mappings_and_type_tagged():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    values = [1, 1.0, "1", True, [1], None, b"1", np.array([1])]
    assert len({fingerprint(v) for v in values}) == len(values)
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])  # lengths are part of the hash


def test_fingerprint_is_stable_across_processes():
    # A fixed expectation: a change here silently invalidates every user's cache.
    assert fingerprint({"a": [1, "x", 2.5, None]}) == "750b682ddee91d0ee94eb20ff1a14eb9"


def test_unhashable_value_raises_instead_of_random_fingerprint():
    with pytest.raises(TypeError, match="cannot fingerprint a value of type object"):
        fingerprint({"x": object()})


def test_file_hash_is_memoized_by_size_and_mtime(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    memo = tmp_path / "memo.json"
    first = file_sha256(f, memo=memo)
    assert first == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert first in memo.read_text()
    f.write_bytes(b"abcd")  # new size: the memo must not answer
    assert file_sha256(f, memo=memo) != first
