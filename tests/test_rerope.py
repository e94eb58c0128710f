"""ReRoPE and Leaky ReRoPE against a naive reference: the full clipped relative-position matrix.

The reference runs transformers' own model with rotary turned off (cos 1,
sin 0, so attention gets q and k before rotation) and an attention function
registered here that builds the distance matrix D[i, j], turns each query by
D[i, j] against each unrotated key, and takes a plain causal softmax. It
shares nothing with patches/rerope.py's two-form split.
"""

from __future__ import annotations

import math

import pytest
import torch

from longserve.patches.rerope import flash_cpu
from longserve.patches.rope import PositionSpec
from longserve.server.engine.base import SamplingParams
from longserve.server.engine.native.sequence import Sequence
from tests.conftest import chat_ids, greedy_text, make_engine, tiny_model

TRAINED = 64  # the tiny model's nominal trained length, so log-n acts past 64 tokens


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_model(seed: int, spec: PositionSpec, family: str = "llama", **overrides):
    """A tiny model (Llama unless `family` says) whose attention is the naive clipped-distance formula for `spec`,
    rotating with the model's own frequencies (a Llama 3 or Phi-3 config's scaling included)."""
    from transformers import AttentionInterface

    model = tiny_model(family, seed=seed, max_position_embeddings=TRAINED, **overrides)
    rotary = model.model.rotary_emb
    own_rotation = rotary.forward
    window = spec.window_for(TRAINED)
    leak = 1.0 / spec.k if spec.type == "leaky-rerope" else 0.0

    def own_table(length: int):
        """The model's own frequencies and cos/sin factor for `length` tokens, as transformers picks them
        (Phi-3's longrope takes its long factors past its original length)."""
        own_rotation(torch.zeros(1), torch.arange(length)[None])
        return rotary.inv_freq.float(), rotary.attention_scaling

    def no_rotation(x, position_ids):
        shape = (*position_ids.shape, rotary.inv_freq.shape[0] * 2)
        return torch.ones(shape, dtype=x.dtype), torch.zeros(shape, dtype=x.dtype)

    def naive(module, query, key, value, attention_mask, scaling=None, **kwargs):
        batch, heads, length, dim = query.shape
        groups = heads // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        at = torch.arange(length)
        inv_freq, factor = own_table(length)
        if spec.type == "rope":
            distance = (at[:, None] - at[None, :]).float()
        else:
            r = (at[:, None] - at[None, :]).float()
            distance = torch.where(r < window, r, window + (r - window) * leak)  # D[i, j], patches/README.md, section 1
            if spec.type == "self-extend":  # LongLM: exact inside the neighbour window, grouped positions past it
                group = spec.group
                grouped = (at[:, None] // group - at[None, :] // group + window - window // group).float()
                distance = torch.where(r < window, r, grouped)
        angles = distance.unsqueeze(-1) * inv_freq  # [L, L, d/2]
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        turned = query.unsqueeze(3) * cos + rotate_half(query).unsqueeze(3) * sin  # [B, H, L(i), L(j), d]
        scores = (turned * key.unsqueeze(2)).sum(-1) * scaling * factor**2  # the factor scales q's and k's cos and sin
        if spec.logn:
            n = (at + 1).float()
            scores = scores * torch.clamp(torch.log(n) / math.log(TRAINED), min=1.0)[:, None]
        scores = scores.masked_fill(at[None, :] > at[:, None], float("-inf"))
        return (scores.softmax(-1) @ value).transpose(1, 2), None

    AttentionInterface.register("naive_clipped", naive)
    model.set_attn_implementation("naive_clipped")
    model.model.rotary_emb.forward = no_rotation
    return model


def reference_logits(seed: int, spec: PositionSpec, ids: list[int], family: str = "llama", **overrides) -> torch.Tensor:
    with torch.no_grad():
        return reference_model(seed, spec, family, **overrides)(torch.tensor([ids])).logits[0]


class Driver:
    """Drives the engine's model runner directly: chunked prefill, then decode steps in one batch."""

    def __init__(self, engine):
        self.engine = engine

    def start(self, ids: list[int], spec: PositionSpec, chunk: int) -> tuple[Sequence, list[torch.Tensor]]:
        engine = self.engine
        seq = Sequence("probe", 0, list(ids), SamplingParams(max_tokens=64), lambda d: None,
                       engine.tokenizer.backend_tokenizer, frozenset())
        seq.positions = engine.positions.for_sequence(spec, len(ids) + 64)
        assert engine.blocks.admit(seq, len(ids) + 64)
        logits = []
        for start in range(0, len(ids), chunk):
            end = min(len(ids), start + chunk)
            logits += list(engine.runner.prefill(seq, start, end, every_position=True))
            seq.num_cached = end
        seq.output_ids.append(int(logits[-1].argmax()))
        return seq, logits

    def step(self, seqs: list[Sequence]) -> list[torch.Tensor]:
        out = self.engine.runner.decode(seqs)
        for seq, row in zip(seqs, out):
            seq.num_cached += 1
            seq.output_ids.append(int(row.argmax()))
        return list(out)


def engine_for(seed: int, tokenizer, family: str = "llama", overrides: dict | None = None, **config):
    model = tiny_model(family, seed=seed, max_position_embeddings=TRAINED, **(overrides or {}))
    engine = make_engine(model, tokenizer, max_model_len=512, **config)
    engine.shutdown()  # the runner is driven directly
    return engine


def prompt(tokenizer, length: int, salt: str = "") -> list[int]:
    return tokenizer.encode(f"{salt} It was the best of times, it was the worst of times, " * 40)[:length]


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor):
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-3)


def unequal_batch(driver: Driver, tokenizer, spec: PositionSpec, chunk: int, steps: int = 12):
    """Prompts of 90, 37 and 70 tokens prefilled in chunks of `chunk`, then decoded together for `steps` steps:
    (each sequence's ids so far, the engine's logit rows for them: every prompt position and each step)."""
    started = [driver.start(prompt(tokenizer, n, salt), spec, chunk) for n, salt in ((90, "a"), (37, "b"), (70, "c"))]
    seqs = [seq for seq, _ in started]
    decoded = [[] for _ in seqs]
    for _ in range(steps):
        for rows, logits in zip(decoded, driver.step(seqs)):
            rows.append(logits)
    return [(seq.all_ids[: len(seq.prompt_ids) + len(rows)], torch.stack(prefill + rows))
            for (seq, prefill), rows in zip(started, decoded)]


SPECS = [
    pytest.param(PositionSpec(type="rerope", window=16), 24, id="rerope-w16-chunk24"),
    pytest.param(PositionSpec(type="rerope", window=16, logn=True), 24, id="rerope-w16-logn"),
    pytest.param(PositionSpec(type="rerope", window=40), 16, id="rerope-w40-chunk16"),
    pytest.param(PositionSpec(type="leaky-rerope", window=12, k=4), 16, id="leaky-w12-k4"),
    pytest.param(PositionSpec(type="leaky-rerope", window=20, k=2, logn=True), 64, id="leaky-w20-k2-logn"),
    pytest.param(PositionSpec(type="self-extend", window=12, group=3), 16, id="self-extend-w12-g3"),
    pytest.param(PositionSpec(type="self-extend", window=20, group=5, logn=True), 24, id="self-extend-w20-g5-logn"),
]


@pytest.mark.parametrize("spec,chunk", SPECS)
def test_prefill_and_every_decode_step_match_the_naive_reference(tokenizer, spec, chunk):
    """A batch of unequal lengths, prefilled in chunks, then decoded together: every logit row
    equals the naive reference recomputed over the whole sequence so far."""
    for ids, logits in unequal_batch(Driver(engine_for(11, tokenizer, position=spec)), tokenizer, spec, chunk):
        assert_logits_close(logits, reference_logits(11, spec, ids))
        assert torch.isfinite(logits).all()


def test_the_explicit_attention_path_used_off_cpu_matches_the_reference_too(tokenizer, monkeypatch):
    """Devices without a fused kernel that returns the log-sum-exp run the backend's explicit path; drive the
    whole engine through it here."""
    from longserve.server.engine.native import attention_backend

    monkeypatch.setattr(attention_backend, "fused_kernel_for", lambda device: False)
    spec = PositionSpec(type="leaky-rerope", window=16, k=8, logn=True)
    driver = Driver(engine_for(15, tokenizer, position=spec))
    seq, prefill = driver.start(prompt(tokenizer, 90), spec, chunk=32)
    steps = [driver.step([seq])[0] for _ in range(4)]
    assert_logits_close(torch.stack(prefill + steps), reference_logits(15, spec, seq.all_ids[: seq.num_cached]))


def test_window_past_the_sequence_is_plain_rope(tokenizer):
    ids = prompt(tokenizer, 120)
    driver = Driver(engine_for(12, tokenizer))
    _, plain = driver.start(ids, PositionSpec(), chunk=50)
    for spec in (PositionSpec(type="rerope", window=200), PositionSpec(type="leaky-rerope", window=120, k=3)):
        _, clipped = driver.start(ids, spec, chunk=50)
        assert_logits_close(torch.stack(clipped), torch.stack(plain))
    # and the reference agrees that a window past the sequence is no clipping at all
    assert_logits_close(reference_logits(12, PositionSpec(type="rerope", window=200), ids), reference_logits(12, PositionSpec(), ids))


def test_leaky_with_a_very_large_k_approaches_rerope(tokenizer):
    ids = prompt(tokenizer, 100)
    driver = Driver(engine_for(13, tokenizer))
    _, rerope = driver.start(ids, PositionSpec(type="rerope", window=16), chunk=32)
    gaps = []
    for k in (4.0, 64.0, 1e6):
        _, leaky = driver.start(ids, PositionSpec(type="leaky-rerope", window=16, k=k), chunk=32)
        gaps.append(float((torch.stack(leaky) - torch.stack(rerope)).abs().max()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3


def test_rerope_and_plain_sequences_decode_together(tokenizer):
    """Per-request settings: one batch mixes a plain row (keys cached rotated) and clipped rows."""
    spec = PositionSpec(type="rerope", window=16, logn=True)
    driver = Driver(engine_for(14, tokenizer))
    plain_seq, _ = driver.start(prompt(tokenizer, 50, "p"), PositionSpec(), chunk=64)
    clipped_seq, _ = driver.start(prompt(tokenizer, 80, "q"), spec, chunk=64)
    steps = [driver.step([plain_seq, clipped_seq]) for _ in range(6)]
    for seq, setting, column in ((plain_seq, PositionSpec(), 0), (clipped_seq, spec, 1)):
        expected = reference_logits(14, setting, seq.all_ids[: seq.num_cached])
        assert_logits_close(torch.stack([step[column] for step in steps]), expected[len(seq.prompt_ids) :])


def test_the_explicit_path_equals_the_cpu_kernel():
    """Devices other than CPU use the explicit path; both give the same output and log-sum-exp, grouped-query
    heads included (4 query heads over 2 KV heads)."""
    from longserve.server.engine.native.attention_backend import explicit

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 300, 16), torch.randn(1, 2, 90, 16), torch.randn(1, 2, 90, 16)
    visible = (torch.rand(300, 90) > 0.5)[None, None]
    visible[..., 7, :] = True
    additive = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
    masked = explicit(q, k, v, visible, 0.25)
    torch.testing.assert_close(flash_cpu(q, k, v, additive, 0.25), masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flash_cpu(q, k, v, None, 0.25), explicit(q, k, v, None, 0.25), rtol=1e-5, atol=1e-5)
    one_head = explicit(q[:, 3:4], k[:, 1:2], v[:, 1:2], visible, 0.25)  # head 3 reads KV head 1
    torch.testing.assert_close(masked[0][:, 3:4], one_head[0], rtol=1e-5, atol=1e-5)


def test_bundled_model_answers_with_a_window_shorter_than_the_prompt(bundled_model, tokenizer):
    engine = make_engine(bundled_model, tokenizer, position=PositionSpec(type="rerope", window=16, logn=True))
    try:
        ids = chat_ids(tokenizer, "What is the capital of France?")
        assert len(ids) > 16  # the question sits partly past the window
        assert "Paris" in greedy_text(engine, ids)
    finally:
        engine.shutdown()


def test_a_clipped_request_on_a_plain_server_adds_near_keys_and_the_pool_stays_usable(tokenizer, monkeypatch):
    """The near-key plane is added at the first clipped step, before its forward pass; blocks zeroed after it (here: every new block) must
    not hit an inference-mode tensor. This once stopped the engine on the next request that needed fresh blocks."""
    import asyncio

    from longserve.server.engine.base import GenerationRequest, SamplingParams
    from longserve.server.engine.native.kv_cache import KvPool
    from tests.test_engine import hf_greedy

    monkeypatch.setattr(KvPool, "ZERO_RUN", 1)
    model = tiny_model("llama", seed=17, max_position_embeddings=TRAINED)
    engine = make_engine(model, tokenizer, max_model_len=512)

    async def greedy(ids, position=None):
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        return [t async for d in engine.generate(GenerationRequest(f"r{len(ids)}", [ids], params, position=position)) for t in d.token_ids]

    try:
        asyncio.run(greedy(prompt(tokenizer, 40, "x"), PositionSpec(type="rerope", window=16)))
        assert engine.pool.with_near_keys
        ids = prompt(tokenizer, 200, "y")  # fresh blocks, zeroed one by one
        assert asyncio.run(greedy(ids)) == hf_greedy(model, ids, 8, eos=False)
        assert engine.is_alive()
    finally:
        engine.shutdown()


@pytest.mark.server
def test_the_kv_budget_keeps_room_for_near_keys_or_refuses_clipped_requests(tokenizer):
    """--kv-cache-memory bounds the whole cache: a clipped request on a plain server adds its near-key plane
    inside the budget; with --no-request-rerope the whole budget holds tokens and such a request gets a 400."""
    import httpx

    from tests.conftest import running_server

    budget = 2**20  # the tiny model: 2 layers x 2 KV heads x 16 dims x 4 bytes = 256 bytes a plane per token
    model = tiny_model("llama", seed=18, max_position_embeddings=TRAINED)
    engine = make_engine(model, tokenizer, max_model_len=512, kv_cache_memory=budget / 2**30)
    assert engine.pool.num_tokens == budget // (3 * 256 * 16) * 16 and not engine.pool.with_near_keys
    body = {"model": "tiny", "prompt": "It was the best of times", "max_tokens": 4}
    with running_server(engine) as url:
        clipped = httpx.post(f"{url}/v1/completions", json={**body, "position": {"type": "rerope", "window": 16}})
        assert clipped.status_code == 200 and engine.pool.with_near_keys
        assert engine.pool.bytes_allocated() <= budget
    model = tiny_model("llama", seed=18, max_position_embeddings=TRAINED)
    engine = make_engine(model, tokenizer, max_model_len=512, kv_cache_memory=budget / 2**30, request_rerope=False)
    assert engine.pool.num_tokens == budget // (2 * 256 * 16) * 16
    with running_server(engine) as url:
        for spec in ({"type": "rerope", "window": 16}, {"type": "self-extend", "window": 16, "group": 4}):
            refused = httpx.post(f"{url}/v1/completions", json={**body, "position": spec})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "position"
            assert "--no-request-rerope" in refused.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/completions", json={**body, "position": {"type": "ntk", "factor": 2}}).status_code == 200
        assert not engine.pool.with_near_keys
    longest = budget // (2 * 256)  # 2048 tokens in two planes, 1360 in three
    with pytest.raises(ValueError, match="holds 1360 tokens.*or pass --no-request-rerope"):
        make_engine(tiny_model("llama", seed=18, max_position_embeddings=TRAINED), tokenizer, max_model_len=longest,
                    kv_cache_memory=budget / 2**30)
    make_engine(tiny_model("llama", seed=18, max_position_embeddings=TRAINED), tokenizer, max_model_len=longest,
                kv_cache_memory=budget / 2**30, request_rerope=False).shutdown()


def test_self_extend_says_where_its_grouped_positions_leave_the_trained_length():
    spec = PositionSpec(type="self-extend", window=16, group=4)  # trained 64: (64 - 16) * 4 + 16 = 208 tokens
    grouped = lambda d: d // 4 + 16 - 16 // 4  # noqa: E731 - the far form's distance, as in the naive matrix above
    assert grouped(207) < 64 <= grouped(208 + 3)
    assert spec.past_reach(64, 208) is None
    assert "208 tokens" in spec.past_reach(64, 209) and "raise group" in spec.past_reach(64, 209)
    assert PositionSpec(type="rerope", window=16).past_reach(64, 10_000) is None
