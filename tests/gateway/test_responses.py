"""The Responses API on llm-gateway (``POST /v1/responses``, stateless), through the official
``openai`` client, unmodified, in front of two real llm_service replicas and the real model."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.harness.gateway import KEY, MODEL, Gateway

pytestmark = pytest.mark.model

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"], "additionalProperties": False}  # fmt: skip
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": CITY, "strict": True}  # fmt: skip
NAMED = {"type": "function", "name": "get_weather"}


def test_a_whole_response(gateway: Gateway) -> None:
    done = gateway.client().responses.create(
        model=MODEL, input="Name three colours.", instructions="Answer briefly.",
        max_output_tokens=16, temperature=0,
    )  # fmt: skip
    assert done.object == "response" and done.id.startswith("resp_") and done.model == MODEL
    assert done.status in ("completed", "incomplete") and done.output_text
    assert done.usage is not None and done.usage.input_tokens > 0
    assert 0 < done.usage.output_tokens <= 16
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    if done.status == "incomplete":
        assert done.incomplete_details and done.incomplete_details.reason == "max_output_tokens"


def test_streamed_deltas_add_up_to_the_response(gateway: Gateway) -> None:
    """The SDK's stream helper checks the order of events; greedy, the stream's text is the
    whole answer's (same machine, same model)."""
    ask: dict[str, Any] = {"model": MODEL, "input": "Name three colours.",
                           "max_output_tokens": 24, "temperature": 0}  # fmt: skip
    client = gateway.client()
    whole = client.responses.create(**ask)
    deltas, kinds, numbers = [], [], []
    with client.responses.stream(**ask) as stream:
        for event in stream:
            kinds.append(event.type)
            numbers.append(event.sequence_number)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == f"response.{whole.status}"  # completed, or incomplete at the limit
    assert numbers == list(range(len(numbers)))
    last = event.response  # type: ignore[union-attr]
    assert "".join(deltas) == last.output_text == whole.output_text
    assert last.usage == whole.usage


def test_a_function_call_round_trip(gateway: Gateway) -> None:
    """A named tool's call follows its schema (whole and streamed: the SDK helper's final
    response); its output sent back with the items so far gets an answer in text."""
    client = gateway.client()
    question: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    ask: dict[str, Any] = {"model": MODEL, "input": question, "tools": [WEATHER],
                           "tool_choice": NAMED, "max_output_tokens": 64, "temperature": 0,
                           "parallel_tool_calls": False}  # fmt: skip
    first = client.responses.create(**ask)
    assert first.status == "completed"
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.id and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), CITY)
    with client.responses.stream(**ask) as stream:
        streamed = stream.get_final_response()
    [streamed_call] = streamed.output
    assert streamed_call.type == "function_call"
    assert json.loads(streamed_call.arguments) == json.loads(call.arguments)  # greedy: same

    answer = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C"}
    final = client.responses.create(
        model=MODEL, input=[*question, *first.output, answer], tools=[WEATHER],
        tool_choice="none", max_output_tokens=32, temperature=0,
    )  # fmt: skip
    assert final.output_text
    assert all(item.type == "message" for item in final.output)


def test_text_format_json_schema_validates(gateway: Gateway) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    done = gateway.client().responses.create(
        model=MODEL, input="Describe a person as JSON.", max_output_tokens=64, temperature=0,
        text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                         "strict": True}},
    )  # fmt: skip
    jsonschema.validate(json.loads(done.output_text), schema)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"store": True}, "store"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input[0].content[0]"),
    ],
)  # fmt: skip
def test_what_is_not_served_is_a_400_naming_it(
    gateway: Gateway, fields: dict[str, Any], param: str
) -> None:
    ask: dict[str, Any] = {"model": MODEL, "input": "Hi", "max_output_tokens": 2} | fields
    with pytest.raises(openai.BadRequestError) as info:
        gateway.client().responses.create(**ask)
    assert info.value.param == param and info.value.code is None
    assert info.value.type == "invalid_request_error"


def test_the_route_without_v1_and_in_the_document(gateway: Gateway) -> None:
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 2, "stream": True}
    with httpx.stream("POST", gateway.url + "/responses", json=body, headers=headers) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in answer.iter_lines() if line and not line.startswith(":")]
    names = [line.removeprefix("event: ") for line in lines[0::2]]
    data = [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert names == [d["type"] for d in data] and names[-1] in (
        "response.completed", "response.incomplete"
    )  # fmt: skip
    assert httpx.post(gateway.url + "/responses", json=body).status_code == 401  # a key first
    paths = json.loads(gateway.http_get("/openapi.json")[1])["paths"]
    assert "/v1/responses" in paths and "/responses" not in paths
