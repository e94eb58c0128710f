"""What either engine starts from, and the defaults of its settings: the one place for each (server/settings.py's
engine flags take theirs from here, so the engine imports nothing from the server)."""

from __future__ import annotations

from dataclasses import dataclass, field

from longserve.patches.rope import PositionSpec

DEFAULT_STEP_TOKENS = 2048  # the most tokens a step holds unless --max-num-batched-tokens says otherwise


@dataclass
class EngineConfig:
    model_path: str
    model_name: str
    device: str = "auto"  # auto | cpu | cuda (native engine)
    dtype: str = "auto"  # auto | float32 | bfloat16
    max_num_seqs: int = 16
    max_model_len: int | None = None  # None: trained length x position factor
    max_waiting: int = 256
    prefill_chunk: int = 512  # the most prompt tokens one sequence prefills in a step (native)
    # tokens in one step, decodes and prefill chunks; None: the native engine sizes it from a profiled forward pass
    # (native/step_budget.py), at most DEFAULT_STEP_TOKENS, which vLLM gets
    max_num_batched_tokens: int | None = None
    kv_cache_memory: float | None = None  # GiB of KV-cache blocks; None: the engine's own share
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | int8 | fp8 | fp8_e4m3 | fp8_e5m2 (native/kv_quant.py)
    enable_prefix_caching: bool = True
    request_rerope: bool = True  # native: a request may ask for a clipped position (near-key plane budgeted)
    grammar_step_timeout: float = 2.0  # native: seconds a grammar may take to check one token
    enforce_eager: bool = False  # vLLM: no torch.compile or CUDA graphs (vLLM's flag); the native engine runs eagerly
    # vLLM only (the native engine refuses other values at start-up: server/cli.py)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    gpu_memory_utilization: float = 0.9  # CUDA, both engines: weights, activations and KV cache together
    position: PositionSpec = field(default_factory=PositionSpec)
    data_dir: str | None = None  # the volume replicas share; vLLM: where large tries go for workers on other nodes

    @property
    def distributed(self) -> dict:
        """vLLM's engine arguments for its distributed runtime."""
        return {"tensor_parallel_size": self.tensor_parallel_size, "pipeline_parallel_size": self.pipeline_parallel_size,
                "data_parallel_size": self.data_parallel_size, "distributed_executor_backend": self.distributed_executor_backend,
                "gpu_memory_utilization": self.gpu_memory_utilization}


def default(name: str):
    """The engine's default for setting `name`."""
    return EngineConfig.__dataclass_fields__[name].default
