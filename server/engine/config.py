"""What either engine starts from. Its defaults are ServerSettings' (server/settings.py): one place for each."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from patches.rope import PositionSpec
from server.settings import ServerSettings


def default(name: str):
    return ServerSettings.model_fields[name].default


@dataclass
class EngineConfig:
    model_path: str
    model_name: str
    device: str = default("device")  # auto | cpu | cuda (native engine)
    dtype: str = default("dtype")  # auto | float32 | bfloat16
    max_num_seqs: int = default("max_num_seqs")
    max_model_len: int | None = default("max_model_len")  # None: trained length x position factor
    max_waiting: int = default("max_waiting")
    prefill_chunk: int = default("prefill_chunk")  # the most prompt tokens one sequence prefills in a step (native)
    max_num_batched_tokens: int = default("max_num_batched_tokens")  # tokens in one step, decodes and prefill chunks
    kv_cache_memory: float | None = default("kv_cache_memory")  # GiB of KV-cache blocks; None: the engine's own share
    enable_prefix_caching: bool = default("enable_prefix_caching")
    request_rerope: bool = default("request_rerope")  # native: a request may ask for a clipped position (near-key plane budgeted)
    grammar_step_timeout: float = default("grammar_step_timeout")  # native: seconds a grammar may take to check one token
    # vLLM only (the native engine refuses other values at start-up: server/cli.py)
    tensor_parallel_size: int = default("tensor_parallel_size")
    pipeline_parallel_size: int = default("pipeline_parallel_size")
    data_parallel_size: int = default("data_parallel_size")
    distributed_executor_backend: str | None = default("distributed_executor_backend")
    gpu_memory_utilization: float = default("gpu_memory_utilization")
    position: PositionSpec = field(default_factory=PositionSpec)
    data_dir: str | None = None  # the volume replicas share; vLLM: where large tries go for workers on other nodes

    @property
    def distributed(self) -> dict:
        """vLLM's engine arguments for its distributed runtime."""
        return {"tensor_parallel_size": self.tensor_parallel_size, "pipeline_parallel_size": self.pipeline_parallel_size,
                "data_parallel_size": self.data_parallel_size, "distributed_executor_backend": self.distributed_executor_backend,
                "gpu_memory_utilization": self.gpu_memory_utilization}

    @classmethod
    def from_settings(cls, settings: ServerSettings, model_path: str) -> "EngineConfig":
        given = {f.name: getattr(settings, f.name) for f in fields(cls) if f.name not in ("model_path", "model_name", "data_dir")}
        return cls(model_path=model_path, model_name=settings.model_name, data_dir=str(settings.data_dir), **given)
