"""Replicas on one --data-dir: a trie uploaded, replaced or deleted through one server is what every other
serves within 5 s, with no restart. Two real servers (tiny models), one directory."""

from __future__ import annotations

import time

import httpx

from server.knowledge import KnowledgeStore, Limits, build
from tests.conftest import make_engine, running_server, tiny_model, wait_until

LIMITS = Limits(1000, 64, 2**30)
FIRST = [{"key": "Paris", "value": "France"}, {"key": "Rome", "value": "Italy"}]
SECOND = [{"key": "Oslo", "value": "Norway"}]


def answer(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=30, json={
        "model": "tiny", "prompt": "Capital:", "max_tokens": 8, "temperature": 0, "constraint": {"trie": "capitals"}})


def test_a_trie_changed_through_one_replica_is_served_by_the_other(tokenizer, tmp_path):
    engines = [make_engine(tiny_model("llama", seed=seed), tokenizer, max_model_len=128) for seed in (41, 42)]
    with running_server(engines[0], data_dir=str(tmp_path)) as a, running_server(engines[1], data_dir=str(tmp_path)) as b:
        assert httpx.post(f"{a}/v1/tries", json={"name": "capitals", "entries": FIRST}).status_code == 200
        started = time.time()
        assert wait_until(lambda: answer(b).status_code == 200, timeout=5), "B never served the trie uploaded to A"
        print(f"B served A's upload after {time.time() - started:.2f} s")
        assert answer(b).json()["choices"][0]["key"] in {"Paris", "Rome"}

        assert httpx.post(f"{b}/v1/tries", json={"name": "capitals", "entries": SECOND}).status_code == 200
        assert wait_until(lambda: answer(a).json()["choices"][0]["key"] == "Oslo", timeout=5), "A kept the old trie"
        assert httpx.get(f"{a}/v1/tries/capitals").json()["keys"] == 1

        assert httpx.delete(f"{a}/v1/tries/capitals").json()["deleted"] is True
        assert wait_until(lambda: answer(b).status_code == 404, timeout=5), "B still serves a deleted trie"
        assert httpx.get(f"{b}/v1/tries").json()["data"] == []


def test_sync_never_loads_a_partial_file_and_keeps_another_replicas_young_one(tokenizer, tmp_path):
    """A save in flight is a *.partial file: it is not a base, and a replica starting meanwhile leaves it alone."""
    writer = KnowledgeStore(tmp_path, LIMITS)
    writer.put(build("capitals", FIRST, tokenizer, "", LIMITS))
    in_flight = tmp_path / "tmpsave.partial"
    in_flight.write_bytes(b"half of a file")
    reader = KnowledgeStore(tmp_path, LIMITS)
    assert sorted(reader.bases) == ["capitals"] and in_flight.exists()
    (tmp_path / "broken.npz").write_bytes(b"not an npz")  # a file that does not read back whole is refused
    assert reader.sync() == [] and "broken" not in reader.bases
    writer.delete("capitals")
    assert reader.sync() == ["capitals"] and reader.bases == {}
