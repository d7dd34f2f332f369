"""Tool calling without a model: the plan (messages, system text, grammars) and the parser of
answers, fed in every possible split."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import llama_cpp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llama_cpp.llama_grammar import json_schema_to_gbnf

from llm_service.engine.tools import ToolCallParser, ToolPlan, _hermes_grammar, plan, syntax_of
from llm_service.errors import InvalidRequestError
from llm_service.types import ChatMessage, GenerationRequest, Tool, ToolCall, ToolCallDelta

WEATHER = Tool(
    "get_weather",
    "The weather in a city.",
    json.dumps(
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        }
    ),
)
TIME = Tool("get_time", parameters=json.dumps({"type": "object", "properties": {}}))
TOOLS = (WEATHER, TIME)

HISTORY = (
    ChatMessage("system", "You are terse."),
    ChatMessage("user", "Weather and time in Paris?"),
    ChatMessage(
        "assistant",
        "",
        tool_calls=(
            ToolCall("call_1", "get_weather", '{"city": "Paris"}'),
            ToolCall("call_2", "get_time", "{}"),
        ),
    ),
    ChatMessage("tool", "18 C", tool_call_id="call_1"),
    ChatMessage("tool", "12:00", tool_call_id="call_2"),
    ChatMessage("assistant", "18 C at noon."),
    ChatMessage("user", "Thanks."),
)


def chat(*messages: ChatMessage, **options: Any) -> GenerationRequest:
    return GenerationRequest(messages=messages or HISTORY, **options)


def fake_gbnf(schema: str) -> str:
    return 'root ::= "{}"'


def schema_of(request: GenerationRequest) -> dict[str, Any]:
    """The JSON schema ``plan`` hands to the converter for the generic syntax."""
    seen: list[str] = []

    def convert(schema: str) -> str:
        seen.append(schema)
        return fake_gbnf(schema)

    plan(request, "generic", convert)
    assert len(seen) == 1
    return dict(json.loads(seen[0]))


def llama_parses(grammar: str) -> bool:
    """Whether llama.cpp's own GBNF parser takes ``grammar`` (start rule ``root``).

    ``LlamaGrammar.from_string`` only stores the text in llama-cpp-python 0.3.36; a grammar
    sampler parses it, and needs no vocabulary to do so.
    """
    sampler = llama_cpp.llama_sampler_init_grammar(None, grammar.encode(), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def test_llama_parses_can_fail() -> None:
    assert llama_parses('root ::= "a" b\nb ::= "b"')
    assert not llama_parses('root ::= "a" missing')
    assert not llama_parses('root ::= ( "a"')


# -- syntax ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "syntax"),
    [
        (None, "generic"),
        ("{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}", "generic"),
        ("{%- if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}<tool_call>", "hermes"),
    ],
)
def test_syntax_of(template: str | None, syntax: str) -> None:
    assert syntax_of(template) == syntax


# -- messages -------------------------------------------------------------------------------


def test_generic_messages_write_tool_turns_as_json() -> None:
    messages = plan(chat(tools=TOOLS), "generic", fake_gbnf).messages
    assert messages[0]["role"] == "system"
    assert messages[0]["content"].startswith("You are terse.\n\nYou can call tools.")
    assert messages[1:] == [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": json.dumps(
                {
                    "tool_calls": [
                        {"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_1"},
                        {"name": "get_time", "arguments": {}, "id": "call_2"},
                    ]
                }
            ),
        },
        {
            # Two tool answers in a row: one user turn, a line each.
            "role": "user",
            "content": json.dumps(
                {
                    "tool_response": {
                        "tool_call_id": "call_1",
                        "name": "get_weather",
                        "content": "18 C",
                    }
                }
            )
            + "\n"
            + json.dumps(
                {
                    "tool_response": {
                        "tool_call_id": "call_2",
                        "name": "get_time",
                        "content": "12:00",
                    }
                }
            ),
        },
        {"role": "assistant", "content": "18 C at noon."},
        {"role": "user", "content": "Thanks."},
    ]


def test_generic_messages_keep_the_content_of_a_call_and_an_unknown_call_id() -> None:
    request = chat(
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Looking.", tool_calls=(ToolCall("c9", "get_time", "{}"),)),
        ChatMessage("tool", "noon", tool_call_id="elsewhere"),
    )
    messages = plan(request, "generic", fake_gbnf).messages
    call = '{"tool_calls": [{"name": "get_time", "arguments": {}, "id": "c9"}]}'
    assert messages[1] == {"role": "assistant", "content": "Looking.\n" + call}
    assert json.loads(messages[2]["content"]) == {
        "tool_response": {"tool_call_id": "elsewhere", "content": "noon"}
    }


def test_hermes_messages_pass_tool_turns_natively() -> None:
    result = plan(chat(tools=TOOLS), "hermes", fake_gbnf)
    assert result.messages == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": {}},
                },
            ],
        },
        {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
        {"role": "tool", "content": "12:00", "tool_call_id": "call_2"},
        {"role": "assistant", "content": "18 C at noon."},
        {"role": "user", "content": "Thanks."},
    ]
    assert result.template_tools == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city.",
                "parameters": json.loads(WEATHER.parameters),
            },
        },
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "description": "",
                "parameters": json.loads(TIME.parameters),
            },
        },
    ]
    assert result.grammar is None  # auto: free text
    assert result.parser is not None


@pytest.mark.parametrize("syntax", ["generic", "hermes"])
@pytest.mark.parametrize("options", [{}, {"tools": TOOLS, "tool_choice": "none"}])
def test_without_calls_there_is_no_grammar_nor_parser(syntax: Any, options: Any) -> None:
    result = plan(chat(**options), syntax, fake_gbnf)
    assert result == ToolPlan(result.messages, None, None, None)
    # The history is still converted, and no tools are described.
    assert result.messages[0] == {"role": "system", "content": "You are terse."}
    assert len(result.messages) == (6 if syntax == "generic" else 7)


@pytest.mark.parametrize("syntax", ["generic", "hermes"])
def test_arguments_in_the_history_must_be_an_object(syntax: Any) -> None:
    request = chat(
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("c1", "get_time", "[1]"),)),
    )
    with pytest.raises(InvalidRequestError) as caught:
        plan(request, syntax, fake_gbnf)
    assert caught.value.field == "messages[1].tool_calls"
    assert "c1" in caught.value.detail


def test_generic_system_text_is_added_when_there_is_no_system_message() -> None:
    messages = plan(chat(ChatMessage("user", "Hi"), tools=TOOLS), "generic", fake_gbnf).messages
    assert [m["role"] for m in messages] == ["system", "user"]
    text = messages[0]["content"]
    assert '{"tool_calls": [' in text
    assert '{"response": ' in text
    assert "one or more calls" in text
    assert "- get_weather: The weather in a city." in text
    assert f"parameters: {json.dumps(json.loads(WEATHER.parameters))}" in text
    assert "- get_time\n" in text


@pytest.mark.parametrize(
    ("options", "present", "absent"),
    [
        ({"tool_choice": "required"}, ["Call tools (one or more calls)"], ['"response"']),
        ({"tool_choice": "required", "tool_name": "get_time"}, ["Call the tool get_time"], []),
        ({"parallel_tool_calls": False}, ["exactly one call", '"response"'], []),
    ],
)
def test_generic_system_text_follows_the_tool_choice(
    options: Any, present: list[str], absent: list[str]
) -> None:
    text = plan(chat(tools=TOOLS, **options), "generic", fake_gbnf).messages[0]["content"]
    for words in present:
        assert words in text
    for words in absent:
        assert words not in text


# -- grammars -------------------------------------------------------------------------------

CALL_WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}
CALL_TIME = {"name": "get_time", "arguments": {}}


@pytest.mark.parametrize(
    ("options", "accepted", "refused"),
    [
        (
            {},
            [{"response": "Hi"}, {"tool_calls": [CALL_WEATHER, CALL_TIME]}],
            [{"tool_calls": []}, {"tool_calls": [{"name": "get_weather", "arguments": {}}]}],
        ),
        (
            {"tool_choice": "required"},
            [{"tool_calls": [CALL_TIME]}],
            [{"response": "Hi"}, {"tool_calls": [{"name": "other", "arguments": {}}]}],
        ),
        (
            {"tool_choice": "required", "tool_name": "get_time"},
            [{"tool_calls": [CALL_TIME, CALL_TIME]}],
            [{"tool_calls": [CALL_WEATHER]}, {"response": "Hi"}],
        ),
        (
            {"parallel_tool_calls": False},
            [{"tool_calls": [CALL_WEATHER]}, {"response": "Hi"}],
            [{"tool_calls": [CALL_WEATHER, CALL_TIME]}],
        ),
    ],
    ids=["auto", "required", "named", "one-call"],
)
def test_generic_grammar(options: Any, accepted: list[Any], refused: list[Any]) -> None:
    request = chat(tools=TOOLS, **options)
    schema = schema_of(request)
    for answer in accepted:
        jsonschema.validate(answer, schema)
    for answer in refused:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(answer, schema)
    grammar = plan(request, "generic", json_schema_to_gbnf).grammar
    assert grammar is not None and llama_parses(grammar)


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("tool_name", [None, "get_weather"])
def test_hermes_grammar_wraps_the_calls_in_blocks(parallel: bool, tool_name: str | None) -> None:
    request = chat(
        tools=TOOLS, tool_choice="required", tool_name=tool_name, parallel_tool_calls=parallel
    )
    grammar = plan(request, "hermes", json_schema_to_gbnf).grammar
    assert grammar is not None and llama_parses(grammar)
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines())
    block = r'"<tool_call>\n" tool-call "\n</tool_call>"'
    more = r' ( "\n<tool_call>\n" tool-call "\n</tool_call>" )*'
    assert rules["root"] == block + (more if parallel else "")
    if tool_name is None:
        assert rules["tool-call"] == "alternative-0 | alternative-1"
    else:
        assert rules["tool-call"].startswith('"{" space name-kv')
        assert '"\\"get_weather\\""' in grammar
        assert "get_time" not in grammar


def test_hermes_grammar_renames_only_the_rule_root() -> None:
    # "root" as a value and a property of the arguments: literals and longer rule names.
    tool = Tool(
        "f",
        parameters=json.dumps(
            {"type": "object", "properties": {"root": {"enum": ["root"]}}, "required": ["root"]}
        ),
    )
    grammar = plan(
        chat(tools=(tool,), tool_choice="required"), "hermes", json_schema_to_gbnf
    ).grammar
    assert grammar is not None and llama_parses(grammar)
    assert [line for line in grammar.splitlines() if line.startswith("root ")] == [
        r'root ::= "<tool_call>\n" tool-call "\n</tool_call>"'
        r' ( "\n<tool_call>\n" tool-call "\n</tool_call>" )*'
    ]
    assert 'arguments-root-kv ::= "\\"root\\"" space' in grammar
    assert "tool-call ::= " in grammar


def test_hermes_grammar_moves_a_rule_named_tool_call_out_of_the_way() -> None:
    calls = 'root ::= tool-call [root] # root\ntool-call ::= "root" root-x\nroot-x ::= "x"\n'
    grammar = _hermes_grammar(calls, parallel=False)
    assert llama_parses(grammar)
    assert grammar.splitlines()[1:] == [
        "tool-call ::= tool-call-0 [root] # root",
        'tool-call-0 ::= "root" root-x',
        'root-x ::= "x"',
    ]


def test_a_tool_schema_refers_to_its_own_definitions() -> None:
    def with_item(item: dict[str, Any]) -> str:
        return json.dumps(
            {
                "type": "object",
                "properties": {"item": {"$ref": "#/$defs/Item"}},
                "required": ["item"],
                "$defs": {"Item": item},
            }
        )

    number = Tool("number", parameters=with_item({"type": "integer"}))
    text = Tool("text", parameters=with_item({"type": "string"}))
    request = chat(tools=(number, text), tool_choice="required")
    schema = schema_of(request)
    jsonschema.validate({"tool_calls": [{"name": "number", "arguments": {"item": 1}}]}, schema)
    jsonschema.validate({"tool_calls": [{"name": "text", "arguments": {"item": "a"}}]}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_calls": [{"name": "text", "arguments": {"item": 1}}]}, schema)
    grammar = plan(request, "generic", json_schema_to_gbnf).grammar
    assert grammar is not None and llama_parses(grammar)
    assert "integer" in grammar and "string" in grammar  # one rule each, not one shared


@pytest.mark.parametrize(
    ("parameters", "convert", "words"),
    [
        ({"type": "strin"}, json_schema_to_gbnf, "Unrecognized schema"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/No"}}}, fake_gbnf, "nowhere"),
        ({"type": "object", "properties": {"a": {"$ref": "#no"}}}, fake_gbnf, "'#no'"),
    ],
)
def test_a_tool_schema_without_a_grammar_is_refused(
    parameters: Any, convert: Callable[[str], str], words: str
) -> None:
    bad = Tool("bad_tool", parameters=json.dumps(parameters))
    with pytest.raises(InvalidRequestError) as caught:
        plan(chat(tools=(WEATHER, bad)), "generic", convert)
    assert caught.value.field == "tools"
    assert "'bad_tool'" in caught.value.detail and words in caught.value.detail


@pytest.mark.parametrize("error", [ValueError("no"), RecursionError()])
@pytest.mark.parametrize("syntax", ["generic", "hermes"])
def test_a_converter_error_names_the_tool(error: Exception, syntax: Any) -> None:
    def convert(schema: str) -> str:
        if "bad_tool" in schema:
            raise error
        return fake_gbnf(schema)

    bad = Tool("bad_tool")
    with pytest.raises(InvalidRequestError) as caught:
        plan(chat(tools=(WEATHER, bad), tool_choice="required"), syntax, convert)
    assert caught.value.field == "tools"
    assert caught.value.detail.startswith("tool 'bad_tool': its parameters")


# -- the parser -----------------------------------------------------------------------------


def numbered_ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def parse(syntax: Any, pieces: list[str]) -> tuple[str, list[ToolCallDelta], list[ToolCall]]:
    """Feed ``pieces``, then finish; check the deltas agree with the calls."""
    parser = ToolCallParser(syntax, new_id=numbered_ids())
    content: list[str] = []
    deltas: list[ToolCallDelta] = []
    for piece in [*pieces, None]:
        text, more = parser.feed(piece) if piece is not None else parser.finish()
        text.encode()  # whole characters only: never half a surrogate pair
        content.append(text)
        deltas.extend(more)
    calls = parser.calls
    assert [c.id for c in calls] == [f"call_{i}" for i in range(len(calls))]
    for index, call in enumerate(calls):
        mine = [d for d in deltas if d.index == index]
        assert (mine[0].id, mine[0].name) == (call.id, call.name)
        assert all(d.id == d.name == "" for d in mine[1:])
        assert "".join(d.arguments for d in mine) == call.arguments
    assert {d.index for d in deltas} == set(range(len(calls)))
    return "".join(content), deltas, calls


def splits(text: str) -> Iterator[list[str]]:
    """``text`` in two at every point, a character at a time, and with empty fragments."""
    for at in range(len(text) + 1):
        yield [text[:at], text[at:]]
    yield list(text)
    yield ["", *itertools.chain.from_iterable((c, "") for c in text)]


HERMES = [
    pytest.param(
        "I'll check both.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "note": "a } and \\" <b>"}}'
        "\n</tool_call>\n<tool_call>\n"
        '{"name": "get_time", "arguments": {"tz": "Europe/Paris", "nested": {"x": [1, 2]}}}'
        "\n</tool_call>\n",
        "I'll check both.\n",
        [
            ("get_weather", '{"city":"Paris","note":"a } and \\" <b>"}'),
            ("get_time", '{"tz":"Europe/Paris","nested":{"x":[1,2]}}'),
        ],
        id="content-and-two-calls",
    ),
    pytest.param(
        '\n<tool_call>\n{"name": "f", "arguments": {"é": "😀"}}\n</tool_call>\n\nDone.  \n',
        "\n\nDone.  \n",
        [("f", '{"é":"😀"}')],
        id="blank-before-and-text-after",
    ),
    pytest.param(
        "Hi <tool_call>\nnot json\n</tool_call> and <tool_call>"
        '{"name": "f", "arguments": "[1]"}</tool_call>',
        "Hi <tool_call>\nnot json\n</tool_call> and <tool_call>"
        '{"name": "f", "arguments": "[1]"}</tool_call>',
        [],
        id="invalid-blocks-are-content",
    ),
    pytest.param(
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}}',
        "",
        [("f", '{"a":1}')],
        id="unclosed-call",
    ),
    pytest.param(
        'Hi\n<tool_call>\n{"name": "f", "argum',
        'Hi\n<tool_call>\n{"name": "f", "argum',
        [],
        id="unclosed-invalid-block",
    ),
    pytest.param(
        "if a < b and <tool> or </tool_call> then <tool_cal",
        "if a < b and <tool> or </tool_call> then <tool_cal",
        [],
        id="angle-brackets-in-content",
    ),
    pytest.param("  \n", "  \n", [], id="blank-answer"),
]


@pytest.mark.parametrize(("answer", "content", "calls"), HERMES)
def test_hermes_answers_in_every_split(
    answer: str, content: str, calls: list[tuple[str, str]]
) -> None:
    for pieces in splits(answer):
        got_content, _, got_calls = parse("hermes", pieces)
        assert got_content == content, pieces
        assert [(c.name, c.arguments) for c in got_calls] == calls, pieces


def test_hermes_streams_content_and_holds_a_partial_marker() -> None:
    parser = ToolCallParser("hermes", new_id=numbered_ids())
    assert parser.feed("Let me <") == ("Let me ", [])
    assert parser.feed("b>see</b> <tool_") == ("<b>see</b> ", [])
    assert parser.feed('call>{"name": "f", "arguments": {}}') == ("", [])
    assert parser.calls == []
    assert parser.feed("</tool_call>") == ("", [ToolCallDelta(0, "call_0", "f", "{}")])
    assert parser.calls == [ToolCall("call_0", "f", "{}")]
    assert parser.feed("\n") == ("", [])
    assert parser.finish() == ("", [])


GENERIC = [
    pytest.param(
        '{"response": "Line 1\\nLine \\"2\\" \\\\ caf\\u00e9 \\ud83d\\ude00 \\/ end"}',
        'Line 1\nLine "2" \\ café 😀 / end',
        [],
        id="response-with-escapes",
    ),
    pytest.param(
        '\n {"response":"lone \\ud83d then \\udc00 and \\ud83d\\n."}  \n',
        "lone \ufffd then \ufffd and \ufffd\n.",
        [],
        id="lone-surrogates",
    ),
    pytest.param(
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris }\\"", '
        '"where": {"lat": [48.8, {"x": "]}"}]}}}, {"name": "get_time", "arguments": {} }]}',
        "",
        [
            ("get_weather", '{"city": "Paris }\\"", "where": {"lat": [48.8, {"x": "]}"}]}}'),
            ("get_time", "{}"),
        ],
        id="two-calls",
    ),
    pytest.param(
        '{"tool_calls": [{"arguments": {"a": 1}, "id": "x", "name": "late"}]}',
        "",
        [("late", '{"a": 1}')],
        id="arguments-before-the-name",
    ),
    pytest.param(
        '{"tool_calls": [{"name": "f", "arguments": {"a": "x}',
        "",
        [("f", '{"a": "x}')],
        id="cut-off-in-arguments",
    ),
    pytest.param(
        '{"tool_calls": [{"name": "f", "arguments": {}}, {"name": "g"',
        "",
        [("f", "{}"), ("g", "")],
        id="cut-off-after-a-name",
    ),
    pytest.param('{"response": "Hel\\u00e', "Hel", [], id="cut-off-in-an-escape"),
    pytest.param("Hello {there}", "Hello {there}", [], id="not-json"),
    pytest.param('{"answer": "x"}', '{"answer": "x"}', [], id="another-shape"),
    pytest.param('  {"tool', '  {"tool', [], id="too-short-to-tell"),
    pytest.param('{"response": "x"} extra', "x extra", [], id="text-after-the-object"),
]


@pytest.mark.parametrize(("answer", "content", "calls"), GENERIC)
def test_generic_answers_in_every_split(
    answer: str, content: str, calls: list[tuple[str, str]]
) -> None:
    for pieces in splits(answer):
        got_content, _, got_calls = parse("generic", pieces)
        assert got_content == content, pieces
        assert [(c.name, c.arguments) for c in got_calls] == calls, pieces


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([p.values for p in HERMES + GENERIC]), st.data())
def test_any_number_of_splits(case: Any, data: st.DataObject) -> None:
    answer, content, calls = case
    syntax = "hermes" if any(answer is p.values[0] for p in HERMES) else "generic"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(answer)), max_size=12)))
    pieces = [answer[a:b] for a, b in itertools.pairwise([0, *cuts, len(answer)])]
    got_content, _, got_calls = parse(syntax, pieces)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls


def test_generic_streams_names_before_arguments_and_never_past_them() -> None:
    parser = ToolCallParser("generic", new_id=numbered_ids())
    assert parser.feed('{"tool_calls": [{"name": "f') == ("", [])
    assert parser.feed('", "arguments": {"a"') == (
        "",
        [ToolCallDelta(0, "call_0", "f"), ToolCallDelta(0, arguments='{"a"')],
    )
    assert parser.feed(": [1]}") == ("", [ToolCallDelta(0, arguments=": [1]}")])
    assert parser.calls == []
    assert parser.feed(' }, {"name": "g", ') == (
        "",
        [ToolCallDelta(1, "call_1", "g")],
    )
    assert parser.calls == [ToolCall("call_0", "f", '{"a": [1]}')]
    assert parser.feed('"arguments": {}}]}') == ("", [ToolCallDelta(1, arguments="{}")])
    assert parser.finish() == ("", [])
    assert [c.name for c in parser.calls] == ["f", "g"]


def test_generic_streams_a_response_as_it_comes() -> None:
    parser = ToolCallParser("generic")
    assert parser.feed('{"resp') == ("", [])
    assert parser.feed('onse": "Hi') == ("Hi", [])
    assert parser.feed(" \\") == (" ", [])
    assert parser.feed("u00") == ("", [])
    assert parser.feed('e9!"') == ("é!", [])
    assert parser.feed("}") == ("", [])
    assert parser.finish() == ("", [])
    assert parser.calls == []


def test_repeated_ids_are_made_unique() -> None:
    parser = ToolCallParser("hermes", new_id=lambda: "same")
    call = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    parser.feed(call * 3)
    assert [c.id for c in parser.calls] == ["same", "same_2", "same_3"]


def test_default_ids() -> None:
    parser = ToolCallParser("generic")
    parser.feed('{"tool_calls": [{"name": "f", "arguments": {}}, {"name": "f", "arguments": {}}]}')
    ids = [c.id for c in parser.calls]
    assert len(set(ids)) == 2
    assert all(i.startswith("call_") and len(i) == 29 for i in ids)


@pytest.mark.parametrize("syntax", ["generic", "hermes"])
def test_a_tool_schema_nested_too_deeply_is_refused(syntax: Any) -> None:
    depth = 450  # Tool takes it (json.loads); building its grammar would overflow the stack
    deep = Tool("deep", parameters='{"properties": {"a": ' * depth + "{}" + "}}" * depth)
    with pytest.raises(InvalidRequestError) as caught:
        plan(chat(tools=(WEATHER, deep), tool_choice="required"), syntax, json_schema_to_gbnf)
    assert caught.value.field == "tools"
    assert caught.value.detail.startswith("tool 'deep': its parameters are nested too deeply")
