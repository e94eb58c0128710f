"""Dual Chunk Attention against a naive reference: the full (query, key) position matrix DCA defines.

The reference runs transformers' own model with rotary turned off and an attention function registered here
that builds, for every pair i >= j, where the query stands (by how many chunks back the key is) minus where
the key stands, turns each query by that distance against each unrotated key, and takes a causal softmax. It
shares nothing with the engine's three calls and their merge.
"""

from __future__ import annotations

import math

import httpx
import pytest
import torch

from longserve.patches import dca
from longserve.patches.rope import PositionSpec
from tests.conftest import make_engine, running_server, tiny_model
from tests.test_rerope import (TRAINED, Driver, assert_logits_close, engine_for, prompt, reference_logits, rotate_half,
                               unequal_batch)


def dca_distance(length: int, chunk_size: int, local_size: int) -> torch.Tensor:
    """D[i, j] for i, j < length, the naive way: the chunk distance picks the query's place, the key sits at
    j mod cl, cl = chunk_size - local_size."""
    cl = chunk_size - local_size
    at = torch.arange(length)
    i, j = at[:, None], at[None, :]
    back = i // cl - j // cl
    same, previous, earlier = i % cl, torch.clamp(i % cl + cl, max=chunk_size), min(2 * cl - 1, chunk_size)
    query_at = torch.where(back == 0, same, torch.where(back == 1, previous, torch.full_like(same, earlier)))
    return (query_at - j % cl).float()


def dca_reference_logits(seed: int, spec: PositionSpec, ids: list[int]) -> torch.Tensor:
    from transformers import AttentionInterface

    chunk_size, local_size = spec.chunk_sizes(TRAINED)
    model = tiny_model("llama", seed=seed, max_position_embeddings=TRAINED)
    rotary = model.model.rotary_emb

    def no_rotation(x, position_ids):
        shape = (*position_ids.shape, rotary.inv_freq.shape[0] * 2)
        return torch.ones(shape, dtype=x.dtype), torch.zeros(shape, dtype=x.dtype)

    def naive(module, query, key, value, attention_mask, scaling=None, **kwargs):
        length = query.shape[2]
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        angles = dca_distance(length, chunk_size, local_size).unsqueeze(-1) * rotary.inv_freq.float()
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        turned = query.unsqueeze(3) * cos + rotate_half(query).unsqueeze(3) * sin
        scores = (turned * key.unsqueeze(2)).sum(-1) * scaling
        at = torch.arange(length)
        if spec.logn:
            scores = scores * torch.clamp(torch.log((at + 1).float()) / math.log(TRAINED), min=1.0)[:, None]
        scores = scores.masked_fill(at[None, :] > at[:, None], float("-inf"))
        return (scores.softmax(-1) @ value).transpose(1, 2), None

    AttentionInterface.register("naive_dca", naive)
    model.set_attn_implementation("naive_dca")
    model.model.rotary_emb.forward = no_rotation
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


SPECS = [
    pytest.param(PositionSpec(type="dca", chunk_size=24, local_size=8), 24, id="chunks16-prefill24"),
    pytest.param(PositionSpec(type="dca", chunk_size=40, local_size=30, logn=True), 16, id="chunks10-logn"),
    pytest.param(PositionSpec(type="dca", chunk_size=64, local_size=16), 50, id="chunks48-prefill50"),
]


@pytest.mark.parametrize("spec,chunk", SPECS)
def test_prefill_and_every_decode_step_match_the_naive_reference(tokenizer, spec, chunk):
    """Prompts of 90, 37 and 70 tokens (several chunks: every one of the three cases), prefilled in chunks that
    cut through DCA's chunks, then decoded together; every logit row equals the naive reference."""
    for ids, logits in unequal_batch(Driver(engine_for(21, tokenizer, position=spec)), tokenizer, spec, chunk):
        assert_logits_close(logits, dca_reference_logits(21, spec, ids))


def test_the_explicit_attention_path_used_off_cpu_matches_the_reference_too(tokenizer, monkeypatch):
    """Devices without a fused kernel that returns the log-sum-exp (CUDA here) run the backend's explicit path."""
    from longserve.server.engine.native import attention_backend

    monkeypatch.setattr(attention_backend, "fused_kernel_for", lambda device: False)
    spec = PositionSpec(type="dca", chunk_size=24, local_size=8, logn=True)
    driver = Driver(engine_for(26, tokenizer, position=spec))
    seq, prefill = driver.start(prompt(tokenizer, 90), spec, chunk=32)
    steps = [driver.step([seq])[0] for _ in range(4)]
    assert_logits_close(torch.stack(prefill + steps), dca_reference_logits(26, spec, seq.all_ids[: seq.num_cached]))


def test_dca_plain_and_rerope_rows_share_a_batch(tokenizer):
    """Per-request settings: plain, ReRoPE and DCA rows (two chunk sizes) prefill in one step and decode
    together; each equals its own reference."""
    settings = [PositionSpec(), PositionSpec(type="rerope", window=16, logn=True),
                PositionSpec(type="dca", chunk_size=24, local_size=8), PositionSpec(type="dca", chunk_size=48, local_size=12, logn=True)]
    engine = engine_for(22, tokenizer)
    driver = Driver(engine)
    seqs = []
    for index, spec in enumerate(settings):
        seq, _ = driver.start(prompt(tokenizer, 60 + 7 * index, f"s{index}"), spec, chunk=64)
        seqs.append(seq)
    steps = [driver.step(seqs) for _ in range(8)]
    for column, (seq, spec) in enumerate(zip(seqs, settings)):
        ids = seq.all_ids[: seq.num_cached]
        expected = (dca_reference_logits(22, spec, ids) if spec.type == "dca" else reference_logits(22, spec, ids))
        assert_logits_close(torch.stack([step[column] for step in steps]), expected[len(seq.prompt_ids) :])


def test_the_positions_are_vllm_v0s():
    """vLLM's V0 DualChunkRotaryEmbedding (vllm/model_executor/layers/rotary_embedding/dual_chunk_rope.py) with
    chunk_size 8 and local_size 3, so chunk_len 5: keys at pos % 5 (its k table); the query in its own chunk at
    pos % 5 (q table); for the chunk before at min(pos % 5 + 5, 8) (qc table, clamped at chunk_size); for
    earlier chunks at qc[chunk_len - 1] = min(4 + 5, 8) = 8 for every query. Written out for positions 0..11."""
    positions = torch.arange(12)
    length = dca.chunk_len(8, 3)
    assert length == 5
    assert dca.key_positions(positions, length).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    same, previous, earlier = dca.query_positions(positions, length, 8)
    assert same.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert previous.tolist() == [5, 6, 7, 8, 8, 5, 6, 7, 8, 8, 5, 6]
    assert earlier.tolist() == [8] * 12
    # query 11 (chunk 2): key 9 is in its own chunk... no: 9 // 5 = 1, the chunk before: 6 - 4 = 2, its true distance;
    # key 2 two chunks back: 8 - 2 = 6; key 10 in its own chunk: 1 - 0 = 1
    matrix = dca.relative_positions(length, 8, positions, positions)
    assert (matrix[11, 9], matrix[11, 2], matrix[11, 10]) == (2, 6, 1)
    assert torch.equal(matrix, dca_distance(12, 8, 3).long())
    assert int(matrix.tril().max()) <= 8  # never past chunk_size


def test_bad_settings_are_refused_naming_the_field(tokenizer):
    with pytest.raises(ValueError, match="local_size"):
        PositionSpec(type="dca", chunk_size=16, local_size=16)
    with pytest.raises(ValueError, match="chunk_size"):
        PositionSpec(type="rope", chunk_size=16)
    with pytest.raises(ValueError, match="chunk_size.*trained length 64"):
        PositionSpec(type="dca", chunk_size=65).chunk_sizes(TRAINED)
    assert PositionSpec(type="dca").chunk_sizes(TRAINED) == (48, 4)  # ChunkLlama's 3L/4 and L/16


@pytest.mark.server
def test_a_request_asks_for_dca_and_bad_sizes_get_a_400(tokenizer):
    model = tiny_model("llama", seed=23, max_position_embeddings=TRAINED)
    engine = make_engine(model, tokenizer, max_model_len=512)
    body = {"prompt": tokenizer.decode(prompt(tokenizer, 150)), "max_tokens": 0, "echo": True, "logprobs": 0}
    with running_server(engine) as url:
        def scores(position: dict | None) -> list:
            reply = httpx.post(f"{url}/v1/completions", json={**body, **({"position": position} if position else {})})
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["logprobs"]["token_logprobs"]

        chunked = scores({"type": "dca", "chunk_size": 32, "local_size": 8})
        assert chunked != scores(None)
        assert chunked == scores({"type": "dca", "chunk_size": 32, "local_size": 8})
        for bad, param in (({"type": "dca", "chunk_size": 100}, "position.chunk_size"),
                           ({"type": "dca", "chunk_size": 32, "local_size": 40}, "position"),
                           ({"type": "dca", "chunk_size": 1}, "position.chunk_size")):
            reply = httpx.post(f"{url}/v1/completions", json={**body, "position": bad})
            assert reply.status_code == 400, (bad, reply.text)
            assert reply.json()["error"]["param"] == param, reply.json()
            assert "size" in reply.json()["error"]["message"]


def test_a_dca_block_is_never_reused_by_plain_or_rerope_requests(tokenizer):
    from tests.test_paged_engine import one, words

    model = tiny_model("llama", seed=24, max_position_embeddings=TRAINED)
    engine = make_engine(model, tokenizer, max_model_len=1024)
    try:
        document = words(tokenizer, 200, salt=70)
        chunked = PositionSpec(type="dca", chunk_size=48, local_size=16)
        first = one(engine, "dca", document, 4, position=chunked)
        assert first["cached"] == 0
        assert one(engine, "plain", document, 4)["cached"] == 0
        assert one(engine, "rerope", document, 4, position=PositionSpec(type="rerope", window=32))["cached"] == 0
        assert one(engine, "dca-other", document, 4, position=PositionSpec(type="dca", chunk_size=40, local_size=16))["cached"] == 0
        again = one(engine, "dca-again", document, 4, position=chunked)
        assert again["cached"] > 0 and again["tokens"] == first["tokens"]
    finally:
        engine.shutdown()


def test_a_model_whose_config_carries_dca_is_served_with_it(tokenizer, tmp_path, caplog):
    """A tiny random Qwen2 saved with Qwen2.5-1M's `dual_chunk_attention_config`: served with DCA by default,
    said so in the log, and its output is the naive DCA reference's."""
    import logging

    from longserve.server.engine.native.loading import load_model

    model = tiny_model("qwen2", seed=25, max_position_embeddings=TRAINED)
    model.config.dual_chunk_attention_config = {"chunk_size": 32, "local_size": 8, "original_max_position_embeddings": TRAINED}
    model.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), torch.device("cpu"), torch.float32)
    with caplog.at_level(logging.INFO, logger="longserve.engine"):
        engine = make_engine(loaded, tokenizer, max_model_len=512)
    try:
        assert engine.describe()["position"] == {"type": "dca", "logn": False, "chunk_size": 32, "local_size": 8}
        assert "dual_chunk_attention_config" in caplog.text
        assert engine.positions.default_spec.type == "dca"
    finally:
        engine.shutdown()


def test_vllm_refuses_dca_in_one_line():
    from longserve.server.engine.vllm import positions_for_vllm

    with pytest.raises(ValueError, match="needs the native engine"):
        positions_for_vllm(PositionSpec(type="dca"), 64, 10000.0, TRAINED, 512)
