"""Replicas on one --data-dir: a trie uploaded, replaced or deleted through one server is what every other
serves within 5 s, with no restart. Two real servers (tiny models), one directory."""

from __future__ import annotations

import time

import httpx
import pytest

from longserve.server.knowledge import KnowledgeStore, Limits, build
from tests.conftest import make_engine, running_server, tiny_model, wait_until

LIMITS = Limits(1000, 64, 2**30)
FIRST = [{"key": "Paris", "value": "France"}, {"key": "Rome", "value": "Italy"}]
SECOND = [{"key": "Oslo", "value": "Norway"}]


def answer(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=30, json={
        "model": "tiny", "prompt": "Capital:", "max_tokens": 8, "temperature": 0, "constraint": {"trie": "capitals"}})


@pytest.mark.server
def test_a_trie_changed_through_one_replica_is_served_by_the_other(tokenizer, tmp_path):
    engines = [make_engine(tiny_model("llama", seed=seed), tokenizer, max_model_len=128) for seed in (41, 42)]
    with running_server(engines[0], data_dir=str(tmp_path)) as a, running_server(engines[1], data_dir=str(tmp_path)) as b:
        assert httpx.post(f"{a}/v1/tries", json={"name": "capitals", "entries": FIRST}).status_code == 200
        started = time.time()
        assert wait_until(lambda: answer(b).status_code == 200, timeout=120), "B never served the trie uploaded to A"
        print(f"B served A's upload after {time.time() - started:.2f} s")
        assert answer(b).json()["choices"][0]["key"] in {"Paris", "Rome"}

        assert httpx.post(f"{b}/v1/tries", json={"name": "capitals", "entries": SECOND}).status_code == 200
        assert wait_until(lambda: answer(a).json()["choices"][0]["key"] == "Oslo", timeout=120), "A kept the old trie"
        assert httpx.get(f"{a}/v1/tries/capitals").json()["keys"] == 1

        assert httpx.delete(f"{a}/v1/tries/capitals").json()["deleted"] is True
        assert wait_until(lambda: answer(b).status_code == 404, timeout=120), "B still serves a deleted trie"
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


def test_a_sync_keeps_what_this_server_put_after_its_listing(tokenizer, tmp_path, monkeypatch):
    import pathlib

    store = KnowledgeStore(tmp_path, LIMITS)
    store.put(build("capitals", FIRST, tokenizer, "", LIMITS))
    store.delete("capitals")
    listing = pathlib.Path.glob

    def put_after_listing(self, pattern):  # the upload lands between the sync's listing and its lock
        found = list(listing(self, pattern))
        if pattern == "*.npz":
            monkeypatch.setattr(pathlib.Path, "glob", listing)
            store.put(build("capitals", SECOND, tokenizer, "", LIMITS))
        return iter(found)

    monkeypatch.setattr(pathlib.Path, "glob", put_after_listing)
    store.sync()
    assert sorted(store.bases) == ["capitals"] and store.bases["capitals"].trie.num_keys == 1
    assert store.sync() == [] and sorted(store.bases) == ["capitals"]


def test_a_trie_over_the_limit_is_refused_once_and_tried_again_when_room_is_freed(tokenizer, tmp_path, monkeypatch):
    writer = KnowledgeStore(tmp_path, LIMITS)
    big, small = build("big", FIRST, tokenizer, "", LIMITS), build("small", SECOND, tokenizer, "", LIMITS)
    writer.put(small)
    writer.put(big)
    tight = Limits(LIMITS.max_keys, LIMITS.max_key_chars, big.nbytes + small.nbytes - 1)  # room for one of them
    reader = KnowledgeStore(tmp_path, tight)
    assert len(reader.bases) == 1
    refused = ({"big", "small"} - set(reader.bases)).pop()
    loads = []
    monkeypatch.setattr(reader, "_load", lambda path: loads.append(path) or pytest.fail("read again"))
    assert reader.sync() == [] and loads == []  # the refused file is not read every second
    monkeypatch.undo()
    reader.delete(next(iter(reader.bases)))
    assert reader.sync() == [refused] and sorted(reader.bases) == [refused]


@pytest.mark.server
def test_a_refused_trie_can_be_deleted(tokenizer, tmp_path):
    """A file this replica refused (unreadable here, or over its --max-trie-bytes) is still a trie of the shared
    directory: DELETE removes it, where it used to answer 404 and leave the file to be retried forever."""
    engine = make_engine(tiny_model("llama", seed=43), tokenizer, max_model_len=128)
    broken = tmp_path / "tries" / "broken.npz"
    broken.parent.mkdir()
    broken.write_bytes(b"not an npz")
    with running_server(engine, data_dir=str(tmp_path)) as url:
        assert httpx.get(f"{url}/v1/tries/broken").status_code == 404  # not served
        deleted = httpx.delete(f"{url}/v1/tries/broken")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert not broken.exists()
        again = httpx.delete(f"{url}/v1/tries/broken")
        assert again.status_code == 404 and again.json()["error"]["code"] == "trie_not_found"
        nul = httpx.delete(f"{url}/v1/tries/broken%00")  # no trie can have it: 404, not a 500 from the path
        assert nul.status_code == 404 and nul.json()["error"]["code"] == "trie_not_found"


def test_the_vllm_trie_directories_of_stopped_servers_on_this_host_are_swept_at_start(tmp_path):
    """A SIGKILLed vLLM server leaves its trie directory under --data-dir/vllm-tries; the next server on the same
    host removes it. It leaves alone a live server's (another process's, or another TrieFiles of its own process,
    whatever their pids), another host's, and names it does not know."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from longserve.server.engine.trie_files import ALIVE, PREFIX, TrieFiles

    root = tmp_path / "vllm-tries"
    make_one = (f"import sys, time; sys.path.insert(0, {os.getcwd()!r}); from longserve.server.engine.trie_files import TrieFiles; "
                f"files = TrieFiles({str(tmp_path)!r}); print(files.path, flush=True); time.sleep(60)")

    def server_process():
        process = subprocess.Popen([sys.executable, "-c", make_one], stdout=subprocess.PIPE, text=True)
        return process, os.path.basename(process.stdout.readline().strip())

    alive, alive_dir = server_process()
    ours = TrieFiles(str(tmp_path))
    killed, killed_dir = server_process()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    other_host = f"{PREFIX}{os.getpid()}-d4-elsewhere"
    odd = [f"{PREFIX}\u00b2-x-{socket.gethostname()}", f"{PREFIX}plain-file-{socket.gethostname()}"]
    (root / other_host).mkdir()
    (root / other_host / ALIVE).write_bytes(b"")  # nobody holds it, but it is not this host's to judge
    (root / odd[0]).mkdir()
    (root / odd[1]).write_bytes(b"x")
    try:
        assert killed_dir in {path.name for path in root.iterdir()}
        files = TrieFiles(str(tmp_path))
        left = {path.name for path in root.iterdir()}
        assert left == {alive_dir, os.path.basename(ours.path), other_host, *odd, os.path.basename(files.path)}
        files.cleanup()
        assert os.path.basename(files.path) not in {path.name for path in root.iterdir()}
    finally:
        alive.send_signal(signal.SIGKILL)
        alive.wait()
        ours.cleanup()
    TrieFiles(str(tmp_path)).cleanup()
    assert alive_dir not in {path.name for path in root.iterdir()}  # swept once its server died
