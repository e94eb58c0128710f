"""How the vLLM engine hands a trie to vLLM's workers: inline in the request, or as a file they can read.

Up to 1 MiB (patches/vllm_trie.py's INLINE_TRIE_BYTES) a trie travels as bytes
inside the request's extra_args; a larger one is written once, as a file in
this server's own directory under --data-dir/vllm-tries, which workers on
other nodes see through the shared volume. The file is removed when the trie
is dropped, and the directory when the server shuts down.

A server killed with SIGKILL leaves its directory behind, so the next server
started on the same host removes the stale ones. A directory is live while
its server holds an flock on the `.alive` file inside it; the kernel drops
the lock when the process dies, however it dies. A pid would not do:
containers sharing a host name (host networking) each have their own pid 1,
and pids are reused. Only this host's directories are swept: a lock taken on
another host over NFS may not be visible here (nolock, local_lock mounts).
"""

from __future__ import annotations

import fcntl
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
ALIVE = ".alive"


def directory_host(name: str) -> str | None:
    """The host in `{PREFIX}{pid}-{random}-{host}` (tempfile's random part has no "-"), or None."""
    parts = name[len(PREFIX):].split("-", 2) if name.startswith(PREFIX) else []
    return parts[2] if len(parts) == 3 else None


def hold_alive(directory: str) -> int:
    """Lock `.alive` in the directory for as long as the returned descriptor stays open. The file is locked
    under a temporary name and then renamed, so a sweeper never finds it unlocked."""
    staging = os.path.join(directory, f"{ALIVE}.{uuid.uuid4().hex}")
    descriptor = os.open(staging, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(staging, os.path.join(directory, ALIVE))
    return descriptor


def sweep_stale(root: str, host: str) -> list[str]:
    """Remove `host`'s directories under root whose `.alive` lock nobody holds. Returns their names."""
    removed = []
    for name in os.listdir(root):
        directory = os.path.join(root, name)
        if directory_host(name) != host:
            continue
        try:
            descriptor = os.open(os.path.join(directory, ALIVE), os.O_RDWR)  # NFS locks exclusively only for writers
        except OSError:  # no lock file (a plain file, or not a server's directory): not ours to judge
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its server is alive
            os.close(descriptor)
            continue
        shutil.rmtree(directory, ignore_errors=True)
        os.close(descriptor)
        removed.append(name)
    if removed:
        log.info("removed %d trie directories left by servers that stopped without cleaning up: %s", len(removed),
                 ", ".join(removed))
    return removed


class TrieFiles:
    def __init__(self, data_dir: str | None):
        root = None if data_dir is None else os.path.join(data_dir, "vllm-tries")
        host = socket.gethostname()
        if root is not None:
            os.makedirs(root, exist_ok=True)
            sweep_stale(root, host)
        self._dir = tempfile.TemporaryDirectory(prefix=f"{PREFIX}{os.getpid()}-", suffix=f"-{host}", dir=root)
        self._release = weakref.finalize(self, os.close, hold_alive(self._dir.name))  # the lock goes with us
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
        from longserve.patches.vllm_trie import INLINE_TRIE_BYTES, trie_bytes

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
        from longserve.patches.vllm_trie import trie_args

        held = self._held[id(constraint.trie)]
        return trie_args(constraint.trie, constraint.end_token, held if isinstance(held, bytes) else None,
                         held if isinstance(held, str) else None)

    def _forget(self, key: int) -> None:
        held = self._held.pop(key, None)
        if isinstance(held, str) and os.path.exists(held):
            os.unlink(held)

    def cleanup(self) -> None:
        self._dir.cleanup()
        self._release()
