"""The KV cache: one padded tensor per layer, one row ("slot") per running sequence.

Layout, per layer: keys and values of shape [slots, kv_heads, capacity, head_dim].
A sequence owns one slot from its admission to its end and writes the key and
value of its token at position p into column p of its row. A decode step runs
over the rows [0, R) where R is one past the highest slot in use, as views of
these tensors: no gather, no copy. Free rows inside that range cost a dummy
token each; slots are handed out lowest first, so holes fill quickly.

Both dimensions grow on demand (slots by doubling up to --max-num-seqs,
capacity in blocks of CAPACITY_BLOCK up to --max-model-len) and both shrink
when the rows or the longest sequence leave, so memory follows the batch
actually running: rows x longest sequence.

What the cache holds is decided by the position scheme (attention.py): with
plain and scaled RoPE the keys are stored *after* rotation, because they never
need to move again. ReRoPE rows store keys in the far form in `keys` and, in a
third plane `near_keys` that exists only once a ReRoPE sequence has come, the
same keys rotated by their own position (the near form), so no step has to
turn keys again. The cache itself does not care which.
"""

from __future__ import annotations

import torch

CAPACITY_BLOCK = 256


def round_up(value: int, block: int) -> int:
    return -(-value // block) * block


class SlotCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_slots = max_slots
        self.max_len = max_len
        self.dtype = dtype
        self.device = device
        self.free_slots: set[int] = set(range(max_slots))
        self.lengths = [0] * max_slots  # tokens a slot is known to need (for shrinking)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.near_keys: list[torch.Tensor] = []  # only with_near_keys: the near-form plane of ReRoPE rows
        self.with_near_keys = False
        self._resize(slots=0, capacity=0)

    def ensure_near_keys(self) -> None:
        """Add the near-form key plane (ReRoPE), shaped like the others, from now on."""
        if not self.with_near_keys:
            self.with_near_keys = True
            self.near_keys = [torch.zeros_like(k) for k in self.keys]

    @property
    def num_slots(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def rows_in_use(self) -> int:
        used = [slot for slot in range(self.max_slots) if slot not in self.free_slots]
        return max(used) + 1 if used else 0

    def bytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values + self.near_keys)

    def allocate(self) -> int:
        slot = min(self.free_slots)  # lowest first keeps the rows in use compact
        self.free_slots.remove(slot)
        self.lengths[slot] = 0
        if slot >= self.num_slots:
            self._resize(slots=min(self.max_slots, max(slot + 1, 2 * self.num_slots)), capacity=self.capacity)
        return slot

    def free(self, slot: int) -> None:
        self.free_slots.add(slot)
        self.lengths[slot] = 0
        # Shrink both dimensions once they are 4x what is in use: rows that a
        # wide request (NBCE, beam search) grew would otherwise stay, and the
        # next long prompt would grow every one of them to its length.
        rows, longest = max(self.rows_in_use, 1), max(self.lengths)
        slots = rows if self.num_slots > 4 * rows else self.num_slots
        capacity = round_up(max(longest, 1), CAPACITY_BLOCK) if self.capacity > 4 * max(longest, CAPACITY_BLOCK) else self.capacity
        if (slots, capacity) != (self.num_slots, self.capacity):
            self._resize(slots=slots, capacity=capacity)

    def reserve(self, slot: int, length: int) -> None:
        """Make room for `length` tokens in `slot`."""
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds the cache limit of {self.max_len}")
        self.lengths[slot] = max(self.lengths[slot], length)
        if length > self.capacity:
            grown = min(self.max_len, max(round_up(length, CAPACITY_BLOCK), 2 * self.capacity))
            self._resize(slots=self.num_slots, capacity=grown)

    def copy_rows(self, sources: list[int], destinations: list[int], length: int) -> None:
        """Positions [0, length) of each source row into its destination row (beam search).

        All sources are read before any destination is written, so rows may swap.
        """
        source, destination = torch.tensor(sources, device=self.device), torch.tensor(destinations, device=self.device)
        for planes in (self.keys, self.values, self.near_keys):
            for plane in planes:
                plane[destination, :, :length] = plane[source, :, :length]
        for slot in destinations:
            self.lengths[slot] = max(self.lengths[slot], length)

    def _resize(self, slots: int, capacity: int) -> None:
        shape = (slots, self.num_kv_heads, capacity, self.head_dim)
        keep_slots = min(slots, self.num_slots)
        keep_len = min(capacity, self.capacity)
        def resized(planes: list[torch.Tensor]) -> list[torch.Tensor]:
            grown = []
            for layer in range(self.num_layers):
                plane = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if planes and keep_slots and keep_len:
                    plane[:keep_slots, :, :keep_len] = planes[layer][:keep_slots, :, :keep_len]
                grown.append(plane)
            return grown

        self.keys, self.values = resized(self.keys), resized(self.values)
        if self.with_near_keys:
            self.near_keys = resized(self.near_keys)
