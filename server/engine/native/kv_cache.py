"""The KV cache: a fixed pool of blocks, allocated once, sized by a memory budget.

Per layer, keys and values are one tensor of shape [kv_heads, num_blocks *
BLOCK_SIZE, head_dim]: token slot `block * BLOCK_SIZE + offset` of each KV
head. Which blocks a sequence holds is block_manager.py's business; this file
only allocates, zeroes and copies. Heads first, because attention reads them
so: a gather of a step's slots (attention_backend.py) comes out as [kv_heads,
tokens, head_dim] with every head's keys contiguous, ready for the kernels,
and whole blocks move as one piece (32 decode rows x 320 keys: 249 us in
bf16 against 577 us for slots-first planes gathered and permuted; `make
bench-kernels`, docs/engine.md). A long prompt's consecutive blocks are a
plain slice, no copy at all.

What the cache holds is decided by the position scheme (attention.py): with
plain and scaled RoPE the keys are stored *after* rotation, because they never
need to move again. ReRoPE rows store keys in the far form in `keys` and, in a
third plane `near_keys`, the same keys rotated by their own position (the near
form), so no step has to turn keys again. The budget pays for the third plane
whenever a sequence may need it: the server's --position is clipped, or a
request may ask for a clipped position (--request-rerope, the default). On a
server that is not clipped the plane is only added at the first such request,
inside the budget all the same: a third of it waits for the plane (on CPU as
unbacked pages, so it costs nothing until then). --no-request-rerope gives
that third to tokens and refuses clipped requests.

With --kv-cache-dtype int8 or fp8 each plane holds one-byte codes and, beside
them, one scale per (token, KV head) (kv_quant.py); a Plane keeps the two and
quantizes on write. Both have the slot axis second, so blocks move, zero and
copy the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from longserve.patches.model_facts import ModelFacts
from longserve.server.engine.native import elementwise
from longserve.server.engine.native.kv_quant import FORMATS, CacheFormat, code_bytes, quantize, scale_dtype

log = logging.getLogger("longserve.engine")

BLOCK_SIZE = 16


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, planes: int,
                    cache: CacheFormat = FORMATS["auto"]) -> int:
    return num_layers * num_kv_heads * planes * code_bytes(cache, dtype, head_dim)


@dataclass
class Plane:
    """One layer's keys, values or near keys: [kv_heads, slots, d] in the model's dtype, or codes of an 8-bit
    cache with their scales [kv_heads, slots]."""

    data: torch.Tensor
    scales: torch.Tensor | None
    cache: CacheFormat

    def tensors(self) -> list[torch.Tensor]:
        return [self.data] if self.scales is None else [self.data, self.scales]

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """x [tokens, kv_heads, d] into `slots`, quantized where the cache is."""
        if self.scales is None:
            self.data.index_copy_(1, slots, x.transpose(0, 1))
            return
        codes, scales = quantize(x.transpose(0, 1), self.cache, self.scales.dtype)
        self.store(slots, codes, scales)

    def store(self, slots: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.data.index_copy_(1, slots, codes)
        self.scales.index_copy_(1, slots, scales)


def write_keys_and_values(keys: Plane, values: Plane, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """A step's k and v [tokens, kv_heads, d] into their planes; quantized as one tensor where the cache is (half
    the small ops of two: a one-row decode step is mostly such ops)."""
    if keys.scales is None:
        if not elementwise.write_keys_and_values(keys.data, values.data, slots, k, v):
            keys.write(slots, k)
            values.write(slots, v)
        return
    codes, scales = quantize(torch.stack([k, v]).transpose(1, 2), keys.cache, keys.scales.dtype)
    keys.store(slots, codes[0], scales[0])
    values.store(slots, codes[1], scales[1])


def default_budget_bytes(device: torch.device, activation_bytes: int, utilization: float) -> int:
    """With the model loaded and its activations measured (memory_profile.py): on CUDA, `utilization` of the
    device's memory less what is in use and what a step's activations take; on CPU, half of what is still
    available once the activations are set aside."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return cuda_budget(free, total, activation_bytes, utilization)
    available = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    return cpu_budget(available, activation_bytes)


def cuda_budget(free: int, total: int, activation_bytes: int, utilization: float) -> int:
    return max(int(total * utilization) - (total - free) - activation_bytes, 0)


def cpu_budget(available: int, activation_bytes: int) -> int:
    return max((available - activation_bytes) // 2, 64 << 20)


class KvPool:
    """On CPU the planes start unbacked (torch.empty: the OS hands out pages on first touch) and blocks are
    zeroed in runs as they are first handed out, so resident memory follows the blocks ever used, up to the
    budget. On CUDA the whole pool is allocated and zeroed at once, as vLLM does."""

    ZERO_RUN = 256  # blocks zeroed at a time on first use

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, dtype: torch.dtype,
                 device: torch.device, near_keys: bool, budgets_near_keys: bool | None = None,
                 cache: CacheFormat = FORMATS["auto"]):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.cache = cache
        self.budgets_near_keys = near_keys if budgets_near_keys is None else budgets_near_keys  # room left for the plane
        self.num_blocks = num_blocks
        self.dtype, self.device = dtype, device
        self.ready = 0  # blocks [0, ready) are zeroed or written
        self.keys, self.values, self.near_keys = self._planes(), self._planes(), []
        self.with_near_keys = False
        if near_keys:
            self.ensure_near_keys()
        if device.type == "cuda":
            self.prepare(num_blocks - 1)

    def _planes(self) -> list[Plane]:
        shape = (self.num_kv_heads, self.num_blocks * BLOCK_SIZE, self.head_dim)
        quantized = self.cache.quantized
        return [Plane(torch.empty(shape, dtype=self.cache.stored if quantized else self.dtype, device=self.device),
                      torch.empty(shape[:2], dtype=scale_dtype(self.dtype), device=self.device) if quantized else None,
                      self.cache)
                for _ in range(self.num_layers)]

    def _tensors(self) -> list[torch.Tensor]:
        return [tensor for plane in self.keys + self.values + self.near_keys for tensor in plane.tensors()]

    def ensure_near_keys(self) -> None:
        """Add the near-form key plane (ReRoPE). A server started without a clipped --position adds it at its
        first ReRoPE request, into the room its budget kept for it."""
        if self.with_near_keys:
            return
        if not self.budgets_near_keys:  # the engine refuses such requests first (--no-request-rerope)
            raise RuntimeError("the KV cache has no room for a near-key plane")
        log.info("a clipped request: the KV cache adds its near-key plane, %.2f GiB, inside --kv-cache-memory",
                 self.bytes_allocated() / 2 / 2**30)
        with torch.inference_mode(False):  # called in the runner's inference-mode step: plain tensors, which prepare() zeroes later
            self.near_keys = self._planes()
        for plane in self.near_keys:
            for tensor in plane.tensors():
                tensor[:, : self.ready * BLOCK_SIZE].zero_()
        self.with_near_keys = True

    def prepare(self, block_id: int) -> None:
        """Zero the never-used blocks up to `block_id`, before it is handed out."""
        if block_id < self.ready:
            return
        ready = min(self.num_blocks, max(block_id + 1, self.ready + self.ZERO_RUN))
        for tensor in self._tensors():
            tensor[:, self.ready * BLOCK_SIZE : ready * BLOCK_SIZE].zero_()
        self.ready = ready

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * BLOCK_SIZE

    def bytes_per_block(self) -> int:
        planes = 3 if self.near_keys else 2
        return BLOCK_SIZE * bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, planes, self.cache)

    def bytes_allocated(self) -> int:
        """What the pool may take: every plane of every block."""
        return self.bytes_per_block() * self.num_blocks

    def copy_block(self, source: int, destination: int) -> None:
        src = slice(source * BLOCK_SIZE, (source + 1) * BLOCK_SIZE)
        dst = slice(destination * BLOCK_SIZE, (destination + 1) * BLOCK_SIZE)
        for tensor in self._tensors():
            tensor[:, dst] = tensor[:, src]


def sized_pool(facts: ModelFacts, dtype: torch.dtype, device: torch.device, memory_gib: float | None, max_model_len: int,
               near_keys: bool, budget_near_keys: bool = False, activation_bytes: int = 0,
               utilization: float = 0.9, cache: CacheFormat = FORMATS["auto"]) -> KvPool:
    """The block pool, sized by --kv-cache-memory (or default_budget_bytes); says how many tokens fit.
    near_keys: the plane from the start; budget_near_keys: room kept for it, added at the first clipped request."""
    budgeted = near_keys or budget_near_keys
    waiting = budget_near_keys and not near_keys  # a third kept, the plane not made yet
    token_bytes = bytes_per_token(facts.num_layers, facts.num_kv_heads, facts.head_dim, dtype, 3 if budgeted else 2, cache)
    budget = int(memory_gib * 2**30) if memory_gib else default_budget_bytes(device, activation_bytes, utilization)
    num_blocks = budget // (token_bytes * BLOCK_SIZE)
    if num_blocks * BLOCK_SIZE < max_model_len:
        kept = ", or pass --no-request-rerope (a third is kept for clipped requests)" if waiting else ""
        raise ValueError(
            f"--kv-cache-memory {budget / 2**30:.2f} GiB holds {num_blocks * BLOCK_SIZE} tokens, fewer than one sequence "
            f"of --max-model-len {max_model_len}; raise --kv-cache-memory or lower --max-model-len{kept}"
        )
    pool = KvPool(facts.num_layers, facts.num_kv_heads, facts.head_dim, num_blocks, dtype, device, near_keys=near_keys,
                  budgets_near_keys=budgeted, cache=cache)
    total = num_blocks * BLOCK_SIZE * token_bytes
    kept = f" ({total / 3 / 2**30:.2f} GiB of it kept for the near keys of clipped requests)" if waiting else ""
    log.info("KV cache: %.2f GiB%s in %s (%d bytes a token), %d blocks of %d: %d tokens fit (%.1f sequences of "
             "--max-model-len %d)", total / 2**30, kept, cache.describe(), token_bytes, num_blocks, BLOCK_SIZE,
             pool.num_tokens, pool.num_tokens / max_model_len, max_model_len)
    return pool

