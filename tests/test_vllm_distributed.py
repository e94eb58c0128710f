"""vLLM's distributed runtime behind `longserve serve --engine vllm`: the flags reach vLLM, tensor parallelism
gives one worker's greedy output (log-n and a trie constraint included, so our plugin and logits processor reach
the workers), and a stopped server leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.engine.vllm import cpu_thread_binding, vllm_available
from tests.conftest import free_port, tiny_model, wait_until

PROMPTS = ["The quick brown fox jumps over the lazy dog. " * 12, "Once upon a time, in a land far away, " * 12]  # past 64 tokens
POSITION = {"type": "ntk-mixed", "factor": 4, "logn": True}  # the tiny model is trained to 64: log-n acts on every prompt
CHOICES = ["red", "green", "blue", "dark red"]


def session_processes(session: int) -> list[str]:
    """The command lines of the processes still in `session` (a server and everything it started)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            alive.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return alive


def greedy_outputs(model_dir: Path, tensor_parallel: int, tmp_path: Path) -> tuple[list[str], str]:
    """The greedy texts of PROMPTS and the key a constrained request picks, from a server on `tensor_parallel` workers."""
    port = free_port()
    log = open(tmp_path / f"tp{tensor_parallel}.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--served-model-name", "tiny", "--engine", "vllm",
         "--dtype", "float32", "--port", str(port), "--max-num-seqs", "4", "--tensor-parallel-size", str(tensor_parallel),
         "--data-dir", str(tmp_path / "data"), "--position", json.dumps(POSITION)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: server.poll() is not None or healthy(url), timeout=300, interval=1)
        assert server.poll() is None, (tmp_path / f"tp{tensor_parallel}.log").read_text()[-3000:]
        reply = httpx.post(f"{url}/v1/completions", timeout=120,
                           json={"model": "tiny", "prompt": PROMPTS, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        keyed = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "constraint": {"choices": CHOICES, "lead": " "}})
        assert keyed.status_code == 200, keyed.text
        return [choice["text"] for choice in sorted(reply.json()["choices"], key=lambda c: c["index"])], keyed.json()["choices"][0]["key"]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
        log.close()
        assert wait_until(lambda: not session_processes(server.pid), timeout=30), f"left behind: {session_processes(server.pid)}"


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (make setup installs it unless SKIP_VLLM=1)")
def test_tensor_parallel_2_gives_one_workers_greedy_output_and_leaves_nothing_behind(tokenizer, tmp_path):
    """A tiny random model (head_dim 64, which vLLM's CPU attention takes; 4 heads, 2 KV heads: both split in 2)."""
    import asyncio

    from patches.rope import PositionSpec
    from tests.conftest import make_engine
    from tests.test_engine import engine_greedy

    def model():
        return tiny_model("llama", seed=7, hidden_size=256, intermediate_size=256, max_position_embeddings=64)

    model_dir = tmp_path / "tiny"
    model().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    one = greedy_outputs(model_dir, 1, tmp_path)
    two = greedy_outputs(model_dir, 2, tmp_path)
    assert all(one[0]) and one[1] in CHOICES and two == one
    native = make_engine(model(), tokenizer, position=PositionSpec(**POSITION))  # the same maths, in this process
    try:
        tokens = asyncio.run(engine_greedy(native, [tokenizer.encode(p) for p in PROMPTS], 16, ignore_eos=True))
    finally:
        native.shutdown()
    assert [tokenizer.decode(t) for t in tokens] == two[0]


def test_cpu_workers_get_their_own_share_of_the_cpus():
    cpus = sorted(os.sched_getaffinity(0))
    shares = cpu_thread_binding(len(cpus)).split("|")
    assert shares == [str(cpu) for cpu in cpus]
    with pytest.raises(ValueError, match="lower the sizes"):
        cpu_thread_binding(len(cpus) + 1)


def test_the_native_engine_refuses_the_distributed_flags(tmp_path):
    reply = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--engine", "native", "--tensor-parallel-size", "2",
                            "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert reply.returncode != 0 and "--tensor-parallel-size needs --engine vllm" in reply.stderr
