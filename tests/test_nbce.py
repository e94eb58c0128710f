"""NBCE: the merge step by hand, the engine's invariants on a tiny model, the API through the SDK."""

from __future__ import annotations

import asyncio
import math
import random

import httpx
import pytest
import torch

from longserve.patches.nbce import NbceParams, nbce_merge, truncate_top_p
from longserve.server.engine.base import GenerationRequest, SamplingParams
from tests.conftest import make_engine, openai_client, running_server, tiny_model, wait_until

CONTEXTS = [
    "The red house stands at the end of Willow Lane, next to the old mill.",
    "Bakers in the valley start their ovens before dawn and sell bread by seven.",
    "The lighthouse keeper logs every ship that passes the northern rocks.",
    "In spring the river floods the low meadows and the geese come back.",
]
QUESTION = "Question: where does the red house stand? Answer:"


def logits_of(*rows: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in row] for row in rows])


def hand_entropy(probs: list[float]) -> float:
    return -sum(p * math.log(p) for p in probs)


def test_merge_by_hand_and_stickiness_only_breaks_near_ties():
    question = [0.25, 0.25, 0.25, 0.25]
    sharp, vague, near_sharp = [0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.68, 0.12, 0.1, 0.1]
    plain = NbceParams(beta=0.25, top_p=1.0, stickiness=0.1)

    result = nbce_merge(logits_of(question, sharp, vague), plain)
    assert result.chosen == 1
    assert result.entropies[1:].tolist() == pytest.approx([hand_entropy(sharp), hand_entropy(vague)], abs=1e-5)
    expected = [1.25 * math.log(p) - 0.25 * math.log(0.25) for p in sharp]
    assert result.merged.tolist() == pytest.approx(expected, abs=1e-5)

    # 0.148 apart: a bonus of 0.1 for the vaguer row, chosen last step, does not move the choice
    assert hand_entropy(vague) - hand_entropy(sharp) > 0.1
    assert nbce_merge(logits_of(question, sharp, vague), plain, previous=2).chosen == 1
    # 0.037 apart: the same bonus keeps the previous row
    assert hand_entropy(near_sharp) - hand_entropy(sharp) < 0.1
    assert nbce_merge(logits_of(question, sharp, near_sharp), plain, previous=2).chosen == 2
    assert nbce_merge(logits_of(question, sharp, near_sharp), plain, previous=None).chosen == 1

    # top-p 0.75 keeps {0.7, 0.1} of the sharp row: the merge is -inf outside that nucleus
    truncated = nbce_merge(logits_of(question, sharp, vague), NbceParams(beta=0.25, top_p=0.75, stickiness=0.0))
    assert truncated.entropies[1] == pytest.approx(-(0.7 * math.log(0.7) + 0.1 * math.log(0.1)), abs=1e-5)
    assert torch.isinf(truncated.merged[2:]).all() and torch.isfinite(truncated.merged[:2]).all()
    # where the question's own nucleus excludes a token, the chosen row's score stands alone
    peaked_question = [0.97, 0.01, 0.01, 0.01]
    kept = nbce_merge(logits_of(peaked_question, sharp, vague), NbceParams(beta=0.5, top_p=0.9, stickiness=0.0))
    assert kept.merged[1].item() == pytest.approx(math.log(0.1), abs=1e-5)
    assert kept.merged[0].item() == pytest.approx(1.5 * math.log(0.7) - 0.5 * math.log(0.97), abs=1e-5)


def test_truncation_keeps_the_most_likely_token_even_past_top_p():
    row = torch.log(torch.tensor([[0.9, 0.05, 0.05]]))
    assert torch.isfinite(truncate_top_p(row, 0.5)).tolist() == [[True, False, False]]


@pytest.fixture(scope="module")
def nbce_engine(tokenizer):
    engine = make_engine(tiny_model("llama", seed=21), tokenizer, max_num_seqs=12, max_model_len=512)
    yield engine
    engine.shutdown()


def rows_for(tokenizer, contexts: list[str], question: str) -> list[list[int]]:
    return [tokenizer.encode(question)] + [tokenizer.encode(context + "\n\n" + question) for context in contexts]


async def decode(engine, prompts: list[list[int]], nbce: NbceParams | None, max_tokens: int = 16, request_id: str = "r"):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens, context_ids = [], []
    async for delta in engine.generate(GenerationRequest(request_id, prompts, params, nbce=nbce)):
        tokens += delta.token_ids
        context_ids += delta.context_ids or []
    return tokens, context_ids


def test_one_context_without_sharpening_is_plain_greedy_decoding(nbce_engine, tokenizer):
    rows = rows_for(tokenizer, CONTEXTS[:1], QUESTION)
    plain, _ = asyncio.run(decode(nbce_engine, [rows[1]], None))
    tokens, context_ids = asyncio.run(decode(nbce_engine, rows, NbceParams(beta=0.0, top_p=1.0, stickiness=0.1)))
    assert tokens == plain and context_ids == [0] * len(tokens)


def test_order_and_duplicates_do_not_change_the_answer(nbce_engine, tokenizer):
    nbce = NbceParams()
    tokens, context_ids = asyncio.run(decode(nbce_engine, rows_for(tokenizer, CONTEXTS, QUESTION), nbce))
    assert len(set(context_ids)) > 1, "the test wants steps that pick different contexts"
    assert all(0 <= c < len(CONTEXTS) for c in context_ids)  # row 0 is never chosen
    shuffled = CONTEXTS[:]
    random.Random(3).shuffle(shuffled)
    assert shuffled != CONTEXTS
    again, shuffled_ids = asyncio.run(decode(nbce_engine, rows_for(tokenizer, shuffled, QUESTION), nbce))
    assert again == tokens
    assert [shuffled[c] for c in shuffled_ids] == [CONTEXTS[c] for c in context_ids]
    doubled = CONTEXTS + [CONTEXTS[1], CONTEXTS[3]]
    with_duplicates, _ = asyncio.run(decode(nbce_engine, rows_for(tokenizer, doubled, QUESTION), nbce))
    assert with_duplicates == tokens


@pytest.mark.server
def test_nbce_and_plain_requests_run_together_and_rows_are_freed(nbce_engine, tokenizer):
    rows = rows_for(tokenizer, CONTEXTS, QUESTION)
    alone, _ = asyncio.run(decode(nbce_engine, rows, NbceParams()))
    plain_alone, _ = asyncio.run(decode(nbce_engine, [rows[2]], None))

    async def together():
        return await asyncio.gather(
            decode(nbce_engine, rows, NbceParams(), request_id="a"),
            decode(nbce_engine, [rows[2]], None, request_id="b"),
            decode(nbce_engine, rows, NbceParams(), request_id="c"),
        )

    first, plain, second = asyncio.run(together())
    assert first[0] == alone and second[0] == alone and plain[0] == plain_alone
    assert nbce_engine.scheduler.num_running == 0 and nbce_engine.blocks.in_use == 0


@pytest.fixture(scope="module")
def nbce_server(tokenizer):
    engine = make_engine(tiny_model("llama", seed=21), tokenizer, max_num_seqs=8, max_model_len=256)
    with running_server(engine, max_contexts=4) as url:
        yield url, engine


def test_completions_with_contexts_through_the_sdk_streamed_and_not(nbce_server, nbce_engine, tokenizer):
    url, engine = nbce_server
    client = openai_client(url)
    extra = {"contexts": CONTEXTS, "nbce": {"beta": 0.25, "top_p": 0.95, "stickiness": 0.1}}
    reply = client.completions.create(model="tiny", prompt=QUESTION, max_tokens=12, temperature=0, extra_body=extra)
    choice = reply.choices[0]
    expected_tokens, expected_ids = asyncio.run(decode(nbce_engine, rows_for(tokenizer, CONTEXTS, QUESTION), NbceParams(), max_tokens=12))
    assert choice.text == tokenizer.decode(expected_tokens, skip_special_tokens=True)
    assert choice.model_extra["nbce_context_ids"] == expected_ids
    assert reply.usage.prompt_tokens == sum(len(row) for row in rows_for(tokenizer, CONTEXTS, QUESTION))
    assert reply.usage.completion_tokens == 12

    chunks = list(client.completions.create(model="tiny", prompt=QUESTION, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=extra))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [i for c in chunks if c.choices for i in c.choices[0].model_extra["nbce_context_ids"]] == expected_ids
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens


def test_chat_with_contexts_puts_each_context_before_the_last_user_message(nbce_server, nbce_engine, tokenizer):
    url, _ = nbce_server
    client = openai_client(url)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, extra_body={"contexts": CONTEXTS[:3]})

    def row(content: str) -> list[int]:
        conversation = [messages[0], {"role": "user", "content": content}]
        return tokenizer.encode(tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False), add_special_tokens=False)

    rows = [row(QUESTION)] + [row(context + "\n\n" + QUESTION) for context in CONTEXTS[:3]]
    tokens, context_ids = asyncio.run(decode(nbce_engine, rows, NbceParams(), max_tokens=10))
    assert reply.choices[0].message.content == tokenizer.decode(tokens, skip_special_tokens=True)
    assert reply.choices[0].model_extra["nbce_context_ids"] == context_ids
    assert reply.usage.prompt_tokens == sum(len(r) for r in rows)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
                                            extra_body={"contexts": CONTEXTS[:3]})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    assert [i for c in chunks for i in (c.choices[0].model_extra.get("nbce_context_ids") or [])] == context_ids


@pytest.mark.parametrize(
    "extra,param,says",
    [
        ({"contexts": []}, "contexts", "empty"),
        ({"contexts": CONTEXTS + ["one more"]}, "contexts", "--max-contexts 4"),
        ({"contexts": CONTEXTS, "nbce": {"beta": -1}}, "nbce.beta", "greater than or equal to 0"),
        ({"contexts": CONTEXTS, "nbce": {"top_p": 0}}, "nbce.top_p", "greater than 0"),
        ({"contexts": CONTEXTS, "nbce": {"temperature": 1}}, "nbce.temperature", "unknown field"),
        ({"nbce": {"beta": 0.5}}, None, "need contexts"),
        ({"contexts": CONTEXTS, "n": 2}, None, "n > 1"),
        ({"contexts": CONTEXTS, "echo": True}, "echo", "echo"),
        ({"contexts": ["word " * 300]}, "contexts", "contexts[0]"),
    ],
)
def test_bad_nbce_requests_get_400_saying_what_to_change(nbce_server, extra, param, says):
    url, _ = nbce_server
    reply = httpx.post(f"{url}/v1/completions", json={"prompt": QUESTION, "max_tokens": 4, **extra})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert says in error["message"] and error["param"] == param


def test_a_client_that_leaves_frees_every_row(nbce_server):
    url, engine = nbce_server
    body = {"prompt": QUESTION, "max_tokens": 200, "stream": True, "ignore_eos": True, "contexts": CONTEXTS}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk in, then hang up
    assert wait_until(lambda: engine.scheduler.num_running == 0 and engine.blocks.in_use == 0)
