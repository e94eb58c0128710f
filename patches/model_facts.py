"""What the patches and the engines read from a transformers model config, read in one place."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_ROPE_BASE = 10000.0  # transformers' default rope_theta


@dataclass(frozen=True)
class ModelFacts:
    head_dim: int
    rope_base: float  # rope_theta: the base of the rotary frequencies
    trained_len: int  # max_position_embeddings: the longest sequence the model was trained on
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int
    vocab_size: int  # rows of the output layer (may exceed the tokenizer's count)
    rope_type: str = "default"  # the model's own rotary scaling (llama3, yarn, ...); "default": none

    @classmethod
    def of(cls, config) -> "ModelFacts":
        num_heads = config.num_attention_heads
        rope_parameters = getattr(config, "rope_parameters", None) or {}  # transformers >= 5; older: rope_theta
        own_scaling = rope_parameters.get("rope_type") or (getattr(config, "rope_scaling", None) or {}).get("rope_type")
        return cls(
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            rope_base=float(rope_parameters.get("rope_theta", getattr(config, "rope_theta", DEFAULT_ROPE_BASE))),
            trained_len=config.max_position_embeddings,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            vocab_size=config.vocab_size,
            rope_type=own_scaling or "default",
        )
