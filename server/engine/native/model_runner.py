"""The forward pass: a transformers model's own modules, our attention and cache.

We reuse the loaded model's embeddings, norms, projections and MLPs, and write
the attention step ourselves, because the cache layout (kv_cache.py) and the
place where positions enter attention are what the long-context patches
change. Supported families share one layer shape: Llama, Qwen2, Mistral.

Two entry points:
- prefill(seq, start, end): one chunk of one prompt, causal within the chunk
  and attending to everything already cached for that sequence;
- decode(seqs): one new token for each running sequence, all in one batch,
  whatever their lengths (a length mask per row).
How positions enter attention, and what the cache keeps, is attention.py's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from server.engine.native.attention import DecodeAttention, PrefillAttention
from server.engine.native.kv_cache import SlotCache
from server.engine.native.positions import Positions
from server.engine.native.sequence import Sequence

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def fuse_linears(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several projections of the same input.

    The original modules keep working: their parameters become views of the
    fused tensor, so the model's memory does not grow.
    """
    weight = torch.cat([linear.weight.data for linear in linears], dim=0)
    has_bias = all(linear.bias is not None for linear in linears)
    bias = torch.cat([linear.bias.data for linear in linears], dim=0) if has_bias else None
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = torch.nn.Parameter(weight[start : start + rows], requires_grad=False)
        if has_bias:
            linear.bias = torch.nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return weight, bias


class ModelRunner:
    def __init__(self, model, cache: SlotCache, positions: Positions):
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"the native engine runs {', '.join(SUPPORTED_MODEL_TYPES)} models; this one is {config.model_type!r}"
            )
        self.model = model
        self.decoder = model.model
        self.cache = cache
        self.positions = positions
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.device = cache.device
        self.dtype = model.dtype
        self.idle_row = positions.for_sequence(None, 0)
        self.scale = getattr(self.decoder.layers[0].self_attn, "scaling", self.head_dim**-0.5)
        self.act = ACT2FN[config.hidden_act]
        # Fewer, larger matmuls: q/k/v as one projection, gate/up as another.
        self.qkv = [fuse_linears(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj) for l in self.decoder.layers]
        self.gate_up = [fuse_linears(l.mlp.gate_proj, l.mlp.up_proj) for l in self.decoder.layers]

    @torch.inference_mode()
    def prefill(self, seq: Sequence, start: int, end: int, every_position: bool = False) -> torch.Tensor:
        """Cache positions [start, end) of `seq`; return the logits after position end-1,
        or after every position of the chunk ([end - start, vocab]) when asked."""
        ids = torch.tensor([seq.all_ids[start:end]], device=self.device)
        positions = torch.arange(start, end, device=self.device).unsqueeze(0)
        encoding = self.positions.encode([seq.positions], positions, self.dtype)
        attend = PrefillAttention(self.cache, seq.slot, start, end, encoding, self.num_heads // self.num_kv_heads, self.scale)
        hidden = self._forward(ids, attend)
        return self._logits(hidden[0] if every_position else hidden[0, -1])

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One step for every sequence; returns logits [len(seqs), vocab]."""
        rows = self.cache.rows_in_use
        tokens = torch.zeros(rows, 1, dtype=torch.long)
        lengths = torch.zeros(rows, dtype=torch.long)  # free rows: a dummy token at position 0
        row_positions = [self.idle_row] * rows  # free or prefilling rows: any table will do
        for seq in seqs:
            tokens[seq.slot, 0] = seq.last_token
            lengths[seq.slot] = seq.num_cached
            row_positions[seq.slot] = seq.positions
        tokens, lengths = tokens.to(self.device), lengths.to(self.device)
        slots = torch.tensor([seq.slot for seq in seqs], device=self.device)
        encoding = self.positions.encode(row_positions, lengths.unsqueeze(1), self.dtype)
        attend = DecodeAttention(self.cache, slots, lengths, encoding, self.num_heads, self.scale)
        hidden = self._forward(tokens, attend)
        return self._logits(hidden[slots, -1])

    def _forward(self, ids: torch.Tensor, attend) -> torch.Tensor:
        """The decoder stack over ids [rows, tokens]; `attend(layer, q, k, v)` places positions and attends."""
        batch, tokens = ids.shape
        hidden = self.decoder.embed_tokens(ids)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        for index, layer in enumerate(self.decoder.layers):
            x = layer.input_layernorm(hidden)
            q, k, v = F.linear(x, *self.qkv[index]).split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
            k = k.view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
            out = attend(index, q, k, v)
            out = out.transpose(1, 2).reshape(batch, tokens, q_size)
            hidden = hidden + layer.self_attn.o_proj(out)
            gate, up = F.linear(layer.post_attention_layernorm(hidden), *self.gate_up[index]).chunk(2, dim=-1)
            hidden = hidden + layer.mlp.down_proj(self.act(gate) * up)
        return self.decoder.norm(hidden)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()
