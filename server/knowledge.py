"""Knowledge bases: named sets of (key, value) entries behind a token trie, kept on disk.

A base is built from its entries with the served model's tokenizer: each key
is tokenized the way the model writes it after the prompt (`lead` + key; a
lead of " " gives the leading-space tokens a completion after "Answer:" uses),
and patches/trie.py indexes the token sequences. Keys and values are kept as
two UTF-8 blobs with offsets, not as Python objects, so a million entries
stay within a few hundred bytes each.

On disk a base is one .npz file under --data-dir, written to a temporary
`*.partial` file, fsync'd, and renamed over the old one: an interrupted or
failed upload leaves the previous version whole. The file carries a SHA-256
of its arrays. At start-up every base in the directory loads; a file that
does not read back whole or whose checksum differs is refused with a log line
and never served, and `*.partial` files that a killed save left are removed.

Replicas may share the directory (a ReadWriteMany volume): `sync` takes in
what the others wrote. A file whose name, size, inode or mtime changed loads
again, and a base whose file is gone leaves. The server calls it every
--trie-sync-seconds. Polling is deliberate: inotify (and so watchfiles) does
not see what another NFS client writes, and a stat per base each second
costs nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longserve.patches.trie import RepeatedKey, TokenTrie
from longserve.server.errors import TOO_DEEP
from longserve.server.valid_text import INVALID_TEXT, first_invalid_text

log = logging.getLogger("longserve.knowledge")
PARTIAL_MAX_AGE = 600.0  # seconds: another host's *.partial older than this is a killed save's, not one in flight
ARRAYS = ("offsets", "labels", "end_nodes", "end_entries", "key_blob", "key_offsets", "value_blob", "value_offsets", "meta")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # fullmatch: `$` also matches before a final "\n"


class EntryError(ValueError):
    """A bad entry; `line` is 1-based (the JSON-lines line, or the entry index + 1)."""

    def __init__(self, line: int, message: str):
        super().__init__(f"entry {line}: {message}")
        self.line, self.message = line, message

    def __reduce__(self):  # it comes back from the process that builds an upload (serve_tries.py)
        return EntryError, (self.line, self.message)


@dataclass(frozen=True)
class Limits:
    max_keys: int = 2_000_000  # keys per base
    max_key_chars: int = 512
    max_total_bytes: int = 4 * 2**30  # all bases together, in memory


def pack(texts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in texts], out=offsets[1:])
    return np.frombuffer(b"".join(texts), dtype=np.uint8).copy(), offsets


@dataclass
class KnowledgeBase:
    name: str
    lead: str
    trie: TokenTrie
    key_blob: np.ndarray  # uint8
    key_offsets: np.ndarray  # int64 [keys + 1]
    value_blob: np.ndarray  # uint8, JSON
    value_offsets: np.ndarray
    num_tokens: int
    build_seconds: float

    @property
    def num_keys(self) -> int:
        return self.trie.num_keys

    @property
    def nbytes(self) -> int:
        arrays = (self.key_blob, self.key_offsets, self.value_blob, self.value_offsets)
        return self.trie.nbytes + sum(a.nbytes for a in arrays)

    def key(self, entry: int) -> str:
        return self.key_blob[self.key_offsets[entry] : self.key_offsets[entry + 1]].tobytes().decode("utf-8")

    def value(self, entry: int):
        return json.loads(self.value_blob[self.value_offsets[entry] : self.value_offsets[entry + 1]].tobytes())

    def stats(self) -> dict:
        return {
            "name": self.name, "object": "trie", "lead": self.lead, "keys": self.num_keys, "tokens": self.num_tokens,
            "nodes": self.trie.num_nodes, "bytes": self.nbytes, "bytes_per_key": round(self.nbytes / max(1, self.num_keys), 1),
            "build_seconds": round(self.build_seconds, 3),
        }


def check_entries(entries, limits: Limits) -> tuple[list[str], list[bytes]]:
    """Keys and JSON-encoded values of `entries` (dicts), or EntryError naming the first bad one."""
    if len(entries) > limits.max_keys:
        raise EntryError(limits.max_keys + 1, f"over the limit of {limits.max_keys} keys per base (--max-trie-keys)")
    keys, values, seen = [], [], set()
    for line, entry in enumerate(entries, start=1):
        try:
            key, value = check_entry(line, entry, limits, seen)
        except RecursionError:  # a value nested past the JSON reader's and writer's depth
            raise EntryError(line, TOO_DEEP) from None
        seen.add(key)
        keys.append(key)
        values.append(value)
    if not keys:
        raise EntryError(1, "no entries; a base needs at least one key")
    return keys, values


def check_entry(line: int, entry, limits: Limits, seen: set[str]) -> tuple[str, bytes]:
    """One entry's key and JSON-encoded value, or EntryError."""
    if not isinstance(entry, dict) or "key" not in entry:
        raise EntryError(line, 'missing "key": each entry is {"key": string, "value": any JSON}')
    invalid = first_invalid_text(entry)
    if invalid is not None:
        raise EntryError(line, INVALID_TEXT.format(path=invalid[0], at=invalid[1]))
    key = entry["key"]
    if not isinstance(key, str):
        raise EntryError(line, f'"key" must be a string, got {type(key).__name__}')
    if not key:
        raise EntryError(line, '"key" is empty')
    if len(key) > limits.max_key_chars:
        raise EntryError(line, f'"key" has {len(key)} characters, over the limit of {limits.max_key_chars} (--max-key-chars)')
    if key in seen:
        raise EntryError(line, f"the key {key!r} appears twice; keys must be distinct")
    extra = set(entry) - {"key", "value"}
    if extra:
        raise EntryError(line, f"unknown field {sorted(extra)[0]!r}; an entry has only key and value")
    return key, json.dumps(entry.get("value"), ensure_ascii=False).encode("utf-8")


def build(name: str, entries: list, tokenizer, lead: str, limits: Limits) -> KnowledgeBase:
    started = time.perf_counter()
    keys, values = check_entries(entries, limits)
    token_lists = tokenizer([lead + key for key in keys], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    for index, tokens in enumerate(token_lists):
        if special.intersection(tokens):  # the answer would carry the special token, and its text would come back as ""
            found = tokenizer.convert_ids_to_tokens(sorted(special.intersection(tokens)))
            raise EntryError(index + 1, f"the key {keys[index]!r} holds the text of the special token(s) {found}, which an "
                                        "answer cannot carry as text; remove it from the key (or the lead)")
    try:
        trie = TokenTrie.build(token_lists)
    except RepeatedKey as exc:  # distinct strings, same tokens: the model could not tell them apart
        raise EntryError(exc.entry + 1, f"the key {keys[exc.entry]!r} tokenizes like entry {exc.other + 1}'s key") from None
    key_blob, key_offsets = pack([key.encode("utf-8") for key in keys])
    value_blob, value_offsets = pack(values)
    num_tokens = sum(len(t) for t in token_lists)
    return KnowledgeBase(name, lead, trie, key_blob, key_offsets, value_blob, value_offsets, num_tokens, time.perf_counter() - started)


class KnowledgeStore:
    """The bases this server holds, persisted under `directory` (None: memory only)."""

    def __init__(self, directory: Path | None, limits: Limits):
        self.directory = directory
        self.limits = limits
        self.bases: dict[str, KnowledgeBase] = {}
        self._seen: dict[str, tuple] = {}  # name -> the signature of the file its base (or its refusal) came from
        self._lock = threading.Lock()
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            for path in sorted(directory.glob("*.partial")):  # a save killed before its rename
                if killed_save(path):
                    path.unlink(missing_ok=True)
                    log.warning("removed %s, left by a save that did not finish; the previous version of that base is kept", path)
            self.sync()

    def sync(self) -> list[str]:
        """Take in the directory as it is now: bases whose file is new or changed load, those whose file is gone
        leave. Returns the names that changed. Loading happens outside the lock: requests go on meanwhile."""
        if self.directory is None:
            return []
        on_disk = {path.stem: sig for path in self.directory.glob("*.npz")
                   if NAME_PATTERN.fullmatch(path.stem) and (sig := signature(path)) is not None}
        changed = []
        with self._lock:
            for name in [name for name in self._seen if name not in on_disk]:
                if signature(self.directory / f"{name}.npz") is not None:  # put by this server since the listing
                    continue
                self._seen.pop(name, None)  # (a refusal may be forgotten already)
                if self.bases.pop(name, None) is not None:
                    changed.append(name)
            if changed:  # room was freed
                self._forget_refusals()
            stale = {name: self._seen.get(name) for name, sig in on_disk.items() if self._seen.get(name) != sig}
        for name, before in stale.items():
            path = self.directory / f"{name}.npz"
            try:
                base = self._load(path)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is refused the same way
                if signature(path) == on_disk[name]:  # not replaced while we read it: refuse this version once
                    log.error("not serving the trie %r: %s cannot be read whole (%s: %s); upload it again",
                              name, path, type(exc).__name__, exc)
                    with self._lock:
                        self._seen[name] = on_disk[name]
                        self.bases.pop(name, None)
                continue
            if signature(path) != on_disk[name]:  # replaced while we read it: the next sync takes the new one
                continue
            with self._lock:
                if self._seen.get(name) != before:  # this server put or deleted it meanwhile: that stands
                    continue
                others = sum(b.nbytes for n, b in self.bases.items() if n != name)
                if others + base.nbytes > self.limits.max_total_bytes:
                    log.error("not serving the trie %r: with the others it is over --max-trie-bytes %d; "
                              "it is tried again when a base here is deleted", name, self.limits.max_total_bytes)
                    self._seen[name] = on_disk[name]  # refused: not read again every sync
                    self.bases.pop(name, None)
                    continue
                self.bases[name] = base
                self._seen[name] = on_disk[name]
                changed.append(name)
        return changed

    @staticmethod
    def check_name(name: str) -> None:
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"the name {name!r} is not allowed: use 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit")

    def put(self, base: KnowledgeBase) -> None:
        """Add or replace `base`, on disk first (atomically), then in memory."""
        with self._lock:
            others = sum(b.nbytes for n, b in self.bases.items() if n != base.name)
            if others + base.nbytes > self.limits.max_total_bytes:
                raise MemoryError(
                    f"the base takes {base.nbytes} bytes; with the others that is over the limit of "
                    f"{self.limits.max_total_bytes} bytes (--max-trie-bytes); delete a base or raise the limit"
                )
            if self.directory is not None:
                self._seen[base.name] = self._save(base)
            self.bases[base.name] = base

    def delete(self, name: str) -> bool:
        """Remove the base and its file; also the file of one this server refused (over --max-trie-bytes here,
        or unreadable), which another replica may serve. False when there was neither."""
        if not NAME_PATTERN.fullmatch(name):  # no base has it, and a NUL in it would fail the path
            return False
        with self._lock:
            served = self.bases.pop(name, None) is not None
            if self.directory is None:
                return served
            try:
                (self.directory / f"{name}.npz").unlink()
                on_disk = True
            except FileNotFoundError:
                on_disk = False
            self._seen.pop(name, None)
            if served:
                self._forget_refusals()
            return served or on_disk

    def _forget_refusals(self) -> None:
        """Room was freed: files refused before (over the limit, or unreadable) are read again at the next sync.
        Called under the lock."""
        for name in [name for name in self._seen if name not in self.bases]:
            del self._seen[name]

    def _save(self, base: KnowledgeBase) -> tuple:
        """Write `base` whole under its name; returns the file's signature."""
        meta = {"lead": base.lead, "tokens": base.num_tokens, "build_seconds": base.build_seconds}
        arrays = dict(
            offsets=base.trie.offsets, labels=base.trie.labels, end_nodes=base.trie.end_nodes, end_entries=base.trie.end_entries,
            key_blob=base.key_blob, key_offsets=base.key_offsets, value_blob=base.value_blob, value_offsets=base.value_offsets,
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        )
        checksum = np.frombuffer(checksum_of(arrays).encode(), dtype=np.uint8)
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=f"{socket.gethostname()}~{os.getpid()}~", suffix=".partial")
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, **arrays, sha256=checksum)
                file.flush()
                os.fsync(file.fileno())  # the bytes are on disk before the name points at them
            os.replace(temporary, self.directory / f"{base.name}.npz")
            directory = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory)  # and so is the rename
            finally:
                os.close(directory)
            return signature(self.directory / f"{base.name}.npz")
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @staticmethod
    def _load(path: Path) -> KnowledgeBase:
        with np.load(path) as data:
            arrays = {name: data[name] for name in ARRAYS}
            stored = data["sha256"].tobytes().decode() if "sha256" in data.files else None
        if stored is not None and stored != checksum_of(arrays):
            raise ValueError("its SHA-256 does not match the one saved with it")
        meta = json.loads(arrays["meta"].tobytes())
        trie = TokenTrie(arrays["offsets"], arrays["labels"], arrays["end_nodes"], arrays["end_entries"])
        return KnowledgeBase(path.stem, meta["lead"], trie, arrays["key_blob"], arrays["key_offsets"], arrays["value_blob"],
                             arrays["value_offsets"], meta["tokens"], meta["build_seconds"])


async def keep_in_sync(store: KnowledgeStore, period: float) -> None:
    """`store.sync()` every `period` seconds, in a worker thread, until cancelled."""
    while True:
        await asyncio.sleep(period)
        try:
            changed = await asyncio.to_thread(store.sync)
        except Exception:  # noqa: BLE001 - a failed scan (a volume gone for a moment) must not end the syncing
            log.exception("could not read %s; trying again in %.1f s", store.directory, period)
            continue
        if changed:
            log.info("tries changed on disk: %s", ", ".join(sorted(changed)))


def killed_save(path: Path) -> bool:
    """Whether the *.partial file `path` is left by a save that will never finish. Its name starts with the
    writer's host and pid: this host's file is stale unless a process other than this one (which is starting
    and saves nothing yet) still runs under that pid; another replica's file is stale once it is old."""
    host, pid, *_ = path.name.split("~") + ["", ""]  # "~" is in no host name
    if host == socket.gethostname() and pid.isdigit():
        return int(pid) == os.getpid() or not Path(f"/proc/{pid}").exists()
    try:
        return time.time() - path.stat().st_mtime > PARTIAL_MAX_AGE
    except FileNotFoundError:
        return False


def signature(path: Path) -> tuple | None:
    """What changes when a file is replaced or rewritten; None once it is gone."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def checksum_of(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the arrays of a saved base, in a fixed order, with their dtypes and shapes."""
    digest = hashlib.sha256()
    for name in ARRAYS:
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.data)
    return digest.hexdigest()
