"""Hostile input against llm-gateway: schemathesis from the gateway's own OpenAPI document, then
the bodies no schema describes (not JSON, not UTF-8, nested 100000 deep, over the size limit,
NaN literals, thousands of stop strings, schemas that refer to themselves).

One gateway, with API keys, over one real replica. The rule: never a 5xx; a refused request is
a 4xx with an OpenAI error body (``{"error": {message, type, param, code}}``) naming ``param``
where there is one; responses match what the document says; afterwards every context of the
replica is free.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode
from schemathesis import checks as generic_checks
from schemathesis.specs.openapi import checks as openapi_checks

from tests.harness.gateway import KEY, MODEL, Gateway
from tests.harness.service import Certs, Service
from tests.reliability.conftest import examples, replica, wait_pool_whole

pytestmark = pytest.mark.model

MAX_BODY = 1024 * 1024  # the gateway's LLM_GATEWAY_MAX_REQUEST_BYTES here
GATEWAY_ENV = {"LLM_GATEWAY_MAX_REQUEST_BYTES": str(MAX_BODY)}  # read by hostile_gateway
AUTH = {"authorization": f"Bearer {KEY}"}
SCHEMATHESIS_AUTH = {"Authorization": f"Bearer {KEY}"}  # spelled as the document's scheme
CHECKS = [
    generic_checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
    openapi_checks.ignored_auth,
]


@pytest.fixture(scope="module")
def http(hostile_gateway: Gateway) -> Iterator[httpx.Client]:
    headers = AUTH | {"content-type": "application/json"}
    with httpx.Client(base_url=hostile_gateway.url, headers=headers, timeout=60) as client:
        yield client


# -- schemathesis -------------------------------------------------------------------------


def _steer(body: dict[str, Any], served: bool, max_tokens: int) -> dict[str, Any]:
    """The generated body, made cheap to answer and, half the time, for the model served.

    Only values the schema allows are changed, for others that it also allows, so that a
    body generated to break the schema still breaks it.
    """
    body = dict(body)
    if served and isinstance(body.get("model"), str):
        body["model"] = MODEL
    # The Responses API's body has an input, and its limit has a name of its own.
    limits = ("max_output_tokens",) if "input" in body else ("max_tokens", "max_completion_tokens")
    for name in limits:
        value = body.get(name)
        if type(value) is int and value > 4:  # valid (>= 1): a few tokens, not thousands
            body[name] = max_tokens
    if not any(name in body for name in limits):
        body[limits[0]] = max_tokens  # the default is the whole context
    return body


def flatmap_body(context: Any, body: Any) -> st.SearchStrategy[Any]:
    if not isinstance(body, dict):
        return st.just(body)
    return st.builds(_steer, st.just(body), st.booleans(), st.integers(1, 4))


@pytest.fixture(scope="module")
def gateway_schema(hostile_gateway: Gateway) -> Any:
    url = hostile_gateway.url
    loaded = schemathesis.openapi.from_url(url + "/openapi.json")
    loaded.config.update(base_url=url, request_timeout=60)
    loaded.hook(flatmap_body)
    return loaded


# The document's operations, named here so that tests are collected before the gateway runs
# (schemathesis' own lazy loader, ``schemathesis.pytest.from_fixture``, fails on pytest 9:
# it sets ``node._nodeid``); test_every_operation_is_tested keeps the list whole.
OPERATIONS = [
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "POST /v1/responses",
    "GET /v1/models",
    "GET /v1/models/{model_id}",
    "POST /v1/messages",
    "POST /v1/messages/count_tokens",
    "POST /tokenize",
    "POST /detokenize",
    "POST /apply-template",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
]


def test_every_operation_is_tested(gateway_schema: Any) -> None:
    labels = {result.ok().label for result in gateway_schema.get_all_operations()}
    assert labels == set(OPERATIONS)


# Negative cases only where there is a body to break: a GET's only parameter is a free string.
CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE) for label in OPERATIONS if label.startswith("POST")
]


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{op}-{m}" for op, m in CASES])
def test_the_openapi_document_holds(gateway_schema: Any, label: str, mode: GenerationMode) -> None:
    method, path = label.split(" ", 1)
    operation = gateway_schema[path][method]

    @settings(max_examples=examples(1 if method == "POST" else 0.25))
    @given(case=operation.as_strategy(mode))
    def holds(case: Any) -> None:
        # The key as an explicit header, so that ignored_auth checks it is required: it sends
        # the request again without it, and with a wrong one, and expects 401 both times.
        case.call_and_validate(headers=SCHEMATHESIS_AUTH, checks=CHECKS)

    holds()


# -- what the document cannot describe ----------------------------------------------------

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def refused(response: httpx.Response, param: str | None) -> dict[str, Any]:
    """``response`` is a 4xx with an OpenAI error body naming ``param``; the error."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] == "invalid_request_error", error
    assert error["param"] == param, error
    if param is not None:
        assert error["message"].startswith(f"{param}:"), error
    return dict(error)


def chat(**fields: Any) -> bytes:
    return json.dumps(CHAT | fields).encode()


NOT_JSON = {
    "invalid": (b"{not json", "body"),
    "empty": (b"", "body"),
    "list-100000-deep": (b"[" * 100_000 + b"]" * 100_000, "body"),
    "object-100000-deep": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "body"),
    "utf8-bad-bytes": (chat()[:-1] + b', "user": "\xff\xfe"}', "body"),
    "utf8-no-continuation": (chat().replace(b"Hi", b"\xc3\x28"), "body"),
    # A UTF-16 surrogate, encoded or escaped: Python's JSON decoder lets it through, and the
    # message that holds it cannot be encoded for the replica.
    "utf8-surrogate": (chat().replace(b"Hi", b"\xed\xa0\x80"), "messages[0]"),
    "escaped-surrogate": (chat().replace(b"Hi", b"\\ud800"), "messages[0]"),
}


@pytest.mark.parametrize(("body", "param"), NOT_JSON.values(), ids=NOT_JSON.keys())
def test_bodies_that_are_not_json(
    http: httpx.Client, hostile_service: Service, body: bytes, param: str
) -> None:
    refused(http.post("/v1/chat/completions", content=body), param)
    wait_pool_whole(hostile_service)


NUMBERS = [
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
    "seed",
    "n",
]


@pytest.mark.parametrize("name", NUMBERS)
@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_literals(http: httpx.Client, name: str, literal: bytes) -> None:
    # Python's JSON parser reads these (JSON has no such numbers): the model must refuse them.
    body = chat()[:-1] + b', "' + name.encode() + b'": ' + literal + b"}"
    refused(http.post("/v1/chat/completions", content=body), name)


def test_a_body_over_the_size_limit(http: httpx.Client) -> None:
    big = chat(messages=[{"role": "user", "content": "a" * MAX_BODY}])
    error = refused(http.post("/v1/chat/completions", content=big), "body")
    assert str(MAX_BODY) in error["message"]

    def chunked() -> Iterator[bytes]:  # no content-length: the limit counts what arrives
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    refused(http.post("/v1/chat/completions", content=chunked()), "body")
    # Just under the limit is read (and refused for what it says: a prompt too long).
    almost = chat(messages=[{"role": "user", "content": "a" * (MAX_BODY - 200)}])
    assert len(almost) <= MAX_BODY
    refused(http.post("/v1/chat/completions", content=almost), "messages")


@pytest.mark.parametrize("count", [17, 5000, 100_000])
def test_thousands_of_stop_strings(
    http: httpx.Client, hostile_service: Service, count: int
) -> None:
    stop = [f"s{i}" for i in range(count)]
    refused(http.post("/v1/chat/completions", content=chat(stop=stop)), "stop")
    wait_pool_whole(hostile_service)


SCHEMAS_REFUSED = [
    {"$ref": "#"},
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"$ref": "http://127.0.0.1:1/schema.json"},
    {"type": "string", "maxLength": 2**63},
]


@pytest.mark.parametrize("schema_", SCHEMAS_REFUSED)
def test_a_response_format_schema_that_refers_to_itself_or_cannot_be_served(
    http: httpx.Client, hostile_service: Service, schema_: dict[str, Any]
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema_}}
    body = chat(response_format=response_format)
    refused(http.post("/v1/chat/completions", content=body), "response_format")
    wait_pool_whole(hostile_service)


def test_the_document_says_what_is_served(hostile_gateway: Gateway, http: httpx.Client) -> None:
    """Each value the document lists is served; a value it leaves out is refused, naming the
    parameter. (The document used to allow any role, any ``n``, any ``logprobs``...)"""
    doc = json.loads(hostile_gateway.http_get("/openapi.json")[1])
    schemas = doc["components"]["schemas"]

    def served(path: str, **fields: Any) -> None:
        response = http.post(path, content=json.dumps({"model": MODEL, "max_tokens": 1} | fields))
        assert response.status_code == 200, (fields, response.text)

    chat_path, completion_path = "/v1/chat/completions", "/v1/completions"
    for role in schemas["Message"]["properties"]["role"]["enum"]:
        answer = {"tool_call_id": "call_1"} if role == "tool" else {}  # (the document's if/then)
        served(chat_path, messages=[{"role": role, "content": "Hi", **answer}])
    refused(http.post(chat_path, content=chat(messages=[{"role": "tool", "content": "Hi"}])),
            "messages[0].tool_call_id")  # fmt: skip
    refused(http.post(chat_path, content=chat(messages=[{"role": "robot"}])), "messages[0].role")
    part = schemas["ContentPart"]
    assert part["properties"]["type"]["enum"] == ["text", "refusal"]
    assert [(k["properties"]["type"]["const"], k["required"]) for k in part["oneOf"]] == [
        ("text", ["text"]), ("refusal", ["refusal"]),
    ]  # fmt: skip
    served(chat_path, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    refusal = [{"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}]
    served(chat_path, messages=[{"role": "user", "content": "Hi"}, *refusal])
    image = [{"role": "user", "content": [{"type": "image_url"}]}]
    refused(http.post(chat_path, content=chat(messages=image)), "messages[0].content[0]")
    sampling = schemas["ChatCompletionRequest"]["properties"]
    most = int(sampling["n"]["anyOf"][0]["maximum"])
    served(chat_path, messages=CHAT["messages"], n=most)
    refused(http.post(chat_path, content=chat(n=most + 1)), "n")
    served(chat_path, messages=CHAT["messages"], logprobs=True, top_logprobs=20)
    refused(http.post(chat_path, content=chat(top_logprobs=2)), "top_logprobs")
    completion = schemas["CompletionRequest"]["properties"]
    prompts = next(m for m in completion["prompt"]["anyOf"] if m["type"] == "array")
    assert (prompts["minItems"], prompts["maxItems"]) == (1, 1)
    served(completion_path, prompt=["Hi"])
    two = json.dumps({"model": MODEL, "prompt": ["a", "b"]})
    refused(http.post(completion_path, content=two), "prompt")
    for echo in completion["echo"]["enum"]:
        served(completion_path, prompt="Hi", echo=echo)
    assert completion["suffix"]["enum"] == [None]


def test_a_stream_is_documented(hostile_gateway: Gateway, http: httpx.Client) -> None:
    doc = json.loads(hostile_gateway.http_get("/openapi.json")[1])
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert "text/event-stream" in doc["paths"][path]["post"]["responses"]["200"]["content"]
    response = http.post("/v1/chat/completions", content=chat(stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")


def test_regression_penalty(http: httpx.Client) -> None:
    """Found here (fixed in a35ff6c): every penalty was INTERNAL on the replica, so 500."""
    response = http.post("/v1/chat/completions", content=chat(presence_penalty=0.5))
    assert response.status_code == 200, response.text


def test_every_context_is_free_and_no_5xx_was_sent(
    hostile_gateway: Gateway, hostile_service: Service
) -> None:
    """Runs after the tests above (pytest keeps the file's order)."""
    wait_pool_whole(hostile_service)
    assert hostile_gateway.readyz()[0] == 200
    errors = 0.0
    for family in text_string_to_metric_families(hostile_gateway.http_get("/metrics")[1]):
        for sample in family.samples:
            if sample.name == "llm_gateway_requests_total":
                errors += sample.value if sample.labels["status"].startswith("5") else 0
    assert errors == 0, "the gateway answered with a 5xx"


def test_regression_a_schema_no_token_satisfies(
    tmp_path: Path,
    certs: Certs,
    model_path: Path,
    keys_file: Path,
) -> None:
    """Found here (fixed in d8143b6): a JSON schema that allows no first token ({'const': NUL})
    aborted the replica: one request through the gateway killed a replica."""
    # A replica and gateway of their own: this request kills the replica it reaches.
    svc = replica(tmp_path, certs, model_path).wait_ready()
    gw = Gateway(tmp_path, certs, [svc], keys_file=keys_file)
    try:
        gw.wait_ready(30)
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"const": "\x00"}}}
        headers = AUTH | {"content-type": "application/json"}
        with httpx.Client(base_url=gw.url, headers=headers, timeout=60) as client:
            response = client.post("/v1/chat/completions", content=chat(response_format=fmt))
        refused(response, "response_format")
        assert svc.process.poll() is None, "the replica died"
    finally:
        gw.stop()
        if svc.process.poll() is None:
            svc.stop()


def test_regression_a_count_too_large_for_a_float(http: httpx.Client) -> None:
    """Found here (fixed in fbcf8e3): INTERNAL on the replica, so 500 through the gateway."""
    schema_ = {"type": "array", "items": {"type": "integer"}, "minItems": 10**400}
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema_}}
    body = chat(response_format=response_format)
    refused(http.post("/v1/chat/completions", content=body), "response_format")
