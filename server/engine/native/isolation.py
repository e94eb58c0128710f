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

from longserve.server.engine.native.scheduler import Step

FATAL_WORDS = ("out of memory", "not enough memory", "cuda error", "cublas", "cudnn", "device-side assert")


def is_fatal(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: not a request's doing
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(word in text for word in FATAL_WORDS)


def by_request(step: Step) -> list[Step]:
    """`step` split by request, in first-seen order: a request's rows (NBCE, beams, n > 1) stay together."""
    parts: dict[str, Step] = {}
    for seq in step.decode:
        parts.setdefault(seq.request_id, Step()).decode.append(seq)
    for chunk in step.chunks:
        parts.setdefault(chunk.seq.request_id, Step()).chunks.append(chunk)
    return list(parts.values())
