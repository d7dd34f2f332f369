"""A real agent framework against llm-gateway, unmodified: LangChain's ``ChatOpenAI`` runs a
tool loop (``bind_tools``), streams a call, and fills a pydantic model
(``with_structured_output``), in front of two real llm_service replicas (the real model).

The model is tiny, so its words are never asserted: the calls are constrained by the tools'
schemas (a named ``tool_choice``), so their shape holds by construction.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.harness.gateway import KEY, MODEL, Gateway

pytestmark = pytest.mark.model


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"Sunny and 21 degrees in {city}."


class Person(BaseModel):
    """A person named in the text."""

    name: str
    age: int


class Recorded:
    """The JSON bodies LangChain sent, so that a failure shows the request that caused it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> None:
        self.bodies.append(json.loads(request.content or b"{}"))

    def __str__(self) -> str:
        return "requests sent:\n" + "\n".join(json.dumps(b, indent=1) for b in self.bodies)


@pytest.fixture
def sent() -> Recorded:
    return Recorded()


@pytest.fixture
def chat(gateway: Gateway, sent: Recorded) -> Iterator[ChatOpenAI]:
    """``ChatOpenAI`` as its documentation configures it for an OpenAI-compatible server; only
    the HTTP client is ours, to record the requests."""
    with httpx.Client(event_hooks={"request": [sent]}, timeout=60) as http:
        yield ChatOpenAI(
            model=MODEL,
            base_url=gateway.url + "/v1",
            api_key=KEY,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=48,  # type: ignore[call-arg]
            max_retries=0,
            http_client=http,
        )


def only_call(message: AIMessage, sent: Recorded) -> dict[str, Any]:
    """The one get_weather call in ``message``, with a string city (the tool's schema)."""
    assert len(message.tool_calls) == 1, f"{message!r}\n{sent}"
    call = message.tool_calls[0]
    assert call["name"] == "get_weather", sent
    assert isinstance(call["args"], dict) and isinstance(call["args"].get("city"), str), sent
    assert call["id"], sent
    # The tool runs on the arguments as parsed: the schema LangChain derived from the signature.
    get_weather.args_schema.model_validate(call["args"])  # type: ignore[union-attr]
    return dict(call)


def test_a_two_turn_tool_loop_through_bind_tools(chat: ChatOpenAI, sent: Recorded) -> None:
    """The model calls the tool; the tool's result goes back as a ToolMessage; the plain model
    answers in words."""
    history: list[Any] = [HumanMessage("What is the weather in Paris?")]
    asked = chat.bind_tools([get_weather], tool_choice="get_weather").invoke(history)
    assert isinstance(asked, AIMessage), sent
    call = only_call(asked, sent)
    assert asked.response_metadata.get("finish_reason") == "tool_calls", sent
    assert sent.bodies[-1]["tool_choice"] == {
        "type": "function",
        "function": {"name": "get_weather"},
    }

    result = get_weather.invoke(call["args"])
    history += [asked, ToolMessage(content=result, tool_call_id=call["id"])]
    final = chat.invoke(history)
    assert isinstance(final, AIMessage), sent
    assert final.tool_calls == [] and final.invalid_tool_calls == [], sent
    assert isinstance(final.content, str) and final.content.strip(), sent
    assert final.response_metadata.get("finish_reason") in ("stop", "length"), sent
    # The second request carried the whole loop: the call, then its result under its id.
    assistant, tool_message = sent.bodies[-1]["messages"][-2:]
    assert assistant["role"] == "assistant" and assistant["tool_calls"][0]["id"] == call["id"]
    assert (tool_message["role"], tool_message["tool_call_id"]) == ("tool", call["id"])
    assert tool_message["content"] == result


def test_a_streamed_tool_call_aggregates_into_a_whole_call(
    chat: ChatOpenAI, sent: Recorded
) -> None:
    bound = chat.bind_tools([get_weather], tool_choice="get_weather")
    chunks = list(bound.stream("What is the weather in Paris?"))
    assert sent.bodies[-1]["stream"] is True
    whole = AIMessageChunk(content="")
    for chunk in chunks:
        assert isinstance(chunk, AIMessageChunk), sent
        whole += chunk
    assert [c["name"] for c in whole.tool_call_chunks] == ["get_weather"], f"{chunks!r}\n{sent}"
    call = only_call(whole, sent)
    assert json.loads(whole.tool_call_chunks[0]["args"] or "") == call["args"]
    assert whole.response_metadata.get("finish_reason") == "tool_calls", sent

    # Streamed or not, greedy decoding makes the same call.
    again = bound.invoke("What is the weather in Paris?")
    assert isinstance(again, AIMessage) and again.tool_calls[0]["args"] == call["args"], sent


def test_structured_output_by_function_calling_is_an_instance(
    chat: ChatOpenAI, sent: Recorded
) -> None:
    """It used to be None: the answer had no tool call for LangChain's parser to read."""
    extract = chat.with_structured_output(Person, method="function_calling")
    person = extract.invoke("Ada Lovelace was 36 years old.")
    assert isinstance(person, Person), f"{person!r}\n{sent}"
    assert sent.bodies[-1]["tool_choice"]["function"]["name"] == "Person"
