"""A grammar whose matcher costs more than --grammar-step-timeout for one token ends its request with a 400; the
rows beside it decode on (tiny random-weight model). Matcher calls run in C++ and cannot be stopped, so the
engine times each and acts on the token after the one that went past the budget; the cost is injected here
through the clock, so nothing depends on this machine's speed."""

from __future__ import annotations

import asyncio

import pytest

from longserve.server.engine.base import GenerationRequest, GrammarSpec, SamplingParams
from longserve.server.engine.native.constraint import GrammarState, GrammarTooCostly
from longserve.server.extensions.grammar_compile import compile_checked, grammar_compiler
from tests.conftest import running_engine
from tests.test_isolation import run_all

VOCAB = 49152


class Clock:
    """A clock each matcher call moves on by `cost` seconds."""

    def __init__(self, cost: float):
        self.now, self.cost, self.started = 0.0, cost, False

    def __call__(self) -> float:
        self.now += self.cost if self.started else 0.0
        self.started = not self.started
        return self.now


@pytest.fixture(scope="module")
def digits(tokenizer):
    compiler = grammar_compiler(tokenizer, VOCAB, 2**24)
    return compile_checked(compiler, GrammarSpec("regex", "[0-9]{1,40}"), tokenizer, VOCAB)


def test_a_token_within_the_budget_goes_on_and_one_past_it_is_a_400(digits, tokenizer):
    state = GrammarState(digits, step_budget=2.0)
    state.clock = Clock(cost=0.5)  # fill + advance: 1 s a token
    bitmask = __import__("xgrammar").allocate_token_bitmask(1, VOCAB)
    one = tokenizer.encode("1")[0]
    state.fill_bitmask(bitmask, 0)
    assert state.advance(one) is False
    state.clock = Clock(cost=1.5)  # 3 s a token
    state.fill_bitmask(bitmask, 0)
    with pytest.raises(GrammarTooCostly, match="--grammar-step-timeout") as raised:
        state.advance(one)
    assert raised.value.status == 400 and "3.0 s" in str(raised.value)


def test_a_costly_grammar_fails_alone_and_the_plain_rows_beside_it_decode_on(digits, tiny_llama, tokenizer, monkeypatch):
    def params():
        return SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    with running_engine(tiny_llama, tokenizer, max_num_seqs=4, max_model_len=128, grammar_step_timeout=2.0) as engine:
        plain = [GenerationRequest(f"plain-{i}", [[5 + i, 6, 7]], params()) for i in range(2)]
        alone = asyncio.run(run_all(engine, plain))
        real_init = GrammarState.__init__

        def costly_init(self, *args, **kwargs):
            real_init(self, *args, **kwargs)
            self.clock = Clock(cost=5.0)

        monkeypatch.setattr(GrammarState, "__init__", costly_init)
        costly = GenerationRequest("costly", [[9, 10, 11]], params(), grammar=GrammarSpec("regex", "[0-9]{1,40}", digits))
        together = asyncio.run(run_all(engine, [plain[0], costly, plain[1]]))
        assert together[0] == alone[0] and together[2] == alone[1]
        tokens, error = together[1]
        assert len(tokens) == 1 and "--grammar-step-timeout" in error
        assert engine.is_alive()
