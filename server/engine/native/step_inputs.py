"""Every tensor one step needs, built once on the host and copied to the device in one transfer.

A step is rows: each decoding sequence adds one token, each prefill chunk adds
its tokens. The forward pass sees the step's tokens flat, in row order, and
everything it needs to place them comes from here: the token ids, their
positions, which row each belongs to, the cache slot each one's key and value
go to (slot mapping), where each row's queries start (cu_seqlens), each row's
length after the step, and the block table as one int32 tensor. After this,
no Python loop over rows runs in the forward pass; the per-row facts the
attention backend plans its calls with stay here as host lists.

The integer tensors travel as one packed int64 buffer (pinned on CUDA), so a
step costs one host-to-device copy and no sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longserve.server.engine.native.kv_cache import BLOCK_SIZE
from longserve.server.engine.native.loading import to_device
from longserve.server.engine.native.sequence import Sequence


@dataclass(frozen=True)
class StepRow:
    """One row of a step on the host: its sequence and the positions [first, end) it adds."""

    seq: Sequence
    first: int
    end: int

    @property
    def count(self) -> int:
        return self.end - self.first


@dataclass
class StepInputs:
    rows: list[StepRow]  # host facts, in the order of the flat tokens
    query_start: list[int]  # host cu_seqlens: row r's tokens are [query_start[r], query_start[r + 1])
    ids: torch.Tensor  # long [tokens]
    positions: torch.Tensor  # long [tokens]
    row_of_token: torch.Tensor  # long [tokens]
    slot_mapping: torch.Tensor  # long [tokens]: the pool slot each token's key and value are written to
    cu_seqlens: torch.Tensor  # int32 [rows + 1]
    seq_lens: torch.Tensor  # int32 [rows]: each row's length after the step
    block_table: torch.Tensor  # int32 [rows, widest table]; past a row's blocks: 0

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]

    @classmethod
    def build(cls, rows: list[StepRow], device: torch.device) -> "StepInputs":
        query_start = [0]
        for row in rows:
            query_start.append(query_start[-1] + row.count)
        tokens, width = query_start[-1], max(-(-row.end // BLOCK_SIZE) for row in rows)
        table = torch.zeros(len(rows), width, dtype=torch.int64)
        for index, row in enumerate(rows):
            blocks = row.seq.block_table[:width]
            table[index, : len(blocks)] = torch.tensor(blocks, dtype=torch.int64)
        ids = torch.tensor([token for row in rows for token in row.seq.all_ids[row.first : row.end]], dtype=torch.int64)
        counts = torch.tensor([row.count for row in rows])
        row_of_token = torch.repeat_interleave(torch.arange(len(rows)), counts)
        starts = torch.tensor([row.first for row in rows])
        positions = starts[row_of_token] + torch.arange(tokens) - torch.tensor(query_start[:-1])[row_of_token]
        slot_mapping = table[row_of_token, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
        seq_lens = torch.tensor([row.end for row in rows])
        parts = [ids, positions, row_of_token, slot_mapping, torch.tensor(query_start), seq_lens, table.flatten()]
        packed = to_device(torch.cat(parts), device)
        ids, positions, row_of_token, slot_mapping, cu, lens, flat_table = packed.split([len(part) for part in parts])
        return cls(rows, query_start, ids, positions, row_of_token, slot_mapping, cu.to(torch.int32), lens.to(torch.int32),
                   flat_table.view(len(rows), width).to(torch.int32))
