"""An 8-bit KV cache (--kv-cache-dtype): what each choice stores, and how one plane is quantized and read back.

Every (token, KV head) vector of d values is stored as d one-byte codes and one
scale, computed when the token is written: no calibration, nothing that depends
on position or on other tokens, so a block can be shared by prefix caching and
copy-on-write beams as it is (vLLM's and SGLang's "per token and head" scales;
per-tensor scales left at 1.0 are the ones both projects warn about).

- int8: codes round(x / s) in [-127, 127], s = max|x| / 127. Error per value at
  most s / 2, a 254th of the vector's largest value.
- fp8 (= fp8_e4m3): codes x / s in float8 e4m3, s = max|x| / 448: three mantissa
  bits, so error at most 1/16 of the value (relative, down to the smallest normal).
- fp8_e5m2: s = max|x| / 57344, two mantissa bits: at most 1/8 of the value.

Scales take two bytes: the model's dtype where that is bfloat16 or float16,
float16 for float32 models. They are stored rounded, and the codes are computed
against the stored scale, so reading back adds no error of its own beyond the
final rounding to the model's dtype. A scale never goes below the smallest normal
of its dtype (a vector of zeros stays zeros; one of values under 0.008 in a
float32 model then has an absolute error under 3e-5).

Reading back happens in the attention backend for the blocks a call reads,
never for the whole cache. On CPU, decode rows are read in place by the paged
decode kernel (paged_decode.c), which widens codes in registers and applies a
scale once per key's score and value's weight. Elsewhere, and for prefill
chunks, dequantize widens the gathered codes to the model's dtype and
multiplies them by their scales; the kernels then accumulate in float32 as
they do for an unquantized cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CACHE_DTYPES = ("auto", "int8", "fp8", "fp8_e4m3", "fp8_e5m2")  # vLLM's flag values, with int8 added


@dataclass(frozen=True)
class CacheFormat:
    name: str  # as --kv-cache-dtype names it ("fp8" is fp8_e4m3)
    codes: torch.dtype | None  # what a code means; None: the model's dtype, unquantized
    largest: float  # the largest code's magnitude

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    @property
    def stored(self) -> torch.dtype | None:
        """The dtype of the stored codes: float8 ones are kept as bytes, as torch has no index_copy_ for them on CPU."""
        if self.codes is None:
            return None
        return torch.int8 if self.codes == torch.int8 else torch.uint8

    def describe(self) -> str:
        if not self.quantized:
            return "the model's dtype"
        return f"{self.name}, one scale per token and head"


FORMATS = {
    "auto": CacheFormat("auto", None, 0.0),
    "int8": CacheFormat("int8", torch.int8, 127.0),
    "fp8": CacheFormat("fp8", torch.float8_e4m3fn, torch.finfo(torch.float8_e4m3fn).max),
    "fp8_e4m3": CacheFormat("fp8_e4m3", torch.float8_e4m3fn, torch.finfo(torch.float8_e4m3fn).max),
    "fp8_e5m2": CacheFormat("fp8_e5m2", torch.float8_e5m2, torch.finfo(torch.float8_e5m2).max),
}


def cache_format(name: str) -> CacheFormat:
    if name not in FORMATS:
        raise ValueError(f"--kv-cache-dtype {name!r} is not one of {', '.join(CACHE_DTYPES)}")
    return FORMATS[name]


def scale_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Two bytes per scale: the model's own 16-bit dtype, else float16."""
    return model_dtype if model_dtype in (torch.bfloat16, torch.float16) else torch.float16


def code_bytes(cache: CacheFormat, model_dtype: torch.dtype, head_dim: int) -> int:
    """Bytes one (token, KV head) vector takes in a plane: its values, and its scale where quantized."""
    if not cache.quantized:
        return head_dim * torch.empty((), dtype=model_dtype).element_size()
    return head_dim + torch.empty((), dtype=scale_dtype(model_dtype)).element_size()


def quantize(x: torch.Tensor, cache: CacheFormat, scales_as: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] as (codes [..., d] in cache.stored, scales [...] in `scales_as`)."""
    wide = x.float()
    largest = wide.abs().amax(dim=-1)
    limits = torch.finfo(scales_as)
    scales = (largest / cache.largest).clamp_(limits.tiny, limits.max).to(scales_as)  # finite: no inf * 0 = NaN
    scaled = wide / scales.float().unsqueeze(-1)  # a new tensor: x.float() is x itself for float32
    if cache.codes == torch.int8:
        return scaled.round_().clamp_(-127, 127).to(torch.int8), scales
    # a stored scale may round below largest / cache.largest: clamp, so no code overflows to inf or NaN
    return scaled.clamp_(-cache.largest, cache.largest).to(cache.codes).view(torch.uint8), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, cache: CacheFormat, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """codes [..., d] and scales [...] back to values [..., d] in `dtype`, into `out` where given. On CPU torch
    widens int8 vectorized and float8 one value at a time: reading back 12.6M codes in bfloat16 took 2.5 ms from
    int8, 29 ms from e4m3 and 8 ms from e5m2 (2 threads); a lookup of the 256 codes was no faster."""
    typed = codes.view(cache.codes)
    values = typed.to(dtype) if out is None else out.copy_(typed)
    return values.mul_(scales.to(dtype).unsqueeze(-1))
