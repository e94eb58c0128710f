"""Install the position patches into a transformers model (Llama, Qwen2, Mistral families).

The native engine applies patches/rope.py itself; this installer is for
plain transformers use (`model.generate`, scoring scripts) and serves as an
independent path in the tests. It touches only the rotary module's table
and, for log-n, the query projections:

- static types: `rotary_emb.inv_freq` and `attention_scaling` are replaced;
- dynamic: a pre-hook on the decoder sets the table from the length seen so
  far (transformers' own behaviour: keys already cached keep their scale);
- log-n: a pre-hook records the positions of the current forward, and a
  hook on every `q_proj` scales its output by max(1, ln n / ln L).
"""

from __future__ import annotations

from typing import Any

import torch

from longserve.patches.model_facts import ModelFacts
from longserve.patches.rope import PositionSpec, logn_factors, rope_table


def forward_positions(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """Positions [batch, tokens] of a decoder forward call, from its arguments."""
    if kwargs.get("position_ids") is not None:
        return kwargs["position_ids"]
    inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
    if inputs is None:
        inputs = kwargs["inputs_embeds"]
    tokens = inputs.shape[1]
    cache = kwargs.get("past_key_values")
    past = cache.get_seq_length() if cache is not None else 0
    return torch.arange(past, past + tokens, device=inputs.device).unsqueeze(0)


def install_position(model, spec: PositionSpec) -> list:
    """Patch `model` in place for `spec`; returns hook handles (call .remove() to undo the hooks)."""
    if spec.clipped:
        raise ValueError(f"{spec.type!r} changes the attention step itself; it runs in longserve's native engine only")
    facts = ModelFacts.of(model.config)
    head_dim, rope_base, trained_len = facts.head_dim, facts.rope_base, facts.trained_len
    decoder = model.model
    rotary = decoder.rotary_emb
    handles = []
    if spec.type != "rope":
        table = rope_table(spec, head_dim, rope_base, trained_len, trained_len)
        rotary.inv_freq = table.inv_freq.to(rotary.inv_freq.device)
        rotary.attention_scaling = table.attention_factor

    if spec.type == "dynamic":

        def set_dynamic_table(module, args, kwargs):
            positions = forward_positions(args, kwargs)
            seq_len = int(positions.max()) + 1
            table = rope_table(spec, head_dim, rope_base, trained_len, seq_len)
            rotary.inv_freq = table.inv_freq.to(rotary.inv_freq.device)

        handles.append(decoder.register_forward_pre_hook(set_dynamic_table, with_kwargs=True))

    if spec.logn:
        current: dict[str, torch.Tensor] = {}

        def record_positions(module, args, kwargs):
            current["scale"] = logn_factors(forward_positions(args, kwargs), trained_len)

        def scale_queries(module, args, output):
            return output * current["scale"].unsqueeze(-1).to(output.dtype)

        handles.append(decoder.register_forward_pre_hook(record_positions, with_kwargs=True))
        for layer in decoder.layers:
            handles.append(layer.self_attn.q_proj.register_forward_hook(scale_queries))
    return handles
