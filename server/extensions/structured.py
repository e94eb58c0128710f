"""Structured outputs: `structured_outputs` (vLLM's fields: json, regex, choice, grammar, structural_tag) and chat's
`response_format` in; the output is held to the grammar they name. No response fields.

Grammars compile with xgrammar, as vLLM does by default, in a worker thread:
other requests' streams go on meanwhile. xgrammar's compiler caches what it
compiled by the grammar's text, within --grammar-cache-bytes, so a schema sent
again costs nothing. A grammar xgrammar refuses is a 400 that names the field.
The native engine masks logits with the compiled grammar; the vLLM engine
hands the same spec to vLLM's own structured outputs.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

from server.engine.base import GrammarSpec
from server.errors import TOO_DEEP, APIError
from server.extensions import Extension
from server.extensions.schema_keywords import unenforced

# what xgrammar writes before its message: "[06:30:32] /project/cpp/x.cc:83: " and "Check failed: (...) is false: "
XGRAMMAR_PREAMBLE = re.compile(r"^\[[^\]]*\] \S+:\d+: (Check failed: .*? is false: )?")
_compilers: dict[int, object] = {}
_compilers_lock = threading.Lock()
# Grammar compiles have threads of their own: a costly one used to hold the event loop's default executor, which
# also serves trie builds and the --data-dir sync, and every thread of it once six costly grammars came together.
COMPILE_THREADS = 2
COMPILE_POOL = ThreadPoolExecutor(max_workers=COMPILE_THREADS, thread_name_prefix="grammar-compile")


def grammar_compiler(tokenizer, vocab_size: int, cache_bytes: int):
    """One xgrammar compiler per tokenizer (building its token table takes about 0.3 s)."""
    import xgrammar

    with _compilers_lock:
        if id(tokenizer) not in _compilers:
            info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
            _compilers[id(tokenizer)] = xgrammar.GrammarCompiler(info, cache_enabled=True, cache_limit_bytes=cache_bytes)
        return _compilers[id(tokenizer)]


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


def compile_checked(compiler, spec: GrammarSpec, vocab_size: int):
    if spec.kind == "json" and (found := unenforced(spec.value)):
        raise ValueError(found)
    grammar = compile_spec(compiler, spec)
    if not derives_text(grammar, vocab_size):
        raise ValueError("it accepts no text at all (no token can begin an answer): look for a character class that "
                         "matches nothing, or rules that only refer to each other")
    return grammar


async def compiled(spec: GrammarSpec, state, param: str) -> GrammarSpec:
    """`spec` with its compiled grammar, built off the event loop in the compile pool; a grammar xgrammar refuses, one
    that accepts no text, or one still compiling after --grammar-compile-timeout, is a 400 on `param`. A compile
    still queued then, or whose client left, is dropped; one already running cannot be stopped (xgrammar's C++),
    but it holds one of the pool's threads, never the threads that serve tries and files."""
    engine, timeout = state.engine, state.settings.grammar_compile_timeout
    compiler = await asyncio.to_thread(grammar_compiler, engine.tokenizer, engine.vocab_size, state.settings.grammar_cache_bytes)
    work = COMPILE_POOL.submit(compile_checked, compiler, spec, engine.vocab_size)
    try:
        grammar = await asyncio.wait_for(asyncio.wrap_future(work), timeout)  # a cancelled wait cancels queued work
    except asyncio.TimeoutError:
        if work.cancel():  # never started: the pool is busy with others' grammars
            raise APIError(503, f"{param}: the grammar compiler is busy with other requests' grammars "
                                f"({COMPILE_THREADS} at a time, --grammar-compile-timeout {timeout:g} s); retry later",
                           headers={"Retry-After": "1"}) from None
        raise APIError(400, f"{param}: it did not compile within {timeout:g} s (--grammar-compile-timeout); "
                            "simplify it (fewer alternatives, optional parts or repetitions)", param) from None
    except (RuntimeError, ValueError) as exc:
        reason = XGRAMMAR_PREAMBLE.sub("", str(exc).strip())
        raise APIError(400, f"{param}: {reason}", param) from None
    except RecursionError:
        raise APIError(400, f"{param}: {TOO_DEEP}", param) from None
    return GrammarSpec(spec.kind, spec.value, grammar)


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
