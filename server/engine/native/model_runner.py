"""The forward pass: a transformers model's own modules, our attention and cache.

We reuse the loaded model's embeddings, norms, projections and MLPs, and write
the attention step ourselves, because the cache layout (kv_cache.py) and the
place where positions enter attention are what the long-context patches
change. Supported families share one layer shape: Llama (3.x included, with
its own rope scaling in the model's table), Qwen2, Mistral, Qwen3, whose
per-head RMSNorm of q and k runs before the rotation, and Phi-3, whose q/k/v
and gate/up projections come fused already (its `longrope` table is
positions.py's).

One entry point, run(decode, chunks): a whole step in one forward pass, its
tokens flat. The decoding rows each add one token, whatever their lengths;
each prefill chunk is causal within itself and attends to everything already
cached for its sequence. How positions enter attention, and what the cache
keeps, is attention.py's; how attention runs over the paged cache is
attention_backend.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.activations import ACT2FN

from longserve.patches.model_facts import ModelFacts
from longserve.server.engine.native.attention import StepAttention
from longserve.server.engine.native.attention_backend import GatherBackend
from longserve.server.engine.native.elementwise import AddNorm, SiluMul
from longserve.server.engine.native.kv_cache import KvPool
from longserve.server.engine.native.linear import Linear, linear_maker
from longserve.server.engine.native.loading import to_device
from longserve.server.engine.native.positions import Positions
from longserve.server.engine.native.scheduler import Chunk
from longserve.server.engine.native.sequence import Sequence
from longserve.server.engine.native.step_inputs import StepInputs, StepRow

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3", "phi3")


@dataclass
class StepLogits:
    decode: torch.Tensor | None  # [decoding rows, vocab]
    chunks: list[torch.Tensor | None]  # per chunk: [vocab], [chunk tokens, vocab] or None

    def decode_rows(self, rows: list[int]) -> torch.Tensor:
        """These rows of `decode`: the tensor itself where they are all of its rows in order (a copy of 32 rows
        cost 2 ms a step here)."""
        return self.decode if rows == list(range(len(self.decode))) else self.decode[rows]


def fused(linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection a checkpoint already fuses (Phi-3's qkv_proj, gate_up_proj): its weight and bias as they are."""
    return linear.weight, linear.bias


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


def release_plain_weights(model) -> None:
    """Drop the projections' plain weights once packed copies run them (the embedding keeps its own, and a
    head tied to it); the model cannot run outside the engine after this."""
    embedding = model.model.embed_tokens.weight
    modules = [model.lm_head] if model.lm_head.weight is not embedding else []
    for layer in model.model.layers:
        modules += [module for module in (*layer.self_attn.children(), *layer.mlp.children())
                    if isinstance(module, torch.nn.Linear)]
    for module in modules:
        module.weight = torch.nn.Parameter(module.weight.new_empty(0), requires_grad=False)


def check_servable(config, max_model_len: int) -> None:
    """Refuse, in one line each, the models this forward pass would get wrong."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"the native engine runs {', '.join(SUPPORTED_MODEL_TYPES)} models; this one is {config.model_type!r}")
    capped = [name for name in ("attn_logit_softcapping", "final_logit_softcapping") if getattr(config, name, None)]
    if capped:
        raise ValueError(f"this model caps its logits ({', '.join(capped)}), which the native engine does not implement")
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    partial = rope_parameters.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
    if partial != 1.0:  # Phi-4-mini's 0.75: rotate() turns the whole head; a null factor reads as absent, as in transformers
        raise ValueError(f"this model rotates only part of each head (partial_rotary_factor {partial}), "
                         f"which the native engine does not implement")
    sliding = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if sliding and max_model_len > sliding:
        raise ValueError(f"this model uses sliding-window attention ({sliding} tokens), which the native engine does not "
                         f"implement; set --max-model-len {sliding} or less")


class ModelRunner:
    def __init__(self, model, pool: KvPool, positions: Positions, owns_model: bool = False):
        config = model.config
        self.model = model
        self.decoder = model.model
        self.positions = positions
        facts = ModelFacts.of(config)
        self.num_heads, self.num_kv_heads, self.head_dim = facts.num_heads, facts.num_kv_heads, facts.head_dim
        self.device = pool.device
        self.dtype = model.dtype
        self.scale = getattr(self.decoder.layers[0].self_attn, "scaling", self.head_dim**-0.5)
        # the residual adds, norms and SiLU as one call each (elementwise.py), where that gives what the modules give
        self.input_norms = [AddNorm(l.input_layernorm, self.device, self.dtype) for l in self.decoder.layers]
        self.post_attention_norms = [AddNorm(l.post_attention_layernorm, self.device, self.dtype) for l in self.decoder.layers]
        self.final_norm = AddNorm(self.decoder.norm, self.device, self.dtype)
        self.silu_mul = SiluMul(config.hidden_act, ACT2FN[config.hidden_act], self.device, self.dtype)
        self.use_pool(pool)
        # Fewer, larger matmuls: q/k/v as one projection, gate/up as another (Phi-3 ships them so: the same order).
        make = linear_maker(self.device, self.dtype)
        self.qkv = [make(*fused(l.self_attn.qkv_proj)) if hasattr(l.self_attn, "qkv_proj")
                    else make(*fuse_linears(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj)) for l in self.decoder.layers]
        self.gate_up = [make(*fused(l.mlp.gate_up_proj)) if hasattr(l.mlp, "gate_up_proj")
                        else make(*fuse_linears(l.mlp.gate_proj, l.mlp.up_proj)) for l in self.decoder.layers]
        self.o = [make(*fused(l.self_attn.o_proj)) for l in self.decoder.layers]
        self.down = [make(*fused(l.mlp.down_proj)) for l in self.decoder.layers]
        self.head = make(*fused(model.lm_head))
        if owns_model and make is not Linear:
            release_plain_weights(model)
        # Qwen3: RMSNorm over each head's q and k, before the rotation; None for the other families
        self.qk_norms = [(l.self_attn.q_norm, l.self_attn.k_norm) if hasattr(l.self_attn, "q_norm") else None
                         for l in self.decoder.layers]

    def use_pool(self, pool: KvPool) -> None:
        """Run on `pool` from now on: the engine's real pool, once the start-up passes ran on a probe pool."""
        self.pool = pool
        self.backend = GatherBackend(self.num_heads, self.num_kv_heads, self.scale, pool.num_blocks, self.device)

    @torch.inference_mode()
    def run(self, decode: list[Sequence], chunks: list[Chunk]) -> StepLogits:
        """One forward pass over every token of a step: one new token per decoding row, then each prefill chunk.

        The step's tokens go through every layer flat and together (step_inputs.py), attention included
        (attention.py). Returns the logits the step's sequences need: one row per decoding sequence, and per
        chunk the logits after its last position (every position for prompt_logprobs), or None for a chunk
        that does not end its prompt and needs no scores.
        """
        rows = [StepRow(seq, seq.num_cached, seq.num_cached + 1) for seq in decode]
        rows += [StepRow(chunk.seq, chunk.start, chunk.end) for chunk in chunks]
        if any(row.seq.positions.window is not None for row in rows):
            self.pool.ensure_near_keys()  # before the forward pass: its allocation never fails inside one
        step = StepInputs.build(rows, self.device)
        encoding = self.positions.encode([row.seq.positions for row in rows], step.positions, step.row_of_token, self.dtype)
        hidden = self._forward(step.ids, StepAttention(self.pool, step, encoding, self.backend))
        wanted, spans = list(range(len(decode))), []  # rows of `hidden` to project, and each owner's share of them
        offset = len(decode)
        for chunk in chunks:
            size = chunk.end - chunk.start
            if chunk.every_position:
                wanted += range(offset, offset + size)
                spans.append(size)
            elif chunk.ends_prompt:
                wanted.append(offset + size - 1)
                spans.append(1)
            else:
                spans.append(0)
            offset += size
        if wanted and len(wanted) < step.num_tokens:  # one copy of the indices, none when every token is wanted
            hidden = hidden.index_select(0, to_device(torch.tensor(wanted), self.device))
        logits = self._logits(hidden) if wanted else None
        decode_logits = logits[: len(decode)] if decode else None
        chunk_logits, at = [], len(decode)
        for chunk, span in zip(chunks, spans):
            rows = logits[at : at + span] if span else None
            chunk_logits.append(rows if rows is None or chunk.every_position else rows[0])
            at += span
        return StepLogits(decode_logits, chunk_logits)

    def prefill(self, seq: Sequence, start: int, end: int, every_position: bool = False) -> torch.Tensor:
        """One chunk alone (tests and tools drive the maths through this): logits after end-1, or every position."""
        return self.run([], [Chunk(seq, start, end, ends_prompt=True, every_position=every_position)]).chunks[0]

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One decode step alone for `seqs`: logits [len(seqs), vocab]."""
        return self.run(seqs, []).decode

    def _forward(self, ids: torch.Tensor, attention: StepAttention) -> torch.Tensor:
        """The decoder stack over the step's flat ids [tokens]; `attention(layer, q, k, v)` places and attends."""
        tokens = ids.shape[0]
        hidden, mlp_out = self.decoder.embed_tokens(ids), None  # the MLP's output joins the residual in the next norm
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        for index in range(len(self.decoder.layers)):
            hidden, x = self.input_norms[index](hidden, mlp_out)
            q, k, v = self.qkv[index](x).split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(tokens, self.num_heads, self.head_dim)
            k = k.view(tokens, self.num_kv_heads, self.head_dim)
            if self.qk_norms[index] is not None:
                q, k = self.qk_norms[index][0](q), self.qk_norms[index][1](k)
            out = attention(index, q, k, v.view(tokens, self.num_kv_heads, self.head_dim))
            hidden, x = self.post_attention_norms[index](hidden, self.o[index](out.reshape(tokens, q_size)))
            mlp_out = self.down[index](self.silu_mul(self.gate_up[index](x)))
        return self.final_norm(hidden, mlp_out)[1]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).float()
