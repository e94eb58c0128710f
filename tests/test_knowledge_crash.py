"""Knowledge bases on disk survive kill -9 mid-save, torn files and flipped bytes: never a half base served."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from longserve.server.knowledge import KnowledgeStore, Limits, build

SAVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from transformers import AutoTokenizer
    from longserve.server.knowledge import KnowledgeStore, Limits, build

    directory, model = Path(sys.argv[1]), sys.argv[2]
    tokenizer = AutoTokenizer.from_pretrained(model)
    store = KnowledgeStore(directory, Limits())
    store.put(build("kb", [{"key": f"old {i}", "value": i} for i in range(100)], tokenizer, " ", Limits()))
    print("old saved", flush=True)
    big = [{"key": f"new key {i}", "value": "v" * 2000} for i in range(60_000)]  # about 120 MB to write
    base = build("kb", big, tokenizer, " ", Limits())
    print("new built", flush=True)
    store.put(base)
    print("new saved", flush=True)
""")


def test_kill_9_during_a_save_then_restart_serves_the_old_base(bundled_path, tmp_path, caplog):
    directory = tmp_path / "tries"
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(directory), str(bundled_path)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert saver.stdout.readline().strip() == "old saved"
    assert saver.stdout.readline().strip() == "new built"
    deadline = time.monotonic() + 60
    while not list(directory.glob("*.partial")):  # the new version is being written
        assert time.monotonic() < deadline and saver.poll() is None, "the save finished before it could be killed"
    saver.send_signal(signal.SIGKILL)
    saver.wait()
    assert list(directory.glob("*.partial")), "a killed save leaves its temporary file"

    with caplog.at_level(logging.WARNING, logger="longserve.knowledge"):
        store = KnowledgeStore(directory, Limits())
    assert not list(directory.glob("*.partial"))
    assert "left by a save that did not finish" in caplog.text
    assert store.bases["kb"].num_keys == 100
    assert store.bases["kb"].key(7) == "old 7" and store.bases["kb"].value(7) == 7


def saved_store(tmp_path, tokenizer) -> KnowledgeStore:
    store = KnowledgeStore(tmp_path, Limits())
    entries = [{"key": f"k{i}", "value": {"n": i}} for i in range(50)]
    store.put(build("good", entries, tokenizer, "", Limits()))
    store.put(build("bad", entries, tokenizer, "", Limits()))
    return store


def test_a_torn_file_is_refused_with_a_log_line(tmp_path, tokenizer, caplog):
    saved_store(tmp_path, tokenizer)
    path = tmp_path / "bad.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.ERROR, logger="longserve.knowledge"):
        store = KnowledgeStore(tmp_path, Limits())
    assert "bad" not in store.bases and store.bases["good"].num_keys == 50
    assert "not serving the trie 'bad'" in caplog.text


def test_a_changed_byte_fails_the_checksum(tmp_path, tokenizer, caplog):
    saved_store(tmp_path, tokenizer)
    path = tmp_path / "bad.npz"
    with np.load(path) as data:
        arrays = {name: data[name].copy() for name in data.files}
    arrays["value_blob"][3] ^= 1  # one bit of one stored value; the zip itself stays valid
    np.savez(path, **arrays)
    with caplog.at_level(logging.ERROR, logger="longserve.knowledge"):
        store = KnowledgeStore(tmp_path, Limits())
    assert "bad" not in store.bases and "good" in store.bases
    assert "SHA-256 does not match" in caplog.text
