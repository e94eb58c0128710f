"""The KV cache: one padded tensor per layer, one row ("slot") per running sequence.

Layout, per layer: keys and values of shape [slots, kv_heads, capacity, head_dim].
A sequence owns one slot from its admission to its end and writes the key and
value of its token at position p into column p of its row. A decode step runs
over the rows [0, R) where R is one past the highest slot in use, as views of
these tensors: no gather, no copy. Free rows inside that range cost a dummy
token each; slots are handed out lowest first, so holes fill quickly.

Both dimensions grow on demand (slots by doubling up to --max-num-seqs,
capacity in blocks of CAPACITY_BLOCK up to --max-model-len) and capacity
shrinks when the longest sequence leaves, so memory follows the batch actually
running: rows x longest sequence.

What the cache holds is decided by the position scheme (model_runner.py):
with plain RoPE the keys are stored *after* rotation, because they never need
to move again. Schemes that rotate at attention time (ReRoPE, consistent
dynamic scaling) store keys before rotation and rotate the slice they read;
the cache itself does not care which.
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
        self._resize(slots=0, capacity=0)

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
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

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
        longest = max(self.lengths)
        if self.capacity > 4 * max(longest, CAPACITY_BLOCK):
            self._resize(slots=self.num_slots, capacity=round_up(max(longest, 1), CAPACITY_BLOCK))

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
        for layer in range(self.num_layers):
            self.keys[layer][destination, :, :length] = self.keys[layer][source, :, :length]
            self.values[layer][destination, :, :length] = self.values[layer][source, :, :length]
        for slot in destinations:
            self.lengths[slot] = max(self.lengths[slot], length)

    def _resize(self, slots: int, capacity: int) -> None:
        shape = (slots, self.num_kv_heads, capacity, self.head_dim)
        keep_slots = min(slots, self.num_slots)
        keep_len = min(capacity, self.capacity)
        new_keys, new_values = [], []
        for layer in range(self.num_layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.keys and keep_slots and keep_len:
                k[:keep_slots, :, :keep_len] = self.keys[layer][:keep_slots, :, :keep_len]
                v[:keep_slots, :, :keep_len] = self.values[layer][:keep_slots, :, :keep_len]
            new_keys.append(k)
            new_values.append(v)
        self.keys, self.values = new_keys, new_values
