"""From logits to tokens, one row per sequence, each with its own parameters.

Order, as in vLLM: logit bias and penalties on the raw logits, then greedy
rows take the argmax; sampled rows divide by temperature, keep top-k, top-p
and min-p, and draw with the sequence's own generator when it has a seed.
Log-probabilities reported to clients are those of the raw model
distribution, before any of these steps.
"""

from __future__ import annotations

import torch

from server.engine.base import TokenLogprob
from server.engine.native.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logit_bias, OpenAI's presence and frequency penalties and vLLM's repetition penalty, in place.

    The repetition penalty (as in vLLM and transformers) covers the prompt and
    the output: a seen token's logit is divided by it where positive and
    multiplied by it where negative."""
    for row, seq in enumerate(seqs):
        params = seq.params
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias.keys()), device=logits.device)
            bias = torch.tensor(list(params.logit_bias.values()), device=logits.device, dtype=logits.dtype)
            logits[row, ids] += bias
        if (params.presence_penalty or params.frequency_penalty) and seq.output_ids:
            counts = torch.bincount(torch.tensor(seq.output_ids, device=logits.device), minlength=logits.shape[1])
            counts = counts[: logits.shape[1]].to(logits.dtype)
            logits[row] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(seq.prompt_ids + seq.output_ids, device=logits.device).unique()
            seen = seen[seen < logits.shape[1]]
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    return logits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what top-k (0 = off), top-p and min-p exclude; one value per row."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    drop = ranks >= k
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each token
    drop |= before >= top_p.unsqueeze(1)
    drop |= probs < min_p.unsqueeze(1) * probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, seqs: list[Sequence], default_generator: torch.Generator | None = None):
    """Return (token ids, logprob records or None per row) for logits [rows, vocab]."""
    want_logprobs = any(seq.params.logprobs is not None for seq in seqs)
    raw_logprobs = logits.log_softmax(dim=-1) if want_logprobs else None
    logits = apply_penalties(logits.clone(), seqs)

    tokens = logits.argmax(dim=-1)
    sampled_rows = [row for row, seq in enumerate(seqs) if not seq.params.greedy]
    if sampled_rows:
        sub = logits[sampled_rows]
        params = [seqs[row].params for row in sampled_rows]
        temperature = torch.tensor([p.temperature for p in params], device=sub.device).unsqueeze(1)
        sub = filter_logits(
            sub / temperature,
            top_k=torch.tensor([p.top_k for p in params], device=sub.device),
            top_p=torch.tensor([p.top_p for p in params], device=sub.device),
            min_p=torch.tensor([p.min_p for p in params], device=sub.device),
        )
        probs = sub.softmax(dim=-1)
        for i, row in enumerate(sampled_rows):
            generator = seqs[row].generator or default_generator
            tokens[row] = torch.multinomial(probs[i], 1, generator=generator)[0]

    token_list = tokens.tolist()
    records = [
        None if seq.params.logprobs is None else logprob_record(raw_logprobs[row], token_list[row], seq.params.logprobs)
        for row, seq in enumerate(seqs)
    ]
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
