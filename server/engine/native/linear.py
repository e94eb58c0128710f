"""The model's linear layers as the engine runs them.

On CPU in bfloat16, each weight is copied once into a layout made for the
few rows of a decode step, and run by one of two kernels:

- Bf16Linear, where the CPU has AVX512-BF16: bf16_matmul.c, written here.
  A decode step is a chain of matrix-vector products, and oneDNN reads the
  weights at about half the memory's speed there. The bundled model's 121
  weights, 2 threads, AMD EPYC without AMX (`make bench-kernels`,
  docs/engine.md): 9.6 against oneDNN's 13.5 ms at one row, 8.2 against
  14.6 at 8, 25.5 against 29.2 at 32; about the same at 512. On a CPU with
  AMX, oneDNN's AMX kernels run calls of more than SMALL_ROWS rows (prefill
  chunks), so the weight is held in both layouts there.
- PackedLinear elsewhere: oneDNN's blocked layout (the layout
  torch.compile's CPU backend prepacks weights into; the ops are torch's
  own, called eagerly). On the Xeon of docs/engine.md, 1 / 8 / 32 rows: 27.5
  / 31.1 / 32.0 ms plain F.linear against 20.2 / 20.8 / 24.0 packed.

In float32 the packed layout was slower for one row on that Xeon (33.2
against 26.4 ms; on the AMD EPYC it is faster), so float32, CUDA and any
build without oneDNN keep F.linear. With
LONGSERVE_BF16_MATMUL=0 the engine uses oneDNN where it would use
bf16_matmul.c.

Packing makes a second copy of a weight; where the engine loaded the model
itself, the plain copy is released (the model is the engine's alone).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from longserve.server.engine.native import c_kernels
from longserve.server.engine.native.loading import cpu_flags

log = logging.getLogger("longserve.engine")

PACKED_ROWS_HINT = 32  # the batch size oneDNN tunes the blocked layout for; any row count runs
SMALL_ROWS = 16  # with AMX, calls of more rows go to oneDNN (AMX multiplies 16-row tiles)


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PackedLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_ROWS_HINT)
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class Bf16Linear:
    """bf16_matmul.c over its own packed copy of the weight; `many_rows`, where given, runs calls of more
    than SMALL_ROWS rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, many_rows: PackedLinear | None = None):
        if weight.dtype != torch.bfloat16 or (bias is not None and bias.dtype != torch.bfloat16):
            raise TypeError(f"Bf16Linear packs bfloat16 weights, not {weight.dtype}")
        self.out_features, self.in_features = weight.shape
        kernels = c_kernels.library()
        self.packed = weight.new_empty(kernels.bf16_packed_elements(self.out_features, self.in_features))
        kernels.bf16_pack_weight(weight.contiguous().data_ptr(), self.packed.data_ptr(), self.out_features,
                                 self.in_features)
        self.matmul = kernels.bf16_matmul
        self.bias = None if bias is None else bias.contiguous()
        self.many_rows = many_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.device.type != "cpu":  # the kernel reads raw bf16 memory
            raise TypeError(f"Bf16Linear takes bfloat16 CPU tensors, not {x.dtype} on {x.device}")
        rows = x.numel() // self.in_features
        if self.many_rows is not None and rows > SMALL_ROWS:
            return self.many_rows(x)
        flat = x.reshape(rows, self.in_features)
        flat = flat if flat.stride(-1) == 1 else flat.contiguous()
        y = x.new_empty(rows, self.out_features)
        self.matmul(flat.data_ptr(), flat.stride(0), self.packed.data_ptr(),
                    None if self.bias is None else self.bias.data_ptr(), y.data_ptr(), rows, self.out_features,
                    self.in_features, torch.get_num_threads())
        return y.view(*x.shape[:-1], self.out_features)


def runs_bf16_matmul(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether Bf16Linear runs here: CPU, bfloat16, the kernels built for a CPU with AVX512-BF16, not switched off."""
    if device.type != "cpu" or dtype != torch.bfloat16 or os.environ.get("LONGSERVE_BF16_MATMUL", "1") == "0":
        return False
    kernels = c_kernels.library()
    return kernels is not None and bool(kernels.bf16_matmul_built())


def packs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights are packed here: CPU, bfloat16, and a torch with oneDNN that packs a probe weight."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = PackedLinear(torch.ones(4, 4, dtype=dtype), None)
        return bool(torch.equal(probe(torch.ones(2, 4, dtype=dtype)), torch.full((2, 4), 4.0, dtype=dtype)))
    except RuntimeError as exc:
        log.info("bf16 weights stay unpacked: %s", exc)
        return False


def linear_maker(device: torch.device, dtype: torch.dtype):
    """Bf16Linear (beside oneDNN where AMX runs prefill), PackedLinear or Linear, whichever runs faster here."""
    packed = packs(device, dtype)
    if runs_bf16_matmul(device, dtype):
        if packed and "amx_bf16" in cpu_flags():
            return lambda weight, bias: Bf16Linear(weight, bias, many_rows=PackedLinear(weight, bias))
        return Bf16Linear
    return PackedLinear if packed else Linear
