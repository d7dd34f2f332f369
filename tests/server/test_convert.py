"""Protobuf <-> engine types."""

from __future__ import annotations

import pytest

from llm_service.api.v1 import llm_pb2 as pb
from llm_service.engine import (
    ChatMessage,
    Finished,
    FinishReason,
    SamplingParams,
    Started,
    Timings,
    TokenDelta,
    Usage,
)
from llm_service.errors import InvalidRequestError
from llm_service.server import convert
from llm_service.types import TokenLogprob, ToolCall, ToolCallDelta


def test_unset_sampling_fields_keep_the_engine_defaults() -> None:
    assert convert.sampling_params(pb.SamplingParams()) == SamplingParams()


def test_set_sampling_fields_override_even_when_zero() -> None:
    msg = pb.SamplingParams(
        max_tokens=7, temperature=0, top_k=0, seed=0, stop=["\n", "END"], grammar='root ::= "a"'
    )
    params = convert.sampling_params(msg)
    assert params == SamplingParams(
        max_tokens=7, temperature=0, top_k=0, seed=0, stop=("\n", "END"), grammar='root ::= "a"'
    )
    assert convert.sampling_params(pb.SamplingParams(json_schema="{}")).json_schema == "{}"


def test_logit_bias_becomes_sorted_pairs() -> None:
    msg = pb.SamplingParams(logit_bias={42: -100.0, 7: 2.5})
    assert convert.sampling_params(msg).logit_bias == ((7, 2.5), (42, -100.0))
    with pytest.raises(InvalidRequestError, match=r"sampling\.logit_bias"):
        convert.sampling_params(pb.SamplingParams(logit_bias={7: 200.0}))


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (pb.SamplingParams(top_p=float("nan")), "sampling.top_p"),
        (pb.SamplingParams(max_tokens=-3), "sampling.max_tokens"),
        (pb.SamplingParams(seed=-1), "sampling.seed"),
        (pb.SamplingParams(stop=["x", ""]), "sampling.stop"),
        (pb.SamplingParams(json_schema="{"), "sampling.json_schema"),
    ],
)
def test_bad_sampling_names_the_field(msg: pb.SamplingParams, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        convert.sampling_params(msg)
    assert info.value.field == field


def test_prompt_and_chat_requests() -> None:
    req = convert.generation_request(pb.GenerateRequest(prompt="Hi"), request_id="r", deadline=5.0)
    assert (req.prompt, req.request_id, req.deadline) == ("Hi", "r", 5.0)
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="Hello")])
    req = convert.generation_request(pb.GenerateRequest(chat=chat), request_id="r", deadline=None)
    assert req.messages == (ChatMessage("user", "Hello"),)


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (pb.GenerateRequest(), "input"),
        (pb.GenerateRequest(prompt=""), "prompt"),
        (pb.GenerateRequest(chat=pb.Chat()), "messages"),
        (
            pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="robot", content="x")])),
            "messages[0].role",
        ),
    ],
)
def test_bad_input_names_the_field(msg: pb.GenerateRequest, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        convert.generation_request(msg, request_id="r", deadline=None)
    assert info.value.field == field


@pytest.mark.parametrize(
    "request_id", ["", "x" * 129, "tab\there", "naïve", "a] backend 10.0.0.1 ejected", "a b"]
)
def test_request_ids_follow_the_one_rule(request_id: str) -> None:
    """The gateway's rule too (an unsafe X-Request-Id is replaced there): nothing that could
    forge a log line."""
    with pytest.raises(InvalidRequestError, match="request_id: must be 1 to 128 characters"):
        convert.check_request_id(request_id)
    assert convert.check_request_id("trace-4711:a.b_c") == "trace-4711:a.b_c"


def test_events() -> None:
    started = convert.event_message(Started("r", 3, 1.5, 0))
    assert started.started.request_id == "r" and started.started.prompt_tokens == 3
    delta = convert.event_message(TokenDelta((5, 6), "ab"))
    assert list(delta.delta.token_ids) == [5, 6] and delta.delta.text == "ab"
    timings = Timings(1.0, 2.0, None, 0.0, 4.0)
    done = convert.event_message(Finished("r", FinishReason.LENGTH, "ab", Usage(3, 2), timings))
    assert done.done.finish_reason == pb.FINISH_REASON_LENGTH
    assert done.done.usage.total_tokens == 5
    assert not done.done.timings.HasField("time_to_first_token_ms")


def test_only_successful_finish_reasons_have_a_done_event() -> None:
    assert set(convert.FINISH_REASONS) == {
        FinishReason.STOP,
        FinishReason.LENGTH,
        FinishReason.STOP_SEQUENCE,
        FinishReason.TOOL_CALLS,
    }
    assert len(set(convert.FINISH_REASONS.values())) == 4


def test_a_chat_with_tools() -> None:
    chat = pb.Chat(
        messages=[
            pb.ChatMessage(role="user", content="Weather?"),
            pb.ChatMessage(role="assistant", tool_calls=[
                pb.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Oslo"}')]),
            pb.ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
        ],
        tools=[pb.Tool(name="get_weather", description="The weather"), pb.Tool(name="now")],
        tool_name="now", parallel_tool_calls=False, split_reasoning=False,
    )  # fmt: skip
    request = convert.generation_request(
        pb.GenerateRequest(chat=chat), request_id="r", deadline=None
    )
    assert [t.name for t in request.tools] == ["get_weather", "now"]
    assert request.tools[1].parameters == '{"type": "object", "properties": {}}'
    assert (request.tool_choice, request.tool_name) == ("required", "now")
    assert not request.parallel_tool_calls and not request.split_reasoning
    assert request.messages is not None
    assert request.messages[1].tool_calls[0].arguments == '{"city": "Oslo"}'
    assert request.messages[2].tool_call_id == "call_1"
    plain = convert.generation_request(
        pb.GenerateRequest(chat=pb.Chat(messages=chat.messages[:1])), request_id="r", deadline=None
    )
    assert (plain.tool_choice, plain.parallel_tool_calls, plain.split_reasoning) == (
        "auto", True, True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("tools", "field"),
    [([pb.Tool(name="bad name")], "chat.tools[0].name"),
     ([pb.Tool(name="f", parameters="{")], "chat.tools[0].parameters"),
     ([pb.Tool(name="f"), pb.Tool(name="f")], "chat.tools")],
)  # fmt: skip
def test_bad_tools_name_the_field(tools: list[pb.Tool], field: str) -> None:
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="Hi")], tools=tools)
    with pytest.raises(InvalidRequestError) as err:
        convert.generation_request(pb.GenerateRequest(chat=chat), request_id="r", deadline=None)
    assert err.value.field == field


def test_a_delta_with_calls_logprobs_and_reasoning() -> None:
    top = (TokenLogprob(7, b"a", -0.1), TokenLogprob(8, b"\xe2", -2.5))
    event = TokenDelta(
        (7,), "a", (ToolCallDelta(0, "call_1", "f", "{"),),
        (TokenLogprob(7, b"a", -0.1, top),), "why",
    )  # fmt: skip
    delta = convert.event_message(event).delta
    assert (delta.text, delta.reasoning) == ("a", "why")
    assert (delta.tool_calls[0].id, delta.tool_calls[0].arguments) == ("call_1", "{")
    assert delta.logprobs[0].top[1].piece == b"\xe2"
    done = Finished(
        "r", FinishReason.TOOL_CALLS, "", Usage(1, 2), Timings(1.0, 2.0, None, 0.0, 4.0),
        tool_calls=(ToolCall("c", "f", "{}"),),
        reasoning="why",
    )  # fmt: skip
    message = convert.event_message(done).done
    assert message.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert (message.tool_calls[0].name, message.reasoning) == ("f", "why")
