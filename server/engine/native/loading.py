"""What the native engine starts from, past its EngineConfig: the device and dtype, the model and its end tokens,
and how host tensors reach the device."""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a stream sync: through pinned memory on CUDA (a copy from pageable
    memory waits for the stream), as it is on CPU."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides CPU speed here; printed beside figures


def cpu_flags() -> set[str]:
    """The CPU's flags as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return set(next((line for line in cpuinfo if line.startswith("flags")), "").split())
    except OSError:
        return set()


def speed_flags() -> str:
    """The flags of SPEED_FLAGS this CPU has, for a benchmark's header."""
    return " ".join(flag for flag in SPEED_FLAGS if flag in cpu_flags())


def cpu_has_bf16_matmul() -> bool:
    """AVX512-BF16 or AMX-BF16: bfloat16 matmuls run 1.3-2x faster than float32 (measured in the issue-16 note)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16_matmul() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_model(path: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tokenizer


def eos_ids(model, tokenizer) -> frozenset[int]:
    ids = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)
