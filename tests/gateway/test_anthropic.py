"""Anthropic's Messages API on llm-gateway: the request mapping and the event stream on their
own, then the official ``anthropic`` SDK against real replicas (mutual TLS, the real model)."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import jsonschema
import pytest
from pydantic import ValidationError

from llm_service.client.types import (
    ChatMessage,
    Chunk,
    Completion,
    FinishReason,
    Timings,
    ToolCall,
    ToolCallDelta,
    Tools,
    Usage,
)
from llm_service.errors import InvalidRequestError, OverloadedError
from llm_service.gateway.anthropic import AnthropicWire, MessagesRequest, to_generation
from llm_service.gateway.app import is_anthropic
from llm_service.gateway.status import http_error
from tests.harness.gateway import KEY, MODEL, Gateway

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"], "additionalProperties": False}  # fmt: skip
WEATHER = {"name": "get_weather", "description": "The weather in a city", "input_schema": CITY}
# The SDK has no sampling parameters now (newer Claude models take none); older clients send
# them, and the gateway serves them.
GREEDY = {"temperature": 0}
HELLO = [{"role": "user", "content": "Name three colours."}]


def body(**fields: Any) -> MessagesRequest:
    return MessagesRequest.model_validate(
        {"model": "m", "max_tokens": 8, "messages": HELLO} | fields
    )


# -- the request mapping --------------------------------------------------------------------


def test_a_conversation_with_a_tool_round_trip_maps_to_chat_messages() -> None:
    gen = to_generation(
        body(
            system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                     "input": {"city": "Paris"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                     "content": [{"type": "text", "text": "timeout"}]},
                    {"type": "text", "text": "And so?", "cache_control": {"type": "ephemeral"}},
                ]},
            ],
            tools=[WEATHER],
            tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            stop_sequences=["END"], temperature=0.5, top_p=0.9, top_k=5, stream=True,
            metadata={"user_id": "u-1"}, service_tier="auto",
        )
    )  # fmt: skip
    call = ToolCall("toolu_1", "get_weather", '{"city": "Paris"}')
    assert gen.prompt == (
        ChatMessage("system", "Be brief.\nBe kind."),
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "Let me look.", (call,)),
        ChatMessage("tool", "Sunny", (), "toolu_1"),
        ChatMessage("tool", "Error: timeout", (), "toolu_2"),
        ChatMessage("user", "And so?"),
    )  # fmt: skip
    assert gen.sampling == {
        "max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "stop": ("END",)
    }  # fmt: skip
    assert gen.stream and gen.n == 1 and not gen.split_reasoning
    assert gen.tools is not None
    assert (gen.tools.choice, gen.tools.name, gen.tools.parallel) == (
        "required",
        "get_weather",
        False,
    )
    assert json.loads(gen.tools.functions[0].parameters) == CITY


@pytest.mark.parametrize(
    ("choice", "expected"),
    [(None, ("auto", None, True)), ({"type": "any"}, ("required", None, True)),
     ({"type": "none"}, ("none", None, True)), ({"type": "auto"}, ("auto", None, True))],
)  # fmt: skip
def test_tool_choice(choice: Any, expected: tuple[Any, ...]) -> None:
    tools = to_generation(body(tools=[WEATHER], tool_choice=choice)).tools
    assert isinstance(tools, Tools)
    assert (tools.choice, tools.name, tools.parallel) == expected


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
         "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "source": 1}]}]},
         "messages[0].content[0].source"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b",
                                                      "input": {}}]}]},
         "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "a",
             "content": [{"type": "image", "source": {}}]}]}]},
         "messages[0].content[0].content[0]"),
        ({"messages": [*HELLO, {"role": "assistant", "content": "The"}]}, "messages[1].role"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
        ({"tools": [WEATHER | {"name": "a b"}]}, "tools[0].name"),
        ({"tools": [WEATHER | {"input_schema": {"type": "string", "maxLength": 10**9}}]},
         "tools[0].input_schema"),
    ],
)  # fmt: skip
def test_what_is_not_served_is_refused_by_name(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        to_generation(body(**fields))
    assert caught.value.field == field


@pytest.mark.parametrize(
    "fields", [{"max_tokens": None}, {"top_logprobs": 2}, {"messages": [{"role": "system",
                                                                         "content": "x"}]}]
)  # fmt: skip
def test_the_model_refuses_unknown_and_missing_fields(fields: dict[str, Any]) -> None:
    raw = {"model": "m", "max_tokens": 8, "messages": HELLO} | fields
    with pytest.raises(ValidationError):
        MessagesRequest.model_validate({k: v for k, v in raw.items() if v is not None})


def test_errors_take_anthropics_shape_on_its_paths() -> None:
    assert is_anthropic("/v1/messages") and is_anthropic("/messages/count_tokens")
    assert not is_anthropic("/v1/chat/completions") and not is_anthropic("/v1/messagesx")
    mapping, shape, _ = http_error(
        InvalidRequestError("messages[0].role", "is bad"), anthropic=True
    )
    assert mapping.status == 400
    assert shape == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "messages[0].role: is bad"},
    }
    _, shape, headers = http_error(OverloadedError("busy", retry_after_s=2), anthropic=True)
    assert shape["error"]["type"] == "overloaded_error" and headers["retry-after"] == "2"


# -- the wire ---------------------------------------------------------------------------------


def events(raw: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for event in raw:
        name, data = event.decode().removesuffix("\n\n").split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == name.removeprefix("event: ")
        out.append((payload["type"], payload))
    return out


def test_a_stream_of_text_then_a_tool_call() -> None:
    wire = AnthropicWire(request_id="r1", model="m", stop_sequences=())
    raw = wire.begin(7)
    raw += wire.events(0, Chunk("Let", (1,)))
    raw += wire.events(0, Chunk(""))  # held back: nothing to send
    raw += wire.events(0, Chunk(" me", (2,)))
    raw += wire.events(0, Chunk("", (3,), tool_calls=(ToolCallDelta(0, "call_1", "f", '{"a"'),)))
    raw += wire.events(0, Chunk("", (4,), tool_calls=(ToolCallDelta(0, "", "", ": 1}"),)))
    raw += wire.events(0, Chunk("", (), FinishReason.TOOL_CALLS, Usage(7, 4)))
    raw += wire.end(Usage(7, 4))
    got = events(raw)
    assert [kind for kind, _ in got] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    start = got[0][1]["message"]
    assert start["id"] == "msg_r1" and start["content"] == [] and start["role"] == "assistant"
    assert start["usage"] == {"input_tokens": 7, "output_tokens": 0}
    assert got[1][1] == {"type": "content_block_start", "index": 0,
                         "content_block": {"type": "text", "text": ""}}  # fmt: skip
    assert got[3][1]["delta"] == {"type": "text_delta", "text": " me"}
    assert got[5][1]["index"] == 1
    assert got[5][1]["content_block"] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "f",
        "input": {},
    }
    parts = [p["delta"]["partial_json"] for k, p in got[6:8]]
    assert json.loads("".join(parts)) == {"a": 1}
    assert got[9][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 4},
    }


def test_a_stream_cut_short_ends_with_an_error_event() -> None:
    wire = AnthropicWire(request_id="r1", model="m", stop_sequences=())
    [(kind, payload)] = events(wire.failure(OverloadedError("busy", retry_after_s=1)))
    assert kind == "error" and payload["error"]["type"] == "overloaded_error"


def test_the_whole_message() -> None:
    wire = AnthropicWire(request_id="r2", model="m", stop_sequences=["END"])
    call = ToolCall("call_1", "f", '{"a": 1}')
    done = Completion(
        "Hi", FinishReason.STOP_SEQUENCE, Usage(5, 3), Timings(0, 0, None, 0, 0), "r2", (call,)
    )
    assert wire.whole([done]) == {
        "id": "msg_r2", "type": "message", "role": "assistant", "model": "m",
        "content": [{"type": "text", "text": "Hi"},
                    {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}],
        "stop_reason": "stop_sequence", "stop_sequence": "END",
        "usage": {"input_tokens": 5, "output_tokens": 3},
    }  # fmt: skip


# -- the official SDK, real replicas ----------------------------------------------------------


def client(gateway: Gateway, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0, timeout=60)


@pytest.mark.model
def test_a_message_and_its_stream(gateway: Gateway) -> None:
    sdk = client(gateway)
    ask: Any = {"model": MODEL, "max_tokens": 24, "extra_body": GREEDY, "messages": HELLO,
                "system": "You are terse."}  # fmt: skip
    whole = sdk.messages.create(**ask)
    assert whole.type == "message" and whole.role == "assistant" and whole.model == MODEL
    assert whole.id.startswith("msg_")
    assert whole.stop_reason in ("end_turn", "max_tokens") and whole.stop_sequence is None
    [text] = whole.content
    assert text.type == "text" and text.text
    assert whole.usage.input_tokens > 0 and 0 < whole.usage.output_tokens <= 24
    with sdk.messages.stream(**ask) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text.text  # greedy: the same answer
    assert final.content[0].type == "text" and final.content[0].text == text.text
    assert final.stop_reason == whole.stop_reason and final.usage == whole.usage


@pytest.mark.model
def test_a_stop_sequence_is_named(gateway: Gateway) -> None:
    """A word of the greedy answer, as a stop sequence, ends the same answer there."""
    sdk = client(gateway)
    ask: Any = {"model": MODEL, "max_tokens": 32, "extra_body": GREEDY, "messages": HELLO}
    [text] = sdk.messages.create(**ask).content
    assert text.type == "text"
    word = text.text.split()[len(text.text.split()) // 2]
    answer = sdk.messages.create(**ask, stop_sequences=["no such words", word])
    assert answer.stop_reason == "stop_sequence"
    assert answer.stop_sequence is None  # which of several matched is not known
    one = sdk.messages.create(**ask, stop_sequences=[word])
    assert (one.stop_reason, one.stop_sequence) == ("stop_sequence", word)
    assert one.content[0].type == "text" and word not in one.content[0].text


@pytest.mark.model
def test_a_tool_call_round_trip(gateway: Gateway) -> None:
    sdk = client(gateway)
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = sdk.messages.create(
        model=MODEL, max_tokens=64, extra_body=GREEDY, messages=messages, tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    )  # fmt: skip
    assert first.stop_reason == "tool_use"
    [call] = [b for b in first.content if b.type == "tool_use"]
    assert call.name == "get_weather"
    jsonschema.validate(call.input, CITY)
    with sdk.messages.stream(
        model=MODEL,
        max_tokens=64,
        extra_body=GREEDY,
        messages=messages,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    ) as stream:
        streamed = stream.get_final_message()
    [streamed_call] = [b for b in streamed.content if b.type == "tool_use"]
    assert streamed_call.input == call.input and streamed.stop_reason == "tool_use"  # greedy
    messages.append({"role": "assistant", "content": first.content})  # as clients do
    messages.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 24 C"},
    ]})  # fmt: skip
    final = sdk.messages.create(
        model=MODEL, max_tokens=32, extra_body=GREEDY, messages=messages, tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "none"},
    )  # fmt: skip
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in final.content] == ["text"] and final.content[0].text  # type: ignore[union-attr]


@pytest.mark.model
def test_count_tokens(gateway: Gateway) -> None:
    sdk = client(gateway)
    counted = sdk.messages.count_tokens(model=MODEL, messages=HELLO, system="You are terse.")  # type: ignore[arg-type]
    answer = sdk.messages.create(
        model=MODEL,
        max_tokens=1,
        messages=HELLO,
        system="You are terse.",  # type: ignore[arg-type]
    )
    assert counted.input_tokens == answer.usage.input_tokens
    with_tools = sdk.messages.count_tokens(model=MODEL, messages=HELLO, tools=[WEATHER])  # type: ignore[arg-type,list-item]
    assert (
        with_tools.input_tokens
        > sdk.messages.count_tokens(model=MODEL, messages=HELLO).input_tokens
    )  # type: ignore[arg-type]


@pytest.mark.model
def test_errors(gateway: Gateway) -> None:
    sdk = client(gateway)
    with pytest.raises(anthropic.BadRequestError) as bad:
        sdk.messages.create(
            model=MODEL, max_tokens=4, messages=HELLO,  # type: ignore[arg-type]
            extra_body={"frequency_penalty": 1},
        )  # fmt: skip
    assert "frequency_penalty" in str(bad.value)
    assert bad.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": bad.value.body["error"]["message"]},  # type: ignore[index]
    }
    with pytest.raises(anthropic.BadRequestError, match=r"messages\[0\]\.content\[0\]"):
        sdk.messages.create(
            model=MODEL, max_tokens=4,
            messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}],
        )  # fmt: skip
    with pytest.raises(anthropic.NotFoundError, match="nope"):
        sdk.messages.create(model="nope", max_tokens=4, messages=HELLO)  # type: ignore[arg-type]
    with pytest.raises(anthropic.AuthenticationError):
        client(gateway, key="sk-wrong").messages.create(model=MODEL, max_tokens=4, messages=HELLO)  # type: ignore[arg-type]
    # The metrics count these routes.
    for status in ("400", "401", "404"):
        labels = {"route": "/v1/messages", "status": status, "model": "-"}
        assert gateway.metric("llm_gateway_requests_total", **labels)
