"""The heap's free pages, handed back to the system when the engine has been idle a second (engine.py)."""

from __future__ import annotations

import ctypes


def give_back_freed_memory() -> None:
    """glibc's malloc_trim. Without it the idle server kept the peak of a load, the freed logits, masks and
    request bodies, in its RSS. By hand: no library wraps it, and only glibc has it (elsewhere this does nothing)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
