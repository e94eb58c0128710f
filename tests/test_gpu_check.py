"""benchmarks/gpu_check.py, the script a lent GPU runs first, goes through its whole flow here on a tiny model on
the CPU: the CUDA test module (skipped without CUDA), then a rate for every cell of its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_script_runs_its_whole_flow_on_a_tiny_model_on_the_cpu():
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--device", "cpu", "--tokens", "4"],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import torch

    assert f"CUDA tests: {'passed' if torch.cuda.is_available() else 'skipped'}" in result.stdout
    cells = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["128"], ["256"])]
    assert [(int(c[0]), int(c[1])) for c in cells] == [(128, 1), (128, 4), (256, 1), (256, 4)]
    assert all(float(c[2]) > 0 and float(c[3]) > 0 for c in cells), result.stdout
