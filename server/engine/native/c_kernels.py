"""The engine's C kernels (paged_decode.c, elementwise.c, bf16_matmul.c, argmax.c), built with the machine's C compiler into one library.

They are plain C with OpenMP, no torch headers, so they build in about a
second: at first use they are compiled for this CPU (-march=native) into
~/.cache/longserve/kernels (or $LONGSERVE_KERNEL_CACHE), named by a hash of
their sources, the flags and the CPU's flags, and loaded with ctypes. The
library links libgomp.so.1, which torch has already loaded, so it runs on
torch's own OpenMP threads. Where no compiler is found, or the build fails,
library() is None, the log says why once, and each caller keeps its torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from longserve.server.engine.native.loading import cpu_flags

log = logging.getLogger("longserve.engine")

HERE = Path(__file__).parent
SOURCES = [HERE / "paged_decode.c", HERE / "elementwise.c", HERE / "bf16_matmul.c", HERE / "argmax.c"]
HEADERS = [HERE / "paged_decode_avx512.h", HERE / "bf16.h"]  # included by sources: part of what a build is named by
# the reassociation vectorizes the dot products; no -ffast-math, whose finite-only maths would break -inf
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno",
         "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math"]

P, INT, INT64, FLOAT = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
SIGNATURES = {
    "paged_decode": [
        P, INT, P, P, P, P,  # q, what it and out hold, planes, scales
        INT, INT,  # what the planes and scales hold
        INT64, INT, INT, INT,  # slots, kv heads, group, dim
        P, INT64, P, INT,  # table, its width, items, their count
        INT, FLOAT, P, P, INT,  # split, scale, out, lse, threads
    ],
    "add_rms_norm": [P, P, P, P, INT, INT, INT, FLOAT, INT],  # hidden, delta, weight, out, kind, rows, dim, eps, threads
    "silu_mul": [P, P, INT, INT, INT, INT],  # gate_up, out, kind, rows, dim, threads
    "rotate": [P, INT64, INT64, P, P, P, INT, INT, INT, INT, INT],  # x, its strides, cos, sin, out, kind, shape, threads
    "write_keys_and_values": [P, P, INT64, P, P, INT64, INT64, P, INT64, INT64, INT, INT, INT, INT],  # planes, slots, k, v
    "bf16_packed_elements": [INT, INT],  # n, k
    "bf16_pack_weight": [P, P, INT, INT],  # weight, packed, n, k
    "bf16_matmul": [P, INT64, P, P, P, INT, INT, INT, INT],  # x, its row stride, packed, bias, y, m, n, k, threads
    "bf16_matmul_built": [],
    "argmax_rows": [P, INT64, INT, INT, P, INT],  # logits, their row stride, rows, columns, out, threads
}
RESULTS = {"paged_decode": INT, "write_keys_and_values": INT, "bf16_matmul": INT, "bf16_matmul_built": INT,
           "bf16_packed_elements": INT64}  # the others return nothing


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built here (the reason is logged once)."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler found: the engine runs torch's ops where its C kernels would run "
                    "(decode attention gathers keys first; install gcc for the kernels)")
        return None
    source = b"".join(path.read_bytes() for path in [*SOURCES, *HEADERS])
    built_for = " ".join([compiler, *FLAGS, *sorted(cpu_flags())])  # -march=native: a build per CPU
    digest = hashlib.sha256(source + built_for.encode()).hexdigest()[:16]
    folder = Path(os.environ.get("LONGSERVE_KERNEL_CACHE", Path.home() / ".cache" / "longserve" / "kernels"))
    built = folder / f"kernels-{digest}.so"
    if not built.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as work:  # built aside, then renamed: processes may race
                partial = Path(work) / built.name
                build(compiler, FLAGS, partial)
                partial.replace(built)
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", b"") or b""
            log.warning("the C kernels did not build (%s %s): the engine runs torch's ops in their place",
                        error, detail.decode(errors="replace")[-500:])
            return None
    log.info("C kernels: %s", built)
    return load(built)


def build(compiler: str, flags: list[str], target: Path) -> None:
    """SOURCES compiled with `flags` into the shared library `target` (CalledProcessError holds the compiler's say)."""
    subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(target), "-lm"], check=True, capture_output=True,
                   timeout=300)


def load(built: Path) -> ctypes.CDLL:
    """A built library, each function's arguments and result declared."""
    kernels = ctypes.CDLL(str(built))
    for name, arguments in SIGNATURES.items():
        function = getattr(kernels, name)
        function.argtypes = arguments
        function.restype = RESULTS.get(name)
    return kernels
