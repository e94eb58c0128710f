"""SIGTERM drains: `longserve serve` as a real process with the bundled model, signalled mid-stream.

Also checks what it logs: the request id on every line about the request,
and no prompt text (there is no --log-prompts here).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, healthy, wait_until

pytestmark = pytest.mark.server  # each test starts `longserve serve` in a process of its own

SECRET = "SECRET-PASSPHRASE-42"


@contextmanager
def server_process(model_path, tmp_path: Path, *flags: str):
    port = free_port()
    log_path = tmp_path / "server.log"
    command = [sys.executable, "-m", "longserve.server.cli", "serve", "--model", str(model_path), "--port", str(port),
               "--data-dir", str(tmp_path / "data"), "--max-model-len", "4096", *flags]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"

    try:
        assert wait_until(lambda: healthy(url), timeout=180, interval=0.25), log_path.read_text()[-3000:]
        yield process, url, log_path
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class Stream:
    """A streamed completion read in a thread-free way: open it, then read its events one by one."""

    def __init__(self, url: str, max_tokens: int, request_id: str):
        self.client = httpx.Client(timeout=120)
        body = {"prompt": f"{SECRET} Once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0.0, "stream": True}
        self.response = self.client.send(self.client.build_request(
            "POST", f"{url}/v1/completions", json=body, headers={"X-Request-Id": request_id}), stream=True)
        assert self.response.status_code == 200
        self.lines = self.response.iter_lines()

    def next_event(self):
        for line in self.lines:
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                return data if data == "[DONE]" else json.loads(data)
        return None

    def rest(self) -> list:
        """Every remaining event; reading to the end raises if the chunked body was cut."""
        events = []
        while (event := self.next_event()) is not None:
            events.append(event)
        self.client.close()
        return events


def group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_sigterm_lets_a_stream_finish_and_refuses_new_requests(bundled_path, tmp_path):
    with server_process(bundled_path, tmp_path, "--shutdown-timeout", "60") as (process, url, log_path):
        stream = Stream(url, max_tokens=40, request_id="drain-finish-1")
        assert stream.next_event()["choices"][0]["finish_reason"] is None
        process.send_signal(signal.SIGTERM)
        assert wait_until(lambda: httpx.get(f"{url}/health").status_code == 503, timeout=120)
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503 and refused.headers["connection"] == "close"
        assert "shutting down" in refused.json()["error"]["message"]
        events = stream.rest()
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert not any("error" in e for e in events[:-1])
        assert process.wait(30) == 0
        assert group_is_gone(process.pid)
        log = log_path.read_text()
        assert "[drain-finish-1]" in log  # the id on the request's lines
        assert SECRET not in log  # and no prompt text without --log-prompts


def test_sigterm_ends_a_stream_longer_than_the_timeout_cleanly(bundled_path, tmp_path):
    with server_process(bundled_path, tmp_path, "--shutdown-timeout", "1") as (process, url, _):
        stream = Stream(url, max_tokens=3000, request_id="drain-cut-1")
        assert stream.next_event()["choices"][0]["finish_reason"] is None
        process.send_signal(signal.SIGTERM)
        events = stream.rest()  # no exception: the chunked body ended with its terminator; 3000 tokens: the timeout cut it
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["type"] == "service_unavailable"
        assert "--shutdown-timeout" in events[-2]["error"]["message"]
        assert process.wait(30) == 0
        assert group_is_gone(process.pid)


@pytest.mark.parametrize("flag", ["--log-prompts"])
def test_log_prompts_writes_the_prompt(bundled_path, tmp_path, flag):
    with server_process(bundled_path, tmp_path, flag) as (process, url, log_path):
        response = httpx.post(f"{url}/v1/completions", json={"prompt": f"{SECRET} hi", "max_tokens": 2},
                              headers={"X-Request-Id": "with-prompts"}, timeout=60)
        assert response.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    lines = [line for line in log_path.read_text().splitlines() if SECRET in line]
    assert lines and all("[with-prompts]" in line for line in lines)
