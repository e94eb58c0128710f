"""`make soak` at toy scale: the command starts its server, drives every kind of request, and reports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.server  # the soak starts its own server


def test_a_short_soak_reports_and_finds_no_5xx_or_leak():
    result = subprocess.run(
        [sys.executable, "benchmarks/soak.py", "--minutes", "0.2", "--warmup-minutes", "0.05", "--clients", "4",
         "--max-tokens", "8", "--port", str(free_port())],
        capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert "RSS: start" in out and "after warm-up" in out, out + result.stderr[-2000:]
    for kind in ("chat", "completion", "nbce", "beam"):
        assert f"{kind} " in out.split("requests in", 1)[1].splitlines()[0]
    assert "PASS: 0 leaked sequences" in out
    assert "PASS: 0 5xx" in out
    assert "PASS: no failed request" in out
    assert "minute   done     p50     p99" in out
