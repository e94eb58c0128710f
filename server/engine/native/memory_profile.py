"""What a step's activations take, measured, so the KV budget leaves them room.

As nano-vllm and vLLM do, the engine runs its start-up forward passes (the
step-budget probe and one pass at --max-num-batched-tokens) on a small probe
pool before the real pool exists, and sizes the real pool from what is left
after the weights and the highest memory those passes reached. On CUDA that
is the allocator's own peak; on CPU it is the process's resident high-water
mark (VmHWM, reset through /proc/self/clear_refs), which also counts what the
allocator keeps after a pass: memory the next step would reuse anyway.
Memory the process freed earlier and reuses during the passes does not
raise the mark, and need not: it is out of MemAvailable already.
"""

from __future__ import annotations

import torch


def status_bytes(field: str) -> int:
    """A size line of /proc/self/status (VmRSS, VmHWM), in bytes; 0 where it cannot be read."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_resident_peak() -> bool:
    """Set VmHWM back to the present RSS (Linux: "5" to clear_refs); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.bytes`: how far memory rose above its level at entry."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = status_bytes("VmRSS")
            self.exact = reset_resident_peak()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:  # without a reset, the high-water mark may predate entry: the present RSS is the safe reading then
            peak = status_bytes("VmHWM") if self.exact else status_bytes("VmRSS")
            self.bytes = max(0, peak - self.start)
