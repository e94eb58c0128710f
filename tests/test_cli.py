"""The command line: model resolution errors, and `longserve serve` as a user starts it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from longserve.server.models import ModelError, resolve
from tests.conftest import free_port, healthy, openai_client, wait_until


def longserve(*args: str, env_extra: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "longserve.server.cli", *args], capture_output=True, text=True, env=env, timeout=120, **kwargs)


@pytest.mark.parametrize(
    "name, words",
    [
        ("no-such-model", ["unknown model", "smollm2-135m-instruct"]),
        ("/no/such/dir", ["does not exist"]),
        ("someorg/somemodel", ["hub", "reachable"]),
    ],
)
def test_bad_model_names_fail_with_one_line_and_exit_2(name, words):
    result = longserve("fetch-model", name)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("longserve: error:"), result.stderr
    for word in words:
        assert word in lines[0]


def test_corrupt_directory_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ModelError, match="unreadable config.json"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelError, match="no weights"):
        resolve(str(tmp_path))
    result = longserve("serve", "--model", str(tmp_path))
    assert result.returncode == 2 and "no weights" in result.stderr and "Traceback" not in result.stderr


def test_bad_flag_value_fails_with_exit_2():
    result = longserve("serve", "--max-num-seqs", "0")
    assert result.returncode == 2 and "--max-num-seqs" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_kv_cache_dtype_stops_serve_with_the_valid_choices():
    for result in (longserve("serve", "--kv-cache-dtype", "int3"),
                   longserve("serve", env_extra={"LONGSERVE_KV_CACHE_DTYPE": "int3"})):
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "kv-cache-dtype" in result.stderr and "'int8'" in result.stderr and "'fp8_e5m2'" in result.stderr


def test_fetch_model_is_idempotent(bundled_path):
    """A second fetch finds the converted model and leaves it as it is: the same files, nothing converted again."""
    before = {path.name: path.stat().st_ino for path in bundled_path.iterdir()}
    result = longserve("fetch-model")
    assert result.returncode == 0 and result.stdout.strip() == str(bundled_path)
    assert "[1/3]" not in result.stderr  # no conversion step ran
    assert {path.name: path.stat().st_ino for path in bundled_path.iterdir()} == before


def save_tiny_model(out, tokenizer) -> None:
    """A tiny model stands in for the GGUF's conversion (minutes)."""
    from tests.conftest import tiny_model

    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def test_servers_starting_together_convert_the_model_once(tmp_path, monkeypatch, tokenizer):
    """Replicas on one RWX volume: the first converts, the others wait for it and load what it wrote. They
    used to convert each, and the later rename removed the directory an earlier replica was loading."""
    import threading

    from longserve.server import models

    conversions = []

    def convert(model, out):
        conversions.append(out)
        time.sleep(1.0)  # long enough for the others to arrive meanwhile
        save_tiny_model(out, tokenizer)

    monkeypatch.setenv("LONGSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "convert_gguf", convert)
    model = next(iter(models.BUNDLED.values()))
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.fetch_bundled(model))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(conversions) == 1
    assert results == [tmp_path / "models" / model.name] * 3 and models.is_model_dir(results[0])


def test_a_copy_another_node_finished_meanwhile_is_kept(tmp_path, monkeypatch, tokenizer):
    """On NFS mounted nolock the flock holds only within a node: a replica on another node can finish its copy
    while this one converts. This one keeps that copy (a replica may be loading it) and drops its own."""
    from longserve.server import models

    monkeypatch.setenv("LONGSERVE_CACHE", str(tmp_path))
    model = next(iter(models.BUNDLED.values()))
    target = tmp_path / "models" / model.name

    def convert(model, out):
        save_tiny_model(out, tokenizer)
        save_tiny_model(target, tokenizer)  # the other node's rename lands while this conversion runs
        (target / "other-node").write_text("")

    monkeypatch.setattr(models, "convert_gguf", convert)
    assert models.fetch_bundled(model) == target
    assert (target / "other-node").exists() and models.is_model_dir(target)
    assert [path.name for path in target.parent.iterdir() if path.name.startswith(".") and path.is_dir()] == []


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, read from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.server
def test_serve_command_answers_openai_requests_and_stops_without_strays():
    """The native engine; `serve --engine vllm` as a user starts it is test_vllm_distributed.py's (one vLLM start)."""
    engine = "native"
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LONGSERVE_API_KEY": "k-123"}
    process = subprocess.Popen(
        [sys.executable, "-m", "longserve.server.cli", "serve", "--port", str(port), "--max-num-seqs", "2", "--engine", engine,
         "--dtype", "float32"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    children = set()
    try:
        url = f"http://127.0.0.1:{port}"

        assert wait_until(lambda: healthy(url), timeout=240, interval=0.5), "server did not start"
        reply = openai_client(url, api_key="k-123").chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=12
        )
        assert "Paris" in reply.choices[0].message.content
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key came from LONGSERVE_API_KEY
        children = descendants(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert wait_until(lambda: not any(alive(pid) for pid in children), timeout=30), "processes outlived the server"
