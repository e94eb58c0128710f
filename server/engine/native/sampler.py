"""From logits to tokens over the batch, one row per sequence, each with its own parameters.

Order, as in vLLM: logit bias and penalties on the raw logits, then greedy
rows take the argmax; sampled rows divide by temperature, keep top-k, top-p
and min-p, and draw by inverting each row's cumulative distribution at one
uniform number: the engine's generator gives it to rows without a seed, and
a row with a seed gets a number that depends only on its seed and how many
tokens it has drawn (seeded_uniform), so the whole batch draws in one pass.
Log-probabilities reported to clients are those of the raw model
distribution, before any of these steps.
"""

from __future__ import annotations

import hashlib

import torch

from longserve.server.engine.base import TokenLogprob
from longserve.server.engine.native import c_kernels
from longserve.server.engine.native.sequence import Sequence


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's largest logit's index, as torch's argmax gives it: argmax.c for float32 rows on the CPU where the
    kernels built (torch's took 0.7-1.3 ms for 32 rows of 49k logits here, one element at a time)."""
    kernels = c_kernels.library() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    if kernels is None or logits.dim() != 2 or logits.stride(-1) != 1:
        return logits.argmax(dim=-1)
    tokens = torch.empty(logits.shape[0], dtype=torch.long)
    kernels.argmax_rows(logits.data_ptr(), logits.stride(0), logits.shape[0], logits.shape[1], tokens.data_ptr(),
                        torch.get_num_threads())
    return tokens


def seen_tokens(lists: list[list[int]], vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's token ids inside the vocabulary as one int64 tensor [rows, longest], padded with a repeat of the
    row's own first id (so a write at the padding writes what the real entry writes), and how often each entry's
    token occurs in its row (0 only for the stand-in of a row with no id at all)."""
    lists = [[token for token in ids if token < vocab] for ids in lists]
    rows = [ids or [0] for ids in lists]  # a row with no id gets a stand-in, counted 0
    longest = max(len(ids) for ids in rows)
    ids = torch.tensor([ids + [ids[0]] * (longest - len(ids)) for ids in rows], dtype=torch.long)  # one host buffer
    real = torch.tensor([[1.0] * len(ids) + [0.0] * (longest - len(ids)) for ids in lists])
    ids, real = ids.to(device), real.to(device)
    counts = torch.zeros(len(lists), vocab, device=device).scatter_add_(1, ids, real)
    return ids, counts.gather(1, ids)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logit_bias, OpenAI's presence and frequency penalties and vLLM's repetition penalty over the batch: on a copy
    where any row asks for one, else `logits` itself (never written: a copy of 32 rows cost 2 ms a step here).

    The repetition penalty (as in vLLM and transformers) covers the prompt and
    the output: a seen token's logit is divided by it where positive and
    multiplied by it where negative. Each is a gather and a scatter over the rows that ask for it, touching only
    the tokens they have seen."""
    vocab, device, params = logits.shape[1], logits.device, [seq.params for seq in seqs]
    biased = [(row, token, bias) for row, p in enumerate(params) if p.logit_bias for token, bias in p.logit_bias.items()]
    penalized = [row for row, p in enumerate(params) if (p.presence_penalty or p.frequency_penalty) and seqs[row].output_ids]
    repeated = [row for row, p in enumerate(params) if p.repetition_penalty != 1.0]
    if not (biased or penalized or repeated):
        return logits
    logits = logits.clone()
    if biased:
        index = torch.tensor([(row, token) for row, token, _ in biased], device=device).T
        logits.index_put_((index[0], index[1]), torch.tensor([b for *_, b in biased], dtype=logits.dtype, device=device),
                          accumulate=True)
    if penalized:
        ids, counts = seen_tokens([seqs[row].output_ids for row in penalized], vocab, device)
        rows = torch.tensor(penalized, device=device)[:, None].expand_as(ids)
        frequency = torch.tensor([params[row].frequency_penalty for row in penalized], device=device)[:, None]
        presence = torch.tensor([params[row].presence_penalty for row in penalized], device=device)[:, None]
        # a repeated id writes the same value; a row's stand-in id (count 0) is left as it is
        logits[rows, ids] -= (frequency * counts + presence * (counts > 0)).to(logits.dtype)
    if repeated:
        ids, counts = seen_tokens([seqs[row].prompt_ids + seqs[row].output_ids for row in repeated], vocab, device)
        rows = torch.tensor(repeated, device=device)[:, None].expand_as(ids)
        penalty = torch.tensor([params[row].repetition_penalty for row in repeated], dtype=logits.dtype, device=device)[:, None]
        values = logits[rows, ids]
        logits[rows, ids] = torch.where(counts > 0, torch.where(values > 0, values / penalty, values * penalty), values)
    return logits


CANDIDATES = 128  # the most likely tokens looked at first; a real model's top-p set is almost always among them


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what top-k (0 = off), top-p and min-p exclude; one value per row. Sorting the vocabulary took
    3 ms a row here, most of a sampled step's sampling, so rows that keep every token (top_p 1, no top_k, no
    min_p: what most requests send) are left as they are, and the others look at their CANDIDATES most likely
    tokens first; only a row whose kept set reaches past those is sorted whole."""
    filtering = ((top_k > 0) | (top_p < 1.0) | (min_p > 0.0)).nonzero()[:, 0]
    if len(filtering) == 0:
        return logits
    logits = logits.clone()
    if logits.shape[-1] <= CANDIDATES:
        logits[filtering] = filter_ranked(logits[filtering], top_k[filtering], top_p[filtering], min_p[filtering],
                                          logits.shape[-1])[0]
        return logits
    rows = logits[filtering]
    filtered, decided = filter_ranked(rows, top_k[filtering], top_p[filtering], min_p[filtering], CANDIDATES)
    undecided = (~decided).nonzero()[:, 0]
    if len(undecided):
        filtered[undecided] = filter_ranked(rows[undecided], top_k[filtering][undecided], top_p[filtering][undecided],
                                            min_p[filtering][undecided], logits.shape[-1])[0]
    logits[filtering] = filtered
    return logits


def filter_ranked(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, ranked: int):
    """(logits filtered, whether each row's kept set lies within its `ranked` most likely tokens); a row where it
    does not is left for a wider call. The kept set ends inside the ranked tokens when the last of them is dropped:
    rank, the mass before a token and a token's probability only grow or shrink further down the order."""
    values, order = logits.topk(ranked, dim=-1) if ranked < logits.shape[-1] else logits.sort(dim=-1, descending=True)
    probs = (values - logits.logsumexp(dim=-1, keepdim=True)).exp()  # over the whole vocabulary
    ranks = torch.arange(ranked, device=logits.device).expand_as(values)
    drop = ranks >= torch.where(top_k > 0, top_k, logits.shape[-1]).unsqueeze(1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each token
    drop |= before >= top_p.unsqueeze(1)
    drop |= probs < min_p.unsqueeze(1) * probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    decided = drop[:, -1] | (ranked == logits.shape[-1])
    kept = torch.full_like(logits, float("-inf")).scatter_(-1, order, values.masked_fill(drop, float("-inf")))
    return kept, decided


def seeded_uniform(seed: int, draw: int) -> float:
    """A uniform number in [0, 1) that depends only on a row's seed and the index of its draw: counter-based, as
    Philox is, so a seeded row draws the same tokens alone, in any batch, and after a preemption. torch has no
    batched call over per-row generators (vLLM loops over them); a hash of (seed, draw) needs no state at all."""
    digest = hashlib.blake2b(f"{seed}:{draw}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / 2**53  # 53 bits: exact in a float64, never 1.0


DRAW_BLOCK = 1024  # tokens per block of the two-level cumulative sum


def draw_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` [rows, vocab] at the inverse of its cumulative distribution: the first token
    whose cumulative mass passes uniform x total. In two levels, because a cumulative sum over the whole
    vocabulary runs one element at a time (2.9 ms of a 9 ms 32-row draw here, 49k tokens): the mass of each block of
    DRAW_BLOCK tokens (a vectorized sum), the block where the target falls, then the cumulative sum inside that
    block alone. Sums are float64. A token of probability zero adds nothing to a running sum, so it is never the
    first to pass; where rounding would pass the last token (or block) with mass, the draw stays on it."""
    rows, vocab = probs.shape
    blocks = -(-vocab // DRAW_BLOCK)
    if blocks * DRAW_BLOCK != vocab:
        probs = torch.nn.functional.pad(probs, (0, blocks * DRAW_BLOCK - vocab))
    padded = probs.view(rows, blocks, DRAW_BLOCK)
    block_mass = padded.sum(dim=-1).double()  # a block's float32 sum is exact enough; float64 from here
    cumulative = block_mass.cumsum(dim=-1)
    targets = uniforms.to(cumulative) * cumulative[:, -1]
    last_block = (cumulative < cumulative[:, -1:]).sum(dim=-1, keepdim=True)  # the last block with mass
    block = torch.searchsorted(cumulative, targets[:, None], right=True).minimum(last_block)
    inside = targets[:, None] - (cumulative.gather(1, block) - block_mass.gather(1, block))
    running = padded[torch.arange(rows, device=probs.device), block[:, 0]].double().cumsum(dim=-1)
    last_token = (running < running[:, -1:]).sum(dim=-1, keepdim=True)
    token = torch.searchsorted(running, inside.clamp(min=0.0), right=True).minimum(last_token)
    return (block * DRAW_BLOCK + token)[:, 0]


def sample(logits: torch.Tensor, seqs: list[Sequence], default_generator: torch.Generator | None = None):
    """Return (token ids, logprob records or None per row) for logits [rows, vocab].

    Every sampled row draws in one pass (draw_tokens); a row with a seed takes its uniform number from
    seeded_uniform, the others from `default_generator`. Tokens, their log-probabilities and the top
    alternatives reach the host in one copy."""
    want_logprobs = any(seq.params.logprobs is not None for seq in seqs)
    raw_logprobs = logits.log_softmax(dim=-1) if want_logprobs else None
    logits = apply_penalties(logits, seqs)  # from here on, `logits` may be the caller's: no step writes it

    sampled_rows = [row for row, seq in enumerate(seqs) if not seq.params.greedy]
    if len(sampled_rows) < len(seqs):
        tokens = argmax(logits)
    else:  # every row draws: no argmax over the vocabulary (1.5 ms for 32 rows here)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
    if sampled_rows:
        params = [seqs[row].params for row in sampled_rows]
        temperature = torch.tensor([p.temperature for p in params], device=logits.device).unsqueeze(1)
        sub = logits[sampled_rows].div_(temperature) if len(sampled_rows) < len(seqs) else logits / temperature
        sub = filter_logits(
            sub,
            top_k=torch.tensor([p.top_k for p in params], device=sub.device),
            top_p=torch.tensor([p.top_p for p in params], device=sub.device),
            min_p=torch.tensor([p.min_p for p in params], device=sub.device),
        )
        uniforms = torch.rand(len(sampled_rows), dtype=torch.float64, generator=default_generator)
        seeded = [(i, seqs[row]) for i, row in enumerate(sampled_rows) if seqs[row].seed is not None]
        if seeded:
            uniforms[[i for i, _ in seeded]] = torch.tensor([seeded_uniform(seq.seed, len(seq.output_ids))
                                                             for _, seq in seeded], dtype=torch.float64)
        tokens[sampled_rows] = draw_tokens(sub.softmax(dim=-1), uniforms.to(sub.device))

    if raw_logprobs is None:
        return tokens.tolist(), [None] * len(seqs)
    return logprob_records(raw_logprobs, tokens, [seq.params.logprobs for seq in seqs])


def logprob_records(logprobs: torch.Tensor, tokens: torch.Tensor, top_counts: list[int | None]):
    """(token ids, a TokenLogprob per row that asked, else None) from log-probs [rows, vocab], in one host copy:
    tokens, their log-probabilities and the widest top-k the batch asked for travel as one float64 tensor (ids
    are exact in it up to 2^53)."""
    widest = max((count or 0 for count in top_counts), default=0)
    chosen = logprobs.gather(1, tokens[:, None])
    parts = [tokens[:, None].double(), chosen.double()]
    if widest:
        values, ids = logprobs.topk(widest, dim=-1)
        parts += [ids.double(), values.double()]
    host = torch.cat(parts, dim=1).tolist()
    token_list, records = [], []
    for row, count in enumerate(top_counts):
        token, logprob, rest = int(host[row][0]), host[row][1], host[row][2:]
        token_list.append(token)
        if count is None:
            records.append(None)
            continue
        top = [(int(rest[k]), rest[widest + k]) for k in range(count)]
        records.append(TokenLogprob(token, logprob, top))
    return token_list, records


def logprob_record(logprobs: torch.Tensor, chosen: int, top_k: int) -> TokenLogprob:
    """The log-probability of `chosen` in one row of log-probs, with the top_k alternatives."""
    top = []
    if top_k > 0:
        values, ids = logprobs.topk(top_k)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(chosen, float(logprobs[chosen]), top)


def prompt_logprobs(logits: torch.Tensor, next_tokens: list[int], top_k: int) -> list[TokenLogprob]:
    """Log-probabilities of the prompt's own next tokens; logits [len(next_tokens) or more, vocab]."""
    logprobs = logits[: len(next_tokens)].log_softmax(dim=-1)
    return [logprob_record(logprobs[i], token, top_k) for i, token in enumerate(next_tokens)]
