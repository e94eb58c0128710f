"""Tool calls: chat's `tools`, `tool_choice` and `parallel_tool_calls` in; `message.tool_calls` (or streamed
`delta.tool_calls`) and finish_reason "tool_calls" out.

The tools reach the model through its chat template (`tools=`). A template
that does not render tools (the bundled SmolLM2's) gets them the way
Hermes-style ChatML models (Qwen2.5, Hermes) are trained to read them: a
system message listing them inside <tools></tools>, calls written as
<tool_call>{"name": ..., "arguments": {...}}</tool_call>, results returned
inside <tool_response></tool_response>.

- "required": the output is held to a JSON array of calls, each one a tool's
  name with arguments valid under its schema, so it always parses.
- a named function: the output is held to that tool's argument schema.
- "auto": free text; the Hermes parser below takes the calls out of it.
- "none": the tools are left out of the prompt, as vLLM does by default.
"""

from __future__ import annotations

import json
import re
import uuid

from longserve.server.engine.base import GrammarSpec
from longserve.server.extensions import Extension
from longserve.server.extensions.structured import compiled

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
HERMES_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*(?:</tool_call>|$)", re.DOTALL)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tools_prompt(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return ("You can call functions to answer. The functions, one JSON signature per line:\n"
            f"<tools>\n{listing}\n</tools>\n"
            "To call one, write its name and JSON arguments between tool_call tags, like this:\n"
            f'{CALL_OPEN}\n{{"name": "function_name", "arguments": {{"argument": "value"}}}}\n{CALL_CLOSE}')


def hermes_conversation(conversation: list[dict], tools: list[dict] | None) -> list[dict]:
    """`conversation` for a template that knows no tools: the tools in the system message, calls and results as text."""
    rendered = []
    for message in conversation:
        message = dict(message)
        calls = message.pop("tool_calls", None)
        if calls:
            written = [f'{CALL_OPEN}\n{json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)}\n{CALL_CLOSE}'
                       for c in calls]
            message["content"] = "\n".join(filter(None, [message.get("content") or "", *written]))
        if message["role"] == "tool":
            message = {"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
        rendered.append(message)
    if tools:
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {**rendered[0], "content": rendered[0]["content"] + "\n\n" + tools_prompt(tools)}
        else:
            rendered.insert(0, {"role": "system", "content": tools_prompt(tools)})
    return rendered


def required_schema(tools: list[dict], parallel: bool) -> dict:
    """A JSON array of at least one call (at most one without parallel_tool_calls), each valid for its tool."""
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               "arguments": t["function"].get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def parse_hermes(text: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """(the content before the first call, or None; the calls of known tools, arguments as JSON text)."""
    calls = []
    for match in HERMES_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments", {}), dict):
            calls.append({"name": call["name"], "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)})
    if not calls:
        return text, []
    content = text[: text.find(CALL_OPEN)].strip()
    return content or None, calls


def whole_calls(text: str) -> list[dict]:
    """The calls that are whole in a required-mode array cut short: '[{call}, {call}, {"na' gives the first two."""
    decoder, calls, at = json.JSONDecoder(), [], text.find("[") + 1
    while 0 < at < len(text):
        while at < len(text) and text[at] in " ,\n":
            at += 1
        try:
            call, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:  # the cut one
            break
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            calls.append({"name": call["name"], "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)})
    return calls


class Tools(Extension):
    def __init__(self, body, state):
        self.tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
        self.names = {tool["function"]["name"] for tool in self.tools}
        choice = body.tool_choice or "auto"
        self.named = choice.function.name if not isinstance(choice, str) else None
        self.mode = "named" if self.named else choice
        self.parallel = body.parallel_tool_calls
        self.native_template = "tools" in (state.engine.tokenizer.chat_template or "")
        self.held: dict[int, str] = {}  # streams: text not yet sent, that may be a call
        self.calling: set[int] = set()  # streams: the choices whose text has reached a call

    def template_args(self) -> dict:
        return {"tools": self.tools} if self.native_template and self.mode != "none" else {}

    def template_conversation(self, conversation: list[dict]) -> list[dict]:
        if self.native_template:
            return conversation
        return hermes_conversation(conversation, self.tools if self.mode != "none" else None)

    async def prepare(self, request, state) -> None:
        if self.mode == "required":
            request.grammar = await compiled(GrammarSpec("json", required_schema(self.tools, self.parallel)), state, "tools")
        elif self.mode == "named":
            tool = next(t for t in self.tools if t["function"]["name"] == self.named)
            schema = tool["function"].get("parameters") or {"type": "object"}
            request.grammar = await compiled(GrammarSpec("json", schema), state, f"tools[{self.named}].parameters")

    def message(self, text: str, finish_reason: str | None) -> tuple[str | None, list[dict]]:
        """The content and the calls (name, arguments as JSON text) of a whole output. A forced call cut by max_tokens
        is never content: the calls that are whole (finish_reason stays "length"), else none."""
        if self.mode == "none":
            return text, []
        if finish_reason != "stop":
            if self.mode not in ("named", "required"):
                return text, []
            return None, whole_calls(text) if self.mode == "required" else []
        if self.mode == "named":
            return None, [{"name": self.named, "arguments": text}]
        if self.mode == "required":
            return None, [{"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}
                          for c in json.loads(text)]
        content, calls = parse_hermes(text, self.names)
        return content, calls if self.parallel else calls[:1]

    def stream_text(self, index: int, text: str) -> str:
        """What of a streamed piece to send as content now. Nothing once a call may have begun: in "auto", text
        that could open a call is held back until it cannot; calls go out when the choice ends (`flush`)."""
        if self.mode in ("named", "required"):
            return ""
        if self.mode == "none":
            return text
        pending = self.held.get(index, "") + text
        start = pending.find(CALL_OPEN)
        if index in self.calling or start >= 0:
            if index not in self.calling:
                self.calling.add(index)
                pending, sent = pending[start:], pending[:start]
            else:
                sent = ""
            self.held[index] = pending
            return sent
        keep = next((n for n in range(min(len(CALL_OPEN) - 1, len(pending)), 0, -1) if CALL_OPEN.startswith(pending[-n:])), 0)
        self.held[index] = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]

    def flush(self, index: int, text: str, finish_reason: str | None) -> tuple[str, list[dict]]:
        """A streamed choice's end: the content still held back (when no call parsed) and its calls."""
        held = self.held.pop(index, "")
        self.calling.discard(index)
        content, calls = self.message(text, finish_reason)
        if calls:
            return "", calls
        return ((content or "") if self.mode in ("named", "required") else held), []
