"""Grammar compiling, as a worker process runs it (compile_workers.py): xgrammar for most grammars, llguidance for
the JSON schemas xgrammar would not hold (schema_keywords.py), and a ValueError, in words, for what neither holds
or what accepts no text."""

from __future__ import annotations

import functools
import json
import re

from longserve.server.engine.base import GrammarSpec
from longserve.server.extensions.guidance import compile_guidance
from longserve.server.extensions.schema_keywords import needs_guidance, unenforced


@functools.cache
def tokenizer_info(tokenizer, vocab_size: int):
    """xgrammar's token table for `tokenizer`, built once (about 0.3 s)."""
    import xgrammar

    return xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)


def grammar_compiler(tokenizer, vocab_size: int, cache_bytes: int):
    """An xgrammar compiler for `tokenizer`; it keeps what it compiled within `cache_bytes` (0: nothing)."""
    import xgrammar

    return xgrammar.GrammarCompiler(tokenizer_info(tokenizer, vocab_size), cache_enabled=cache_bytes > 0,
                                    cache_limit_bytes=max(cache_bytes, 1))


def compile_spec(compiler, spec: GrammarSpec):
    """xgrammar's CompiledGrammar for `spec`; JSON is compact (no whitespace runs a sampler could loop in)."""
    if spec.kind == "json_object":  # any object, written compactly
        return compiler.compile_json_schema(json.dumps({"type": "object"}), any_whitespace=False)
    if spec.kind == "json":
        return compiler.compile_json_schema(json.dumps(spec.value), any_whitespace=False)
    if spec.kind == "regex":
        return compiler.compile_regex(spec.value)
    if spec.kind == "choice":
        return compiler.compile_regex("|".join(re.escape(choice) for choice in spec.value))
    if spec.kind == "structural_tag":
        return compile_structural_tag(compiler, spec.value)
    return compiler.compile_grammar(spec.value)


def compile_structural_tag(compiler, text: str):
    """The current format goes to xgrammar as it is; the older one (structures and triggers) is read as vLLM
    reads it."""
    import xgrammar

    tag = json.loads(text)
    if not (isinstance(tag, dict) and "structures" in tag):
        return compiler.compile_structural_tag(text)
    try:
        items = [xgrammar.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"]) for s in tag["structures"]]
        return compiler.compile_structural_tag(items, tag["triggers"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"each of structures needs begin, schema and end, and triggers is a list of strings ({exc!r})") from None


def derives_text(grammar, vocab_size: int) -> bool:
    """Whether any token may start an answer. xgrammar compiles grammars whose language is empty (a class that
    matches no character, rules that only refer to each other, a $ref to itself); their first mask allows nothing,
    which reached the sampler as a distribution of -inf (a 500) or as token 0 (a step the matcher refused)."""
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
    xgrammar.GrammarMatcher(grammar).fill_next_token_bitmask(bitmask)
    return bool(bitmask.any())


def compile_checked(compiler, spec: GrammarSpec, tokenizer, vocab_size: int):
    """`spec` compiled by the engine that holds an answer to it: xgrammar, or llguidance for the schemas
    schema_keywords.py sends there; ValueError when neither would."""
    if spec.kind == "json" and (found := unenforced(spec.value)):
        raise ValueError(found)
    if spec.kind == "json" and needs_guidance(spec.value):
        return compile_guidance(tokenizer, vocab_size, spec.value)
    grammar = compile_spec(compiler, spec)
    if not derives_text(grammar, vocab_size):
        raise ValueError("it accepts no text at all (no token can begin an answer): look for a character class that "
                         "matches nothing, or rules that only refer to each other")
    return grammar
