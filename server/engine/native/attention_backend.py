"""The attention backend: one call per layer per key plane over a whole step, returning output and log-sum-exp.

A call is planned once per step and run by every layer. Its rows are any of
the step's rows, decode rows and prefill chunks together, each with a band of
relative distances it may see, lo <= i - j < hi: plain rows [0, inf), the near
form of a clipped row [0, w), its far form [w, inf); a DCA row's bands count
chunks instead of tokens (RowBand.unit). Rows with different windows and
chunk sizes share one call; the bounds are per row.

How this backend runs a call:
- each row reads only the keys its band can reach: a ReRoPE row's near call
  reads its last w keys, not its whole length;
- on CPU, one-query rows (decode) go to the paged decode kernel
  (paged_decode.py) in one call: it reads each row's blocks in place through
  the block table, whatever the cache's format, so nothing is gathered or
  padded (32 rows x 2,048 keys, bf16: 6.3 ms against 8.3 for the gather and
  flash kernel below; from int8, 5.4 ms against 12.9; make bench-kernels,
  docs/engine.md);
- elsewhere (or with LONGSERVE_PAGED_DECODE=0) one-query rows are sorted by
  how many blocks they read and grouped
  so that a group, padded to its longest row, holds at most a quarter more
  blocks than its rows read (or is small): memory follows the step's tokens,
  never rows x longest, and a 16k-token row beside 31 short ones is a group
  of its own;
- a multi-query row (a prefill chunk) is a group of its own, with a mask only
  where its band cuts through the keys (none for a first chunk: causal);
- keys are gathered with index_select from the pool through the block table
  (a slice, no copy, where one row's blocks are consecutive), heads first,
  and one-query groups run with the KV heads as the batch: every matmul reads
  contiguous keys (kv_cache.py says what that is worth).

Kernels, chosen by measurement (docs/engine.md): on CPU, one-query groups run
SDPA's own flash kernel, which returns the log-sum-exp too (32 rows x 320
keys, 2 threads: 0.63 ms in bf16 against 0.74 for two matmuls with a float32
softmax, 7.3 for public SDPA with a mask, 1.0 for compiled FlexAttention;
0.61 ms in float32 against 0.76, 1.09 and 0.81). Prefill chunks run it too,
with an additive mask (512 queries over 1,024 keys: 2.20 ms in bf16 against
2.59 for public SDPA with a bool mask). Off CPU: SDPA, or, for the
log-sum-exp, the scores made explicit, a block of query rows at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longserve.patches.rerope import flash_cpu
from longserve.server.engine.native import paged_decode
from longserve.server.engine.native.kv_cache import BLOCK_SIZE, Plane
from longserve.server.engine.native.kv_quant import dequantize
from longserve.server.engine.native.loading import to_device
from longserve.server.engine.native.step_inputs import StepInputs

UNBOUNDED = 1 << 62  # hi for a band with no upper distance
PADDING = 1.25  # a group of one-query rows gathers at most this many times the blocks its rows read...
SMALL_GROUP_KEYS = 256  # ...or is this short
EXPLICIT_QUERY_ROWS = 256  # query rows per block on the explicit path: bounds its score memory


@dataclass(frozen=True)
class RowBand:
    """One row of a call: the step row, and the distances its queries see, lo <= i // unit - j // unit < hi,
    with j <= i. In tokens (unit 1: lo <= i - j < hi) for plain and clipped rows; in chunks for DCA rows
    (unit cl: the same chunk [0, 1), the chunk before [1, 2), earlier ones [2, inf))."""

    row: int
    lo: int
    hi: int
    unit: int = 1


@dataclass
class Group:
    """Rows run by one kernel call: several one-query rows, or one multi-query row."""

    queries: torch.Tensor | slice  # the call's query tokens: long [rows] for one-query rows, a slice for one row
    keys: torch.Tensor | slice  # a slice of pool slots, or the rows of whole blocks to gather (_block_rows)
    rows: int
    width: int  # keys per row, padded
    visible: torch.Tensor | None  # bool [rows, 1, queries, width]; None: every key for every query
    causal: bool  # one row whose queries are all its keys: SDPA's causal mask
    empty: torch.Tensor | None  # bool [queries]: queries that see no key (their output 0, log-sum-exp -inf)
    into: torch.Tensor | slice  # where its outputs go among the call's tokens
    skip: int = 0  # one row gathered by whole blocks: where its first key sits in them
    _additive: torch.Tensor | None = None

    def additive(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self.visible is not None and self._additive is None:
            zeros = torch.zeros(self.visible.shape, dtype=dtype, device=self.visible.device)
            self._additive = zeros.masked_fill_(~self.visible, float("-inf"))
        return self._additive


@dataclass
class PagedRows:
    """One-query rows read in place by the paged decode kernel (paged_decode.py): no gather, no padding."""

    queries: torch.Tensor  # long [n]: their step tokens
    items: torch.Tensor  # int32 [n, 3]: (step row, k0, k1)
    into: torch.Tensor  # long [n]: where their outputs go among the call's tokens
    table: torch.Tensor  # the step's block table, int32 [rows, width]
    every_token: bool = False  # they are the whole call, and the call is the step's tokens in order: no copies


@dataclass
class CallPlan:
    tokens: torch.Tensor | None  # long [call tokens]: the step tokens this call answers; None: all, in order
    count: int
    groups: list[Group]
    need_lse: bool
    paged: PagedRows | None = None


def key_span(first: int, end: int, band: RowBand) -> tuple[int, int]:
    """The keys [k0, k1) that queries at positions [first, end) can see within `band`."""
    if band.unit == 1:
        return max(0, first - band.hi + 1), max(0, end - band.lo)
    first_chunk, last_chunk = first // band.unit, (end - 1) // band.unit
    return max(0, (first_chunk - band.hi + 1) * band.unit), max(0, min(end, (last_chunk - band.lo + 1) * band.unit))


def consecutive(block_table: list[int], k0: int, k1: int) -> bool:
    blocks = block_table[k0 // BLOCK_SIZE : (k1 - 1) // BLOCK_SIZE + 1]
    return blocks == list(range(blocks[0], blocks[0] + len(blocks)))


class GatherBackend:
    def __init__(self, num_heads: int, num_kv_heads: int, scale: float, num_blocks: int, device: torch.device,
                 paged: bool | None = None):
        """paged: one-query rows through the paged decode kernel; None: wherever it serves (CPU, a compiler)."""
        self.num_heads, self.num_kv_heads, self.scale, self.num_blocks = num_heads, num_kv_heads, scale, num_blocks
        self.device = device
        self.paged = paged_decode.supported(device) if paged is None else paged

    def plan(self, step: StepInputs, bands: list[RowBand], need_lse: bool) -> CallPlan:
        """Groups for `bands` (rows in step order); host arithmetic and a few small copies, once per step."""
        offsets, count = [], 0
        for band in bands:
            offsets.append(count)
            count += step.rows[band.row].count
        every_row = [band.row for band in bands] == list(range(len(step.rows)))
        tokens = None if every_row else torch.cat([
            torch.arange(step.query_start[band.row], step.query_start[band.row + 1]) for band in bands])
        tokens = None if tokens is None else to_device(tokens, self.device)
        groups, decode = [], []
        for band, offset in zip(bands, offsets):
            row = step.rows[band.row]
            k0, k1 = key_span(row.first, row.end, band)
            if k1 <= k0:
                continue  # sees nothing in this call: output 0, log-sum-exp -inf
            if row.count == 1:
                decode.append(((k1 - 1) // BLOCK_SIZE - k0 // BLOCK_SIZE + 1, band, offset, k0, k1))
            else:
                groups.append(self._one_row(step, band, offset, k0, k1))
        paged = None
        if self.paged and decode:  # all one-query rows in one kernel call; nothing left to group
            paged = self._paged(step, decode)
            paged.every_token = (tokens is None and not groups and len(decode) == count
                                 and all(offset == index for index, (_, _, offset, _, _) in enumerate(decode)))
            decode = []
        decode.sort(key=lambda item: -item[0])
        while decode:
            width, taken, held = decode[0][0], 0, 0  # in blocks: a group gathers whole ones
            while taken < len(decode) and (width * BLOCK_SIZE <= SMALL_GROUP_KEYS
                                           or (taken + 1) * width <= PADDING * (held + decode[taken][0])):
                held += decode[taken][0]
                taken += 1
            groups.append(self._one_query_rows(step, decode[:taken]))
            decode = decode[taken:]
        return CallPlan(tokens, count, groups, need_lse, paged)

    def _paged(self, step: StepInputs, members: list) -> PagedRows:
        widest = step.block_table.shape[1] * BLOCK_SIZE
        if any(k1 > widest for *_, k1 in members):  # the kernel reads the table unchecked: never past its width
            raise ValueError(f"a decode row reaches past the block table's {widest} slots")
        facts = torch.tensor([(band.row, k0, k1, step.query_start[band.row], offset)
                              for _, band, offset, k0, k1 in members])
        return PagedRows(facts[:, 3], facts[:, :3].to(torch.int32), facts[:, 4], step.block_table)

    def _block_rows(self, step: StepInputs, rows: torch.Tensor, first: torch.Tensor, last: torch.Tensor,
                    blocks: int) -> torch.Tensor:
        """Rows of the pool viewed as [kv_heads * num_blocks, BLOCK_SIZE * d] holding blocks first..last of each
        step row in `rows` (padded with its last block to `blocks`), for every KV head: whole blocks move
        as one piece each."""
        at = torch.minimum(first.unsqueeze(1) + torch.arange(blocks, device=self.device), last.unsqueeze(1))
        ids = step.block_table[rows].long().gather(1, at).flatten()
        return (torch.arange(self.num_kv_heads, device=self.device).unsqueeze(1) * self.num_blocks + ids).flatten()

    def _one_query_rows(self, step: StepInputs, members: list) -> Group:
        """Decode rows: row b reads the blocks holding its keys [k0_b, k1_b), padded to the group's widest
        row; keys outside its span are masked."""
        spans = [(band.row, k0, k1, offset, step.query_start[band.row]) for _, band, offset, k0, k1 in members]
        if len(members) == 1 and consecutive(step.rows[spans[0][0]].seq.block_table, spans[0][1], spans[0][2]):
            row, k0, k1, offset, query = spans[0]
            into, queries = to_device(torch.tensor([[offset], [query]]), self.device)
            return Group(queries, self._slice(step, row, k0, k1), 1, k1 - k0, None, False, None, into)
        blocks = max((k1 - 1) // BLOCK_SIZE - k0 // BLOCK_SIZE + 1 for _, k0, k1, _, _ in spans)
        facts = to_device(torch.tensor(spans), self.device)
        row, k0, k1, into, queries = facts.unbind(1)
        first = k0 // BLOCK_SIZE
        keys = self._block_rows(step, row, first, (k1 - 1) // BLOCK_SIZE, blocks)
        at = first.unsqueeze(1) * BLOCK_SIZE + torch.arange(blocks * BLOCK_SIZE, device=self.device)
        visible = ((at >= k0.unsqueeze(1)) & (at < k1.unsqueeze(1)))[:, None, None, :]
        return Group(queries, keys, len(members), blocks * BLOCK_SIZE, visible, False, None, into)

    def _one_row(self, step: StepInputs, band: RowBand, offset: int, k0: int, k1: int) -> Group:
        """A prefill chunk: queries at positions [first, end) over keys [k0, k1), masked to the band."""
        row = step.rows[band.row]
        queries = slice(step.query_start[band.row], step.query_start[band.row + 1])
        into = slice(offset, offset + row.count)
        skip = 0
        if consecutive(row.seq.block_table, k0, k1):
            keys = self._slice(step, band.row, k0, k1)
        else:
            first, last = k0 // BLOCK_SIZE, (k1 - 1) // BLOCK_SIZE
            at = to_device(torch.tensor([band.row, first, last]), self.device)
            keys = self._block_rows(step, at[:1], at[1:2], at[2:], last - first + 1)
            skip = k0 - first * BLOCK_SIZE
        causal = band.lo == 0 and band.hi > (row.end - 1) // band.unit and k0 == 0 and row.first == 0
        visible = empty = None
        if not causal:
            queries_at = torch.arange(row.first, row.end, device=self.device).unsqueeze(1)
            keys_at = torch.arange(k0, k1, device=self.device).unsqueeze(0)
            distance = torch.div(queries_at, band.unit, rounding_mode="floor") - torch.div(keys_at, band.unit, rounding_mode="floor")
            seen = (distance >= band.lo) & (distance < band.hi) & (keys_at <= queries_at)
            visible = seen[None, None]
            empty = ~seen.any(-1) if band.lo > 0 else None  # a far band: queries within w of the start see nothing
        return Group(queries, keys, 1, k1 - k0, visible, causal, empty, into, skip)

    @staticmethod
    def _slice(step: StepInputs, row: int, k0: int, k1: int) -> slice:
        table = step.rows[row].seq.block_table
        start = table[k0 // BLOCK_SIZE] * BLOCK_SIZE + k0 % BLOCK_SIZE
        return slice(start, start + k1 - k0)

    def attend(self, plan: CallPlan, query: torch.Tensor, key_plane: Plane, value_plane: Plane,
               scratch: Scratch | None = None):
        """query [step tokens, heads, d] (turned); planes [kv_heads, slots, d] (kv_cache.Plane). Returns the output [call tokens,
        heads, d] and, when planned so, the log-sum-exp [call tokens, heads] (float32). Gathered keys and values go
        into `scratch`'s buffers where given (one per step, kept by every layer's calls)."""
        if plan.paged is not None and plan.paged.every_token:  # a decode step: the kernel's answer is the call's
            part, part_lse = paged_decode.paged_decode(query, key_plane, value_plane, plan.paged.table, plan.paged.items,
                                                       self.scale)
            return part.to(query.dtype), part_lse if plan.need_lse else None
        scratch = scratch or Scratch()
        out = query.new_zeros(plan.count, self.num_heads, query.shape[-1])
        lse = torch.full((plan.count, self.num_heads), float("-inf"), device=query.device) if plan.need_lse else None
        if plan.paged is not None:
            rows = plan.paged
            part, part_lse = paged_decode.paged_decode(query.index_select(0, rows.queries), key_plane, value_plane,
                                                       rows.table, rows.items, self.scale)
            out.index_copy_(0, rows.into, part.to(out.dtype))
            if lse is not None:
                lse[rows.into] = part_lse
        for group in plan.groups:
            q = query[group.queries] if isinstance(group.queries, slice) else query.index_select(0, group.queries)
            keys = self._gather(key_plane, group, query.dtype, scratch, "keys")
            values = self._gather(value_plane, group, query.dtype, scratch, "values")
            if isinstance(group.queries, slice):  # one row, its queries along the query axis
                part, part_lse = self._kernel(q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                              group, plan.need_lse)
                part = part[0].transpose(0, 1)
                part_lse = None if part_lse is None else part_lse[0].transpose(0, 1)
            else:
                part, part_lse = self._one_query(q, keys.view(keys.shape[0], group.rows, group.width, -1),
                                                 values.view(keys.shape[0], group.rows, group.width, -1), group, plan.need_lse)
            if group.empty is not None:
                part = part.masked_fill(group.empty[:, None, None], 0.0)
                part_lse = part_lse.masked_fill(group.empty[:, None], float("-inf"))
            if isinstance(group.into, slice):
                out[group.into] = part
            else:
                out.index_copy_(0, group.into, part)
            if lse is not None:
                lse[group.into] = part_lse
        return out, lse

    def _gather(self, plane: Plane, group: Group, dtype: torch.dtype, scratch: Scratch, name: str) -> torch.Tensor:
        """The group's keys [kv_heads, rows * width, d] in `dtype`, each head's contiguous: a view for a slice,
        else whole blocks by index_select over the pool's rows of blocks (1.8x faster than token slots over the
        slot axis with 2 threads; plane[:, index] is 4x slower than either), into a scratch buffer. An 8-bit
        cache's codes and scales are read the same way, and only what was read is dequantized (kv_quant.py)."""
        data, scales = plane.data, plane.scales
        kv_heads, _, dim = data.shape
        if isinstance(group.keys, slice):
            keys, key_scales = data[:, group.keys], None if scales is None else scales[:, group.keys]
        else:
            blocks = scratch.take(name, (group.keys.numel(), BLOCK_SIZE * dim), data.dtype, data.device)
            keys = torch.index_select(data.view(kv_heads * self.num_blocks, BLOCK_SIZE * dim), 0, group.keys, out=blocks)
            keys = keys.view(kv_heads, -1, dim)
            key_scales = None if scales is None else scales.view(-1, BLOCK_SIZE).index_select(0, group.keys).view(kv_heads, -1)
            if isinstance(group.queries, slice):  # one row: its span within the blocks
                keys = keys[:, group.skip : group.skip + group.width]
                key_scales = None if scales is None else key_scales[:, group.skip : group.skip + group.width]
        if scales is None:
            return keys
        read_back = scratch.take(name + " read back", keys.shape, dtype, keys.device)
        return dequantize(keys, key_scales, plane.cache, dtype, out=read_back)

    def _one_query(self, q, keys, values, group: Group, need_lse: bool):
        """One query per row over keys [kv_heads, rows, width, d]: the KV heads are the batch, the rows are its
        heads, and the query heads that share a KV head fold into the query axis, so every kernel reads
        contiguous keys. On CPU SDPA's flash kernel runs it (its log-sum-exp comes free)."""
        rows, heads, dim = q.shape
        folded = q.view(rows, self.num_kv_heads, heads // self.num_kv_heads, dim).transpose(0, 1)  # [kv, rows, g, d]
        lse = None
        if fused_kernel_for(q.device):
            additive = group.additive(q.dtype)
            mask = None if additive is None else additive.view(1, group.rows, 1, group.width)
            out, lse = flash_cpu(folded, keys, values, mask, self.scale)
        elif need_lse:
            scores = torch.matmul(folded, keys.transpose(-1, -2)).float() * self.scale
            if group.visible is not None:
                scores = scores.masked_fill(~group.visible.view(group.rows, 1, group.width), float("-inf"))
            weights = scores.softmax(dim=-1)
            lse = scores.amax(dim=-1) - weights.amax(dim=-1).log()  # at the top score s: w = exp(s - lse)
            out = torch.matmul(weights.to(values.dtype), values)
        else:
            visible = None if group.visible is None else group.visible.view(group.rows, 1, group.width)
            out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=visible, scale=self.scale)
        out = out.transpose(0, 1).reshape(rows, heads, dim)
        return out, None if lse is None or not need_lse else lse.transpose(0, 1).reshape(rows, heads)

    def _kernel(self, q, keys, values, group: Group, need_lse: bool):
        """q [1, heads, queries, d] over keys [1, kv_heads, width, d]."""
        if fused_kernel_for(q.device):
            return flash_cpu(q, keys, values, group.additive(q.dtype), self.scale, causal=group.causal)
        if not need_lse:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=group.visible, is_causal=group.causal,
                                                  scale=self.scale, enable_gqa=True), None
        visible = group.visible
        if group.causal:
            visible = torch.ones(q.shape[2], keys.shape[2], dtype=torch.bool, device=q.device).tril()[None, None]
        return explicit(q, keys, values, visible, self.scale)


class Scratch:
    """Buffers a step's calls gather into, made at the first layer and kept by the others: a gather of many MB
    then faults its pages in once a step instead of once per layer and plane."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def take(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        count = math.prod(shape)
        buffer = self.buffers.get((name, dtype))
        if buffer is None or buffer.numel() < count:
            buffer = self.buffers[name, dtype] = torch.empty(count, dtype=dtype, device=device)
        return buffer[:count].view(shape)


def fused_kernel_for(device: torch.device) -> bool:
    """Whether a fused kernel that returns the log-sum-exp serves this device; elsewhere the explicit path does."""
    return device.type == "cpu"


def explicit(q, k, v, visible: torch.Tensor | None, scale: float):
    """Attention with materialized scores and its log-sum-exp, a block of query rows at a time (for devices
    whose fused kernels do not return it). q [1, heads, queries, d]; k, v [1, kv_heads, width, d]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    outs, lses = [], []
    for first in range(0, q.shape[2], EXPLICIT_QUERY_ROWS):
        block = slice(first, first + EXPLICIT_QUERY_ROWS)
        scores = (q[:, :, block] @ k.transpose(-1, -2)).float() * scale
        if visible is not None:
            scores = scores.masked_fill(~visible[..., block, :], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        outs.append(torch.exp(scores - lse).nan_to_num(0.0).to(v.dtype) @ v)
        lses.append(lse.squeeze(-1))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
