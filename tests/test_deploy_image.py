"""The CPU image itself, built and run as a user would (`make image-test`): one chat question through the
openai SDK, a knowledge base registered and a constrained question, SIGTERM during a stream (the stream
finishes, the container exits 0), the server running as the non-root user, the model cache and --data-dir
on volumes. It downloads torch into the image, so `make test` leaves it out: it runs where a container tool
(podman or docker) works and LONGSERVE_IMAGE_TEST=1 asks for it, and otherwise skips saying why.
tests/test_deploy.py checks the Dockerfiles and manifests without building anything."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port, healthy, openai_client

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"


def container_tool() -> tuple[str | None, str | None]:
    """(podman or docker, None), or (None, why neither runs here)."""
    if os.environ.get("LONGSERVE_IMAGE_TEST") != "1":
        return None, "builds the CPU image (torch downloaded into it): set LONGSERVE_IMAGE_TEST=1, or run `make image-test`"
    reasons = []
    for tool in ("podman", "docker"):
        if not shutil.which(tool):
            reasons.append(f"no {tool}")
            continue
        info = subprocess.run([tool, "info"], capture_output=True, text=True, timeout=60)
        if info.returncode == 0:
            return tool, None
        reasons.append(f"`{tool} info`: {(info.stderr.strip().splitlines() or ['?'])[-1]}")
    return None, "no container tool works here: " + "; ".join(reasons)


def run(*command: str, timeout: float = 120) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(command)}:\n{done.stderr[-2000:]}"
    return done.stdout.strip()


@pytest.mark.server
def test_the_cpu_image_serves_drains_and_runs_as_its_user():
    tool, why_not = container_tool()
    if tool is None:
        pytest.skip(why_not)
    image = os.environ.get("LONGSERVE_IMAGE", "longserve:cpu")
    # `make image` first (its flags: base image, pip's sources), unless LONGSERVE_IMAGE names one built already
    if "LONGSERVE_IMAGE" not in os.environ:
        subprocess.run(["make", "-C", str(REPO), "image", f"IMAGE={image}"], check=True, timeout=3600)
    suffix = uuid.uuid4().hex[:8]
    cache, data, name = f"longserve-cache-{suffix}", f"longserve-data-{suffix}", f"longserve-test-{suffix}"
    port = free_port()
    run(tool, "volume", "create", cache)
    run(tool, "volume", "create", data)
    try:
        # host networking: the sandboxes this runs in have no container network; the server takes the port
        run(tool, "run", "-d", "--name", name, "--network", "host", "-v", f"{cache}:/home/longserve/.cache",
            "-v", f"{data}:/data", image, "--port", str(port), "--max-model-len", "2048", "--shutdown-timeout", "120")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while not healthy(base):
            state = run(tool, "inspect", "-f", "{{.State.Status}}", name)
            assert state == "running", f"the container stopped: {run(tool, 'logs', name)[-3000:]}"
            assert time.monotonic() < deadline, "the container did not turn healthy in 10 minutes"
            time.sleep(2)
        client = openai_client(base)

        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                                max_tokens=16, temperature=0)
        assert answer.choices[0].message.content

        import httpx

        created = httpx.post(f"{base}/v1/tries", json={"name": "capitals", "entries": [
            {"key": "France ||| capital", "value": "Paris"}, {"key": "Japan ||| capital", "value": "Tokyo"}]}, timeout=120)
        assert created.status_code == 200, created.text
        keyed = client.completions.create(model=MODEL, prompt="Question: what is the capital of Japan?\nKey:", max_tokens=16,
                                          temperature=0, extra_body={"constraint": {"trie": "capitals"}}).choices[0]
        assert keyed.model_extra["key"] in ("France ||| capital", "Japan ||| capital")
        assert keyed.model_extra["value"] == {"France ||| capital": "Paris", "Japan ||| capital": "Tokyo"}[keyed.model_extra["key"]]

        uid = [line.split()[1] for line in run(tool, "exec", name, "cat", "/proc/1/status").splitlines() if line.startswith("Uid:")]
        assert uid == ["1001"], uid  # the server process, not only the exec'd one

        stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=64, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        chunks = iter(stream)
        first = next(chunks)
        run(tool, "kill", "--signal", "TERM", name)
        rest = list(chunks)
        finish = [c.choices[0].finish_reason for c in [first, *rest] if c.choices and c.choices[0].finish_reason]
        assert finish == ["length"], finish  # the stream in flight ran to its end
        assert run(tool, "wait", name, timeout=300) == "0"  # and then the server exited cleanly
    finally:
        subprocess.run([tool, "rm", "-f", name], capture_output=True, timeout=120)
        subprocess.run([tool, "volume", "rm", "-f", cache, data], capture_output=True, timeout=120)
