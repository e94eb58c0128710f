"""How the vLLM engine hands a trie to vLLM's workers: inline in the request, or as a file they can read.

Up to 1 MiB (patches/vllm_trie.py's INLINE_TRIE_BYTES) a trie travels as bytes
inside the request's extra_args; a larger one is written once, as a file in
this server's own directory under --data-dir/vllm-tries, which workers on
other nodes see through the shared volume. The file is removed when the trie
is dropped, and the directory when the server shuts down.

A server killed with SIGKILL leaves its directory behind. The directory is
named after the host and process that made it, so the next server started on
that host removes the ones whose process is gone. A directory of another host
is never touched: its server may be alive, and we cannot see its processes.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import uuid
import weakref

log = logging.getLogger("longserve.vllm")

PREFIX = "longserve-tries-"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def host_name() -> str:
    return socket.gethostname().replace("-", "_")  # "-" separates the parts of a directory's name


def sweep_stale(root: str, host: str) -> list[str]:
    """Remove `host`'s directories under root whose process is gone (our own pid too: in a restarted container
    the new server can have the old one's pid, and this runs before our directory exists). Returns them."""
    removed = []
    for name in os.listdir(root):
        parts = name[len(PREFIX):].rsplit("-", 2) if name.startswith(PREFIX) else []
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or not process_alive(pid):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    if removed:
        log.info("removed %d trie directories left by servers that stopped without cleaning up: %s", len(removed),
                 ", ".join(removed))
    return removed


class TrieFiles:
    def __init__(self, data_dir: str | None):
        root = None if data_dir is None else os.path.join(data_dir, "vllm-tries")
        host = host_name()
        if root is not None:
            os.makedirs(root, exist_ok=True)
            sweep_stale(root, host)
        self._dir = tempfile.TemporaryDirectory(prefix=f"{PREFIX}{host}-{os.getpid()}-", dir=root)
        self._held: dict[int, str | bytes] = {}  # id(trie) -> its bytes or its file, while the trie lives
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        return self._dir.name

    def holds(self, trie) -> bool:
        return id(trie) in self._held

    def hold(self, trie) -> None:
        """The trie's bytes or its file, made once per trie and dropped (the file removed) when the trie goes.
        Call it in a worker thread: a large trie's write must not stall the event loop."""
        from patches.vllm_trie import INLINE_TRIE_BYTES, trie_bytes

        with self._lock:
            key = id(trie)
            if key in self._held:
                return
            if trie.nbytes <= INLINE_TRIE_BYTES:
                self._held[key] = trie_bytes(trie)
            else:
                path = os.path.join(self._dir.name, f"{uuid.uuid4().hex}.npz")
                trie.save(path)
                self._held[key] = path
            weakref.finalize(trie, self._forget, key)

    def args(self, constraint) -> dict:
        """extra_args for vLLM's logits processor (the trie held first)."""
        from patches.vllm_trie import trie_args

        held = self._held[id(constraint.trie)]
        return trie_args(constraint.trie, constraint.end_token, held if isinstance(held, bytes) else None,
                         held if isinstance(held, str) else None)

    def _forget(self, key: int) -> None:
        held = self._held.pop(key, None)
        if isinstance(held, str) and os.path.exists(held):
            os.unlink(held)

    def cleanup(self) -> None:
        self._dir.cleanup()
