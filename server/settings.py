"""Server settings: command-line flags over LONGSERVE_* environment variables.

pydantic-settings validates both the same way, so a bad value fails at
start-up with a message that names the flag.
"""

from __future__ import annotations

from pathlib import Path

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from longserve.patches.rope import PositionSpec
from longserve.server.engine.config import EngineConfig
from longserve.server.engine.config import default as engine_default
from longserve.server.engine.native.kv_quant import CACHE_DTYPES
from longserve.server.models import DEFAULT_MODEL


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LONGSERVE_", protected_namespaces=())

    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    engine: Literal["native", "vllm", "auto"] = "native"
    device: Literal["auto", "cpu", "cuda"] = engine_default("device")
    dtype: Literal["auto", "float32", "bfloat16"] = engine_default("dtype")
    max_num_seqs: int = Field(engine_default("max_num_seqs"), ge=1, le=1024)
    max_model_len: int | None = Field(engine_default("max_model_len"), ge=16)
    position: PositionSpec = Field(default_factory=PositionSpec)
    max_waiting: int = Field(engine_default("max_waiting"), ge=0)
    prefill_chunk: int = Field(engine_default("prefill_chunk"), ge=16, le=2**20)
    max_num_batched_tokens: int | None = Field(engine_default("max_num_batched_tokens"), ge=16, le=2**20)
    kv_cache_memory: float | None = Field(engine_default("kv_cache_memory"), gt=0.0, le=4096.0)  # GiB; None: half the memory available (CPU)
    kv_cache_dtype: Literal[CACHE_DTYPES] = engine_default("kv_cache_dtype")
    enable_prefix_caching: bool = engine_default("enable_prefix_caching")
    enforce_eager: bool = engine_default("enforce_eager")  # vLLM: skip torch.compile and CUDA graphs
    request_rerope: bool = engine_default("request_rerope")  # native: per-request rerope/leaky-rerope/self-extend; their near-key plane counts in the KV budget
    # vLLM engine only: its own distributed runtime (multiprocessing or Ray), as `vllm serve` takes these
    tensor_parallel_size: int = Field(engine_default("tensor_parallel_size"), ge=1, le=1024)
    pipeline_parallel_size: int = Field(engine_default("pipeline_parallel_size"), ge=1, le=1024)
    data_parallel_size: int = Field(engine_default("data_parallel_size"), ge=1, le=1024)
    distributed_executor_backend: Literal["mp", "ray"] | None = engine_default("distributed_executor_backend")  # None: vLLM picks (mp on one node)
    gpu_memory_utilization: float = Field(engine_default("gpu_memory_utilization"), gt=0.0, le=1.0)  # CUDA: the share of GPU memory the engine may take
    api_key: str | None = None
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_contexts: int = Field(64, ge=1, le=4096)
    data_dir: Path = Field(default_factory=lambda: Path.home() / ".local" / "share" / "longserve")
    max_trie_keys: int = Field(2_000_000, ge=1)
    max_key_chars: int = Field(512, ge=1)
    max_trie_bytes: int = Field(4 * 2**30, ge=2**20)
    max_upload_bytes: int = Field(2**30, ge=1024)
    trie_sync_seconds: float = Field(1.0, ge=0.0, le=3600.0)  # how often --data-dir is read for other replicas' changes; 0: never
    grammar_cache_bytes: int = Field(256 * 2**20, ge=2**20, le=2**40)  # compiled structured-output grammars, by their text
    grammar_compile_timeout: float = Field(30.0, gt=0.0, le=3600.0)  # seconds one grammar may take to compile (a 400 past it)
    grammar_compile_memory: int = Field(4 * 2**30, ge=2**28, le=2**40)  # bytes one grammar's compile process may map
    grammar_step_timeout: float = Field(engine_default("grammar_step_timeout"), gt=0.0, le=3600.0)  # native: seconds a grammar may take to check one token
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_prompts: bool = False  # prompt text in the log; off by default: prompts are the users' data
    # reliability (server/drain.py, server/http_server.py)
    shutdown_timeout: float = Field(30.0, ge=0.0, le=3600.0)
    health_stall_seconds: float = Field(120.0, gt=0.0, le=86400.0)
    max_header_bytes: int = Field(64 * 1024, ge=1024, le=16 * 2**20)
    header_timeout: float = Field(10.0, gt=0.0, le=3600.0)
    body_timeout: float = Field(30.0, gt=0.0, le=3600.0)
    keep_alive_timeout: int = Field(5, ge=1, le=3600)
    sse_ping_seconds: float | None = Field(None, gt=0.0, le=3600.0)  # None: no keep-alive comments in streams

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def engine_config(self, model_path: str) -> EngineConfig:
        """The engine's share of these settings: every EngineConfig field of the same name."""
        given = {name: getattr(self, name) for name in EngineConfig.__dataclass_fields__
                 if name not in ("model_path", "model_name", "data_dir")}
        return EngineConfig(model_path=model_path, model_name=self.model_name, data_dir=str(self.data_dir), **given)
