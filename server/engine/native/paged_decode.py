"""Decode attention read in place from the paged cache (paged_decode.c), built with the machine's C compiler.

The kernel is plain C with OpenMP, no torch headers, so it builds in about a
second: at first use it is compiled for this CPU (-march=native) into
~/.cache/longserve/kernels (or $LONGSERVE_KERNEL_CACHE), named by a hash of
its source, the flags and the CPU's flags, and loaded with ctypes. It links
libgomp.so.1, which torch has already loaded, so it runs on torch's own
OpenMP threads. Where no compiler is found (or LONGSERVE_PAGED_DECODE=0), the
attention backend keeps its gather path, and the log says so once.
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

import torch

from longserve.server.engine.native.kv_quant import CacheFormat
from longserve.server.engine.native.loading import cpu_flags

log = logging.getLogger("longserve.engine")

SOURCE = Path(__file__).with_name("paged_decode.c")
HEADERS = [Path(__file__).with_name("paged_decode_avx512.h")]  # included by SOURCE: part of what a build is named by
# the reassociation vectorizes the dot products; no -ffast-math, whose finite-only maths would break -inf
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno",
         "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math"]
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
CODES = {torch.int8: 3, torch.float8_e4m3fn: 4, torch.float8_e5m2: 5}
SPLIT_KEYS = 512  # keys per unit of work: a long row is spread over the threads, each split merged by its log-sum-exp


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built here (the reason is logged once)."""
    if os.environ.get("LONGSERVE_PAGED_DECODE", "1") == "0":
        log.info("paged decode kernel off (LONGSERVE_PAGED_DECODE=0): decode attention gathers keys first")
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler found: decode attention gathers keys first (install gcc for the paged kernel)")
        return None
    source = b"".join(path.read_bytes() for path in [SOURCE, *HEADERS])
    built_for = " ".join([compiler, *FLAGS, *sorted(cpu_flags())])  # -march=native: a build per CPU
    digest = hashlib.sha256(source + built_for.encode()).hexdigest()[:16]
    folder = Path(os.environ.get("LONGSERVE_KERNEL_CACHE", Path.home() / ".cache" / "longserve" / "kernels"))
    built = folder / f"paged_decode-{digest}.so"
    if not built.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as work:  # built aside, then renamed: processes may race
                partial = Path(work) / built.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial), "-lm"], check=True,
                               capture_output=True, timeout=300)
                partial.replace(built)
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", b"") or b""
            log.warning("the paged decode kernel did not build (%s %s): decode attention gathers keys first",
                        error, detail.decode(errors="replace")[-500:])
            return None
    kernel = ctypes.CDLL(str(built))
    kernel.paged_decode.restype = ctypes.c_int
    kernel.paged_decode.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # q, planes, scales
        ctypes.c_int, ctypes.c_int,  # what the planes and scales hold
        ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int,  # slots, kv heads, group, dim
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,  # table, its width, items, their count
        ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,  # split, scale, out, lse, threads
    ]
    log.info("paged decode kernel: %s", built)
    return kernel


def kind_of(data: torch.Tensor, cache: CacheFormat) -> int:
    return CODES[cache.codes] if cache.quantized else KINDS[data.dtype]


def supported(device: torch.device) -> bool:
    """Whether the kernel serves this device: the CPU, where it built."""
    return device.type == "cpu" and library() is not None


def paged_decode(q: torch.Tensor, keys, values, table: torch.Tensor, items: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, heads, d] (one query per item); keys, values: kv_cache.Plane; table int32 [rows, width]; items int32
    [n, 3]: (table row, k0, k1). Returns out [n, heads, d] and lse [n, heads], float32."""
    kernel = library()
    n, heads, dim = q.shape
    num_kv_heads = keys.data.shape[0]  # planes are [kv_heads, slots, d]
    q = q.float().contiguous()
    out = torch.empty(n, heads, dim)
    lse = torch.empty(n, heads)
    scale_kind = KINDS[keys.scales.dtype] if keys.scales is not None else 0
    status = kernel.paged_decode(
        q.data_ptr(), keys.data.data_ptr(), None if keys.scales is None else keys.scales.data_ptr(),
        values.data.data_ptr(), None if values.scales is None else values.scales.data_ptr(),
        kind_of(keys.data, keys.cache), scale_kind,
        keys.data.shape[1], num_kv_heads, heads // num_kv_heads, dim,
        table.data_ptr(), table.shape[1], items.data_ptr(), n,
        SPLIT_KEYS, scale, out.data_ptr(), lse.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"paged decode kernel failed ({status}) for {heads} heads, {num_kv_heads} KV heads, d {dim}")
    return out, lse
