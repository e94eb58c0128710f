"""The model's linear layers as the engine runs them.

On CPU in bfloat16, each weight is reordered once into oneDNN's blocked layout
(the layout torch.compile's CPU backend prepacks weights into; the ops are
torch's own, called eagerly). A decode step is a chain of matrix-vector
products, and bf16 F.linear is slow there. The bundled model's 121 weights at
1 / 8 / 32 rows, 2 threads (`make bench-kernels`, docs/engine.md): 27.5 /
31.1 / 32.0 ms plain against 20.2 / 20.8 / 24.0 packed; torch.compile with
inductor's freezing gives what packing gives. In float32 the packed layout is
slower for one row (33.2 against 26.4 ms), so float32, CUDA and any build
without oneDNN keep F.linear.

Packing makes a second copy of a weight; where the engine loaded the model
itself, the plain copy is released (the model is the engine's alone).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("longserve.engine")

PACKED_ROWS_HINT = 32  # the batch size oneDNN tunes the blocked layout for; any row count runs


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
    """Linear or PackedLinear, whichever runs faster here."""
    return PackedLinear if packs(device, dtype) else Linear
