"""Decode attention read in place from the paged cache (paged_decode.c, built by c_kernels.py).

Where the kernels did not build (no C compiler), or with
LONGSERVE_PAGED_DECODE=0, the attention backend keeps its gather path, and
the log says so once.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

from longserve.server.engine.native import c_kernels
from longserve.server.engine.native.kv_quant import CacheFormat

log = logging.getLogger("longserve.engine")

KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
CODES = {torch.int8: 3, torch.float8_e4m3fn: 4, torch.float8_e5m2: 5}
IO_KINDS = {torch.float32: 0, torch.bfloat16: 1}  # what the query and output may hold
SPLIT_KEYS = 512  # keys per unit of work: a long row is spread over the threads, each split merged by its log-sum-exp


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels where decode attention may use them, else None (the reason is logged once)."""
    if os.environ.get("LONGSERVE_PAGED_DECODE", "1") == "0":
        log.info("paged decode kernel off (LONGSERVE_PAGED_DECODE=0): decode attention gathers keys first")
        return None
    return c_kernels.library()


def kind_of(data: torch.Tensor, cache: CacheFormat) -> int:
    return CODES[cache.codes] if cache.quantized else KINDS[data.dtype]


def supported(device: torch.device) -> bool:
    """Whether the kernel serves this device: the CPU, where it built."""
    return device.type == "cpu" and library() is not None


def paged_decode(q: torch.Tensor, keys, values, table: torch.Tensor, items: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, heads, d] (one query per item); keys, values: kv_cache.Plane; table int32 [rows, width]; items int32
    [n, 3]: (table row, k0, k1). Returns out [n, heads, d], in q's dtype where that is bfloat16 or float32 (else
    float32), and lse [n, heads] in float32. The kernel reads and writes bfloat16 itself: converting the query and
    the output here took about 60 copies a step."""
    kernel = library()
    n, heads, dim = q.shape
    num_kv_heads = keys.data.shape[0]  # planes are [kv_heads, slots, d]
    q = (q if q.dtype in IO_KINDS else q.float()).contiguous()
    out = torch.empty(n, heads, dim, dtype=q.dtype)
    lse = torch.empty(n, heads)
    scale_kind = KINDS[keys.scales.dtype] if keys.scales is not None else 0
    status = kernel.paged_decode(
        q.data_ptr(), IO_KINDS[q.dtype], keys.data.data_ptr(), None if keys.scales is None else keys.scales.data_ptr(),
        values.data.data_ptr(), None if values.scales is None else values.scales.data_ptr(),
        kind_of(keys.data, keys.cache), scale_kind,
        keys.data.shape[1], num_kv_heads, heads // num_kv_heads, dim,
        table.data_ptr(), table.shape[1], items.data_ptr(), n,
        SPLIT_KEYS, scale, out.data_ptr(), lse.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"paged decode kernel failed ({status}) for {heads} heads, {num_kv_heads} KV heads, d {dim}")
    return out, lse
