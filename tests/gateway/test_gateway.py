"""The OpenAI surface of llm-gateway, through the official ``openai`` client and raw HTTP,
in front of two real llm_service replicas (mutual TLS, the real model)."""

from __future__ import annotations

import base64
import itertools
import json
import math
import re
import struct
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types import CompletionUsage

from llm_service.client import Client
from tests.harness.gateway import HASHED_KEY, KEY, MODEL, Gateway
from tests.harness.service import Certs, Service

pytestmark = pytest.mark.model

QUESTION = [{"role": "user", "content": "Name three colours."}]


def test_chat_streaming_adds_up_to_the_whole_answer(gateway: Gateway) -> None:
    client = gateway.client()
    whole = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0
    )
    assert whole.object == "chat.completion"
    assert whole.model == MODEL
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens > 0

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *deltas, last = chunks
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == (
        whole.choices[0].message.content
    )
    assert [c.choices[0].finish_reason for c in deltas][-1] == whole.choices[0].finish_reason
    assert all(c.usage is None for c in deltas)
    assert last.choices == [] and last.usage == whole.usage
    assert len({(c.id, c.created) for c in chunks}) == 1


def test_completions_whole_and_streamed(gateway: Gateway) -> None:
    client = gateway.client()
    whole = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=12, temperature=0)
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    streamed = client.completions.create(
        model=MODEL, prompt="1, 2, 3,", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_stop_strings_and_seed(gateway: Gateway) -> None:
    client = gateway.client()
    # The text is forced (a schema allowing one string), so the stop string is sure to come.
    forced = {"type": "json_schema", "json_schema": {"schema": {"const": "4, 5, 6, 7, 8"}}}
    done = client.completions.create(
        model=MODEL, prompt="1, 2, 3,", max_tokens=30, stop=[" 7"],
        extra_body={"response_format": forced},
    )  # fmt: skip
    assert done.choices[0].finish_reason == "stop"
    assert done.choices[0].text == '"4, 5, 6,'
    a, b = (
        client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=42
        )
        .choices[0]
        .text
        for _ in range(2)
    )
    assert a == b


def test_models_list_and_retrieve(gateway: Gateway) -> None:
    client = gateway.client()
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "llm-service"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_api_keys(gateway: Gateway) -> None:
    assert [m.id for m in gateway.client(HASHED_KEY).models.list()] == [MODEL]
    with pytest.raises(openai.AuthenticationError) as caught:
        gateway.client("sk-wrong").chat.completions.create(model=MODEL, messages=QUESTION)
    error = caught.value.body
    assert isinstance(error, dict) and error["type"] == "authentication_error"
    assert error["code"] == "invalid_api_key" and "sk-wrong" not in caught.value.message
    assert "sk-wrong" not in gateway.log and KEY not in gateway.log
    missing = httpx.get(gateway.url + "/v1/models")
    assert missing.status_code == 401
    assert "Authorization header" in missing.json()["error"]["message"]
    # Authentication comes before the body is read: a bad body without a key is still a 401.
    response = httpx.post(gateway.url + "/v1/completions", content=b"{not json")
    assert response.status_code == 401


def test_prompt_too_long_is_context_length_exceeded(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().completions.create(model=MODEL, prompt="word " * 1500, max_tokens=8)
    assert caught.value.code == "context_length_exceeded"
    assert "1024" in caught.value.message  # the replicas' context size


def test_json_schema_response_validates(gateway: Gateway) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    done = gateway.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
    )
    jsonschema.validate(json.loads(done.choices[0].message.content or ""), schema)
    any_object = gateway.client().chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Reply with a JSON object with the key ok set to true."}
        ],
        max_tokens=48,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(any_object.choices[0].message.content or ""), dict)


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"], "additionalProperties": False}  # fmt: skip
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city", "parameters": CITY},
}


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_a_required_tool_call_follows_its_schema(gateway: Gateway, choice: Any) -> None:
    """Whole and streamed: a call whose arguments parse and validate, finish_reason tool_calls,
    and the streamed pieces (id and name first, then argument fragments) add up to it."""
    client = gateway.client()
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}],
           "tools": [WEATHER], "tool_choice": choice, "max_tokens": 64, "temperature": 0,
           "parallel_tool_calls": False}  # fmt: skip
    whole = client.chat.completions.create(**ask)
    choice0 = whole.choices[0]
    assert choice0.finish_reason == "tool_calls" and choice0.message.content is None
    [call] = choice0.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), CITY)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**ask, stream=True):
        delta = chunk.choices[0].delta
        assert not delta.content  # no markup as text
        for piece in delta.tool_calls or []:
            if piece.id:
                assert piece.index not in calls and piece.function and piece.function.name
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "args": ""}
            calls[piece.index]["args"] += (piece.function and piece.function.arguments) or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["args"]) == json.loads(call.function.arguments)  # greedy: same


def test_a_two_turn_tool_loop(gateway: Gateway) -> None:
    """Call, the tool's answer as a ``tool`` message, then a final answer in text."""
    client = gateway.client()
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    # (One call: this small model, let make several, repeats the same call until max_tokens.)
    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=64,
        temperature=0, parallel_tool_calls=False,
    )  # fmt: skip
    message = first.choices[0].message
    assert message.tool_calls
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"})
    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=32,
        temperature=0,
    )  # fmt: skip
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_tool_choice_none_never_calls(gateway: Gateway) -> None:
    for stream in (False, True):
        done = gateway.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER], tool_choice="none", max_tokens=16, temperature=0, stream=stream,
        )  # fmt: skip
        choices = [c for chunk in done for c in chunk.choices] if stream else done.choices  # type: ignore[union-attr,attr-defined]
        assert all(c.finish_reason != "tool_calls" for c in choices)
        assert not any(getattr(c, "message", None) and c.message.tool_calls for c in choices)


def test_chat_logprobs_through_the_official_client(gateway: Gateway) -> None:
    """Greedy: each token is its own top alternative, with the same log probability; 20
    alternatives hold at most all the probability; the tokens spell the answer. Streamed, the
    same tokens come piece by piece."""
    client = gateway.client()
    ask = {"model": MODEL, "messages": QUESTION, "max_tokens": 16, "temperature": 0,
           "logprobs": True, "top_logprobs": 20}  # fmt: skip
    whole = client.chat.completions.create(**ask)
    content = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    for t in content:
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob
        assert t.logprob == max(a.logprob for a in t.top_logprobs)
        assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1 + 1e-5
        assert bytes(t.bytes or []) == t.token.encode()
    streamed = [
        t
        for chunk in client.chat.completions.create(**ask, stream=True)
        if chunk.choices and chunk.choices[0].logprobs
        for t in chunk.choices[0].logprobs.content or []
    ]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


def test_completion_logprobs_are_the_legacy_form(gateway: Gateway) -> None:
    done = gateway.client().completions.create(
        model=MODEL, prompt="1, 2, 3,", max_tokens=8, temperature=0, logprobs=3
    )
    lp = done.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.top_logprobs is not None
    assert "".join(lp.tokens) == done.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    columns = zip(lp.tokens, lp.token_logprobs or [], lp.top_logprobs, strict=True)
    for token, logprob, top in columns:
        assert len(top) <= 3 and top[token] == logprob == max(top.values())


def test_n_choices_with_a_seed_are_reproducible(gateway: Gateway) -> None:
    client = gateway.client()
    ask = {"model": MODEL, "messages": QUESTION, "max_tokens": 12, "temperature": 1.0,
           "seed": 42, "n": 3}  # fmt: skip
    first = client.chat.completions.create(**ask)
    again = client.chat.completions.create(**ask)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts
    # Choice i is seeded seed + i: alone, each gives the same text; the prompt counts once.
    singles = [client.chat.completions.create(**(ask | {"n": 1, "seed": 42 + i})) for i in range(3)]
    assert [s.choices[0].message.content for s in singles] == texts
    assert first.usage == CompletionUsage(
        prompt_tokens=singles[0].usage.prompt_tokens,  # type: ignore[union-attr]
        completion_tokens=sum(s.usage.completion_tokens for s in singles),  # type: ignore[union-attr]
        total_tokens=singles[0].usage.prompt_tokens  # type: ignore[union-attr]
        + sum(s.usage.completion_tokens for s in singles),  # type: ignore[union-attr]
    )


def test_llama_cpp_sampling_parameters_are_served(gateway: Gateway) -> None:
    done = gateway.client().chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=8,
        extra_body={"grammar": 'root ::= "yes" | "no"', "top_k": 1, "min_p": 0.0},
    )
    assert done.choices[0].message.content in ("yes", "no")


def test_logit_bias_forces_and_forbids_tokens(
    gateway: Gateway, backends: list[Service], certs: Certs
) -> None:
    """+100 on a token makes it the answer's first; -100 keeps it out of the answer."""
    tls = {"tls_ca": certs.ca, "tls_cert": certs.client.cert, "tls_key": certs.client.key}
    with Client(f"127.0.0.1:{backends[0].grpc_port}", **tls) as c:
        token = c.tokenize(" purple", add_special=False)[0]
        piece = c.detokenize([token])
    client = gateway.client()
    forced = client.completions.create(
        model=MODEL, prompt="My favourite colour is", max_tokens=1, temperature=0,
        logit_bias={str(token): 100},
    )  # fmt: skip
    assert forced.choices[0].text == piece
    kept_out = client.completions.create(
        model=MODEL, prompt="My favourite colour is", max_tokens=1, temperature=0,
        logit_bias={str(token): -100},
    )  # fmt: skip
    assert kept_out.choices[0].text != piece


def _post(gateway: Gateway, body: Any, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {"authorization": f"Bearer {KEY}"}
    if isinstance(body, bytes):
        return httpx.post(gateway.url + path, content=body, headers=headers, timeout=60)
    return httpx.post(gateway.url + path, json=body, headers=headers, timeout=60)


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": MODEL, "messages": QUESTION, "n": 9}, 400, "n", None),
        ({"model": MODEL, "messages": QUESTION, "temperature": "hot"}, 400, "temperature", None),
        ({"model": MODEL, "messages": QUESTION, "temperature": 3}, 400, "temperature", None),
        ({"model": MODEL, "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens", None),
        ({"model": MODEL, "messages": []}, 400, "messages", None),
        ({"messages": QUESTION}, 400, "model", None),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400,
         "messages[0].role", None),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400,
         "messages[0].content", None),
        ({"model": MODEL, "messages": QUESTION, "stop": 5}, 400, "stop", None),
        ({"model": MODEL, "messages": QUESTION, "top_p": 0.5, "top_k": 1000000}, 200, None, None),
        ({"model": MODEL, "messages": QUESTION, "tools": [WEATHER],
          "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400,
         "tool_choice.function.name", None),
        ({"model": MODEL, "messages": QUESTION, "top_logprobs": 21, "logprobs": True}, 400,
         "top_logprobs", None),
        ({"model": MODEL, "messages": QUESTION, "logit_bias": {"x": 5}}, 400, "logit_bias.x",
         None),
        ({"model": MODEL, "messages": QUESTION, "logit_bias": {"1": 101}}, 400, "logit_bias.1",
         None),
        ({"model": MODEL, "messages": QUESTION, "logit_bias": {str(10**9): 1}}, 400,
         "logit_bias", None),
        ({"model": MODEL, "messages": QUESTION, "temprature": 0.5}, 400, "temprature", None),
        ({"model": "gpt-4", "messages": QUESTION}, 404, "model", "model_not_found"),
        ([1, 2], 400, "body", None),
        (b"{not json", 400, "body", None),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors(
    gateway: Gateway, body: Any, status: int, param: str | None, code: str | None
) -> None:
    if isinstance(body, dict) and status == 200:
        body |= {"max_tokens": 4}  # top_k is llama.cpp's, served (past the vocabulary: all)
    response = _post(gateway, body)
    assert response.status_code == status, response.text
    if status != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert (error["param"], error["code"]) == (param, code)
        assert error["message"].startswith(f"{param}: ")


def test_request_id_goes_through_to_the_replica(gateway: Gateway, backends: list[Service]) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4}
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {KEY}", "x-request-id": "trace-4711"},
        timeout=60,
    )
    assert response.headers["x-request-id"] == "trace-4711"
    assert response.json()["id"] == "chatcmpl-trace-4711"
    assert "[trace-4711]" in gateway.log
    assert sum("[trace-4711] Generate from" in b.log for b in backends) == 1
    generated = _post(gateway, body).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    # An id that could forge log lines ("[...] backend ejected") is replaced.
    forged = httpx.post(
        gateway.url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {KEY}", "x-request-id": "a] backend 10.0.0.1 ejected"},
        timeout=60,
    )
    assert re.fullmatch(r"[0-9a-f]{32}", forged.headers["x-request-id"])
    assert _post(gateway, [1]).headers["x-request-id"]  # errors carry one too


def test_a_body_over_the_limit_is_refused(gateway: Gateway) -> None:
    big = {"model": MODEL, "prompt": "x" * (9 * 1024 * 1024)}  # the default limit is 8 MiB
    response = _post(gateway, big, "/v1/completions")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "body"
    assert "larger than the limit of 8388608 bytes" in response.json()["error"]["message"]

    def chunked() -> Iterator[bytes]:  # no content-length: counted as it arrives
        yield json.dumps(big).encode()

    response = httpx.post(gateway.url + "/v1/completions", content=chunked(),
                          headers={"authorization": f"Bearer {KEY}"}, timeout=60)  # fmt: skip
    assert response.status_code == 400 and "larger than" in response.text
    assert _post(gateway, {"model": MODEL, "prompt": "Hi", "max_tokens": 2}, "/completions")


def _events(response: httpx.Response) -> tuple[list[str], bytes]:
    raw = response.read()
    return raw.decode().split("\n\n"), raw


def test_sse_wire_format(gateway: Gateway) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "stream": True}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                      headers=headers, timeout=60) as response:  # fmt: skip
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        request_id = response.headers["x-request-id"]
        events, raw = _events(response)
    assert raw.endswith(b"data: [DONE]\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = []
    for event in events[:-2]:
        assert event.startswith("data: {") and "\n" not in event, event
        chunks.append(json.loads(event.removeprefix("data: ")))
    assert not re.search(rb"^(id|retry|event):", raw, re.MULTILINE)
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage
    # A stream read to its end is no disconnect.
    assert f"[{request_id}] client went away" not in gateway.log


def test_routes_without_the_v1_prefix(gateway: Gateway) -> None:
    done = _post(gateway, {"model": MODEL, "prompt": "Hi", "max_tokens": 2}, "/completions")
    assert done.status_code == 200 and done.json()["object"] == "text_completion"
    models = httpx.get(gateway.url + "/models", headers={"authorization": f"Bearer {KEY}"})
    assert models.json()["data"][0]["id"] == MODEL
    missing = httpx.get(gateway.url + "/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_health_readiness_metrics_and_openapi(gateway: Gateway, backends: list[Service]) -> None:
    assert gateway.http_get("/healthz") == (200, '{"status":"alive"}')
    status, ready = gateway.readyz()
    assert status == 200 and ready["ready"] is True
    assert {b["state"] for b in ready["backends"]} == {"healthy"}
    assert {b["pool_size"] for b in ready["backends"]} == {2}
    _post(gateway, {"model": MODEL, "prompt": "Hi", "max_tokens": 2}, "/v1/completions")
    route = "/v1/completions"
    assert gateway.metric("llm_gateway_requests_total", route=route, status="200", model=MODEL)
    # Labels are route templates, known even for a request refused before routing.
    httpx.post(gateway.url + "/v1/chat/completions", json={})  # no key
    httpx.get(gateway.url + f"/v1/models/{MODEL}", headers={"authorization": f"Bearer {KEY}"})
    httpx.get(gateway.url + "/v1/nothing/here", headers={"authorization": f"Bearer {KEY}"})
    chat, one_model = "/v1/chat/completions", "/v1/models/{model_id:path}"
    assert gateway.metric("llm_gateway_requests_total", route=chat, status="401", model="-")
    assert gateway.metric("llm_gateway_requests_total", route=one_model, status="200", model="-")
    assert gateway.metric("llm_gateway_requests_total", route="other", status="404", model="-")
    assert gateway.metric("llm_gateway_tokens_total", model=MODEL, kind="completion") >= 2
    for b in backends:
        labels = {"backend": f"127.0.0.1:{b.grpc_port}"}
        assert gateway.metric("llm_gateway_backend_state", state="healthy", **labels) == 1
    schema = json.loads(gateway.http_get("/openapi.json")[1])
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(schema["paths"])


def test_curl_sees_chunks_as_they_are_generated(gateway: Gateway) -> None:
    body = json.dumps(
        {"model": MODEL, "prompt": "1, 2, 3,", "max_tokens": 64, "temperature": 0, "stream": True}
    )
    curl = subprocess.Popen(
        ["curl", "-sN", gateway.url + "/v1/completions", "-H", f"authorization: Bearer {KEY}",
         "-H", "content-type: application/json", "-d", body],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert curl.stdout is not None
    arrivals = []
    for line in curl.stdout:
        if line.startswith(b"data: {"):
            arrivals.append(time.monotonic())
    assert curl.wait() == 0
    assert len(arrivals) >= 60
    # Tokens come about every 10 ms: chunks that arrived together would show no spread.
    spread = arrivals[-1] - arrivals[0]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert spread > 0.2, f"all {len(arrivals)} chunks arrived within {spread:.3f} s"
    assert sum(g > 0.002 for g in gaps) >= len(gaps) // 2, gaps


# -- embeddings ------------------------------------------------------------------------------

TEXTS = [f"Note {i}: the {c} cat sat on the mat." for i, c in enumerate(["black", "white"] * 16)]


def test_embeddings_through_the_official_client(
    gateway: Gateway, backends: list[Service], certs: Certs
) -> None:
    """The default model's mean-pooled embeddings (no embedding model ships on PyPI as a
    package this project could use): 32 inputs, vectors of the model's size and of length 1;
    identical inputs, identical vectors; a text is closer to itself than to an unrelated one;
    the same alone as in a batch (to float precision: llama.cpp multiplies a batch of 32 inputs
    with other kernels than one input, cosine >= 0.9999); base64 the same numbers."""
    client = gateway.client()
    tls = {"tls_ca": certs.ca, "tls_cert": certs.client.cert, "tls_key": certs.client.key}
    with Client(f"127.0.0.1:{backends[0].grpc_port}", **tls) as c:
        size = c.model_info().embedding_dimensions
    assert size > 0
    batch = client.embeddings.create(model=MODEL, input=TEXTS)
    vectors = [d.embedding for d in sorted(batch.data, key=lambda d: d.index)]
    assert len(vectors) == 32 and all(len(v) == size for v in vectors)
    assert all(abs(math.fsum(x * x for x in v) - 1) < 1e-4 for v in vectors)
    assert batch.usage.prompt_tokens > 32

    def cosine(a: list[float], b: list[float]) -> float:
        return math.fsum(x * y for x, y in zip(a, b, strict=True))

    again = client.embeddings.create(model=MODEL, input=[TEXTS[0], TEXTS[0]]).data
    assert again[0].embedding == again[1].embedding
    alone = client.embeddings.create(model=MODEL, input=TEXTS[5]).data[0].embedding
    assert cosine(alone, vectors[5]) >= 0.9999
    assert cosine(alone, alone) == pytest.approx(1, abs=1e-5)
    unrelated = client.embeddings.create(model=MODEL, input="Quarterly revenue rose 4 percent.")
    assert cosine(vectors[0], unrelated.data[0].embedding) < cosine(vectors[0], vectors[2])
    body = {"model": MODEL, "input": TEXTS[5], "encoding_format": "base64"}
    raw = _post(gateway, body, "/v1/embeddings")
    packed = base64.b64decode(raw.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{size}f", packed)) == pytest.approx(alone, abs=1e-6)
    tokens = client.embeddings.create(model=MODEL, input=[[1, 2, 3], [4, 5]]).data
    assert len(tokens) == 2


@pytest.mark.parametrize(
    ("body", "param"),
    [({"input": "hi", "dimensions": 64}, "dimensions"), ({"input": []}, "input"),
     ({"input": [""]}, "input[0]"), ({"input": [[10**9]]}, "input[0]"),
     ({"input": "x " * 5000}, "input[0]")],
)  # fmt: skip
def test_bad_embedding_requests_name_the_param(
    gateway: Gateway, body: dict[str, Any], param: str
) -> None:
    response = _post(gateway, {"model": MODEL} | body, "/v1/embeddings")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_llama_servers_text_utilities(gateway: Gateway) -> None:
    """POST /tokenize, /detokenize and /apply-template, shaped as llama-server's; ``model`` may
    be left out when one model is served."""
    ids = _post(gateway, {"content": "Hello world"}, "/tokenize").json()["tokens"]
    assert ids and all(isinstance(i, int) for i in ids)
    pieces = _post(gateway, {"content": "Hello world", "with_pieces": True}, "/tokenize").json()
    assert [p["id"] for p in pieces["tokens"]] == ids
    assert "".join(p["piece"] for p in pieces["tokens"]) == "Hello world"
    back = _post(gateway, {"model": MODEL, "tokens": ids}, "/detokenize").json()
    assert back == {"content": "Hello world"}
    prompt = _post(gateway, {"messages": QUESTION}, "/apply-template").json()["prompt"]
    assert "Name three colours." in prompt and prompt.endswith("assistant\n")
    wrong = _post(gateway, {"model": "gpt-4", "content": "x"}, "/tokenize")
    assert wrong.status_code == 404 and wrong.json()["error"]["param"] == "model"
    unknown = _post(gateway, {"content": "x", "colour": 1}, "/tokenize")
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "colour"
    no_key = httpx.post(gateway.url + "/tokenize", json={"content": "x"}, timeout=60)
    assert no_key.status_code == 401
