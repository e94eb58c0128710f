"""What a failed step means: one request's fault, or the engine's.

Most exceptions in a step come from what one request asked for (a parameter
no check foresaw, a state a patch did not expect). Those fail the requests
whose rows were in the failing piece of work, and the engine goes on; when a
whole batch fails, each request's rows are run alone to find the culprit.
Some faults leave the engine itself unusable: out of memory (the cache may
be half-written) and CUDA errors (the context is lost for every request).
Those stop the engine, and the server exits so a supervisor restarts it.
"""

from __future__ import annotations

import torch

from server.engine.native.sequence import Sequence

FATAL_WORDS = ("out of memory", "not enough memory", "cuda error", "cublas", "cudnn", "device-side assert")


def is_fatal(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: not a request's doing
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(word in text for word in FATAL_WORDS)


def by_request(seqs: list[Sequence]) -> list[list[Sequence]]:
    """`seqs` split by request, in first-seen order: a request's rows (NBCE, beams, n > 1) stay together."""
    groups: dict[str, list[Sequence]] = {}
    for seq in seqs:
        groups.setdefault(seq.request_id, []).append(seq)
    return list(groups.values())
