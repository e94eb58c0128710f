"""Knowledge bases over HTTP: register, inspect, replace atomically, survive a restart, refuse bad input."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from longserve.server.knowledge import KnowledgeStore, Limits, build
from tests.conftest import make_engine, running_server, tiny_model, wait_until

ENTRIES = [
    {"key": "Paris ||| capital of", "value": "France"},
    {"key": "Paris ||| population", "value": 2102650},
    {"key": "Paris", "value": {"note": "a key that is a prefix of others"}},
    {"key": "夜曲（歌曲） ||| 演唱", "value": "周杰伦"},
]


@pytest.fixture(scope="module")
def tiny_engine(tokenizer):
    engine = make_engine(tiny_model("llama", seed=31), tokenizer, max_model_len=256)
    yield engine
    engine.shutdown()


@pytest.mark.server
def test_register_inspect_list_and_delete(tiny_engine, tmp_path):
    with running_server(tiny_engine, data_dir=str(tmp_path)) as url:
        created = httpx.post(f"{url}/v1/tries", json={"name": "kb", "entries": ENTRIES, "lead": " "}).json()
        assert created["keys"] == 4 and created["tokens"] > 4 and created["bytes"] > 0 and created["build_seconds"] >= 0
        assert httpx.get(f"{url}/v1/tries/kb").json() == created
        assert [t["name"] for t in httpx.get(f"{url}/v1/tries").json()["data"]] == ["kb"]
        lines = "\n".join(json.dumps(e, ensure_ascii=False) for e in ENTRIES[:2]) + "\n"
        uploaded = httpx.put(f"{url}/v1/tries/small", content=lines.encode(), headers={"Content-Type": "application/x-ndjson"})
        assert uploaded.status_code == 200 and uploaded.json()["keys"] == 2
        assert httpx.delete(f"{url}/v1/tries/small").json()["deleted"] is True
        missing = httpx.get(f"{url}/v1/tries/small")
        assert missing.status_code == 404 and "kb" in missing.json()["error"]["message"]
    assert sorted(p.name for p in (tmp_path / "tries").iterdir()) == ["kb.npz"]


@pytest.mark.server
def test_bases_survive_a_restart_and_keep_their_entries(tiny_engine, tokenizer, tmp_path):
    with running_server(tiny_engine, data_dir=str(tmp_path)) as url:
        before = httpx.post(f"{url}/v1/tries", json={"name": "kb", "entries": ENTRIES}).json()
    store = KnowledgeStore(tmp_path / "tries", Limits())
    base = store.bases["kb"]
    assert {**base.stats(), "build_seconds": None} == {**before, "build_seconds": None}
    for entry, item in enumerate(ENTRIES):
        assert base.key(entry) == item["key"] and base.value(entry) == item["value"]
        assert base.trie.entry_at(base.trie.walk(tokenizer.encode(item["key"], add_special_tokens=False))) == entry


@pytest.mark.server
def test_a_failed_or_interrupted_upload_leaves_the_previous_version(tiny_engine, tokenizer, tmp_path, monkeypatch):
    with running_server(tiny_engine, data_dir=str(tmp_path)) as url:
        httpx.post(f"{url}/v1/tries", json={"name": "kb", "entries": ENTRIES})
        bad = httpx.put(f"{url}/v1/tries/kb", content=b'{"key": "a", "value": 1}\n{"value": 2}\n')
        assert bad.status_code == 400 and "entry 2" in bad.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/tries/kb").json()["keys"] == 4
    store = KnowledgeStore(tmp_path / "tries", Limits())
    replacement = build("kb", [{"key": "only", "value": 1}], tokenizer, "", Limits())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError):
        store.put(replacement)
    assert store.bases["kb"].num_keys == 4
    assert KnowledgeStore(tmp_path / "tries", Limits()).bases["kb"].num_keys == 4
    assert sorted(p.name for p in (tmp_path / "tries").iterdir()) == ["kb.npz"]  # no half-written file left


@pytest.mark.parametrize(
    "entries,says",
    [
        ([{"key": "a", "value": 1}, {"value": 2}], 'entry 2: missing "key"'),
        ([{"key": "a"}, {"key": 7, "value": 1}], 'entry 2: "key" must be a string'),
        ([{"key": ""}], 'entry 1: "key" is empty'),
        ([{"key": "a"}, {"key": "b"}, {"key": "a"}], "entry 3: the key 'a' appears twice"),
        ([{"key": "a", "valeu": 1}], "entry 1: unknown field 'valeu'"),
        ([{"key": "x" * 40}], "over the limit of 32"),
        ([], "no entries"),
        # it was answered with text "" and that key: the special token's text never comes back as text
        ([{"key": "Paris"}, {"key": "<|im_end|>"}], "entry 2: the key '<|im_end|>' holds the text of the special token"),
    ],
)
@pytest.mark.server
def test_bad_entries_get_400_naming_the_first_bad_one(tiny_engine, tmp_path, entries, says):
    with running_server(tiny_engine, data_dir=str(tmp_path), max_key_chars=32) as url:
        reply = httpx.post(f"{url}/v1/tries", json={"name": "kb", "entries": entries})
        assert reply.status_code == 400 and says in reply.json()["error"]["message"], reply.text
        assert httpx.get(f"{url}/v1/tries").json()["data"] == []


@pytest.mark.server
def test_names_sizes_and_limits_are_checked(tiny_engine, tmp_path):
    with running_server(tiny_engine, data_dir=str(tmp_path), max_trie_keys=3, max_upload_bytes=2048) as url:
        for name in ("../etc", "okname\n"):  # a final newline passed a `$`-anchored pattern and named a file "okname\n.npz"
            bad_name = httpx.post(f"{url}/v1/tries", json={"name": name, "entries": ENTRIES[:1]})
            assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "name", name
        assert httpx.put(f"{url}/v1/tries/okpath%0A", content=b'{"key": "a"}\n').status_code == 400
        assert sorted(path.name for path in tmp_path.iterdir() if path.suffix == ".npz") == []
        too_many = httpx.post(f"{url}/v1/tries", json={"name": "kb", "entries": ENTRIES})
        assert too_many.status_code == 400 and "--max-trie-keys" in too_many.json()["error"]["message"]
        big = httpx.put(f"{url}/v1/tries/kb", content=b'{"key": "a"}\n' * 400)
        assert big.status_code == 413 and "--max-upload-bytes" in big.json()["error"]["message"]
        not_json = httpx.put(f"{url}/v1/tries/kb", content=b'{"key": "a"}\nnot json\n')
        assert not_json.status_code == 400 and "entry 2: not valid JSON" in not_json.json()["error"]["message"]


def held_build(name, body, tokenizer, lead, limits):
    """serve_tries.parse_and_build, held until the test lets it go; says which process runs it."""
    from longserve.server import serve_tries

    held = Path(os.environ["LONGSERVE_TEST_HELD"])
    (held / "pid").write_text(str(os.getpid()))
    for _ in range(1200):
        if (held / "release").exists():
            break
        time.sleep(0.05)
    return serve_tries.parse_and_build(name, body, tokenizer, lead, limits)


@pytest.mark.server
def test_an_upload_is_parsed_and_built_in_another_process(tokenizer, tmp_path, monkeypatch):
    """The build of a JSON-lines upload is held (in its own process) until a plain request has been answered: run
    on the event loop, or in a thread whose garbage holds the interpreter lock, it held that request too."""
    import threading

    from longserve.server import serve_tries

    monkeypatch.setenv("LONGSERVE_TEST_HELD", str(tmp_path))
    monkeypatch.setattr(serve_tries, "parse_and_build", held_build)
    engine = make_engine(tiny_model("llama", seed=31), tokenizer, max_model_len=256)
    with running_server(engine, data_dir=str(tmp_path / "data")) as url:
        answers = []
        upload = threading.Thread(target=lambda: answers.append(httpx.put(f"{url}/v1/tries/kb", content=b'{"key": "a"}\n', timeout=120)))
        upload.start()
        try:
            assert wait_until(lambda: (tmp_path / "pid").exists(), timeout=120)
            assert int((tmp_path / "pid").read_text()) != os.getpid()
            assert httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=600).status_code == 200
        finally:
            (tmp_path / "release").touch()
            upload.join(120)
        assert answers[0].status_code == 200 and answers[0].json()["keys"] == 1


@pytest.mark.server
def test_a_value_nested_too_deep_gets_400_and_the_server_goes_on(tokenizer, tmp_path):
    """It raised RecursionError in the upload's JSON reader: a 500."""
    deep = b'{"key": "a"}\n{"key": "deep", "value": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    engine = make_engine(tiny_model("llama", seed=31), tokenizer, max_model_len=256)
    with running_server(engine, data_dir=str(tmp_path)) as url:
        reply = httpx.put(f"{url}/v1/tries/kb", content=deep)
        assert reply.status_code == 400 and "entry 2: JSON nested deeper" in reply.json()["error"]["message"], reply.text
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/v1/tries").json()["data"] == []
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


KEYS = ["Paris", "Paris ||| capital of", "Paris ||| population", "Lyon ||| river", "夜曲（歌曲） ||| 演唱",
        "夜曲（小说） ||| 作者", "ab", "ab cd", "ab cde", "Zürich ||| lake"]


@pytest.fixture(scope="module")
def constrained_server(tokenizer, tmp_path_factory):
    engine = make_engine(tiny_model("llama", seed=32), tokenizer, max_model_len=256, max_num_seqs=8)
    with running_server(engine, data_dir=str(tmp_path_factory.mktemp("kb"))) as url:
        entries = [{"key": key, "value": {"id": i}} for i, key in enumerate(KEYS)]
        assert httpx.post(f"{url}/v1/tries", json={"name": "kb", "entries": entries}).status_code == 200
        yield url


def test_every_sampled_answer_is_a_key_with_its_value(constrained_server):
    from tests.conftest import openai_client

    client = openai_client(constrained_server)
    seen = set()
    for seed, prompt in enumerate(["Q: capital? A:", "The river of Lyon is", "谁演唱了夜曲？", "x"]):
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=32, temperature=1.0, n=4, seed=seed,
                                          extra_body={"constraint": {"trie": "kb"}})
        for choice in reply.choices:
            extra = choice.model_extra
            assert choice.finish_reason == "stop" and extra["key"] in KEYS, choice
            assert choice.text == extra["key"] and extra["value"] == {"id": KEYS.index(extra["key"])}
            seen.add(extra["key"])
    assert len(seen) > 2  # sampling explores several keys, all of them valid


def test_a_prefix_key_is_reachable_through_the_end_of_key_step(constrained_server, tokenizer):
    from tests.conftest import openai_client

    client = openai_client(constrained_server)
    eos = tokenizer.eos_token_id
    choices = {"choices": ["ab", "ab cd", "ab cde"]}
    for bias, expected in ((100, "ab"), (-100, None)):
        reply = client.completions.create(model="tiny", prompt="pick:", max_tokens=16, temperature=0,
                                          logit_bias={str(eos): bias}, extra_body={"constraint": choices})
        key = reply.choices[0].model_extra["key"]
        assert key == expected if expected else key in ("ab cd", "ab cde")


def test_a_key_cut_by_max_tokens_is_no_answer_and_streaming_carries_the_value(constrained_server):
    from tests.conftest import openai_client

    client = openai_client(constrained_server)
    cut = client.completions.create(model="tiny", prompt="Q:", max_tokens=1, temperature=0,
                                    extra_body={"constraint": {"choices": ["Paris ||| capital of", "Lyon ||| river"]}})
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].model_extra["key"] is None and cut.choices[0].model_extra["value"] is None
    whole = client.completions.create(model="tiny", prompt="Q:", max_tokens=32, temperature=0, extra_body={"constraint": {"trie": "kb"}})
    chunks = list(client.completions.create(model="tiny", prompt="Q:", max_tokens=32, temperature=0, stream=True,
                                            extra_body={"constraint": {"trie": "kb"}}))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].model_extra["value"] == whole.choices[0].model_extra["value"] is not None
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Where?"}], max_tokens=32,
                                          temperature=0, extra_body={"constraint": {"trie": "kb"}})
    assert chat.choices[0].message.content in KEYS and chat.choices[0].model_extra["key"] == chat.choices[0].message.content


def test_a_key_completed_on_the_last_allowed_token_is_the_answer(constrained_server):
    from tests.conftest import openai_client

    client = openai_client(constrained_server)
    ask = {"model": "tiny", "prompt": "Q:", "temperature": 0, "extra_body": {"constraint": {"choices": ["Paris"]}}}
    whole = client.completions.create(max_tokens=32, **ask)
    assert whole.choices[0].finish_reason == "stop" and whole.choices[0].model_extra["key"] == "Paris"
    exact = client.completions.create(max_tokens=whole.usage.completion_tokens, **ask)  # the key's last token is the last allowed
    assert exact.choices[0].finish_reason == "stop" and exact.choices[0].model_extra["key"] == "Paris"


@pytest.mark.parametrize(
    "constraint,status,param",
    [
        ({"trie": "nope"}, 404, "name"),
        ({"trie": "kb", "choices": ["a"]}, 400, "constraint"),
        ({}, 400, "constraint"),
        ({"choices": []}, 400, "constraint.choices"),
        ({"choices": ["a", "a"]}, 400, "constraint.choices"),
        ({"trie": "kb", "lead": " "}, 400, "constraint"),
    ],
)
def test_bad_constraints_get_4xx(constrained_server, constraint, status, param):
    reply = httpx.post(f"{constrained_server}/v1/completions", json={"prompt": "Q:", "max_tokens": 8, "constraint": constraint})
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param


def test_kgclue_client_on_the_bundled_dataset_gives_only_valid_keys(constrained_server, tmp_path, capsys):
    """The client end to end on a tiny model: every answer is a key of the base (the model's quality is not judged)."""
    from pathlib import Path

    from longserve.clients.kgclue import lcs_f1, read_triples
    from longserve.server.cli import main

    data = Path(__file__).parent / "data" / "kgclue"
    main(["kgclue", "--base-url", constrained_server, "--kb", str(data / "kb.tsv"), "--questions", str(data / "questions.jsonl"),
          "--name", "kgclue", "--shots", "2", "--limit", "12", "--max-tokens", "48", "--out", str(tmp_path)])
    result = json.loads(next(tmp_path.glob("kgclue-*.json")).read_text())
    keys = read_triples(data / "kb.tsv")
    assert result["summary"]["questions"] == 12 and result["trie"]["keys"] == len(keys)
    for record in result["records"]:
        assert record["valid"] and record["key"] in keys and record["objects"] == keys[record["key"]]
    assert "validity 100.0%" in capsys.readouterr().out
    assert lcs_f1("周杰伦", "周杰伦") == 1.0 and lcs_f1("abc", "xbz") == pytest.approx(1 / 3)
    several = [k for k, v in keys.items() if len(v) > 1]
    assert several and any("（歌曲）" in k for k in several)  # the dataset holds one (S, P) with several objects


def exact_key_scores(model, tokenizer, prompt: str, keys: list[str]) -> dict[str, float]:
    """log P(key) under the model, token by token, plus the end-of-key step where a longer key continues it."""
    import torch

    from longserve.patches.trie import TokenTrie

    prompt_ids = tokenizer.encode(prompt)
    tokenized = [tokenizer.encode(key, add_special_tokens=False) for key in keys]
    trie = TokenTrie.build(tokenized)
    scores = {}
    for key, tokens in zip(keys, tokenized):
        with torch.no_grad():
            logprobs = model(torch.tensor([prompt_ids + tokens])).logits[0].float().log_softmax(-1)
        total = sum(float(logprobs[len(prompt_ids) - 1 + t, token]) for t, token in enumerate(tokens))
        if len(trie.children(trie.walk(tokens))):
            total += float(logprobs[-1, tokenizer.eos_token_id])
        scores[key] = total
    return scores


@pytest.mark.server
def test_beam_search_returns_the_best_distinct_keys_with_their_scores(tokenizer, tmp_path):
    from tests.conftest import openai_client

    choices = ["ab", "ab cd", "ab cde", "Lyon ||| river", "Paris", "Paris ||| capital of"]
    model = tiny_model("llama", seed=33)
    engine = make_engine(model, tokenizer, max_model_len=256, max_num_seqs=8)
    reference = exact_key_scores(tiny_model("llama", seed=33), tokenizer, "Answer:", choices)
    with running_server(engine, data_dir=str(tmp_path)) as url:
        client = openai_client(url)
        for stream in (False, True):
            reply = client.completions.create(model="tiny", prompt="Answer:", max_tokens=16, n=len(choices), stream=stream,
                                              extra_body={"constraint": {"choices": choices}, "use_beam_search": True})
            found = [c for c in reply] if stream else reply.choices
            found = sorted((c.choices[0] if stream else c for c in found), key=lambda c: c.index)
            keys = [c.model_extra["key"] for c in found]
            assert sorted(keys) == sorted(choices)  # all distinct, all valid
            assert keys == sorted(choices, key=lambda k: -reference[k])  # best first
            assert [c.model_extra["score"] for c in found] == pytest.approx([reference[k] for k in keys], abs=1e-3)
        narrow = client.completions.create(model="tiny", prompt="Answer:", max_tokens=16, n=2,
                                           extra_body={"constraint": {"choices": choices}, "use_beam_search": True})
        assert len({c.model_extra["key"] for c in narrow.choices}) == 2
        assert narrow.choices[0].model_extra["score"] >= narrow.choices[1].model_extra["score"]
        too_wide = httpx.post(f"{url}/v1/completions", json={"prompt": "A", "n": 7, "use_beam_search": True, "constraint": {"choices": choices}})
        assert too_wide.status_code == 400 and too_wide.json()["error"]["param"] == "n"
        no_constraint = httpx.post(f"{url}/v1/completions", json={"prompt": "A", "n": 2, "use_beam_search": True})
        assert no_constraint.status_code == 400 and "constraint" in no_constraint.json()["error"]["message"]
        two_prompts = httpx.post(f"{url}/v1/completions", json={"prompt": ["A", "B"], "n": 2, "use_beam_search": True,
                                                                "constraint": {"choices": choices}}, timeout=600)
        assert two_prompts.status_code == 400 and two_prompts.json()["error"]["param"] == "prompt"  # it hung before
        with_contexts = httpx.post(f"{url}/v1/completions", json={"prompt": "A", "n": 2, "use_beam_search": True, "contexts": ["x", "y"],
                                                                  "constraint": {"choices": choices}}, timeout=600)
        assert with_contexts.status_code == 400 and "contexts" in with_contexts.json()["error"]["message"]
        assert wait_until(lambda: engine.scheduler.num_running == 0 and engine.blocks.in_use == 0)
