"""Structured outputs and tool calls: the real server, the bundled model, the openai SDK, both engines."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest


MODEL = "smollm2-135m-instruct"
# A handful of seeded samples per schema: the same tokens every run on one machine, and every one must hold to
# the schema (the property is per sample; fifty samples proved no more than four and took minutes per engine).
SAMPLES, SEED = 4, 1234
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        },
        "required": ["name", "age", "role"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["new", "paid", "shipped"]},
            "items": {
                "type": "array", "minItems": 1, "maxItems": 3,
                "items": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                                            "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                          "required": ["sku", "qty"], "additionalProperties": False},
            },
        },
        "required": ["status", "items"],
        "additionalProperties": False,
    },
    "profile": {
        "type": "object",
        "properties": {
            "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99999},
                                                      "tags": {"type": "array", "maxItems": 2,
                                                               "items": {"enum": ["red", "green", "blue"]}}},
                     "required": ["id", "tags"], "additionalProperties": False},
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now in a time zone",
                                          "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                                                         "required": ["zone"], "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def sampled(client, **request) -> list:
    """SAMPLES seeded choices at temperature 1, in one request (choice i draws with seed SEED + i)."""
    return client.chat.completions.create(**{"model": MODEL, "max_tokens": 120, **request}, temperature=1, n=SAMPLES, seed=SEED).choices


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_sample_under_a_json_schema_validates(client, name):
    schema = SCHEMAS[name]
    choices = sampled(client, messages=[{"role": "user", "content": f"Write a {name} as JSON."}],
                      response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema}})
    assert len(choices) == SAMPLES
    for choice in choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


# what xgrammar would let pass and llguidance holds (tests/test_schema_keywords.py shows each on both matchers)
LLGUIDANCE_ONLY = {
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a"],
                         "additionalProperties": False}, {"required": ["b"]}]},
    "pattern + length": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[a-z]+$", "minLength": 2,
                                                                   "maxLength": 4}}, "required": ["code"], "additionalProperties": False},
}


@pytest.mark.parametrize("name", sorted(LLGUIDANCE_ONLY))
def test_what_only_llguidance_holds_is_held_on_native_and_refused_on_vllm(client, request, name):
    """The native engine sends these schemas to llguidance; vLLM here runs xgrammar alone, so it refuses them."""
    schema = LLGUIDANCE_ONLY[name]
    format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    messages = [{"role": "user", "content": "Write the object as JSON."}]
    if request.node.callspec.params["server"] == "vllm":
        with pytest.raises(openai.BadRequestError, match="--engine native"):
            sampled(client, messages=messages, response_format=format)
        return
    for choice in sampled(client, messages=messages, response_format=format):
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_the_probes_nested_repetition_pattern_is_answered_within_its_length_on_native(client, request):
    """{"pattern": "(.*){1,32000}", "maxLength": 12} stalled the engine: xgrammar ignored the length and took seconds
    a token on the pattern. llguidance holds both; vLLM here refuses it (tests above)."""
    schema = {"type": "string", "pattern": "(.*){1,32000}", "maxLength": 12}
    format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    messages = [{"role": "user", "content": "Reply with a JSON value."}]
    if request.node.callspec.params["server"] == "vllm":
        with pytest.raises(openai.BadRequestError, match="--engine native"):
            client.chat.completions.create(model=MODEL, messages=messages, response_format=format, max_tokens=24)
        return
    reply = client.chat.completions.create(model=MODEL, messages=messages, response_format=format, max_tokens=24,
                                           n=2, seed=3, temperature=1.0)
    for choice in reply.choices:
        assert choice.finish_reason == "stop" and len(json.loads(choice.message.content)) <= 12, choice.message.content


def test_structured_outputs_json_regex_choice_and_grammar(client):
    schema = SCHEMAS["person"]
    reply = client.completions.create(model=MODEL, prompt="A person:", max_tokens=80, temperature=1, n=4, seed=SEED,
                                      extra_body={"structured_outputs": {"json": schema}})
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.text), schema)
    phone = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=20, temperature=1, n=8, seed=SEED,
                                      extra_body={"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}})
    assert all(re.fullmatch("[0-9]{3}-[0-9]{4}", choice.text) for choice in phone.choices)
    picked = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick a colour."}], n=8,
                                            temperature=1, seed=SEED, max_tokens=10, extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert {choice.message.content for choice in picked.choices} <= {"red", "green"}
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Yes or no?"}], n=4,
                                            temperature=1, seed=SEED, max_tokens=10,
                                            extra_body={"structured_outputs": {"grammar": 'root ::= "yes" | "no" | "maybe"'}})
    assert {choice.message.content for choice in answer.choices} <= {"yes", "no", "maybe"}


def test_a_structural_tag_holds_the_tagged_part_to_its_schema(client):
    """Greedy: a structural tag's JSON allows any whitespace (xgrammar has no switch for it there), which a
    sampled small model can run on in until max_tokens."""
    schema = SCHEMAS["person"]
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<person>", "end": "</person>",
                                                "content": {"type": "json_schema", "json_schema": schema}}}
    reply = client.completions.create(model=MODEL, prompt='A person as JSON: {"name": "Ann", "age": 30, "role": "user"}\nAnother:',
                                      max_tokens=80, temperature=0, extra_body={"structured_outputs": {"structural_tag": json.dumps(tag)}})
    for choice in reply.choices:
        inside = re.fullmatch("<person>(.*)</person>", choice.text, re.DOTALL)
        assert inside and choice.finish_reason == "stop", choice.text
        jsonschema.validate(json.loads(inside.group(1)), schema)


def test_json_object_outputs_parse_streamed_and_not(client):
    """Any JSON object has no bound on its length: a sampled one may be cut by max_tokens (finish_reason "length",
    as with OpenAI and vLLM); every one that ends by itself parses, and a greedy one ends by itself."""
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Give me a JSON object about cats."}], max_tokens=150,
               response_format={"type": "json_object"})
    for choice in sampled(client, **{**ask, "max_tokens": 60}):  # the cut ones run to max_tokens: kept short
        assert choice.finish_reason in ("stop", "length")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
    greedy = {**ask, "messages": [{"role": "user", "content": "Describe a cat as a JSON object with its name and age."}]}
    chunks = list(client.chat.completions.create(**greedy, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert isinstance(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), dict)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_validate_streamed_and_not(client, tool_choice):
    ask = dict(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER, CLOCK], tool_choice=tool_choice, max_tokens=100)
    # sampled: one call each (parallel calls have no bound on their number, so a sample could run past max_tokens)
    for choice in client.chat.completions.create(**ask, temperature=1, n=SAMPLES, seed=SEED, parallel_tool_calls=False).choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None and choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            tool = next(t for t in (WEATHER, CLOCK) if t["function"]["name"] == call.function.name)
            jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
        if isinstance(tool_choice, dict):
            assert [call.function.name for call in choice.message.tool_calls] == ["get_weather"]
    chunks = list(client.chat.completions.create(**ask, temperature=0, stream=True))
    calls = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    assert calls and chunks[-1].choices[0].finish_reason == "tool_calls"
    plain = client.chat.completions.create(**ask, temperature=0).choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in calls] == [(c.function.name, c.function.arguments) for c in plain]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_cut_by_max_tokens_is_never_content(client, tool_choice):
    """It came back as the raw JSON, as content, beside finish_reason "length"."""
    ask = dict(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER, CLOCK], tool_choice=tool_choice, max_tokens=6, temperature=0)
    choice = client.chat.completions.create(**ask).choices[0]
    assert (choice.finish_reason, choice.message.content, choice.message.tool_calls) == ("length", None, None)
    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert not [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_the_whole_calls_of_a_cut_list_are_kept():
    from longserve.server.extensions.tools import whole_calls

    cut = '[{"name": "a", "arguments": {"x": [1, "]"]}}, {"name": "b", "arguments": {}}, {"name": "c", "argu'
    assert whole_calls(cut) == [{"name": "a", "arguments": '{"x": [1, "]"]}'}, {"name": "b", "arguments": "{}"}]
    assert whole_calls("") == whole_calls("[") == whole_calls('[{"na') == []


def test_auto_parses_calls_from_free_text_and_leaves_plain_answers_alone(client):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    needs = [{"role": "user", "content": "Repeat exactly this text and nothing else:\n" + call}]
    reply = client.chat.completions.create(model=MODEL, messages=needs, tools=[WEATHER], temperature=0, max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == \
        [("get_weather", {"city": "Paris", "unit": "celsius"})]
    chunks = list(client.chat.completions.create(model=MODEL, messages=needs, tools=[WEATHER], temperature=0, max_tokens=60, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""  # the call's text never streams
    assert [c.function.name for ch in chunks if ch.choices for c in ch.choices[0].delta.tool_calls or []] == ["get_weather"]

    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2 + 2?"}], tools=[WEATHER],
                                           temperature=0, max_tokens=20)
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.choices[0].message.tool_calls is None
    assert "4" in plain.choices[0].message.content


def test_a_tool_result_round_trips_into_a_final_answer(client):
    arguments = json.dumps({"city": "Paris", "unit": "celsius"})
    messages = ASK_WEATHER + [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=40)
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    assert "21" in choice.message.content  # the result reached the model


def test_beam_search_under_a_grammar_gives_the_best_distinct_valid_answers(server, client):
    """Native: n distinct answers that hold to the grammar, best first; vLLM has no beam search behind its API."""
    engine = httpx.get(f"{server}/v1/models").json()["data"][0]["engine"]
    schema = SCHEMAS["person"]
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Write a person as JSON."}], max_tokens=60, n=3,
               response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
               extra_body={"use_beam_search": True})
    if engine == "vllm":
        body = {name: value for name, value in ask.items() if name != "extra_body"} | ask["extra_body"]
        reply = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=600)
        assert reply.status_code == 400 and "--engine native" in reply.json()["error"]["message"]
        return
    for stream in (False, True):
        reply = client.chat.completions.create(**ask, stream=stream)
        if stream:
            chunks = [chunk.choices[0] for chunk in reply if chunk.choices]
            texts = {i: "".join(c.delta.content or "" for c in chunks if c.index == i) for i in range(3)}
            scores = [next(c.model_extra["score"] for c in chunks if c.index == i and c.finish_reason) for i in range(3)]
        else:
            texts = {c.index: c.message.content for c in reply.choices}
            scores = [c.model_extra["score"] for c in sorted(reply.choices, key=lambda c: c.index)]
            assert all(c.finish_reason == "stop" for c in reply.choices)
        assert len(set(texts.values())) == 3
        for text in texts.values():
            jsonschema.validate(json.loads(text), schema)
        assert scores == sorted(scores, reverse=True) and scores[0] < 0
    alone = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "Hi", "n": 2, "use_beam_search": True})
    assert alone.status_code == 400 and alone.json()["error"]["param"] == "use_beam_search"


@pytest.mark.server
def test_beam_scores_under_a_grammar_are_the_models_log_probabilities(tokenizer):
    """A tiny model, a one-letter regex: each answer is one letter token and a stop token, so the exact score of
    every answer is two log-probabilities of one forward pass; the beam must return the best three, with them."""
    import torch
    import xgrammar

    from tests.conftest import make_engine, openai_client, running_server, tiny_model

    letters = "abcde"
    prompt_ids = tokenizer.encode("Letter:")
    stops = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=49152).stop_token_ids
    model = tiny_model("llama", seed=5)
    reference = {}
    for letter in letters:
        (token,) = tokenizer.encode(letter, add_special_tokens=False)
        with torch.no_grad():
            logprobs = model(torch.tensor([prompt_ids + [token]])).logits[0].float().log_softmax(-1)
        reference[letter] = float(logprobs[-2, token]) + max(float(logprobs[-1, stop]) for stop in stops)
    best = sorted(letters, key=lambda letter: -reference[letter])[:3]
    with running_server(make_engine(tiny_model("llama", seed=5), tokenizer, max_model_len=128)) as url:
        reply = openai_client(url).completions.create(model="tiny", prompt="Letter:", max_tokens=4, n=3, extra_body={
            "structured_outputs": {"regex": f"[{letters}]"}, "use_beam_search": True})
    found = sorted(reply.choices, key=lambda choice: choice.index)
    assert [choice.text for choice in found] == best
    assert [choice.model_extra["score"] for choice in found] == pytest.approx([reference[letter] for letter in best], abs=1e-3)


BAD = [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema", "objekt"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type", "json_object"),
    ("/v1/completions", {"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex", "parenthesis"),
    ("/v1/completions", {"structured_outputs": {"grammar": 'root ::= "a" |'}}, "structured_outputs.grammar", "element"),
    ("/v1/completions", {"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not JSON"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ("/v1/completions", {"structured_outputs": {"structural_tag": "{not json"}}, "structured_outputs.structural_tag", "property name"),
    ("/v1/completions", {"structured_outputs": {"structural_tag": '{"type": "structural_tag", "format": {"type": "nope"}}'}},
     "structured_outputs.structural_tag", "nope"),
    ("/v1/completions", {"structured_outputs": {"structural_tag": '{"structures": [{"begin": "<f>"}], "triggers": ["<f>"]}'}},
     "structured_outputs.structural_tag", "begin, schema and end"),
    ("/v1/completions", {"structured_outputs": {"regex": "a"}, "constraint": {"choices": ["b"]}}, None, "cannot be combined"),
    ("/v1/chat/completions", {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, None, "one of them"),
    ("/v1/chat/completions", {"tool_choice": "required"}, None, "needs tools"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None, "'nope'"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", "pattern"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, None, "leave out"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
                              "tool_choice": "required"}, "tools", "objekt"),
    ("/v1/completions", {"structured_outputs": {"json": "[" * 100_000 + "]" * 100_000}}, "structured_outputs.json", "nested deeper"),
    # keywords xgrammar ignores: answers broke them with finish_reason "stop" (tests/test_schema_keywords.py has each)
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": {
        "type": "object", "properties": {"v": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 3, "maxItems": 3,
                                               "uniqueItems": True}}, "required": ["v"], "additionalProperties": False}}}},
     "response_format.json_schema.schema", "/properties/v: uniqueItems is not enforced"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "string", "pattern": "^[a-z]{5}$", "maxLength": 2}}}}, "response_format.json_schema.schema",
     ("Unsatisfiable", "--engine native")),  # llguidance finds it unsatisfiable; vLLM here would not hold it
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "not": {"const": ""}}}}}}], "tool_choice": "required"}, "tools", "not is not"),
    # grammars whose language is empty: their first mask allowed nothing (a 500 from the sampler, or token 0)
    ("/v1/completions", {"structured_outputs": {"regex": "[^\\x00-\\U0010FFFF]"}}, "structured_outputs.regex", "accepts no text"),
    ("/v1/completions", {"structured_outputs": {"grammar": "root ::= a\na ::= b\nb ::= a"}}, "structured_outputs.grammar", "accepts no text"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}}}}, "response_format.json_schema.schema", "accepts no text"),
    # a stop string cut the JSON a grammar promises and answered it as whole (a 500 for a forced tool call)
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "required", "stop": ["}"]}, None, "stop cannot be combined"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                              "stop": ["}"]}, None, "stop cannot be combined"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS["person"]}},
                              "stop": ["}"]}, None, "stop cannot be combined"),
    ("/v1/completions", {"structured_outputs": {"regex": "[0-9]+"}, "stop": "5"}, None, "stop cannot be combined"),
]


@pytest.mark.parametrize("path,fields,param,words", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_structured_requests_get_a_400_naming_the_field(server, path, fields, param, words):
    body = {"model": MODEL, "max_tokens": 5, **fields}
    body.update({"messages": ASK_WEATHER} if path.endswith("chat/completions") else {"prompt": "Hi"})
    reply = httpx.post(f"{server}{path}", json=body, timeout=600)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert any(alternative in error["message"] for alternative in ((words,) if isinstance(words, str) else words)), error
    if param is not None:
        assert error["param"] == param, error
    assert httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=600).status_code == 200


def test_a_beam_keeps_one_entry_per_text_with_its_best_tokenization():
    """A grammar allows every tokenization of a text: whichever finishes first, the entry keeps the best score."""
    from types import SimpleNamespace

    from longserve.server.engine.native.beam_group import BeamGroup, Hypothesis

    pieces = {1: "a", 2: "b", 3: "ab", 4: "c"}
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: "".join(pieces[i] for i in ids))
    grammar_state = SimpleNamespace(entry=None)  # a grammar's state has no key entry: answers are texts
    group = BeamGroup.__new__(BeamGroup)  # only the finished list matters here
    group.finished = []
    for tokens, score in (([1, 2], -3.0), ([4], -2.0), ([3], -1.0), ([1, 2], -0.5), ([3], -4.0)):
        group.keep_finished(Hypothesis(tokens, score, grammar_state), tokenizer)
    assert [(tokenizer.decode(h.tokens, True), h.tokens, h.score) for h in group.finished] == [("ab", [1, 2], -0.5), ("c", [4], -2.0)]
