"""OpenAI tool calling on any chat model: the prompt and grammar of a request, and the parser
that splits its answer into content and tool calls.

Two syntaxes, as llama.cpp's ``common/chat.cpp`` has them:

- ``hermes``: the chat template describes the tools itself (its source has ``<tool_call>``,
  as Hermes 2 Pro's and Qwen2.5's) and the model answers with
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks, free text around
  them. tool_choice "auto" leaves the answer free; "required" and a named tool constrain it to
  blocks only.
- ``generic``: every other template (``common_chat_params_init_generic``). A system message
  describes the tools, and a grammar holds the whole answer to JSON: ``{"tool_calls": [...]}``
  or, with tool_choice "auto", ``{"response": "..."}``. Unlike llama.cpp, the calls are always
  an array (at most one item without parallel calls, where llama.cpp has ``{"tool_call": {}}``),
  the model writes no call ids (the parser makes them), and the tools are described by our own
  system text rather than by the template's tool polyfill.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from llm_service.engine.text import partial_marker
from llm_service.errors import InvalidRequestError
from llm_service.types import ChatMessage, GenerationRequest, Tool, ToolCall, ToolCallDelta

__all__ = ["Syntax", "ToolCallParser", "ToolPlan", "plan", "syntax_of", "system_as_user"]

Syntax = Literal["generic", "hermes"]

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


def syntax_of(template: str | None) -> Syntax:
    """``hermes`` when the chat template's source writes ``<tool_call>`` blocks, else
    ``generic`` (also for a model without a template)."""
    return "hermes" if template is not None and OPEN in template else "generic"


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one chat request with tools is rendered, constrained and parsed.

    Attributes:
        messages: what the chat template renders (``role``, ``content`` and, for hermes,
            ``tool_calls`` and ``tool_call_id``).
        template_tools: the template's ``tools`` variable, in OpenAI's shape (hermes, with
            tool_choice other than "none"); None otherwise.
        grammar: GBNF (start rule ``root``) the whole answer must follow; None leaves it free.
        parser: splits the answer into content and calls; None when no call can come (no
            tools, or tool_choice "none").
    """

    messages: list[dict[str, Any]]
    template_tools: list[dict[str, Any]] | None
    grammar: str | None
    parser: ToolCallParser | None


def plan(
    request: GenerationRequest, syntax: Syntax, schema_to_gbnf: Callable[[str], str]
) -> ToolPlan:
    """The plan for a chat request (``request.messages`` is set).

    Args:
        syntax: the model's (``syntax_of`` its template).
        schema_to_gbnf: JSON schema text -> GBNF whose start rule is ``root`` (llama.cpp's
            converter).

    Raises:
        InvalidRequestError: ``messages[i].tool_calls`` when a call's arguments in the history
            are not a JSON object; ``tools`` when a tool's parameters cannot be turned into a
            grammar (the message names the tool).
    """
    if request.messages is None:
        raise ValueError("plan() needs a chat request")
    active = bool(request.tools) and request.tool_choice != "none"
    if syntax == "hermes":
        messages = _hermes_messages(request.messages)
        template_tools = [_openai_tool(t) for t in request.tools] if active else None
    else:
        messages = _generic_messages(request.messages)
        template_tools = None
        if active:
            _add_system(messages, _system_text(request))
    if not active:
        return ToolPlan(messages, template_tools, None, None)
    grammar: str | None
    try:
        if syntax == "generic":
            grammar = _to_gbnf(_generic_schema(request), request.tools, schema_to_gbnf)
        elif request.tool_choice == "auto":
            grammar = None  # free text: the parser finds the blocks
        else:
            calls = _to_gbnf(_calls_schema(request), request.tools, schema_to_gbnf)
            grammar = _hermes_grammar(calls, request.parallel_tool_calls)
    except RecursionError:  # each tool's schema was checked: this is all of them together
        raise InvalidRequestError("tools", "their parameters are nested too deeply") from None
    names = frozenset(t.name for t in request.tools)
    parser = ToolCallParser(syntax, names=names, parallel=request.parallel_tool_calls)
    return ToolPlan(messages, template_tools, grammar, parser)


# -- messages -------------------------------------------------------------------------------


def _arguments(call: ToolCall, index: int) -> dict[str, Any]:
    why = "are not a JSON object"
    try:
        value = json.loads(call.arguments)
    except ValueError:
        value = None
    except RecursionError:
        value, why = None, "are nested too deeply"
    if not isinstance(value, dict):
        raise InvalidRequestError(
            f"messages[{index}].tool_calls",
            f"the arguments of call {call.id!r} ({call.name}) {why}",
        )
    return value


def _parameters(tool: Tool) -> dict[str, Any]:
    """The tool's parameters schema (``Tool`` checked that it is a JSON object)."""
    try:
        value: dict[str, Any] = json.loads(tool.parameters)
        json.dumps(value)  # what the grammar and the system text will do with it
    except RecursionError:
        raise InvalidRequestError(
            "tools", f"tool {tool.name!r}: {_why(RecursionError())}"
        ) from None
    return value


def _hermes_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Tool turns as HF templates take them: arguments as objects (they apply ``tojson``)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": _arguments(c, i)},
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def _generic_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Tool turns as plain text, in the JSON the model answers with. A tool's answer becomes a
    user message (many templates refuse a "tool" role); consecutive ones are merged into one,
    a line each, since many templates also refuse two user turns in a row."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id -> tool name, from the calls so far
    for i, m in enumerate(messages):
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                names[c.id] = c.name
                calls.append({"name": c.name, "arguments": _arguments(c, i), "id": c.id})
            text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
            out.append(
                {"role": "assistant", "content": f"{m.content}\n{text}" if m.content else text}
            )
        elif m.role == "tool":
            response: dict[str, Any] = {}
            if m.tool_call_id is not None:
                response["tool_call_id"] = m.tool_call_id
                if m.tool_call_id in names:
                    response["name"] = names[m.tool_call_id]
            response["content"] = m.content
            text = json.dumps({"tool_response": response}, ensure_ascii=False)
            if i > 0 and messages[i - 1].role == "tool":
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text})
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def system_as_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with the first (system) message's text put at the start of the first user
    turn instead: for a template that refuses a system role (Gemma 2's), the tools' system
    text still reaches the model."""
    system, rest = messages[0], messages[1:]
    if rest and rest[0]["role"] == "user":
        first = rest[0] | {"content": f"{system['content']}\n\n{rest[0]['content']}"}
        return [first, *rest[1:]]
    return [{"role": "user", "content": system["content"]}, *rest]


def _add_system(messages: list[dict[str, Any]], text: str) -> None:
    if messages and messages[0]["role"] == "system":
        first = messages[0]["content"]
        messages[0] = {"role": "system", "content": f"{first}\n\n{text}" if first else text}
    else:
        messages.insert(0, {"role": "system", "content": text})


def _system_text(request: GenerationRequest) -> str:
    calls = "one or more calls" if request.parallel_tool_calls else "exactly one call"
    name = request.tool_name or "<tool name>"
    call_form = f'{{"tool_calls": [{{"name": "{name}", "arguments": {{<its parameters>}}}}]}}'
    if request.tool_choice == "auto":
        lines = [
            "You can call tools. Answer with one JSON object, in one of two forms:",
            f"- to call tools ({calls}): {call_form}",
            '- to answer the user directly: {"response": "<your answer>"}',
        ]
    elif request.tool_name is not None:
        lines = [f"Call the tool {name}. Answer with one JSON object: {call_form}"]
    else:
        lines = [f"Call tools ({calls}). Answer with one JSON object: {call_form}"]
    lines.append(
        'A tool\'s result comes back as {"tool_response": {"tool_call_id": ..., "name": ...,'
        ' "content": ...}}.'
    )
    lines.append("Tools:")
    for tool in request.tools:
        lines.append(f"- {tool.name}: {tool.description}" if tool.description else f"- {tool.name}")
        schema = json.dumps(_parameters(tool), ensure_ascii=False)
        lines.append(f"  parameters: {schema}")
    return "\n".join(lines)


def _openai_tool(tool: Tool) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": _parameters(tool),
        },
    }


# -- grammars -------------------------------------------------------------------------------


def _calls_schema(request: GenerationRequest) -> dict[str, Any]:
    """One call of any tool the request allows (only the named one, if it names one)."""
    tools = [t for t in request.tools if request.tool_name in (None, t.name)]
    defs: dict[str, Any] = {}
    schemas = [_call_schema(tool, i, defs) for i, tool in enumerate(tools)]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return {**schema, "$defs": defs} if defs else schema


def _call_schema(tool: Tool, number: int, defs: dict[str, Any]) -> dict[str, Any]:
    try:
        arguments = _rooted(_parameters(tool), tool.name, number, defs)
    except RecursionError:
        raise InvalidRequestError(
            "tools", f"tool {tool.name!r}: {_why(RecursionError())}"
        ) from None
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": arguments},
        "required": ["name", "arguments"],
    }


def _generic_schema(request: GenerationRequest) -> dict[str, Any]:
    calls = _calls_schema(request)
    defs = calls.pop("$defs", None)
    array: dict[str, Any] = {"type": "array", "items": calls, "minItems": 1}
    if not request.parallel_tool_calls:
        array["maxItems"] = 1
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"tool_calls": array},
        "required": ["tool_calls"],
    }
    if request.tool_choice == "auto":
        response = {
            "type": "object",
            "properties": {"response": {"type": "string"}},
            "required": ["response"],
        }
        schema = {"anyOf": [schema, response]}
    return {**schema, "$defs": defs} if defs else schema


def _rooted(schema: Any, tool: str, number: int, defs: dict[str, Any]) -> Any:
    """A tool's parameters with their local ``$ref``s pointing into ``defs``.

    A ``#/...`` reference is relative to the tool's own schema, but the converter resolves it
    against the whole request's; each target is copied into the root ``$defs`` under a name of
    its own (the converter names a reference's rule by the last segment of its path, so two
    tools' ``#/$defs/Item`` would otherwise share one rule).
    """
    keys: dict[str, str] = {}

    def key_of(ref: str) -> str:
        if ref not in keys:
            keys[ref] = f"tool{number}-ref{len(keys)}"
            defs[keys[ref]] = rewrite(_pointer(schema, ref, tool))
        return keys[ref]

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                node = {**node, "$ref": f"#/$defs/{key_of(ref)}"}
            return {k: rewrite(v) if k != "$ref" else v for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    return rewrite(schema)


def _pointer(schema: Any, ref: str, tool: str) -> Any:
    if ref != "#" and not ref.startswith("#/"):
        raise InvalidRequestError("tools", f"tool {tool!r}: $ref {ref[:100]!r} is not '#/...'")
    node = schema
    for part in ref[2:].split("/") if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise InvalidRequestError("tools", f"tool {tool!r}: $ref {ref[:100]!r} leads nowhere")
    return node


def _to_gbnf(schema: dict[str, Any], tools: Sequence[Tool], convert: Callable[[str], str]) -> str:
    # The converter is another library's code fed the client's schema: whatever it raises
    # (ValueError, RecursionError, an assertion on a schema it does not follow) is the request's
    # fault. The tool at fault is found by converting its calls alone.
    try:
        return convert(json.dumps(schema))
    except Exception as exc:
        error = exc
    for number, tool in enumerate(tools):
        defs: dict[str, Any] = {}
        try:
            alone = _call_schema(tool, number, defs)
            convert(json.dumps({**alone, "$defs": defs} if defs else alone))
        except InvalidRequestError:
            raise
        except Exception as exc:
            raise InvalidRequestError("tools", f"tool {tool.name!r}: {_why(exc)}") from None
    raise InvalidRequestError("tools", _why(error))


def _why(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "its parameters are nested too deeply or refer to themselves"
    return f"its parameters cannot be turned into a grammar: {exc}"[:500]


# A GBNF token: a string literal, a character class, a comment, or a rule name.
_GBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*|[A-Za-z0-9-]+')


def _rename_rule(grammar: str, old: str, new: str) -> str:
    """``grammar`` with rule ``old`` (its definition and every reference) named ``new``; never
    inside a literal, a character class or a comment, never part of a longer name."""
    return _GBNF_TOKEN.sub(lambda m: new if m.group() == old else m.group(), grammar)


def _rule_names(grammar: str) -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9-]+)\s*::=", grammar, re.MULTILINE))


def _hermes_grammar(calls: str, parallel: bool) -> str:
    """``<tool_call>`` blocks only, each holding one call of ``calls`` (GBNF, start ``root``)."""
    names = _rule_names(calls)
    if "tool-call" in names:  # a tool's own rule of that name: move it out of the way
        free = next(
            f"tool-call-{n}" for n in range(len(names) + 1) if f"tool-call-{n}" not in names
        )
        calls = _rename_rule(calls, "tool-call", free)
    calls = _rename_rule(calls, "root", "tool-call")
    block = r'"<tool_call>\n" tool-call "\n</tool_call>"'
    more = r' ( "\n<tool_call>\n" tool-call "\n</tool_call>" )*' if parallel else ""
    return f"root ::= {block}{more}\n{calls}"


# -- the parser -----------------------------------------------------------------------------


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallParser:
    """Splits a chat answer's text into content and tool calls, as it streams.

    Text comes in arbitrary fragments (a token's text each: empty, or splitting a marker or a
    JSON escape); what ``feed`` and ``finish`` return is final. The deltas of call ``index``
    (0, 1, ...) start with one carrying its ``id`` and ``name``; their ``arguments`` joined
    are the call's ``arguments``.

    hermes: content outside ``<tool_call>`` blocks streams as it comes; a possible partial
    marker at the end is held until decided. Whitespace-only text just before a block, or
    after a call at the end, is dropped. At ``</tool_call>`` (or at ``finish`` if the block is
    unclosed) a block's JSON must be ``{"name": str, "arguments": object}``: the call's one
    delta then has compact ``arguments`` JSON. A block that is not is given back as content,
    markup included, as llama.cpp does.

    generic: the answer is JSON (``plan``'s grammar), perhaps cut short. A
    ``{"response": ...}`` string streams decoded as content (never half an escape). In
    ``{"tool_calls": [...]}`` each call's delta with id and name comes as soon as its name is
    complete, then the raw text of its arguments as it streams, formatting kept. An answer
    cut short ends without error: a named call whose arguments did not complete is a call with
    the text it got, a response cut short is the content so far. Text that is not of either
    shape is content, all of it; once the shape was recognised, text that breaks it (a
    grammar-held answer has none) is content from where it breaks.

    A hermes block is a call only if it names one of ``names`` and, without ``parallel``, is
    the answer's first call (``auto`` answers are not held by a grammar); its arguments may
    also be a JSON string holding the object. An answer cut short (``finish(complete=False)``:
    max tokens, a stop string, a cancel) drops what it held of an unfinished call or block,
    rather than showing its markup as content.

    Args:
        new_id: makes each call's id (default: ``call_`` and 24 hex digits); a repeated id is
            made unique with a suffix.
        names: the tools offered (None: any name).
        parallel: an answer may hold more than one call.
    """

    def __init__(
        self,
        syntax: Syntax,
        new_id: Callable[[], str] = _new_call_id,
        *,
        names: frozenset[str] | None = None,
        parallel: bool = True,
    ) -> None:
        self.names = names
        self.parallel = parallel
        self._new_id = new_id
        self._ids: set[str] = set()
        self._calls: list[ToolCall] = []
        self._split: _HermesSplitter | _GenericSplitter = (
            _HermesSplitter(self) if syntax == "hermes" else _GenericSplitter(self)
        )

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Add the next fragment; return the content safe to show now, and call pieces."""
        return self._split.feed(text)

    def finish(self, *, complete: bool = True) -> tuple[str, list[ToolCallDelta]]:
        """End of the answer: flush what was held (``complete`` False: the answer was cut
        short; an unfinished call or block is dropped)."""
        return self._split.finish(complete)

    @property
    def calls(self) -> list[ToolCall]:
        """The complete calls so far, in order (all of them after ``finish``)."""
        return list(self._calls)

    def _call_id(self) -> str:
        base = call_id = self._new_id()
        n = 1
        while call_id in self._ids:
            n += 1
            call_id = f"{base}_{n}"
        self._ids.add(call_id)
        return call_id


class _HermesSplitter:
    def __init__(self, parser: ToolCallParser) -> None:
        self._parser = parser
        self._pending = ""  # text not yet decided: a partial marker, or a block's so far
        self._inside = False
        self._run_blank = True  # the text since the start or the last call is all whitespace
        self._blank = ""  # that whitespace, held

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._pending += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while True:
            if not self._inside:
                at = self._pending.find(OPEN)
                if at < 0:
                    keep = len(self._pending) - partial_marker(self._pending, OPEN)
                    content.append(self._release(self._pending[:keep]))
                    self._pending = self._pending[keep:]
                    break
                content.append(self._release(self._pending[:at]))
                self._pending = self._pending[at + len(OPEN) :]
                self._inside = True
            at = self._pending.find(CLOSE)
            if at < 0:
                break
            block, self._pending = self._pending[:at], self._pending[at + len(CLOSE) :]
            self._inside = False
            content.append(self._end_block(block, CLOSE, deltas))
        return "".join(content), deltas

    def finish(self, complete: bool) -> tuple[str, list[ToolCallDelta]]:
        deltas: list[ToolCallDelta] = []
        if self._inside:
            self._inside = False
            # An unclosed block: a whole call or text; cut short, neither is shown.
            content = self._end_block(self._pending, "", deltas) if complete else ""
        else:
            content = self._release(self._pending)
            if self._run_blank and self._parser._calls:
                self._blank = ""  # whitespace after the last call
            content += self._blank
        self._pending = self._blank = ""
        return content, deltas

    def _release(self, text: str) -> str:
        """Outside text, as content; whitespace that may yet precede a block is held."""
        if not self._run_blank:
            return text
        if not text.strip():
            self._blank += text
            return ""
        text, self._blank, self._run_blank = self._blank + text, "", False
        return text

    def _end_block(self, block: str, close: str, deltas: list[ToolCallDelta]) -> str:
        try:
            value = json.loads(block)
        except (ValueError, RecursionError):
            value = None
        parser = self._parser
        name = value.get("name") if isinstance(value, dict) else None
        given = value.get("arguments") if isinstance(value, dict) else None
        if isinstance(given, str):  # some models write the arguments as a JSON string
            try:
                given = json.loads(given)
            except (ValueError, RecursionError):
                given = None
        if (
            not isinstance(name, str)
            or not isinstance(given, dict)
            or (parser.names is not None and name not in parser.names)  # not a tool offered
            or (not parser.parallel and parser._calls)  # a second call, when one is allowed
        ):
            text, self._blank, self._run_blank = f"{self._blank}{OPEN}{block}{close}", "", False
            return text
        arguments = json.dumps(given, ensure_ascii=False, separators=(",", ":"))
        call = ToolCall(parser._call_id(), name, arguments)
        deltas.append(ToolCallDelta(len(parser._calls), call.id, call.name, arguments))
        parser._calls.append(call)
        self._blank, self._run_blank = "", True
        return ""


_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = frozenset("0123456789abcdefABCDEF")
_WS = frozenset(" \t\n\r")


class _ShapeError(Exception):
    """The text is not (or no longer) of the generic answer's shape."""


@dataclass(slots=True)
class _OpenCall:
    id: str = ""
    name: str | None = None
    index: int = -1
    arguments: str = ""
    sent: int = 0  # characters of ``arguments`` given out in deltas


class _GenericSplitter:
    """A resumable scanner of ``{"response": "..."}`` / ``{"tool_calls": [...]}``, a
    character at a time (answers are short; fragments can end anywhere)."""

    def __init__(self, parser: ToolCallParser) -> None:
        self._parser = parser
        self._text = ""  # the whole answer so far
        self._pos = 0  # where the scan is
        self._state = "start"
        self._committed = False  # the shape is recognised: text before _pos is not content
        self._failed_at: int | None = None  # content from here on
        self._sent = 0  # content given out, once failed
        self._key = ""  # the raw text of a key or name being read; then the key
        self._after_key = ""  # the state after a key
        self._tail = 0  # where the text after the object starts
        self._escape = ""  # an escape being read in the response string
        self._high: int | None = None  # a high surrogate waiting for its low half
        self._value = _ValueScan()
        self._call: _OpenCall | None = None
        self._named = 0
        self._content: list[str] = []
        self._deltas: list[ToolCallDelta] = []

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._text += text
        if self._failed_at is None:
            try:
                while self._pos < len(self._text):
                    self._step(self._text[self._pos])
            except _ShapeError:
                self._failed_at = self._pos if self._committed else 0
                if self._call is not None:
                    self._end_call()
            self._flush_arguments()
        return self._take()

    def finish(self, complete: bool) -> tuple[str, list[ToolCallDelta]]:
        if self._failed_at is None:
            if not self._committed:
                if not complete:  # cut before its shape showed: not text, not a call
                    return "", []
                self._failed_at = 0  # too short to tell: it is all content
            elif self._call is not None:
                self._end_call()  # (a call cut short keeps the arguments it streamed)
        return self._take()

    def _take(self) -> tuple[str, list[ToolCallDelta]]:
        if self._failed_at is not None:
            self._content.append(self._text[max(self._failed_at, self._sent) :])
            self._sent = len(self._text)
        content, deltas = "".join(self._content), self._deltas
        self._content, self._deltas = [], []
        return content, deltas

    def _step(self, c: str) -> None:
        state = self._state
        blank = c in _WS
        if state in ("response", "key", "name") or state.startswith("value"):
            pass  # whitespace is text there
        elif blank:
            self._pos += 1
            return
        if state == "start":
            self._expect(c, "{", "top-key")
        elif state == "top-key":
            self._expect(c, '"', "key")
            self._key, self._after_key = "", "top-colon"
        elif state == "key" or state == "name":
            self._read_string(c)
        elif state == "top-colon":
            self._expect(c, ":", "top-value")
        elif state == "top-value":
            if self._key == "response" and c == '"':
                self._state = "response"
            elif self._key == "tool_calls" and c == "[":
                self._state = "item"
            else:
                raise _ShapeError
            self._committed, self._pos = True, self._pos + 1
        elif state == "response":
            self._read_response(c)
        elif state == "item":
            if c == "]":
                self._state = "top-end"
            else:
                self._expect(c, "{", "call-key")
                self._call = _OpenCall()
        elif state == "call-key":
            if c == "}":
                self._end_call()
                self._state, self._pos = "item-end", self._pos + 1
            else:
                self._expect(c, '"', "key")
                self._key, self._after_key = "", "call-colon"
        elif state == "call-colon":
            self._expect(c, ":", "call-value")
        elif state == "call-value":
            if self._key == "name":
                self._expect(c, '"', "name")
                self._key = ""
            else:
                self._value = _ValueScan()
                self._state = "value-arguments" if self._key == "arguments" else "value-other"
        elif state.startswith("value"):
            self._scan_value(c)
        elif state == "call-next":
            if c == ",":
                self._state, self._pos = "call-key", self._pos + 1
            else:
                self._expect(c, "}", "item-end")
                self._end_call()
        elif state == "item-end":
            if c == ",":
                self._state, self._pos = "item", self._pos + 1
            else:
                self._expect(c, "]", "top-end")
        elif state == "top-end":
            self._expect(c, "}", "tail")
            self._tail = self._pos
        else:  # whitespace only after the object; other text is content from its end on
            self._pos = self._tail
            raise _ShapeError

    def _expect(self, c: str, wanted: str, then: str) -> None:
        if c != wanted:
            raise _ShapeError
        self._state = then
        self._pos += 1

    def _read_string(self, c: str) -> None:
        """A key or a name: kept whole until its closing quote."""
        self._pos += 1
        if c != '"' or _escaped(self._key):
            self._key += c
            return
        try:
            text = json.loads(f'"{self._key}"')
        except ValueError:
            raise _ShapeError from None
        if self._state == "key":
            self._key, self._state = text, self._after_key
            return
        self._state = "call-next"
        call = self._call
        if call is None or call.name is not None:
            return  # a second "name" in one call: the first one stands
        call.name, call.id, call.index = text, self._parser._call_id(), self._named
        self._named += 1
        self._deltas.append(ToolCallDelta(call.index, call.id, call.name))
        self._flush_arguments()  # arguments that came before the name

    def _read_response(self, c: str) -> None:
        self._pos += 1
        if self._escape:
            self._escape += c
            self._decode_escape()
        elif c == "\\":
            self._escape = c
        else:
            self._emit_char(None)
            if c == '"':
                self._state = "top-end"
            else:
                self._content.append(c)

    def _decode_escape(self) -> None:
        esc = self._escape
        if esc[1] != "u":
            if esc[1] not in _ESCAPES:
                raise _ShapeError
            self._emit_char(None)
            self._content.append(_ESCAPES[esc[1]])
            self._escape = ""
            return
        if len(esc) < 6:
            if esc[-1] not in _HEX and len(esc) > 2:
                raise _ShapeError
            return
        if esc[-1] not in _HEX:
            raise _ShapeError
        self._escape = ""
        self._emit_char(int(esc[2:], 16))

    def _emit_char(self, code: int | None) -> None:
        """Give out the code point of an escape (None: whatever comes is no escape), pairing
        surrogates; a half of a pair that stays alone is U+FFFD."""
        high, self._high = self._high, None
        if high is not None:
            if code is not None and 0xDC00 <= code < 0xE000:
                self._content.append(chr(0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00)))
                return
            self._content.append("\ufffd")
        if code is None:
            return
        if 0xD800 <= code < 0xDC00:
            self._high = code
        elif 0xDC00 <= code < 0xE000:
            self._content.append("\ufffd")
        else:
            self._content.append(chr(code))

    def _scan_value(self, c: str) -> None:
        done = self._value.push(c)
        if done == _ValueScan.BEFORE:
            self._state = "call-next"  # this character is not the value's: scan it again
            return
        self._pos += 1
        if self._state == "value-arguments" and self._call is not None:
            self._call.arguments += c
        if done == _ValueScan.AFTER:
            self._state = "call-next"

    def _flush_arguments(self) -> None:
        call = self._call
        if call is not None and call.name is not None and call.sent < len(call.arguments):
            self._deltas.append(ToolCallDelta(call.index, arguments=call.arguments[call.sent :]))
            call.sent = len(call.arguments)

    def _end_call(self) -> None:
        self._flush_arguments()
        call, self._call = self._call, None
        if call is not None and call.name is not None:
            self._parser._calls.append(ToolCall(call.id, call.name, call.arguments))


def _escaped(raw: str) -> bool:
    """Whether a quote after ``raw`` (a JSON string's text so far) is escaped."""
    return (len(raw) - len(raw.rstrip("\\"))) % 2 == 1


class _ValueScan:
    """Finds where one JSON value ends, a character at a time (it does not validate it)."""

    MORE, AFTER, BEFORE = 0, 1, 2  # go on; the value ends with this character; before it

    def __init__(self) -> None:
        self.depth = 0
        self.started = False
        self.primitive = False
        self.in_string = False
        self.escape = False

    def push(self, c: str) -> int:
        if not self.started:
            self.started = True
            self.primitive = c not in '{["'
            if self.primitive and c in ",}]":
                raise _ShapeError  # no value at all
        if self.primitive:
            return self.BEFORE if c in ",}]" or c in _WS else self.MORE
        if self.in_string:
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == '"':
                self.in_string = False
                return self.AFTER if self.depth == 0 else self.MORE
            return self.MORE
        if c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
            if self.depth == 0:
                return self.AFTER
        return self.MORE
