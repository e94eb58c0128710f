"""Shared fixtures: tiny random-weight models, the bundled model, live servers on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a hub

from longserve.server.app import create_app  # noqa: E402
from longserve.server.engine.config import EngineConfig  # noqa: E402
from longserve.server.engine.native.engine import NativeEngine  # noqa: E402
from longserve.server.engine.metrics import Metrics  # noqa: E402
from longserve.server.models import DEFAULT_MODEL, resolve  # noqa: E402
from longserve.server.settings import ServerSettings  # noqa: E402


# ---- tiers -------------------------------------------------------------------
# `make test-fast` runs `-m "not server and not vllm"`: the tests that start no HTTP server (in this process or
# another) and need no vLLM. A test that takes a fixture named `*server` (or `client`) is marked by itself; a test
# that starts a server inline says so with @pytest.mark.server. A server started in this process under a test that
# is not marked fails that test, so the fast tier never slows down by accident. `vllm` marks the tests that need
# vllm installed.


def pytest_collection_modifyitems(items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        on_vllm = "vllm_server" in fixtures or getattr(item, "callspec", None) and item.callspec.params.get("server") == "vllm"
        if on_vllm:
            item.add_marker(pytest.mark.vllm)
        if on_vllm or "client" in fixtures or any(name.endswith("server") for name in fixtures):
            item.add_marker(pytest.mark.server)


_current_test = {"item": None}
_started = {"servers in this process": 0, "native engines": 0}  # what a run pays for, printed at its end


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line("started: " + ", ".join(f"{count} {what}" for what, count in _started.items()))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item):
    _current_test["item"] = item  # before any fixture: a module's server fixture starts under its first test
    yield
    _current_test["item"] = None


def _server_starting() -> None:
    """Count a server this process starts, and fail the test that starts it unmarked."""
    _started["servers in this process"] += 1
    item = _current_test["item"]
    if item is not None and item.get_closest_marker("server") is None:
        raise RuntimeError(f"{item.nodeid} starts a server: mark it @pytest.mark.server, or the fast tier runs it")


@pytest.fixture(scope="session")
def bundled_path():
    return resolve(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tokenizer(bundled_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundled_path))


@pytest.fixture(scope="session")
def bundled_model(bundled_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(bundled_path), dtype=torch.float32).eval()


def tiny_model(model_type: str = "llama", vocab_size: int = 49152, seed: int = 0, **overrides):
    """A random-weight model of the given family, small enough to run in milliseconds."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=2,
        bos_token_id=1,
    )
    config = AutoConfig.for_model(model_type, **{**settings, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Larger logits than the default init gives: greedy choices far from ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama")


def make_engine(model, tokenizer, name="tiny", **config) -> NativeEngine:
    config.setdefault("kv_cache_memory", 1.0)  # GiB: 15k tokens of the bundled model in float32 (3 planes); far more of a tiny one
    config.setdefault("max_num_batched_tokens", 2048)  # not sized from a timed pass: steps the same on any machine
    metrics = Metrics(name)
    _started["native engines"] += 1
    return NativeEngine(EngineConfig(model_path="", model_name=name, **config), metrics=metrics, model=model, tokenizer=tokenizer)


@contextmanager
def running_engine(model, tokenizer, **config):
    """make_engine's engine, shut down on leaving."""
    engine = make_engine(model, tokenizer, **config)
    try:
        yield engine
    finally:
        engine.shutdown()


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def greedy_text(engine, ids: list[int], max_tokens: int = 12) -> str:
    """The engine's greedy answer to token ids, as text."""
    import asyncio

    from longserve.server.engine.base import GenerationRequest, SamplingParams

    async def run():
        out = ""
        async for delta in engine.generate(GenerationRequest("greedy", [ids], SamplingParams(max_tokens=max_tokens, temperature=0.0))):
            out += delta.text
        return out

    return asyncio.run(run())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(app, port: int | None = None):
    """Any ASGI app under uvicorn on a loopback port, in a thread; yields the base URL."""
    import uvicorn

    port = port or free_port()
    with in_thread(uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def in_thread(server):
    """Run a uvicorn server in a thread until the block ends."""
    _server_starting()
    thread = threading.Thread(target=server.run, daemon=True, name="test-server")
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def running_server(engine, **settings):
    """create_app(engine) on a loopback port, under the server `longserve serve` runs (its HTTP limits
    included); yields the base URL and shuts the engine down after."""
    from longserve.server.http_server import build_server

    own_dir = None if "data_dir" in settings else tempfile.mkdtemp(prefix="longserve-test-")  # never the user's own bases
    settings.setdefault("data_dir", own_dir)
    settings.setdefault("log_level", "warning")
    settings = ServerSettings(model=engine.model_name, port=free_port(), **settings)
    try:
        with in_thread(build_server(create_app(engine, settings, engine.metrics), settings, engine)):
            yield f"http://127.0.0.1:{settings.port}"
    finally:
        engine.shutdown()
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def bundled_server(bundled_model, tokenizer):
    engine = make_engine(bundled_model, tokenizer, name=DEFAULT_MODEL)
    with running_server(engine) as url:
        yield url


@pytest.fixture(scope="session")
def vllm_server(bundled_path):
    """The bundled model behind the vLLM engine (float32, as the native engine runs it), for the whole session:
    vLLM takes about a minute to start on CPU. Skipped where vllm is not installed."""
    from longserve.server.engine.config import EngineConfig
    from longserve.server.engine.vllm import VllmEngine, vllm_available

    if not vllm_available():
        pytest.skip("vllm is not installed (make setup installs it unless SKIP_VLLM=1)")
    engine = VllmEngine(EngineConfig(model_path=str(bundled_path), model_name=DEFAULT_MODEL, dtype="float32", max_num_seqs=8,
                                     enforce_eager=True),  # compiling takes minutes; the tests are about behaviour
                        metrics=Metrics(DEFAULT_MODEL))
    with running_server(engine) as url:
        yield url


@pytest.fixture(scope="module", params=["native", "vllm"])
def server(request):
    """The bundled model behind either engine: a test that takes `server` (or `client`) runs against both
    (the vLLM one skips where vllm is not installed)."""
    return request.getfixturevalue("bundled_server" if request.param == "native" else "vllm_server")


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def tiny_server(tiny_llama, tokenizer):
    engine = make_engine(tiny_llama, tokenizer, name="tiny", max_num_seqs=2, max_waiting=1, max_model_len=256)
    with running_server(engine, max_body_bytes=4096) as url:
        yield url


def openai_client(url: str, api_key: str = "unused"):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120)


def metric_value(url: str, name: str, **labels) -> float:
    """Read one sample from /metrics (0.0 when absent)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def healthy(url: str) -> bool:
    """Whether a server (a process a test started, perhaps still starting) answers /health with 200."""
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
