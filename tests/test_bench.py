"""`longserve bench` against a scripted SSE server with known timings, against trouble, and against the real server.

The scripted server answers every streamed request on a fixed timetable: the
first token TTFT seconds after the request, then one token every ITL
seconds, each sent at its absolute time (no drift), then usage and [DONE].
A prompt can ask for trouble instead: "status 429", "status 500" or "cut"
(two tokens, then the connection drops without [DONE]).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import pytest
from fastapi import FastAPI, Request  # at module level: FastAPI reads the handlers' annotations from here
from fastapi.responses import JSONResponse, StreamingResponse

from longserve.clients.bench import main as bench_main
from tests.conftest import free_port, serving

pytestmark = pytest.mark.server  # every test here runs the bench against a scripted or a real server

TTFT, ITL = 0.4, 0.1
# The scripted server sends each token at its absolute time, and a loaded machine only ever delays a delivery: every
# measured figure has the timetable as its floor, and no upper bound (that would be a speed). A figure taken from the
# wrong moment shows in the records themselves: first token plus the gaps after it must fit inside the request's own
# end-to-end time, and every request inside the run. The summary is the arithmetic of those records.
TIMED_TTFT = 1.0


def scripted_app(received: list[dict], ttft: float = TTFT):
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await request.json()
        text = body.get("prompt") or " ".join(m["content"] for m in body.get("messages", []))
        count = len(text.split()) + (1 if "prompt" in body else 5)  # BOS, or a chat template's own tokens
        return {"count": count, "tokens": list(range(count))}

    async def stream(request: Request, chat: bool):
        body = await request.json()
        received.append(body)
        text = body.get("prompt") if not chat else body["messages"][-1]["content"]
        if text.startswith("status "):
            status = int(text.split()[1])
            return JSONResponse({"error": {"message": "scripted", "type": "scripted", "code": status}}, status_code=status)
        started, tokens = time.perf_counter(), body["max_tokens"]

        async def events():
            for i in range(tokens):
                await asyncio.sleep(max(0.0, started + ttft + i * ITL - time.perf_counter()))
                if text == "cut" and i == 2:
                    raise RuntimeError("scripted cut")  # uvicorn drops the connection mid-stream
                piece = {"delta": {"content": " tok"}} if chat else {"text": " tok"}
                yield f"data: {json.dumps({'choices': [{'index': 0, **piece, 'finish_reason': None}]})}\n\n"
            usage = {"prompt_tokens": len(text.split()) + 1, "completion_tokens": tokens}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await stream(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await stream(request, chat=True)

    return app


@contextmanager
def scripted_server(ttft: float = TTFT):
    received: list[dict] = []
    with serving(scripted_app(received, ttft)) as url:
        yield f"{url}/v1", received


def bench(*args: str) -> int:
    try:
        bench_main(list(args))
    except SystemExit as exc:
        return exc.code
    return 0


def test_timings_and_throughput_come_out_as_scripted(tmp_path):
    prompts, concurrency, output_len = 8, 4, 8
    result_file = tmp_path / "result.json"
    with scripted_server(TIMED_TTFT) as (url, received):
        # one warm-up request pays this process's first-request costs (lazy imports on both sides of the loopback),
        # which a cold CI machine once added to the first wave (+0.27 s of TTFT): they are not part of the timetable
        code = bench("--base-url", url, "--dataset", "random", "--input-len", "20", "--output-len", str(output_len),
                     "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--slo", "ttft=1100,tpot=150",
                     "--warmup", "1", "--result-file", str(result_file), "--save-detailed", "--plot", str(tmp_path / "plots"))
    assert code == 0
    warm_up, received = received[0], received[1:]
    assert warm_up["prompt"] not in {body["prompt"] for body in received}
    result = json.loads(result_file.read_text())
    request_seconds = TIMED_TTFT + (output_len - 1) * ITL
    waves = prompts // concurrency
    assert result["completed"] == prompts and result["failed"] == 0 and result["errors_by_kind"] == {}
    # each request against the timetable: no first token before the server sent it, then one token every ITL
    for ttft, itls, e2el in zip(result["ttfts"], result["itls"], result["e2els"]):
        assert ttft >= TIMED_TTFT and len(itls) == output_len - 1 and e2el >= request_seconds
        assert ttft + sum(itls) <= e2el + 1e-9  # both from this request's own send (not the run's start), one clock
    # the summary is the arithmetic of those records
    ms = lambda values: [1000 * v for v in values]  # noqa: E731
    assert result["median_ttft_ms"] == pytest.approx(float(np.median(ms(result["ttfts"]))))
    assert result["median_itl_ms"] == pytest.approx(float(np.median(ms([g for gaps in result["itls"] for g in gaps]))))
    tpots = [(e2el - ttft) / (output_len - 1) for ttft, e2el in zip(result["ttfts"], result["e2els"])]
    assert result["mean_tpot_ms"] == pytest.approx(float(np.mean(ms(tpots))))
    assert result["median_e2el_ms"] == pytest.approx(float(np.median(ms(result["e2els"]))))
    ends = [start + e2el for start, e2el in zip(result["start_times"], result["e2els"])]
    assert max(ends) <= result["duration"] + 1e-9 and result["duration"] >= waves * request_seconds
    assert result["output_throughput"] == pytest.approx(prompts * output_len / result["duration"])
    assert result["request_throughput"] == pytest.approx(prompts / result["duration"])
    assert result["max_concurrency_observed"] == concurrency
    # random prompts are fitted through /tokenize: 20 tokens = 19 words + BOS there, and the usage agrees
    assert result["input_lens"] == [20] * prompts
    assert all(len(body["prompt"].split()) == 19 and body["stream"] for body in received)
    assert len({body["prompt"] for body in received}) == prompts
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["latency_cdf.png", "over_time.png"]


def test_goodput_counts_only_requests_within_the_slo_and_a_sweep_draws_the_curve(tmp_path):
    result_file = tmp_path / "sweep.json"
    with scripted_server() as (url, _):
        code = bench("--base-url", url, "--endpoint", "chat", "--input-len", "12", "--output-len", "3", "--num-prompts", "4",
                     "--sweep", "concurrency=1,4", "--slo", f"ttft={TTFT * 1000 * 0.8:.0f}", "--result-file", str(result_file),
                     "--plot", str(tmp_path / "plots"))
    assert code == 0
    runs = json.loads(result_file.read_text())["runs"]
    assert [r["max_concurrency"] for r in runs] == [1, 4] and all(r["request_goodput"] == 0 for r in runs)
    assert [r["max_concurrency_observed"] for r in runs] == [1, 4]  # the sweep's points ran at their concurrency
    assert (tmp_path / "plots" / "sweep.png").exists()


def test_refusals_errors_and_cut_streams_are_counted_and_the_report_finishes(tmp_path):
    bodies = tmp_path / "bodies.jsonl"
    bodies.write_text("\n".join(json.dumps({"prompt": p, "max_tokens": 4}) for p in ("ok", "status 429", "status 500", "cut")))
    result_file = tmp_path / "errors.json"
    with scripted_server() as (url, _):
        code = bench("--base-url", url, "--model", "scripted", "--dataset", "file", "--dataset-path", str(bodies),
                     "--num-prompts", "8", "--result-file", str(result_file))
    assert code == 0
    result = json.loads(result_file.read_text())
    assert result["completed"] == 2 and result["failed"] == 6
    assert result["errors_by_kind"] == {"http_429": 2, "http_500": 2, "stream_cut": 2}
    refused = tmp_path / "refused.json"
    code = bench("--base-url", f"http://127.0.0.1:{free_port()}/v1", "--model", "scripted", "--dataset", "file",
                 "--dataset-path", str(bodies), "--num-prompts", "3", "--result-file", str(refused))
    assert code == 1  # nothing completed
    assert json.loads(refused.read_text())["errors_by_kind"] == {"connect_error": 3}


def test_ctrl_c_prints_the_partial_report(tmp_path):
    bodies = tmp_path / "bodies.jsonl"
    bodies.write_text(json.dumps({"prompt": "ok", "max_tokens": 20}))
    with scripted_server() as (url, received):
        process = subprocess.Popen(
            [sys.executable, "-m", "longserve.clients.bench", "--base-url", url, "--model", "scripted", "--dataset", "file",
             "--dataset-path", str(bodies), "--num-prompts", "50", "--max-concurrency", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        deadline = time.time() + 60
        while len(received) < 6 and time.time() < deadline:  # two waves of 2.3 s are done, the third in flight
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert "INTERRUPTED" in out and "Successful requests" in out
    completed = int(out.split("Successful requests")[1].split()[0])
    cancelled = int(out.split("errors: cancelled")[1].split()[0])
    assert completed == 4 and cancelled == 2


def test_random_prompts_are_exact_in_tokens_on_the_real_server(bundled_server, tmp_path):
    result_file = tmp_path / "real.json"
    code = bench("--base-url", f"{bundled_server}/v1", "--input-len", "40", "--output-len", "4", "--num-prompts", "3",
                 "--max-concurrency", "3", "--ignore-eos", "--result-file", str(result_file), "--save-detailed")
    assert code == 0
    result = json.loads(result_file.read_text())
    assert result["input_lens"] == [40, 40, 40] and result["output_lens"] == [4, 4, 4]  # the server's own usage
    assert result["completed"] == 3 and result["median_ttft_ms"] > 0 and result["output_throughput"] > 0


def test_passkey_nbce_and_kgclue_datasets_send_what_they_promise(tmp_path):
    with scripted_server() as (url, received):
        for dataset, extra in (("passkey", ["--input-len", "300"]), ("nbce", ["--input-len", "600", "--nbce-contexts", "3"]),
                               ("kgclue", ["--trie", "kb"])):
            code = bench("--base-url", url, "--dataset", dataset, "--num-prompts", "2", "--output-len", "2", "--seed", "5", *extra)
            assert code == 0, dataset
    passkey, nbce, kgclue = received[0:2], received[2:4], received[4:6]
    for body in passkey:  # the prompt of patches/README.md, section 4, about --input-len tokens as the server counts them
        assert "The pass key is" in body["prompt"] and body["prompt"].rstrip().endswith("The pass key is")
        assert 250 <= len(body["prompt"].split()) + 1 <= 300
    for body in nbce:  # --nbce-contexts documents of about input-len / n tokens, the key hidden in one of them
        assert len(body["contexts"]) == 3 and sum("The pass key is" in doc for doc in body["contexts"]) == 1
        assert "pass key" in body["prompt"]
    assert passkey[0]["prompt"] != passkey[1]["prompt"] and nbce[0]["contexts"] != nbce[1]["contexts"]
    for body in kgclue:  # few-shot KgCLUE questions answered under the named trie
        assert body["constraint"] == {"trie": "kb"} and body["prompt"].count("问题：") == 5
    assert kgclue[0]["prompt"] != kgclue[1]["prompt"]
