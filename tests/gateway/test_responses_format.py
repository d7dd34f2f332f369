"""The Responses API's wire format: request bodies to backend requests, chunks to the
``response`` object and its events, checked against the official SDK's own models and its
stream helper's state machine."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest
from openai._models import validate_type
from openai._types import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent

from llm_service.client import (
    ChatMessage,
    Chunk,
    Completion,
    FinishReason,
    Timings,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from llm_service.errors import ConnectionLostError, InvalidRequestError
from llm_service.gateway.openai import invalid_request
from llm_service.gateway.responses import ResponsesRequest, ResponsesWire, to_generation

TIMINGS = Timings(1.0, 2.0, 3.0, 40.0, 50.0)
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather", "parameters": CITY,
           "strict": True}  # fmt: skip


def body(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "Hi"} | fields)


def refusal(**fields: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        to_generation(body(**fields))
    return info.value


# -- requests -------------------------------------------------------------------------------


def test_a_string_input_is_a_user_message_after_the_instructions() -> None:
    gen = to_generation(body(instructions="Be brief.", max_output_tokens=7, temperature=0))
    assert gen.prompt == (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"))
    assert gen.sampling == {"max_tokens": 7, "temperature": 0}
    assert (gen.n, gen.tools, gen.stream, gen.include_usage) == (1, None, False, False)
    assert gen.split_reasoning is False  # no reasoning items: a <think> block stays in the text


def test_items_become_messages_calls_and_tool_answers() -> None:
    call = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}
    items = [
        {"role": "developer", "content": "Rules."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Go"}]},
        {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "On it.", "annotations": []}]},
        call | {"id": "fc_1", "status": "completed"},
        call | {"call_id": "call_2"},
        {"type": "function_call_output", "call_id": "call_1", "output": "one"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "two"}]},
    ]  # fmt: skip
    f = ("f", "{}")
    assert to_generation(body(input=items)).prompt == (
        ChatMessage("system", "Rules."),
        ChatMessage("user", "Go"),
        ChatMessage("assistant", "On it.", (ToolCall("call_1", *f), ToolCall("call_2", *f))),
        ChatMessage("tool", "one", tool_call_id="call_1"),
        ChatMessage("tool", "two", tool_call_id="call_2"),
    )  # fmt: skip


def test_text_format_asks_for_its_schema() -> None:
    fmt = {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}
    assert json.loads(to_generation(body(text={"format": fmt})).sampling["json_schema"]) == CITY
    any_object = to_generation(body(text={"format": {"type": "json_object"}}))
    assert json.loads(any_object.sampling["json_schema"]) == {"type": "object"}
    assert "json_schema" not in to_generation(body(text={"format": {"type": "text"}})).sampling


def test_tools_and_a_named_choice_are_passed_on() -> None:
    named = to_generation(
        body(tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
             parallel_tool_calls=False)
    ).tools  # fmt: skip
    assert named is not None and [t.name for t in named.functions] == ["get_weather"]
    assert json.loads(named.functions[0].parameters) == CITY
    assert (named.choice, named.name, named.parallel) == ("required", "get_weather", False)
    auto = to_generation(body(tools=[WEATHER])).tools
    assert auto is not None and (auto.choice, auto.name, auto.parallel) == ("auto", None, True)


def test_logprobs_are_asked_for_by_include() -> None:
    gen = to_generation(body(include=["message.output_text.logprobs"], top_logprobs=3))
    assert gen.sampling["logprobs"] == 3


def test_values_that_ask_for_nothing_unserved_are_served() -> None:
    to_generation(
        body(store=False, background=False, truncation="disabled", metadata={"k": "v"},
             service_tier="auto", prompt_cache_key="k", safety_identifier="s", max_tool_calls=3,
             stream_options={"include_obfuscation": False}, context_management=[], user="u")
    )  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"store": True}, "store"),
        ({"background": True}, "background"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"truncation": "auto"}, "truncation"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "tools[0].type"),
        ({"tools": [WEATHER | {"defer_loading": True}]}, "tools[0].defer_loading"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"tools": [WEATHER | {"name": "bad name"}]}, "tools[0].name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
         "tool_choice.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}}, "tool_choice.type"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "include": ["message.output_text.logprobs"]}, "include"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
         "input[0].content[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "a", "x": 1}]}]},
         "input[0].content[0].x"),
        ({"input": [{"role": "tool", "content": "Hi"}]}, "input[0].role"),
        ({"input": [{"role": "user"}]}, "input[0].content"),
        ({"input": [{"role": "user", "content": "Hi", "call_id": "c"}]}, "input[0].call_id"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ],
)  # fmt: skip
def test_what_is_not_served_is_refused_by_name(fields: dict[str, Any], param: str) -> None:
    assert refusal(**fields).field == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"frequency_penalty": 1}, "frequency_penalty"),
        ({"input": 3}, "input"),
        ({"input": [{"role": "user", "content": 3}]}, "input[0].content"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
    ],
)
def test_a_body_that_does_not_validate_names_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        body(**fields)
    assert invalid_request(info.value.errors()).field == param


# -- the response object --------------------------------------------------------------------


def done(text: str = "", reason: FinishReason = FinishReason.STOP, **kw: Any) -> Completion:
    return Completion(text, reason, Usage(5, 3), TIMINGS, "r1", **kw)


def test_a_whole_response_is_the_sdks_response() -> None:
    wire = ResponsesWire(body(instructions="Be brief."), "r1", logprobs=False)
    out = Response.model_validate(wire.whole([done("Red, green.")]))
    assert (out.id, out.object, out.status, out.model) == ("resp_r1", "response", "completed", "m")
    assert out.output_text == "Red, green." and out.instructions == "Be brief."
    [message] = out.output
    assert message.type == "message" and message.id == "msg_r1" and message.status == "completed"
    assert out.usage is not None
    assert (out.usage.input_tokens, out.usage.output_tokens, out.usage.total_tokens) == (5, 3, 8)
    assert out.incomplete_details is None and out.error is None


def test_a_response_cut_by_max_output_tokens_is_incomplete() -> None:
    wire = ResponsesWire(body(max_output_tokens=3), "r1", logprobs=False)
    out = Response.model_validate(wire.whole([done("Red", FinishReason.LENGTH)]))
    assert out.status == "incomplete" and out.incomplete_details is not None
    assert out.incomplete_details.reason == "max_output_tokens"
    assert out.output[0].status == "incomplete"


def test_function_calls_are_items_of_their_own() -> None:
    calls = (ToolCall("call_ab", "get_weather", '{"city":"Paris"}'),)
    wire = ResponsesWire(body(tools=[WEATHER]), "r1", logprobs=False)
    out = Response.model_validate(
        wire.whole([done(reason=FinishReason.TOOL_CALLS, tool_calls=calls)])
    )
    [call] = out.output
    assert call.type == "function_call" and (call.id, call.call_id) == ("fc_ab", "call_ab")
    assert (call.name, call.arguments, call.status) == (
        "get_weather",
        '{"city":"Paris"}',
        "completed",
    )
    assert out.output_text == "" and out.tools[0].type == "function"
    assert out.tool_choice == "auto"


def test_logprobs_are_on_the_output_text() -> None:
    lp = TokenLogprob(1, b"Hi", -0.5, (TokenLogprob(1, b"Hi", -0.5),))
    wire = ResponsesWire(body(include=["message.output_text.logprobs"]), "r1", logprobs=True)
    out = Response.model_validate(wire.whole([done("Hi", logprobs=(lp,))]))
    [part] = out.output[0].content  # type: ignore[union-attr]
    assert part.logprobs is not None and part.logprobs[0].token == "Hi"  # type: ignore[union-attr]
    assert part.logprobs[0].top_logprobs[0].logprob == -0.5  # type: ignore[union-attr]


# -- the stream -----------------------------------------------------------------------------


def parse(raw: list[bytes]) -> list[dict[str, Any]]:
    """The events' data; each event's name is its type."""
    out = []
    for event in raw:
        name, data = event.decode().removesuffix("\n\n").split("\n")
        obj = json.loads(data.removeprefix("data: "))
        assert name == f"event: {obj['type']}"
        out.append(obj)
    return out


def through_the_sdk(events: list[dict[str, Any]]) -> ResponseStreamState[Any]:
    """Each event validated by the SDK's models and fed to its stream helper's state machine,
    which raises on an event out of order."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=[WEATHER], text_format=omit)  # type: ignore[list-item]
    for event in events:
        state.handle_event(validate_type(type_=ResponseStreamEvent, value=event))  # type: ignore[arg-type]
    return state


def stream(wire: ResponsesWire, chunks: list[Chunk]) -> list[dict[str, Any]]:
    raw = [e for chunk in chunks for e in wire.events(0, chunk)] + wire.end(Usage(5, 3))
    return parse(raw)


def test_a_text_stream_is_the_sequence_the_sdk_expects() -> None:
    wire = ResponsesWire(body(stream=True), "r1", logprobs=False)
    chunks = [
        Chunk("Red"),
        Chunk(""),
        Chunk(", green"),
        Chunk(".", finish_reason=FinishReason.STOP, usage=Usage(5, 3)),
    ]
    events = stream(wire, chunks)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    state = through_the_sdk(events)
    final = state._completed_response
    assert final is not None and final.output_text == "Red, green."
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == final.output_text
    assert (
        events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    )
    assert Response.model_validate(events[-1]["response"]).usage.total_tokens == 8  # type: ignore[union-attr]
    assert events[-1]["response"] == wire.whole([done("Red, green.")])  # the same whole answer


def test_a_streamed_call_is_added_filled_and_done() -> None:
    wire = ResponsesWire(body(stream=True, tools=[WEATHER]), "r1", logprobs=False)
    chunks = [
        Chunk("", tool_calls=(ToolCallDelta(0, "call_ab", "get_weather", '{"ci'),)),
        Chunk("", tool_calls=(ToolCallDelta(0, arguments='ty":"Paris"}'),)),
        Chunk("", finish_reason=FinishReason.TOOL_CALLS, usage=Usage(5, 3)),
    ]
    events = stream(wire, chunks)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip
    added = events[2]["item"]
    assert (added["call_id"], added["name"], added["arguments"], added["status"]) == (
        "call_ab",
        "get_weather",
        "",
        "in_progress",
    )
    assert events[5]["arguments"] == '{"city":"Paris"}'
    final = through_the_sdk(events)._completed_response
    assert final is not None
    [call] = final.output
    assert call.type == "function_call" and call.parsed_arguments == {"city": "Paris"}  # type: ignore[union-attr]


def test_a_stream_cut_by_max_output_tokens_ends_incomplete() -> None:
    wire = ResponsesWire(body(stream=True), "r1", logprobs=False)
    events = stream(wire, [Chunk("Red", finish_reason=FinishReason.LENGTH, usage=Usage(5, 1))])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"
    through_the_sdk(events)


def test_a_failure_after_the_start_is_response_failed() -> None:
    wire = ResponsesWire(body(stream=True), "r1", logprobs=False)
    raw = wire.events(0, Chunk("Red")) + wire.failure(ConnectionLostError("backend gone"))
    events = parse(raw)
    assert events[-1]["type"] == "response.failed"
    failed = Response.model_validate(events[-1]["response"])
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.code == "server_error" and "backend" in failed.error.message
    assert failed.output[0].status == "incomplete"  # type: ignore[union-attr]
    through_the_sdk(events)


def test_a_failure_before_the_first_token_still_starts_the_stream() -> None:
    wire = ResponsesWire(body(stream=True), "r1", logprobs=False)
    events = parse(wire.failure(ConnectionLostError("backend gone")))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.failed",
    ]
    through_the_sdk(events)


def test_streamed_logprobs_come_with_their_deltas() -> None:
    lp = TokenLogprob(1, b"Hi", -0.5, ())
    wire = ResponsesWire(body(include=["message.output_text.logprobs"]), "r1", logprobs=True)
    events = stream(
        wire,
        [
            Chunk("Hi", logprobs=(lp,)),
            Chunk("", finish_reason=FinishReason.STOP, usage=Usage(5, 1)),
        ],
    )
    [delta] = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [x["token"] for x in delta["logprobs"]] == ["Hi"]
    assert events[-1]["response"]["output"][0]["content"][0]["logprobs"] == delta["logprobs"]
    through_the_sdk(events)
