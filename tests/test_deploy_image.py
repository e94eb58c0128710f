"""The CPU image itself: built and asked one question, where a Docker daemon runs (elsewhere the test says why it
skipped). tests/test_deploy.py checks the Dockerfiles and manifests without building anything."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "deploy" / "docker"


def docker_unavailable() -> str | None:
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no Docker daemon here: `docker info`: {exc}"
    return f"no Docker daemon here: {(info.stderr.strip().splitlines() or ['?'])[-1]}" if info.returncode else None


def healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=5).status == 200
    except OSError:
        return False


@pytest.mark.server
def test_cpu_image_serves():
    if reason := docker_unavailable():
        pytest.skip(reason)
    tag = "longserve-test:cpu"  # SKIP_VLLM=1: the native engine only, which keeps the build to minutes
    subprocess.run(["docker", "build", "-f", str(DOCKER / "Dockerfile.cpu"), "--build-arg", "SKIP_VLLM=1", "-t", tag, str(REPO)],
                   check=True, timeout=1800)
    container = subprocess.run(["docker", "run", "-d", "--rm", "-p", "127.0.0.1::8000", tag], check=True, capture_output=True,
                               text=True, timeout=60).stdout.strip()
    try:
        port = subprocess.run(["docker", "port", container, "8000/tcp"], check=True, capture_output=True, text=True, timeout=30)
        base = f"http://{port.stdout.split()[0]}"
        deadline = time.monotonic() + 300
        while not healthy(f"{base}/health"):
            assert time.monotonic() < deadline, "the container did not turn healthy in 5 min"
            time.sleep(2)
        body = json.dumps({"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 4}).encode()
        request = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        assert json.load(urllib.request.urlopen(request, timeout=120))["choices"][0]["text"]
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True, timeout=60)
