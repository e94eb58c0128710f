"""vLLM's distributed runtime behind `longserve serve --engine vllm`, started as a user starts it: the flags reach
vLLM, tensor parallelism gives one worker's answers (log-n and a ntk-mixed table past the trained length, and a
trie constraint, so our plugin, rope mapping and logits processor reach every worker), the API key comes from the
environment, and a stopped server leaves no process behind. It is the suite's one vLLM start outside the session's
vllm_server: each start costs tens of seconds on 2 cores, so everything that needs its own flags is checked on it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from longserve.server.engine.vllm import cpu_thread_binding, vllm_available
from tests.conftest import free_port, healthy, tiny_model, wait_until

TRAINED, LONGEST = 256, 1024
LONG = " ".join(f"word{i % 97}" for i in range(300))  # about 900 tokens: 3.5x the trained length
PROMPTS = [LONG, "Once upon a time, in a land far away, " * 30]  # two lengths in one batch, both past TRAINED
POSITION = {"type": "ntk-mixed", "factor": 4, "b": 0.625, "logn": True}
CHOICES = ["red", "green", "blue", "dark red"]
API_KEY = "k-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


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


def answers(url: str, headers: dict | None = None, position: dict | None = None) -> dict:
    """What the checks compare: the greedy texts of PROMPTS, the key a constrained request picks, and LONG's prompt
    log-probs (echo, as `longserve eval loss` scores)."""
    def post(body: dict) -> dict:
        reply = httpx.post(f"{url}/v1/completions", timeout=300, headers=headers,
                           json={"model": "tiny", "temperature": 0, **body, **({"position": position} if position else {})})
        assert reply.status_code == 200, reply.text
        return reply.json()

    greedy = post({"prompt": PROMPTS, "max_tokens": 16, "ignore_eos": True})
    keyed = post({"prompt": PROMPTS[1], "max_tokens": 8, "constraint": {"choices": CHOICES, "lead": " "}})
    scored = post({"prompt": LONG, "max_tokens": 0, "echo": True, "logprobs": 0})
    return {"texts": [choice["text"] for choice in sorted(greedy["choices"], key=lambda c: c["index"])],
            "key": keyed["choices"][0]["key"], "logprobs": scored["choices"][0]["logprobs"]["token_logprobs"][1:]}


def tensor_parallel_answers(model_dir: Path, tensor_parallel: int, tmp_path: Path) -> dict:
    """answers() from `longserve serve --engine vllm` on `tensor_parallel` workers, with its key in LONGSERVE_API_KEY;
    checks on the way that the key is asked for, that the engine runs in child processes, and that none outlives
    the server's SIGTERM."""
    port = free_port()
    log = open(tmp_path / f"tp{tensor_parallel}.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "longserve.server.cli", "serve", "--model", str(model_dir), "--served-model-name", "tiny", "--engine", "vllm",
         "--dtype", "float32", "--port", str(port), "--max-num-seqs", "4", "--tensor-parallel-size", str(tensor_parallel),
         "--max-model-len", str(LONGEST), "--enforce-eager",  # compiling takes minutes; this test is about the runtime
         "--data-dir", str(tmp_path / "data"), "--position", json.dumps(POSITION)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "LONGSERVE_API_KEY": API_KEY},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: server.poll() is not None or healthy(url), timeout=600, interval=1)
        assert server.poll() is None, (tmp_path / f"tp{tensor_parallel}.log").read_text()[-3000:]
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key came from LONGSERVE_API_KEY
        assert len(session_processes(server.pid)) > 1, "vLLM runs its engine in child processes"
        return answers(url, AUTH)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
        log.close()
        assert wait_until(lambda: not session_processes(server.pid), timeout=60), f"left behind: {session_processes(server.pid)}"


@pytest.mark.server
@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (make setup installs it unless SKIP_VLLM=1)")
def test_tensor_parallel_2_gives_one_workers_answers_past_the_trained_length_and_leaves_nothing_behind(tokenizer, tmp_path):
    """A tiny random model (head_dim 64, which vLLM's CPU attention takes; 4 heads, 2 KV heads: both split in 2), against
    the native engine's answers on the same weights and positions: one worker's maths, computed independently.
    vLLM's ntk table must reach past max_position_embeddings (else garbage, no error) and the plugin must scale the
    queries on every worker: the log-probs agree to 1e-3, and without log-n they would differ far more."""
    from longserve.patches.rope import PositionSpec
    from tests.conftest import make_engine, running_server

    def model():
        return tiny_model("llama", seed=7, hidden_size=256, intermediate_size=512, max_position_embeddings=TRAINED)

    model_dir = tmp_path / "tiny"
    model().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    assert 700 < len(tokenizer.encode(LONG)) < LONGEST - 16 and TRAINED < len(tokenizer.encode(PROMPTS[1])) < LONGEST - 16
    with running_server(make_engine(model(), tokenizer, max_model_len=LONGEST, position=PositionSpec(**POSITION))) as url:
        native = answers(url)
        without_logn = answers(url, position={**POSITION, "logn": False})["logprobs"]
    assert all(native["texts"]) and native["key"] in CHOICES
    parallel = tensor_parallel_answers(model_dir, 2, tmp_path)
    assert (parallel["texts"], parallel["key"]) == (native["texts"], native["key"])
    gap = max(abs(a - b) for a, b in zip(parallel["logprobs"], native["logprobs"]))
    gap_without_logn = max(abs(a - b) for a, b in zip(parallel["logprobs"], without_logn))
    assert len(parallel["logprobs"]) == len(native["logprobs"]) > 700
    assert gap < 1e-3, f"vLLM on two workers and the native engine differ by {gap}"
    assert gap_without_logn > 50 * gap, "log-n made no difference: the check above would not catch a missing plugin"


def test_cpu_workers_get_their_own_share_of_the_cpus():
    cpus = sorted(os.sched_getaffinity(0))
    shares = cpu_thread_binding(len(cpus)).split("|")
    assert shares == [str(cpu) for cpu in cpus]
    with pytest.raises(ValueError, match="lower the sizes"):
        cpu_thread_binding(len(cpus) + 1)


def test_the_native_engine_refuses_the_distributed_flags(tmp_path):
    reply = subprocess.run([sys.executable, "-m", "longserve.server.cli", "serve", "--engine", "native", "--tensor-parallel-size", "2",
                            "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert reply.returncode != 0 and "--tensor-parallel-size needs --engine vllm" in reply.stderr
