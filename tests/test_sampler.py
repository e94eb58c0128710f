"""Sampler unit tests: each filter against a naive per-row reference."""

from __future__ import annotations

import math

import pytest
import torch

from longserve.server.engine.base import SamplingParams
from longserve.server.engine.native.sampler import apply_penalties, filter_logits, sample
from longserve.server.engine.native.sequence import Sequence


def make_seq(tokenizer, **params) -> Sequence:
    return Sequence("r", 0, [1, 2, 3], SamplingParams(**params), lambda d: None, tokenizer.backend_tokenizer, frozenset({2}))


def naive_keep(row: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    order = sorted(range(len(row)), key=lambda i: -row[i])
    probs = [math.exp(v) for v in row]
    total = sum(probs)
    probs = [p / total for p in probs]
    keep, mass = [], 0.0
    for rank, i in enumerate(order):
        if top_k and rank >= top_k:
            break
        if rank > 0 and mass >= top_p:
            break
        if rank > 0 and probs[i] < min_p * probs[order[0]]:
            break
        keep.append(i)
        mass += probs[i]
    return set(keep)


def test_filters_match_naive_reference():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    top_k = torch.tensor([0, 5, 0, 0, 3, 10])
    top_p = torch.tensor([1.0, 1.0, 0.7, 1.0, 0.5, 0.9])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.2, 0.0, 0.05])
    filtered = filter_logits(logits, top_k, top_p, min_p)
    for row in range(6):
        kept = {i for i in range(50) if filtered[row, i] != float("-inf")}
        assert kept == naive_keep(logits[row].tolist(), int(top_k[row]), float(top_p[row]), float(min_p[row]))
        kept_values = filtered[row][list(kept)]
        assert torch.equal(kept_values, logits[row][list(kept)])


def test_penalties_and_logit_bias(tokenizer):
    seq = make_seq(tokenizer, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={7: 3.0})
    seq.output_ids = [4, 4, 4, 9]
    logits = torch.zeros(1, 20)
    out = apply_penalties(logits.clone(), [seq])[0]
    expected = torch.zeros(20)
    expected[4] = -(0.25 * 3 + 0.5)
    expected[9] = -(0.25 * 1 + 0.5)
    expected[7] = 3.0
    assert torch.allclose(out, expected)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens(tokenizer):
    seq = make_seq(tokenizer, repetition_penalty=2.0)  # prompt [1, 2, 3]
    seq.output_ids = [5, 5]
    logits = torch.linspace(-4.0, 4.0, 10).unsqueeze(0)
    out = apply_penalties(logits.clone(), [seq])[0]
    expected = logits[0].clone()
    for token in (1, 2, 3, 5):  # each seen token once, however often it was seen
        value = float(logits[0, token])
        expected[token] = value / 2.0 if value > 0 else value * 2.0
    assert torch.allclose(out, expected) and out[5] < logits[0, 5] and out[1] < logits[0, 1]


def test_greedy_takes_argmax_and_reports_raw_logprobs(tokenizer):
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    seq = make_seq(tokenizer, temperature=0.0, logprobs=2)
    tokens, records = sample(logits, [seq])
    assert tokens == [1]
    raw = logits.log_softmax(-1)[0]
    assert math.isclose(records[0].logprob, float(raw[1]), rel_tol=1e-6)
    assert [t for t, _ in records[0].top] == [1, 2]


def test_seeded_sampling_is_reproducible_and_seed_dependent(tokenizer):
    torch.manual_seed(1)
    logits = torch.randn(1, 1000)

    def draw(seed: int) -> list[int]:
        seq = make_seq(tokenizer, temperature=1.0)
        seq.seed = seed
        for _ in range(20):  # as the engine does: each token drawn is appended before the next draw
            seq.output_ids.append(sample(logits, [seq])[0][0])
        return seq.output_ids

    assert draw(42) == draw(42)
    assert draw(42) != draw(43)
    assert len(set(draw(42))) > 1  # the draw index moves the number on


def test_seeded_draws_follow_the_distribution(tokenizer):
    """Inverting the cumulative distribution at seeded_uniform's numbers: over 4,000 seeds the frequencies of
    a known distribution come within a few standard deviations, and a token of probability zero never comes."""
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    logits = probs.log().unsqueeze(0)
    seqs = [make_seq(tokenizer, temperature=1.0) for _ in range(4000)]
    for seed, seq in enumerate(seqs):
        seq.seed = seed
    tokens, _ = sample(logits.expand(len(seqs), -1), seqs)
    counts = torch.bincount(torch.tensor(tokens), minlength=5).double()
    expected = probs.double() * len(seqs)
    assert counts[1] == 0
    assert ((counts - expected).abs() <= 4 * (expected * (1 - probs.double())).sqrt()).all(), counts


def test_draw_tokens_never_passes_the_last_token_with_mass():
    from longserve.server.engine.native.sampler import draw_tokens

    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    for u in (0.0, 0.2499, 0.25, 0.5, 1.0 - 2**-53):
        drawn = draw_tokens(probs, torch.full((3,), u, dtype=torch.float64)).tolist()
        assert drawn == [0 if u < 0.25 else 1, 3, 0], (u, drawn)


def test_sampling_respects_top_k(tokenizer):
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    seq = make_seq(tokenizer, temperature=2.0, top_k=2)
    seq.seed = 0
    drawn = set()
    for _ in range(200):
        drawn.add(sample(logits, [seq])[0][0])
        seq.output_ids.append(0)  # the next draw
    assert drawn == {0, 1}


def mixed_batch(tokenizer, rows: int = 8) -> list[Sequence]:
    """Rows with every parameter mixed: greedy and sampled, seeded and not, penalties, biases and logprobs."""
    seqs = []
    for row in range(rows):
        seq = make_seq(tokenizer, temperature=0.0 if row % 3 == 0 else 0.8 + 0.1 * row, top_k=(0, 5, 20)[row % 3],
                       top_p=(1.0, 0.9)[row % 2], presence_penalty=0.3 * (row % 2), frequency_penalty=0.2 * (row % 4 == 1),
                       repetition_penalty=(1.0, 1.3)[row % 2], logit_bias={row: 2.5} if row % 4 == 2 else None,
                       logprobs=(None, 0, 3)[row % 3])
        seq.output_ids = [row % 7, 11, 11, 40 + row]
        if row % 2:
            seq.seed = 100 + row
        seqs.append(seq)
    return seqs


def test_batched_penalties_and_logprobs_equal_each_row_alone(tokenizer):
    torch.manual_seed(3)
    logits = torch.randn(8, 64) * 2
    seqs = mixed_batch(tokenizer)
    together = apply_penalties(logits.clone(), seqs)
    for row, seq in enumerate(seqs):
        assert torch.allclose(together[row], apply_penalties(logits[row : row + 1].clone(), [seq])[0])
    greedy = [make_seq(tokenizer, temperature=0.0, logprobs=(0, 2, 5)[row % 3]) for row in range(8)]
    tokens, records = sample(logits, greedy)
    raw = logits.log_softmax(-1)
    for row, record in enumerate(records):  # the per-row reference: log_softmax, then that row's top-k
        values, ids = raw[row].topk(greedy[row].params.logprobs) if greedy[row].params.logprobs else (torch.tensor([]), torch.tensor([]))
        assert record.token_id == tokens[row] == int(raw[row].argmax())
        assert math.isclose(record.logprob, float(raw[row, tokens[row]]), rel_tol=1e-6)
        assert [t for t, _ in record.top] == ids.tolist()
        assert [v for _, v in record.top] == pytest.approx(values.tolist(), rel=1e-6)


def test_a_seeded_row_draws_the_same_tokens_alone_and_in_any_batch(tokenizer):
    torch.manual_seed(4)
    steps = [torch.randn(8, 64) * 2 for _ in range(10)]

    def draws(order: list[int]) -> dict[int, list[int]]:
        seqs = mixed_batch(tokenizer)
        out = {row: [] for row in order}
        for logits in steps:
            tokens, _ = sample(logits[order], [seqs[row] for row in order], torch.Generator().manual_seed(9))
            for row, token in zip(order, tokens):
                out[row].append(token)
                seqs[row].output_ids.append(token)  # as the engine does: the next draw has the next index
        return out

    together = draws(list(range(8)))
    shuffled = draws([5, 2, 7, 0, 3, 6, 1, 4])
    for row in range(8):
        alone = draws([row])[row]
        if row % 2 or row % 3 == 0:  # seeded (odd rows) or greedy: a batch never changes what the row draws
            assert together[row] == shuffled[row] == alone, row


def test_a_row_with_nothing_seen_is_left_alone_beside_rows_that_are_penalized(tokenizer):
    quiet = make_seq(tokenizer, repetition_penalty=2.0)
    quiet.prompt_ids = [99]  # past this 20-token vocabulary: nothing seen inside it
    seen = make_seq(tokenizer, repetition_penalty=2.0, presence_penalty=1.0)
    seen.output_ids = [0, 0]
    logits = torch.full((2, 20), 3.0)
    out = apply_penalties(logits.clone(), [quiet, seen])
    assert torch.equal(out[0], logits[0])
    # presence first, then repetition, as before; the prompt [1, 2, 3] counts as seen for repetition only
    assert out[1, 0] == (3.0 - 1.0) / 2.0 and out[1, 1] == 3.0 / 2.0 and out[1, 5] == 3.0


def test_filters_match_the_reference_whether_the_kept_set_fits_the_candidates_or_not():
    """A peaked row keeps a few of its most likely tokens (found among the first candidates); a flat row's top-p
    set reaches past them (it is sorted whole); both agree with the naive reference, beside rows that keep all."""
    from longserve.server.engine.native.sampler import CANDIDATES

    torch.manual_seed(5)
    vocab = 4 * CANDIDATES
    peaked = torch.randn(vocab) * 8
    flat = torch.randn(vocab) * 0.1
    logits = torch.stack([peaked, flat, flat, peaked, flat])
    top_k = torch.tensor([0, 0, 3 * CANDIDATES, 0, 0])
    top_p = torch.tensor([0.9, 0.9, 1.0, 1.0, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5])
    filtered = filter_logits(logits, top_k, top_p, min_p)
    for row in range(5):
        kept = {i for i in range(vocab) if filtered[row, i] != float("-inf")}
        assert kept == naive_keep(logits[row].tolist(), int(top_k[row]), float(top_p[row]), float(min_p[row])), row
    assert len({i for i in range(vocab) if filtered[1, i] != float("-inf")}) > CANDIDATES  # the whole-sort path ran
    assert torch.equal(filtered[3], logits[3])  # nothing to filter: left as it is


def test_the_two_level_draw_equals_a_whole_vocabulary_inverse_cdf():
    """Blocks of DRAW_BLOCK tokens, the last one padded, some tokens and a whole block of probability zero: each
    draw is the first token whose float64 cumulative mass passes uniform x total, as a plain cumulative sum finds."""
    from longserve.server.engine.native.sampler import DRAW_BLOCK, draw_tokens

    generator = torch.Generator().manual_seed(6)
    vocab = 3 * DRAW_BLOCK - 100
    probs = torch.rand(64, vocab, generator=generator) ** 8  # peaked rows, as a model's are
    probs[:, ::7] = 0.0
    probs[::2, DRAW_BLOCK : 2 * DRAW_BLOCK] = 0.0  # even rows: the middle block has no mass
    probs /= probs.sum(dim=-1, keepdim=True)
    uniforms = torch.rand(64, dtype=torch.float64, generator=generator)
    drawn = draw_tokens(probs, uniforms)
    cumulative = probs.double().cumsum(dim=-1)
    for row in range(64):
        target = float(uniforms[row]) * float(cumulative[row, -1])
        assert int(drawn[row]) == int((cumulative[row] <= target).sum()), row
        assert probs[row, drawn[row]] > 0


@pytest.mark.parametrize("kind", ["mixed", "all greedy", "all sampled, no penalties"])
def test_sampling_never_writes_the_callers_logits(tokenizer, kind):
    """The engine passes the runner's own logits (no copy): a row that samples again alone, after its batch
    failed, must see them as they came."""
    torch.manual_seed(5)
    logits = torch.randn(8, 64) * 2
    if kind == "mixed":
        seqs = mixed_batch(tokenizer)
    else:
        seqs = [make_seq(tokenizer, temperature=0.0 if kind == "all greedy" else 0.9, top_p=0.8) for _ in range(8)]
    before = logits.clone()
    sample(logits, seqs)
    assert torch.equal(logits, before)
    assert apply_penalties(logits, [make_seq(tokenizer)] * 8) is logits  # nothing to apply: no copy


def test_the_c_argmax_gives_torchs_index_for_ties_nan_infinities_and_odd_widths():
    from longserve.server.engine.native.sampler import argmax

    torch.manual_seed(6)
    for cols in (1, 15, 16, 17, 49152 + 5):
        logits = torch.randn(9, cols)
        logits[1] = float("-inf")  # every token masked: index 0
        logits[2, cols // 2 :] = logits[2].max() + 1  # a tie: the first
        logits[3, cols - 1] = float("inf")
        logits[4, cols // 3] = float("nan")  # NaN counts as the largest
        logits[5, [0, cols - 1]] = float("nan")
        logits[6] = 0.0
        logits[7, -1] = float("-inf")
        assert torch.equal(argmax(logits), logits.argmax(dim=-1)), cols
        assert torch.equal(argmax(logits[::2]), logits[::2].argmax(dim=-1))  # rows apart
        assert torch.equal(argmax(logits[:, : max(cols - 3, 1)]), logits[:, : max(cols - 3, 1)].argmax(dim=-1))
