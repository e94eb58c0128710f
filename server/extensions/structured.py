"""Structured outputs: `structured_outputs` (vLLM's fields: json, regex, choice, grammar, structural_tag) and chat's
`response_format` in; the output is held to the grammar they name. No response fields.

Grammars compile with xgrammar, as vLLM does by default, or with llguidance for the JSON schemas xgrammar would
not hold (schema_keywords.py), as vLLM's "auto" backend does, in worker processes (compile_workers.py): other
requests' streams go on meanwhile, and a compile past its time is killed. The server keeps compiled grammars
by their text, within --grammar-cache-bytes, so a schema sent again costs nothing. A grammar the compilers
refuse is a 400 that names the field. The native engine masks logits with the compiled grammar; the vLLM
engine hands the same spec to vLLM's own structured outputs.
"""

from __future__ import annotations

import asyncio
import json
import re

from cachetools import LRUCache

from longserve.server.engine.base import GrammarSpec
from longserve.server.errors import TOO_DEEP, APIError
from longserve.server.extensions import Extension
from longserve.server.extensions.compile_workers import CompileTimeout, CompilerBusy, CompileWorkers
from longserve.server.extensions.grammar_compile import tokenizer_info
from longserve.server.extensions.guidance import GuidanceGrammar, guidance_tokenizer

# what xgrammar writes before its message: "[06:30:32] /project/cpp/x.cc:83: " and "Check failed: (...) is false: "
XGRAMMAR_PREAMBLE = re.compile(r"^\[[^\]]*\] \S+:\d+: (Check failed: .*? is false: )?")
COMPILE_WORKERS = 2  # grammars compiling at once, each in a process of its own


class Grammars:
    """The server's compiled grammars: a cache by their text, within --grammar-cache-bytes, and the worker
    processes that compile the rest (compile_workers.py)."""

    def __init__(self, engine, settings):
        self.engine, self.timeout = engine, settings.grammar_compile_timeout
        self.cache = LRUCache(maxsize=settings.grammar_cache_bytes, getsizeof=lambda item: item[1])
        self.workers = CompileWorkers(engine.tokenizer, engine.vocab_size, COMPILE_WORKERS, settings.grammar_compile_memory,
                                      name=f"grammar-compile:{settings.port}")

    async def compiled(self, spec: GrammarSpec, param: str) -> GrammarSpec:
        """`spec` with its compiled grammar. One this engine cannot hold, one xgrammar or llguidance refuses, one
        that accepts no text, or one still compiling after --grammar-compile-timeout (its worker is killed) is a
        400 on `param`; one that found every worker busy that long is a 503, to retry."""
        try:
            self.engine.check_grammar(spec)
            key = (spec.kind, json.dumps(spec.value, sort_keys=True))
        except ValueError as exc:
            raise APIError(400, f"{param}: {exc}", param) from None
        except RecursionError:
            raise APIError(400, f"{param}: {TOO_DEEP}", param) from None
        if key in self.cache:
            return GrammarSpec(spec.kind, spec.value, self.cache[key][0])
        try:
            answer, found = await self.workers.compile(spec, self.timeout)
        except CompilerBusy:
            raise APIError(503, f"{param}: the grammar compiler is busy with other requests' grammars ({COMPILE_WORKERS} "
                                f"at a time, --grammar-compile-timeout {self.timeout:g} s); retry later",
                           headers={"Retry-After": "1"}) from None
        except CompileTimeout:
            raise APIError(400, f"{param}: it did not compile within {self.timeout:g} s (--grammar-compile-timeout); "
                                "simplify it (fewer alternatives, optional parts or repetitions)", param) from None
        if answer == "error":
            raise APIError(400, f"{param}: {XGRAMMAR_PREAMBLE.sub('', found.strip())}", param)
        backend, text = found
        grammar = await asyncio.to_thread(load_grammar, backend, text, self.engine.tokenizer, self.engine.vocab_size)
        if len(text) <= self.cache.maxsize:
            self.cache[key] = (grammar, len(text))
        return GrammarSpec(spec.kind, spec.value, grammar)

    def shutdown(self) -> None:
        self.workers.shutdown()


def load_grammar(backend: str, text: str, tokenizer, vocab_size: int):
    """A worker's serialized grammar, ready for matchers in this process."""
    if backend == "llguidance":
        return GuidanceGrammar(guidance_tokenizer(tokenizer, vocab_size), text)
    import xgrammar

    return xgrammar.CompiledGrammar.deserialize_json(text, tokenizer_info(tokenizer, vocab_size))


async def compiled(spec: GrammarSpec, state, param: str) -> GrammarSpec:
    return await state.grammars.compiled(spec, param)


def spec_of(body) -> tuple[GrammarSpec, str] | None:
    """The grammar `body` asks for and the field that asked, or None."""
    given = body.structured_outputs
    if given is not None:
        kind = next(name for name in ("json", "regex", "choice", "grammar", "structural_tag") if getattr(given, name) is not None)
        value = getattr(given, kind)
        if kind == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise APIError(400, f"structured_outputs.json is a string but not JSON ({exc.msg})", "structured_outputs.json") from None
            except RecursionError:
                raise APIError(400, f"structured_outputs.json: {TOO_DEEP}", "structured_outputs.json") from None
        return GrammarSpec(kind, value), f"structured_outputs.{kind}"
    response_format = getattr(body, "response_format", None)
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return GrammarSpec("json_object", None), "response_format"
    return GrammarSpec("json", response_format.json_schema.schema_), "response_format.json_schema.schema"


class Structured(Extension):
    def __init__(self, body, state):
        self.spec, self.param = spec_of(body)

    async def prepare(self, request, state) -> None:
        request.grammar = await compiled(self.spec, state, self.param)
