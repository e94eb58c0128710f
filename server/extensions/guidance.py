"""llguidance, the grammar engine for the JSON schemas xgrammar would not hold (schema_keywords.py says which).

vLLM ships both engines and its "auto" backend sends such schemas to
llguidance; we do the same on the native engine. The compiled form is
llguidance's grammar text with its token table; each sequence builds its own
matcher from it (constraint.GuidanceState), which takes well under a
millisecond. Answers are compact (no free whitespace), as with xgrammar, and
oneOf is read as anyOf, as xgrammar reads it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

@dataclass(frozen=True)
class GuidanceGrammar:
    tokenizer: Any  # llguidance.LLTokenizer, one per model tokenizer
    text: str  # llguidance's grammar (its JSON form), which each matcher compiles lazily

    def matcher(self):
        import llguidance

        return llguidance.LLMatcher(self.tokenizer, self.text, log_level=0)


@functools.cache
def guidance_tokenizer(tokenizer, vocab_size: int):
    """llguidance's token table for `tokenizer`, built once (about 0.3 s for a 49k vocabulary)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)


def compile_guidance(tokenizer, vocab_size: int, schema) -> GuidanceGrammar:
    """`schema` as a GuidanceGrammar; ValueError with llguidance's words when it refuses the schema, warns that it
    would drop a keyword, finds it unsatisfiable, or its first mask allows no token but the end."""
    import llguidance
    import llguidance.torch

    text = llguidance.LLMatcher.grammar_from_json_schema(  # RecursionError for JSON too deep: the caller says so
        json.dumps(schema), defaults={"whitespace_flexible": False, "coerce_one_of": True})
    grammar = GuidanceGrammar(guidance_tokenizer(tokenizer, vocab_size), text)
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, grammar.tokenizer)
    if failed or messages:
        raise ValueError("; ".join(messages) or "llguidance refused it")
    matcher = grammar.matcher()
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
    llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
    allowed = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab_size]
    allowed[grammar.tokenizer.eos_token] = 0  # an error state allows the end alone
    if matcher.is_error() or not allowed.any():
        raise ValueError("it accepts no text at all (no token can begin an answer): look for a $ref to itself, or "
                         "branches that cannot all hold")
    return grammar
