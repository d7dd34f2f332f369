"""The OpenAI wire format: request bodies to backend requests, chunks to OpenAI objects."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pydantic
import pytest

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
from llm_service.errors import InvalidRequestError
from llm_service.gateway import openai
from llm_service.gateway.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseBuilder,
    invalid_request,
    to_generation,
)

TIMINGS = Timings(
    queue_wait_ms=1.0,
    prefill_ms=2.0,
    time_to_first_token_ms=3.0,
    decode_tokens_per_s=40.0,
    total_ms=50.0,
)


def chat(**fields: Any) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    return ChatCompletionRequest.model_validate(body | fields)


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "Once"} | fields)


def refusal(body: ChatCompletionRequest | CompletionRequest) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        to_generation(body)
    return info.value


# -- sampling -------------------------------------------------------------------------------


def test_unset_sampling_stays_unset() -> None:
    gen = to_generation(chat())
    assert gen.sampling == {}
    assert gen.prompt == (ChatMessage("user", "Hi"),)
    assert gen.stream is False
    assert gen.include_usage is False


def test_sampling_parameters_are_passed_on() -> None:
    gen = to_generation(
        chat(
            max_tokens=7,
            temperature=0.5,
            top_p=0.9,
            seed=42,
            presence_penalty=0.5,
            frequency_penalty=-1.0,
            stop=["\n", "END"],
        )
    )
    assert gen.sampling == {
        "max_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 42,
        "presence_penalty": 0.5,
        "frequency_penalty": -1.0,
        "stop": ("\n", "END"),
    }


def test_zero_values_are_passed_not_dropped() -> None:
    gen = to_generation(chat(temperature=0.0, seed=0, presence_penalty=0.0))
    assert gen.sampling == {"temperature": 0.0, "seed": 0, "presence_penalty": 0.0}


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert to_generation(chat(max_tokens=7, max_completion_tokens=3)).sampling == {"max_tokens": 3}
    assert to_generation(chat(max_completion_tokens=5)).sampling == {"max_tokens": 5}


def test_a_stop_string_becomes_a_one_tuple() -> None:
    assert to_generation(chat(stop="END")).sampling == {"stop": ("END",)}
    assert to_generation(completion(stop=["a", "b"])).sampling == {"stop": ("a", "b")}


def test_stream_options_count_only_when_streaming() -> None:
    options = {"include_usage": True}
    streamed = to_generation(chat(stream=True, stream_options=options))
    assert streamed.stream is True and streamed.include_usage is True
    whole = to_generation(chat(stream=False, stream_options=options))
    assert whole.stream is False and whole.include_usage is False
    assert to_generation(chat(stream=True)).include_usage is False


@pytest.mark.parametrize("build", [chat, completion])
@pytest.mark.parametrize("seed", [-1, -2, -(2**40)])
def test_a_negative_seed_samples_at_random(build: Any, seed: int) -> None:
    gen = to_generation(build(seed=seed, temperature=0.5))
    assert gen.sampling == {"temperature": 0.5}


@pytest.mark.parametrize("build", [chat, completion])
@pytest.mark.parametrize(
    ("seed", "sent"),
    [
        (7, 7),
        (0, 0),
        (2**32 - 2, 2**32 - 2),  # llama.cpp's largest seed
        (2**32 - 1, 0),  # llama.cpp's "random" is folded away
        (2**40, 2**40 % (2**32 - 1)),
    ],
)
def test_a_seed_is_folded_into_llama_cpps_range(build: Any, seed: int, sent: int) -> None:
    assert to_generation(build(seed=seed)).sampling == {"seed": sent}


# -- response_format -------------------------------------------------------------------------


def test_json_object_asks_for_any_object() -> None:
    gen = to_generation(chat(response_format={"type": "json_object"}))
    assert json.loads(gen.sampling["json_schema"]) == {"type": "object"}


def test_json_schema_passes_its_schema_as_json_text() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    gen = to_generation(chat(response_format=fmt))
    assert isinstance(gen.sampling["json_schema"], str)
    assert json.loads(gen.sampling["json_schema"]) == schema


def test_text_format_asks_for_no_schema() -> None:
    assert to_generation(chat(response_format={"type": "text"})).sampling == {}


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "answer"}},
        {"type": "json_schema", "json_schema": {"name": "answer", "schema": {}}},
    ],
)
def test_json_schema_without_a_schema_is_refused(fmt: dict[str, Any]) -> None:
    assert refusal(chat(response_format=fmt)).field == "response_format.json_schema"


# -- what is not served ----------------------------------------------------------------------


def test_n_choices_get_seeds_of_their_own() -> None:
    gen = to_generation(chat(n=3, seed=7))
    assert gen.n == 3
    assert [gen.choice_sampling(i)["seed"] for i in range(3)] == [7, 8, 9]
    assert to_generation(chat(n=2)).choice_sampling(1) == {}  # no seed: each at random
    with pytest.raises(pydantic.ValidationError) as info:
        chat(n=9)
    assert invalid_request(info.value.errors()).field == "n"


def test_logprobs_ask_for_alternatives() -> None:
    assert to_generation(chat(logprobs=True)).sampling == {"logprobs": 0}
    assert to_generation(chat(logprobs=True, top_logprobs=5)).sampling == {"logprobs": 5}
    assert to_generation(completion(logprobs=3)).sampling == {"logprobs": 3}
    assert to_generation(chat(logprobs=False)).sampling == {}
    assert refusal(chat(top_logprobs=2)).field == "top_logprobs"  # without logprobs: true
    for body in ({"logprobs": True, "top_logprobs": 21}, {"logprobs": True, "top_logprobs": -1}):
        with pytest.raises(pydantic.ValidationError) as info:
            chat(**body)
        assert invalid_request(info.value.errors()).field == "top_logprobs"


def test_echo_and_suffix_are_refused() -> None:
    assert refusal(completion(echo=True)).field == "echo"
    assert refusal(completion(suffix="end")).field == "suffix"
    assert to_generation(completion(echo=False)).prompt == "Once"


# -- messages --------------------------------------------------------------------------------


def test_roles_map_to_the_backends_roles() -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]
    gen = to_generation(chat(messages=messages))
    assert gen.prompt == (
        ChatMessage("system", "Be brief."),
        ChatMessage("system", "Be kind."),
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", ""),
        ChatMessage("tool", "42", tool_call_id="call_1"),
    )


def test_an_unknown_role_is_refused_naming_the_message() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "wizard", "content": "Zap"}]
    error = refusal(chat(messages=messages))
    assert error.field == "messages[1].role"
    assert "wizard" in str(error)


def test_text_parts_are_joined() -> None:
    content = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    gen = to_generation(chat(messages=[{"role": "user", "content": content}]))
    assert gen.prompt == (ChatMessage("user", "Hello, world"),)


def test_an_image_part_is_refused_naming_the_part() -> None:
    content = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    error = refusal(chat(messages=[{"role": "user", "content": content}]))
    assert error.field == "messages[0].content[0]"
    assert "image_url" in str(error)


def test_the_part_at_fault_is_named() -> None:
    content = [{"type": "text", "text": "Look: "}, {"type": "input_audio", "input_audio": {}}]
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": content}]
    assert refusal(chat(messages=messages)).field == "messages[1].content[1]"


# -- prompts ---------------------------------------------------------------------------------


def test_a_completion_prompt_is_passed_as_text() -> None:
    gen = to_generation(completion(prompt="Once upon", max_tokens=4))
    assert gen.prompt == "Once upon"
    assert gen.sampling == {"max_tokens": 4}


def test_a_list_of_one_prompt_is_served() -> None:
    assert to_generation(completion(prompt=["Once upon"])).prompt == "Once upon"


def test_a_list_of_two_prompts_is_refused() -> None:
    error = refusal(completion(prompt=["a", "b"]))
    assert error.field == "prompt"
    assert "2" in str(error)


# -- validation errors -----------------------------------------------------------------------


def validation_errors(model: type[pydantic.BaseModel], body: dict[str, Any]) -> list[Any]:
    """The errors of ``body`` with ``body`` first in each ``loc``, as FastAPI reports them."""
    with pytest.raises(pydantic.ValidationError) as info:
        model.model_validate(body)
    return [dict(e, loc=("body", *e["loc"])) for e in info.value.errors()]


CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (CHAT | {"temperature": "hot"}, "temperature"),
        (CHAT | {"temperature": 3}, "temperature"),
        (CHAT | {"stop": 5}, "stop"),
        (CHAT | {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (CHAT | {"messages": [{"content": "Hi"}]}, "messages[0].role"),
        (CHAT | {"messages": []}, "messages"),
        (CHAT | {"response_format": {"type": "xml"}}, "response_format.type"),
    ],
)
def test_a_validation_error_names_the_field(body: dict[str, Any], param: str) -> None:
    error = invalid_request(validation_errors(ChatCompletionRequest, body))
    assert error.field == param
    assert str(error).startswith(f"{param}: ")


def test_a_missing_field_is_required() -> None:
    errors = validation_errors(ChatCompletionRequest, {"messages": CHAT["messages"]})
    error = invalid_request(errors)
    assert error.field == "model"
    assert str(error) == "model: is required"


def test_a_missing_completion_prompt_is_required() -> None:
    error = invalid_request(validation_errors(CompletionRequest, {"model": "m"}))
    assert str(error) == "prompt: is required"


def test_types_are_strict() -> None:
    error = invalid_request(validation_errors(ChatCompletionRequest, CHAT | {"temperature": "0.5"}))
    assert error.field == "temperature"
    with pytest.raises(pydantic.ValidationError):
        ChatCompletionRequest.model_validate(CHAT | {"max_tokens": "7"})
    with pytest.raises(pydantic.ValidationError):
        ChatCompletionRequest.model_validate(CHAT | {"stream": "true"})


def test_an_int_is_accepted_for_a_float() -> None:
    assert ChatCompletionRequest.model_validate(CHAT | {"temperature": 1}).temperature == 1.0


def test_an_unknown_field_is_refused_by_name() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        chat(temprature=0.5)
    error = invalid_request(info.value.errors())
    assert error.field == "temprature"
    assert "not a parameter of this endpoint" in str(error)
    with pytest.raises(pydantic.ValidationError) as nested:
        chat(messages=[{"role": "user", "content": "Hi", "colour": "red"}])
    assert invalid_request(nested.value.errors()).field == "messages[0].colour"


# Every field of OpenAI's request bodies that asks for something not served, with a value that
# asks for it: each is refused with a 400 naming the field.
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
UNSERVED_CHAT = [
    ("tools", [{"type": "custom", "custom": {"name": "f"}}]),
    ("tool_choice", "required"),  # with no tools
    ("tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("functions", [TOOL["function"]]),
    ("function_call", "auto"),
    ("modalities", ["text", "audio"]),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}),
    ("reasoning_effort", "low"),
    ("verbosity", "low"),
    ("moderation", {"model": "omni-moderation-latest"}),
]


@pytest.mark.parametrize(("field", "value"), UNSERVED_CHAT)
def test_a_chat_field_that_is_not_served_is_refused_by_name(field: str, value: Any) -> None:
    assert refusal(chat(**{field: value})).field.startswith(field)


@pytest.mark.parametrize(("field", "value"), [("best_of", 2)])
def test_a_completion_field_that_is_not_served_is_refused_by_name(field: str, value: Any) -> None:
    assert refusal(completion(**{field: value})).field == field


@pytest.mark.parametrize(
    ("role", "field", "value"),
    [("user", "tool_calls", [{"id": "call_1", "type": "function",
                              "function": {"name": "f", "arguments": "{}"}}]),
     ("assistant", "tool_call_id", "call_1"), ("assistant", "function_call", {"name": "f"}),
     ("assistant", "audio", {"id": "a"})],
)  # fmt: skip
def test_a_message_field_out_of_place_or_not_served_is_refused(
    role: str, field: str, value: Any
) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": role, "content": "", field: value}]
    assert refusal(chat(messages=messages)).field == f"messages[1].{field}"


def test_a_tool_message_needs_the_call_it_answers() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}]
    assert refusal(chat(messages=messages)).field == "messages[1].tool_call_id"


# -- tools -----------------------------------------------------------------------------------


def test_tools_and_their_choice_are_passed_on() -> None:
    gen = to_generation(chat(tools=[TOOL]))
    assert gen.tools is not None and gen.tools.choice == "auto" and gen.tools.parallel
    assert [(t.name, t.parameters) for t in gen.tools.functions] == [("f", '{"type": "object"}')]
    named = to_generation(
        chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}})
    )
    assert named.tools is not None and (named.tools.choice, named.tools.name) == ("required", "f")
    single = to_generation(chat(tools=[TOOL], tool_choice="required", parallel_tool_calls=False))
    assert single.tools is not None and single.tools.choice == "required"
    assert not single.tools.parallel
    assert to_generation(chat(tools=[TOOL], tool_choice="none")).tools.choice == "none"  # type: ignore[union-attr]


def test_a_history_with_tool_calls_is_passed_on() -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "f", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    prompt = to_generation(chat(messages=messages, tools=[TOOL])).prompt
    assert prompt[1] == ChatMessage(  # type: ignore[index]
        "assistant", "", (ToolCall("call_1", "f", '{"city": "Paris"}'),)
    )
    assert prompt[2] == ChatMessage("tool", "sunny", tool_call_id="call_1")  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "param"),
    [({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
      "tool_choice.function.name"),
     ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
      "tools[0].function.name"),
     ({"tools": [TOOL], "logprobs": True}, "logprobs")],
)  # fmt: skip
def test_bad_tool_requests_are_refused_naming_the_field(body: dict[str, Any], param: str) -> None:
    assert refusal(chat(**body)).field == param


def test_values_that_ask_for_nothing_unserved_are_served() -> None:
    """What clients send by default: no tool, text only, labels for OpenAI's own services."""
    body = chat(
        tools=[], tool_choice="none", parallel_tool_calls=False, functions=[], function_call="none",
        modalities=["text"], logit_bias={}, metadata={"a": "b"}, store=False,
        service_tier="auto", prompt_cache_key="k", safety_identifier="s", user="u",
        prompt_cache_retention="24h", prompt_cache_options={},
        stream=True, stream_options={"include_usage": True, "include_obfuscation": False},
        messages=[{"role": "user", "content": "Hi", "name": "ann"},
                  {"role": "assistant", "content": "Hello", "refusal": None, "tool_calls": [],
                   "annotations": []}],
    )  # fmt: skip
    generation = to_generation(body)
    assert generation.sampling == {} and generation.include_usage
    assert to_generation(completion(best_of=1)).sampling == {}


def test_logit_bias_is_passed_by_token_id() -> None:
    assert to_generation(chat(logit_bias={"42": -100, "7": 2.5})).sampling == {
        "logit_bias": {42: -100, 7: 2.5}
    }


@pytest.mark.parametrize(
    ("bias", "param"),
    [({"hello": 1}, "logit_bias.hello"), ({"²": 1}, "logit_bias.²"), ({"07": 1}, "logit_bias.07"),
     ({"1" * 11: 1}, "logit_bias." + "1" * 11), ({"5": 101}, "logit_bias.5"),
     ({"5": -100.5}, "logit_bias.5"), ({str(i): 1 for i in range(1025)}, "logit_bias")],
)  # fmt: skip
def test_a_bad_logit_bias_is_refused_naming_it(bias: dict[str, Any], param: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        completion(logit_bias=bias)
    assert invalid_request(info.value.errors()).field == param


def test_a_refusal_in_the_history_is_its_text() -> None:
    messages = [
        {"role": "user", "content": "Do it."},
        {"role": "assistant", "content": None, "refusal": "I cannot."},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
    ]
    prompt = to_generation(chat(messages=messages)).prompt
    assert [m.content for m in prompt] == ["Do it.", "I cannot.", "No."]  # type: ignore[union-attr]


def test_llama_cpps_sampling_parameters_are_served() -> None:
    """As llama-server and vLLM accept them on the same endpoints."""
    body = chat(top_k=20, min_p=0.1, repeat_penalty=1.1, grammar='root ::= "yes" | "no"')
    assert to_generation(body).sampling == {
        "top_k": 20, "min_p": 0.1, "repeat_penalty": 1.1, "grammar": 'root ::= "yes" | "no"',
    }  # fmt: skip
    assert to_generation(completion(top_k=0)).sampling == {"top_k": 0}
    fmt = {"type": "json_object"}
    assert refusal(chat(grammar="root ::= x", response_format=fmt)).field == "grammar"


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("body", "temperature"), "temperature"),
        (("body", "stop", "list[str]", 1), "stop[1]"),
        (
            ("body", "messages", 0, "content", "list[ContentPart]", 2, "text"),
            "messages[0].content[2].text",
        ),
        (
            ("body", "response_format", "json_schema", "schema"),
            "response_format.json_schema.schema",
        ),
        (("body", "logprobs", "int"), "logprobs"),
        (("body",), "body"),
    ],
)
def test_the_param_is_built_from_the_location(loc: tuple[Any, ...], param: str) -> None:
    error = invalid_request([{"loc": loc, "type": "string_type", "msg": "Input is wrong"}])
    assert error.field == param
    assert str(error) == f"{param}: input is wrong"


def test_a_hand_built_missing_error_is_required() -> None:
    error = invalid_request(
        [{"loc": ("body", "model"), "type": "missing", "msg": "Field required"}]
    )
    assert str(error) == "model: is required"


def test_only_the_first_error_is_reported() -> None:
    errors = [
        {"loc": ("body", "model"), "type": "missing", "msg": "Field required"},
        {"loc": ("body", "temperature"), "type": "float_type", "msg": "Input should be a number"},
    ]
    assert invalid_request(errors).field == "model"


def test_bad_json_names_the_body() -> None:
    errors = [
        {
            "loc": ("body", 7),
            "type": "json_invalid",
            "msg": "JSON decode error",
            "ctx": {"error": "Expecting value"},
        }
    ]
    error = invalid_request(errors)
    assert error.field == "body"
    assert "Expecting value" in str(error)


def test_no_errors_still_names_the_body() -> None:
    assert invalid_request([]).field == "body"


# -- responses -------------------------------------------------------------------------------


@pytest.fixture
def ticking_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``time.time`` in the openai module moves one second per call."""
    ticks = iter(range(1_700_000_000, 1_800_000_000))

    class Time:
        @staticmethod
        def time() -> float:
            return float(next(ticks))

    monkeypatch.setattr(openai, "time", Time)
    yield


def text_chunk(text: str) -> Chunk:
    return Chunk(text, (1,))


def final_chunk(reason: FinishReason = FinishReason.STOP) -> Chunk:
    return Chunk("", (), reason, Usage(5, 2), TIMINGS)


@pytest.mark.usefixtures("ticking_clock")
def test_every_chat_chunk_has_the_same_head() -> None:
    builder = ResponseBuilder(chat=True, request_id="req-1", model="SmolLM2")
    chunks = [
        builder.chunk(text_chunk("Hel"), include_usage=False),
        builder.chunk(text_chunk("lo"), include_usage=False),
        builder.chunk(final_chunk(), include_usage=False),
    ]
    heads = {(c["id"], c["object"], c["created"], c["model"]) for c in chunks}
    assert heads == {("chatcmpl-req-1", "chat.completion.chunk", chunks[0]["created"], "SmolLM2")}
    assert all("usage" not in c for c in chunks)


def test_chat_chunks_carry_the_role_first_and_an_empty_delta_last() -> None:
    builder = ResponseBuilder(chat=True, request_id="r", model="m")
    first = builder.chunk(text_chunk("Hel"), include_usage=False)
    second = builder.chunk(text_chunk("lo"), include_usage=False)
    last = builder.chunk(final_chunk(), include_usage=False)
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "Hel"},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert second["choices"][0]["delta"] == {"content": "lo"}
    assert second["choices"][0]["finish_reason"] is None
    assert last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] == "stop"


def test_a_stream_that_ends_at_once_still_sends_the_role() -> None:
    builder = ResponseBuilder(chat=True, request_id="r", model="m")
    only = builder.chunk(final_chunk(FinishReason.LENGTH), include_usage=False)
    assert only["choices"][0]["delta"]["role"] == "assistant"
    assert only["choices"][0]["finish_reason"] == "length"


def test_include_usage_adds_a_null_usage_and_a_last_usage_chunk() -> None:
    builder = ResponseBuilder(chat=True, request_id="r", model="m")
    chunk = builder.chunk(text_chunk("Hi"), include_usage=True)
    assert "usage" in chunk and chunk["usage"] is None
    usage = builder.usage_chunk(Usage(5, 2))
    assert usage["id"] == chunk["id"] and usage["created"] == chunk["created"]
    assert usage["object"] == "chat.completion.chunk"
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (FinishReason.STOP, "stop"),
        (FinishReason.STOP_SEQUENCE, "stop"),
        (FinishReason.LENGTH, "length"),
    ],
)
def test_finish_reasons_are_openais(reason: FinishReason, expected: str) -> None:
    builder = ResponseBuilder(chat=True, request_id="r", model="m")
    builder.chunk(text_chunk("Hi"), include_usage=False)
    last = builder.chunk(final_chunk(reason), include_usage=False)
    assert last["choices"][0]["finish_reason"] == expected
    done = Completion("Hi", reason, Usage(5, 2), TIMINGS, "r")
    assert builder.completion([done])["choices"][0]["finish_reason"] == expected


@pytest.mark.usefixtures("ticking_clock")
def test_text_chunks_carry_text() -> None:
    builder = ResponseBuilder(chat=False, request_id="req-2", model="m")
    first = builder.chunk(text_chunk("Once"), include_usage=False)
    last = builder.chunk(final_chunk(FinishReason.LENGTH), include_usage=True)
    for c in (first, last):
        assert (c["id"], c["object"], c["created"]) == (
            "cmpl-req-2",
            "text_completion",
            1_700_000_000,
        )
    assert first["choices"] == [
        {"index": 0, "text": "Once", "logprobs": None, "finish_reason": None}
    ]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["usage"] is None
    assert builder.usage_chunk(Usage(1, 1))["object"] == "text_completion"


def test_a_chat_completion_object() -> None:
    builder = ResponseBuilder(chat=True, request_id="abc", model="SmolLM2")
    done = Completion("Hello!", FinishReason.STOP_SEQUENCE, Usage(5, 2), TIMINGS, "abc")
    obj = builder.completion([done])
    assert obj["id"] == "chatcmpl-abc"
    assert obj["object"] == "chat.completion"
    assert obj["model"] == "SmolLM2"
    assert isinstance(obj["created"], int)
    assert obj["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert obj["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_a_text_completion_object() -> None:
    builder = ResponseBuilder(chat=False, request_id="abc", model="m")
    done = Completion(" upon a time", FinishReason.LENGTH, Usage(2, 4), TIMINGS, "abc")
    obj = builder.completion([done])
    assert obj["id"] == "cmpl-abc"
    assert obj["object"] == "text_completion"
    assert obj["choices"] == [
        {"index": 0, "text": " upon a time", "logprobs": None, "finish_reason": "length"}
    ]
    assert obj["usage"]["total_tokens"] == 6
    json.dumps(obj)  # JSON-serialisable as it is


# -- tool calls and log probabilities in the answer ------------------------------------------

LP = TokenLogprob(5, b"Hi", -0.5, (TokenLogprob(5, b"Hi", -0.5), TokenLogprob(6, b"\xe2", -1.5)))


def test_tool_calls_make_a_message_with_no_content() -> None:
    builder = ResponseBuilder(chat=True, request_id="abc", model="m")
    call = ToolCall("call_1", "f", '{"a": 1}')
    done = Completion("", FinishReason.TOOL_CALLS, Usage(2, 4), TIMINGS, "abc", (call,))
    choice = builder.completion([done])["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]


def test_streamed_tool_calls_are_openais_pieces() -> None:
    builder = ResponseBuilder(chat=True, request_id="abc", model="m")
    first = builder.chunk(Chunk("", tool_calls=(ToolCallDelta(0, "call_1", "f", ""),)),
                          include_usage=False)  # fmt: skip
    later = builder.chunk(Chunk("", tool_calls=(ToolCallDelta(0, arguments='{"a"'),)),
                          include_usage=False)  # fmt: skip
    assert first["choices"][0]["delta"] == {
        "role": "assistant", "content": None,
        "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                        "function": {"name": "f", "arguments": ""}}],
    }  # fmt: skip
    assert later["choices"][0]["delta"] == {
        "tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]
    }


def test_chat_logprobs_list_tokens_bytes_and_alternatives() -> None:
    builder = ResponseBuilder(chat=True, request_id="abc", model="m", logprobs=True)
    done = Completion("Hi", FinishReason.STOP, Usage(2, 1), TIMINGS, "abc", logprobs=(LP,))
    logprobs = builder.completion([done])["choices"][0]["logprobs"]
    assert logprobs == {"content": [{
        "token": "Hi", "logprob": -0.5, "bytes": [72, 105],
        "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                         {"token": "\ufffd", "logprob": -1.5, "bytes": [226]}],
    }], "refusal": None}  # fmt: skip
    streamed = builder.chunk(Chunk("Hi", (5,), logprobs=(LP,)), include_usage=False)
    assert streamed["choices"][0]["logprobs"] == logprobs


def test_completion_logprobs_are_the_legacy_columns() -> None:
    builder = ResponseBuilder(chat=False, request_id="abc", model="m", logprobs=True)
    one = builder.chunk(Chunk("Hi", (5,), logprobs=(LP,)), include_usage=False)
    two = builder.chunk(Chunk("Hi", (5,), logprobs=(LP,)), include_usage=False)
    assert one["choices"][0]["logprobs"] == {
        "tokens": ["Hi"], "token_logprobs": [-0.5],
        "top_logprobs": [{"Hi": -0.5, "\ufffd": -1.5}], "text_offset": [0],
    }  # fmt: skip
    assert two["choices"][0]["logprobs"]["text_offset"] == [2]  # counts on


def test_n_choices_are_indexed_and_share_their_prompt_in_the_usage() -> None:
    builder = ResponseBuilder(chat=True, request_id="abc", model="m")
    a = Completion("A", FinishReason.STOP, Usage(3, 1), TIMINGS, "abc")
    b = Completion("B", FinishReason.LENGTH, Usage(3, 2), TIMINGS, "abc")
    obj = builder.completion([a, b])
    assert [(c["index"], c["message"]["content"]) for c in obj["choices"]] == [(0, "A"), (1, "B")]
    assert obj["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert builder.chunk(Chunk("x"), include_usage=False, index=1)["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "x",
    }


def test_reasoning_is_reasoning_content() -> None:
    builder = ResponseBuilder(chat=True, request_id="abc", model="m")
    done = Completion("4.", FinishReason.STOP, Usage(2, 4), TIMINGS, "abc", reasoning="2 + 2")
    assert builder.completion([done])["choices"][0]["message"]["reasoning_content"] == "2 + 2"
    first = builder.chunk(Chunk("", reasoning="2 +"), include_usage=False)
    later = builder.chunk(Chunk("", reasoning=" 2"), include_usage=False)
    assert first["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
        "reasoning_content": "2 +",
    }
    assert later["choices"][0]["delta"] == {"reasoning_content": " 2"}
    assert to_generation(chat()).split_reasoning
    assert not to_generation(chat(reasoning_format="none")).split_reasoning
