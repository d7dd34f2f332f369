"""The engine on the fake backend: streaming, stop rules, cancellation, deadlines, validation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from llm_service.engine import (
    ChatMessage,
    Engine,
    EngineConfig,
    FakeBackend,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    RequestLimits,
    SamplingParams,
    Started,
    TokenDelta,
)
from llm_service.engine.chat_template import ChatTemplate
from llm_service.engine.fake import BOS
from llm_service.errors import (
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    OverloadedError,
    PromptTooLongError,
)
from llm_service.types import EmbeddingRequest, Tool, ToolCall
from tests.support import collect


@pytest.fixture(params=["contexts", "batched"])
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[tuple[FakeBackend, Engine]]:
    """A pool of 2 on the fake, in both modes (batched: prompts of 4 tokens a step)."""
    backend = FakeBackend(n_ctx=64, pool_mode=request.param, slots=2, step_tokens=4)
    engine = await Engine.start(backend, EngineConfig(pool_size=2, max_queue=1, queue_timeout_s=5))
    yield backend, engine
    await engine.aclose()


def kv_caches(backend: FakeBackend) -> list[list[int]]:
    """What every context (or every slot of the shared context) holds."""
    if backend.decoder is not None:
        return backend.decoder.kv
    return [c.kv for c in backend.contexts]


def req(prompt: str = "hi", **sampling: object) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, sampling=SamplingParams(**sampling))  # type: ignore[arg-type]


async def test_stream_shape_and_text(fake) -> None:  # type: ignore[no-untyped-def]
    backend, engine = fake
    backend.enqueue("héllo")
    events = await collect(engine, req(max_tokens=20))
    assert isinstance(events[0], Started) and events[0].prompt_tokens == 3  # BOS + "hi"
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    final = events[-1]
    assert isinstance(final, Finished)
    assert final.finish_reason is FinishReason.STOP
    assert "".join(d.text for d in deltas) == final.text == "héllo"
    assert final.usage.completion_tokens == len("héllo".encode())
    assert final.usage.prompt_tokens == 3 and final.usage.total_tokens == 3 + 6
    assert sum(len(d.token_ids) for d in deltas) == final.usage.completion_tokens
    assert backend.history[-1].prompt == "hi"
    assert engine.pool_state().free == 2


async def test_max_tokens_gives_length(fake) -> None:  # type: ignore[no-untyped-def]
    backend, engine = fake
    backend.enqueue("abcdefgh")
    final = (await collect(engine, req(max_tokens=3)))[-1]
    assert isinstance(final, Finished)
    assert final.finish_reason is FinishReason.LENGTH and final.text == "abc"


async def test_stop_sequence(fake) -> None:  # type: ignore[no-untyped-def]
    backend, engine = fake
    backend.enqueue("one two STOP three")
    final = (await collect(engine, req(max_tokens=40, stop=("STOP",))))[-1]
    assert isinstance(final, Finished)
    assert final.finish_reason is FinishReason.STOP_SEQUENCE and final.text == "one two "


async def test_chat_messages_use_the_template(fake) -> None:  # type: ignore[no-untyped-def]
    backend, engine = fake
    request = GenerationRequest(
        messages=(ChatMessage("system", "be brief"), ChatMessage("user", "hi")),
        sampling=SamplingParams(max_tokens=5),
    )
    await collect(engine, request)
    assert backend.history[-1].prompt == "<system>be brief\n<user>hi\n<assistant>"


async def test_consumer_break_cancels_and_frees(fake) -> None:  # type: ignore[no-untyped-def]
    backend, engine = fake
    backend.token_delay_s = 0.01
    backend.enqueue("x" * 60)
    async with contextlib.aclosing(engine.generate(req(max_tokens=60))) as stream:
        async for event in stream:
            if isinstance(event, TokenDelta):
                break
    await asyncio.wait_for(engine.pool.wait_idle(), 1)
    assert engine.pool_state().free == 2
    assert backend.samplers[-1].closed
    assert kv_caches(backend) == [[], []]


async def test_task_cancel_during_prefill_stops_it(fake) -> None:  # type: ignore[no-untyped-def]
    backend, engine = fake
    backend.prefill_delay_s = 0.05  # 60 prompt tokens = 3 s of prefill if not stopped

    async def run() -> None:
        await collect(engine, req("p" * 59, max_tokens=1))

    task = asyncio.create_task(run())
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(engine.pool.wait_idle(), 1)
    assert time.monotonic() - t0 < 0.5
    assert engine.pool_state().free == 2


async def test_deadline_during_generation(fake) -> None:  # type: ignore[no-untyped-def]
    backend, engine = fake
    backend.token_delay_s = 0.02
    backend.enqueue("y" * 50)
    request = GenerationRequest(
        prompt="hi", sampling=SamplingParams(max_tokens=50), deadline=time.monotonic() + 0.2
    )
    final = (await collect(engine, request))[-1]
    assert isinstance(final, Finished) and final.finish_reason is FinishReason.DEADLINE
    assert 0 < final.usage.completion_tokens < 50


async def test_deadline_while_queued(fake) -> None:  # type: ignore[no-untyped-def]
    _, engine = fake
    async with engine.pool.lease(), engine.pool.lease():
        request = GenerationRequest(prompt="hi", deadline=time.monotonic() + 0.1)
        with pytest.raises(DeadlineExceededError):
            await collect(engine, request)
    assert engine.pool_state().free == 2


async def test_overload_when_queue_full(fake) -> None:  # type: ignore[no-untyped-def]
    backend, engine = fake
    backend.token_delay_s = 0.01
    backend.enqueue(*["z" * 30] * 3)
    running = [asyncio.create_task(collect(engine, req(max_tokens=30))) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert engine.pool_state().waiting == 1
    with pytest.raises(OverloadedError):
        await collect(engine, req(max_tokens=1))
    results = await asyncio.gather(*running)
    assert all(isinstance(r[-1], Finished) for r in results)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: req(""), "prompt"),
        (lambda: req(max_tokens=0), "sampling.max_tokens"),
        (lambda: req(max_tokens=-5), "sampling.max_tokens"),
        (lambda: req(temperature=-0.1), "sampling.temperature"),
        (lambda: req(temperature=float("nan")), "sampling.temperature"),
        (lambda: req(top_p=0.0), "sampling.top_p"),
        (lambda: req(top_p=1.5), "sampling.top_p"),
        (lambda: req(seed=-1), "sampling.seed"),
        (lambda: req(stop=("",)), "sampling.stop"),
        (lambda: req(json_schema="{not json"), "sampling.json_schema"),
        (lambda: req(json_schema='{"$ref": "https://example.com/s.json"}'), "sampling.json_schema"),
        (lambda: req(json_schema='{"items": [{"$ref": "/etc/passwd"}]}'), "sampling.json_schema"),
        (lambda: req(json_schema='{"properties": {"a": {"$ref": 5}}}'), "sampling.json_schema"),
        (lambda: req(json_schema='{"type":"string","maxLength":30000}'), "sampling.json_schema"),
        (lambda: req(json_schema='{"type":"array","minItems":1e8}'), "sampling.json_schema"),
        (lambda: req(json_schema='{"minItems":1' + "0" * 400 + "}"), "sampling.json_schema"),
        (lambda: req(json_schema='{"type":"string","pattern":"a{9000}"}'), "sampling.json_schema"),
        (lambda: req(grammar="x", json_schema="{}"), "sampling.grammar"),
        (lambda: req(logit_bias=((5, 100.5),)), "sampling.logit_bias"),
        (lambda: req(logit_bias=((5, float("nan")),)), "sampling.logit_bias"),
        (lambda: req(logit_bias=((-1, 1.0),)), "sampling.logit_bias"),
        (lambda: req(logit_bias=tuple((t, 1.0) for t in range(1025))), "sampling.logit_bias"),
        (lambda: GenerationRequest(messages=()), "messages"),
        (lambda: GenerationRequest(messages=(ChatMessage("robot", "x"),)), "messages.role"),
        (lambda: GenerationRequest(prompt="a", messages=(ChatMessage("user", "x"),)), "prompt"),
    ],
)
def test_bad_requests_name_their_field(make, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError) as info:
        make()
    assert info.value.field == field


async def test_too_long_prompt_names_both_numbers(fake) -> None:  # type: ignore[no-untyped-def]
    _, engine = fake
    with pytest.raises(PromptTooLongError) as info:
        await collect(engine, req("a" * 100))
    assert (info.value.prompt_tokens, info.value.limit) == (101, 64)
    assert "101" in str(info.value) and "64" in str(info.value)
    with pytest.raises(PromptTooLongError, match="max_tokens") as info2:
        await collect(engine, req("abc", max_tokens=61))
    assert info2.value.field == "sampling.max_tokens"
    assert engine.pool_state().free == 2 and engine.pool_state().leased == 0


def test_a_schema_may_refer_to_itself() -> None:
    req(
        json_schema='{"properties": {"next": {"$ref": "#"}}, "$defs": {"a": {"$ref": "#/$defs/a"}}}'
    )


@pytest.mark.parametrize(
    ("limits", "make", "field", "setting"),
    [
        (RequestLimits(prompt_chars=5), lambda: req("abcdef"), "prompt", "PROMPT_CHARS"),
        (
            RequestLimits(prompt_chars=5),
            lambda: GenerationRequest(messages=(ChatMessage("user", "abc"),) * 2),
            "messages",
            "PROMPT_CHARS",
        ),
        (
            RequestLimits(messages=2),
            lambda: GenerationRequest(messages=(ChatMessage("user", "a"),) * 3),
            "messages",
            "MESSAGES",
        ),
        (RequestLimits(stop_strings=2), lambda: req(stop=("a", "b", "c")), "sampling.stop",
         "STOP_STRINGS"),
        (RequestLimits(stop_chars=3), lambda: req(stop=("abcd",)), "sampling.stop", "STOP_CHARS"),
        (RequestLimits(grammar_bytes=10), lambda: req(grammar='root ::= "ééééé"'),
         "sampling.grammar", "GRAMMAR_BYTES"),
        (RequestLimits(schema_bytes=10), lambda: req(json_schema='{"type": "object"}'),
         "sampling.json_schema", "SCHEMA_BYTES"),
    ],
)  # fmt: skip
async def test_limits_name_the_field_and_the_setting(limits, make, field, setting) -> None:  # type: ignore[no-untyped-def]
    backend = FakeBackend(n_ctx=64, slots=1)
    engine = await Engine.start(backend, EngineConfig(limits=limits))
    try:
        with pytest.raises(InvalidRequestError) as info:
            await collect(engine, make())
        assert info.value.field == field
        assert f"LLM_MAX_{setting}" in str(info.value)
        assert backend.history == [] and engine.pool_state().free == 1
        await collect(engine, req("ok"))  # the engine serves on
    finally:
        await engine.aclose()


async def test_bad_grammar_refused_before_lease(fake) -> None:  # type: ignore[no-untyped-def]
    backend, engine = fake
    with pytest.raises(InvalidRequestError) as info:
        await collect(engine, req(grammar="nonsense"))
    assert info.value.field == "sampling.grammar"
    assert backend.history == [] and engine.pool_state().free == 2


async def test_sampler_outlives_the_worker_even_when_cancelled_twice(fake) -> None:  # type: ignore[no-untyped-def]
    backend, engine = fake
    backend.token_delay_s = 0.05
    backend.enqueue("w" * 40)
    task = asyncio.create_task(collect(engine, req(max_tokens=40)))
    await asyncio.sleep(0.12)
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(engine.pool.wait_idle(), 1)
    assert backend.misuse == []
    assert backend.samplers[-1].closed


async def test_chat_prompt_gets_no_extra_bos(fake) -> None:  # type: ignore[no-untyped-def]
    _, engine = fake
    request = GenerationRequest(
        messages=(ChatMessage("user", "hi"),), sampling=SamplingParams(max_tokens=1)
    )
    started = (await collect(engine, request))[0]
    assert isinstance(started, Started)
    assert started.prompt_tokens == len(b"<user>hi\n<assistant>")


async def test_aclose_refuses_new_requests_and_lets_running_ones_finish() -> None:
    backend = FakeBackend(token_delay_s=0.01)
    engine = await Engine.start(backend, EngineConfig(pool_size=1, max_queue=4))
    backend.enqueue("r" * 20)
    running = asyncio.create_task(collect(engine, req(max_tokens=20)))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(collect(engine, req(max_tokens=2)))
    await asyncio.sleep(0.02)
    closing = asyncio.create_task(engine.aclose())
    await asyncio.sleep(0.01)
    with pytest.raises(EngineError, match="shutting down"):
        await waiting
    with pytest.raises(EngineError, match="shutting down"):
        await collect(engine, req())
    events = await running
    assert isinstance(events[-1], Finished) and events[-1].text == "r" * 20
    await asyncio.wait_for(closing, 2)
    assert all(c.closed for c in backend.contexts)


async def test_logprobs_follow_the_released_text(fake) -> None:  # type: ignore[no-untyped-def]
    backend, engine = fake
    backend.enqueue("aé b")  # é is two tokens: its first byte's log probability waits for it
    events = await collect(engine, req(max_tokens=20, logprobs=2))
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    listed = [lp for d in deltas for lp in d.logprobs]
    assert b"".join(lp.piece for lp in listed).decode() == "aé b"
    for d in deltas:  # each delta lists exactly the tokens its text completes
        assert b"".join(lp.piece for lp in d.logprobs).decode() == d.text
    first = listed[0]
    assert first.token_id == ord("a") and first.top[0].token_id == first.token_id
    assert len(first.top) == 2 and first.top[0].logprob == first.logprob
    assert not any(isinstance(e, TokenDelta) and e.logprobs for e in events[:1])


async def test_logprobs_leave_out_a_stop_strings_tokens(fake) -> None:  # type: ignore[no-untyped-def]
    backend, engine = fake
    backend.enqueue("ab##cd")
    events = await collect(engine, req(max_tokens=20, logprobs=0, stop=["##"]))
    listed = [lp for e in events if isinstance(e, TokenDelta) for lp in e.logprobs]
    assert [lp.piece for lp in listed] == [b"a", b"b"] and all(not lp.top for lp in listed)
    assert isinstance(events[-1], Finished) and events[-1].text == "ab"


async def test_no_logprobs_unless_asked(fake) -> None:  # type: ignore[no-untyped-def]
    backend, engine = fake
    backend.enqueue("abc")
    events = await collect(engine, req(max_tokens=20))
    assert not any(isinstance(e, TokenDelta) and e.logprobs for e in events)


@pytest.mark.parametrize("value", [-1, 21])
def test_logprobs_bounds(value: int) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(logprobs=value)
    assert err.value.field == "sampling.logprobs"


# -- tool calls ------------------------------------------------------------------------------

WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}',
)


@pytest.fixture(params=["contexts", "batched"])
async def roomy(request: pytest.FixtureRequest) -> AsyncIterator[tuple[FakeBackend, Engine]]:
    """A pool of 1 on the fake, in both modes, with room for the tools' system message."""
    backend = FakeBackend(n_ctx=4096, pool_mode=request.param, slots=1, step_tokens=512)
    engine = await Engine.start(backend, EngineConfig(pool_size=1, max_queue=1))
    yield backend, engine
    await engine.aclose()


@contextlib.asynccontextmanager
async def templated(template: str) -> AsyncIterator[tuple[FakeBackend, Engine]]:
    """A pool of 1 on the fake (contexts mode) with its own chat ``template``."""
    backend = FakeBackend(chat_template=template, n_ctx=4096, pool_mode="contexts", slots=1)
    engine = await Engine.start(backend, EngineConfig(pool_size=1, max_queue=1))
    try:
        yield backend, engine
    finally:
        await engine.aclose()


async def required_call(backend: FakeBackend, engine: Engine) -> GenerationEvent:
    """The last event of a ``tool_choice: required`` request the fake answers with a call."""
    backend.enqueue('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}')
    return (await collect(engine, tool_request("required")))[-1]


def tool_request(choice: str = "auto", **fields: object) -> GenerationRequest:
    return GenerationRequest(
        messages=(ChatMessage("user", "Weather in Paris?"),),
        tools=(WEATHER,),
        tool_choice=choice,
        **fields,  # type: ignore[arg-type]
    )


async def test_a_generic_tool_call_is_split_from_the_text(roomy) -> None:  # type: ignore[no-untyped-def]
    backend, engine = roomy
    backend.enqueue('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}')
    events = await collect(engine, tool_request("required"))
    done = events[-1]
    assert isinstance(done, Finished) and done.finish_reason is FinishReason.TOOL_CALLS
    assert done.text == "" and [(c.name, c.arguments) for c in done.tool_calls] == [
        ("get_weather", '{"city": "Paris"}')
    ]
    assert done.tool_calls[0].id.startswith("call_")
    pieces = [p for e in events if isinstance(e, TokenDelta) for p in e.tool_calls]
    assert (pieces[0].index, pieces[0].id, pieces[0].name) == (
        0,
        done.tool_calls[0].id,
        "get_weather",
    )
    assert "".join(p.arguments for p in pieces) == done.tool_calls[0].arguments
    assert not any(isinstance(e, TokenDelta) and e.text for e in events)
    prompt = backend.history[-1].prompt
    assert "get_weather" in prompt and "The weather in a city" in prompt  # offered to the model


async def test_a_generic_answer_streams_its_text_only(roomy) -> None:  # type: ignore[no-untyped-def]
    backend, engine = roomy
    backend.enqueue('{"response": "It is \\"sunny\\"\\n."}')
    events = await collect(engine, tool_request())
    done = events[-1]
    assert isinstance(done, Finished) and done.finish_reason is FinishReason.STOP
    assert done.text == 'It is "sunny"\n.' and done.tool_calls == ()
    assert "".join(e.text for e in events if isinstance(e, TokenDelta)) == done.text


async def test_no_tool_is_offered_with_tool_choice_none(roomy) -> None:  # type: ignore[no-untyped-def]
    backend, engine = roomy
    backend.enqueue('{"tool_calls": []}')
    events = await collect(engine, tool_request("none"))
    done = events[-1]
    assert isinstance(done, Finished) and done.text == '{"tool_calls": []}'  # just text
    assert "get_weather" not in backend.history[-1].prompt


async def test_a_hermes_template_gets_the_tools_and_its_calls_are_recognised() -> None:
    template = ChatTemplate.builtin("chatml-tools").source
    backend = FakeBackend(chat_template=template, n_ctx=4096, pool_mode="batched", slots=1)
    engine = await Engine.start(backend, EngineConfig(pool_size=1, max_queue=1))
    try:
        backend.enqueue(
            'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
            "</tool_call>"
        )
        events = await collect(engine, tool_request())
    finally:
        await engine.aclose()
    done = events[-1]
    assert isinstance(done, Finished) and done.finish_reason is FinishReason.TOOL_CALLS
    assert done.text == "Checking." and done.tool_calls[0].arguments == '{"city":"Oslo"}'
    assert "<tools>" in backend.history[-1].prompt


async def test_a_history_with_calls_and_answers_is_rendered(roomy) -> None:  # type: ignore[no-untyped-def]
    backend, engine = roomy
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    request = GenerationRequest(
        messages=(
            ChatMessage("user", "Weather in Paris?"),
            ChatMessage("assistant", "", (call,)),
            ChatMessage("tool", "sunny", tool_call_id="call_1"),
        ),
        tools=(WEATHER,),
    )
    await collect(engine, request)
    prompt = backend.history[-1].prompt
    assert '"city": "Paris"' in prompt and "sunny" in prompt


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"choice": "sometimes"}, "tool_choice"),
     ({"choice": "required", "tool_name": "get_time"}, "tool_name"),
     ({"sampling": SamplingParams(json_schema='{"type": "object"}')}, "tools")],
)  # fmt: skip
def test_bad_tool_requests_name_their_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        tool_request(**fields)  # type: ignore[arg-type]
    assert err.value.field == field


def test_a_tool_needs_a_good_name_and_schema() -> None:
    with pytest.raises(InvalidRequestError, match="1 to 64 characters"):
        Tool("get weather")
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        Tool("f", parameters="{")


# -- reasoning -------------------------------------------------------------------------------


async def test_a_chat_answers_reasoning_is_apart_from_its_text(roomy) -> None:  # type: ignore[no-untyped-def]
    backend, engine = roomy
    backend.enqueue("<think>Ada is a name.</think>\n\nHello, Ada!")
    events = await collect(engine, GenerationRequest(messages=(ChatMessage("user", "Hi"),)))
    done = events[-1]
    assert isinstance(done, Finished)
    assert (done.text, done.reasoning) == ("Hello, Ada!", "Ada is a name.")
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    assert "".join(d.reasoning for d in deltas) == done.reasoning
    assert "".join(d.text for d in deltas) == done.text
    backend.enqueue("<think>x</think>y")
    kept = GenerationRequest(messages=(ChatMessage("user", "Hi"),), split_reasoning=False)
    done = (await collect(engine, kept))[-1]
    assert isinstance(done, Finished) and (done.text, done.reasoning) == ("<think>x</think>y", "")
    backend.enqueue("<think>x</think>y")
    raw = (await collect(engine, GenerationRequest(prompt="Hi")))[-1]  # a prompt: no split
    assert isinstance(raw, Finished) and raw.text == "<think>x</think>y"


async def test_a_template_that_opens_the_think_block() -> None:
    template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|><think>\n"
    )
    backend = FakeBackend(chat_template=template, pool_mode="batched", slots=1)
    engine = await Engine.start(backend, EngineConfig(pool_size=1, max_queue=1))
    try:
        backend.enqueue("Thinking.</think>Answer.")
        done = (await collect(engine, GenerationRequest(messages=(ChatMessage("user", "Hi"),))))[-1]
    finally:
        await engine.aclose()
    assert isinstance(done, Finished) and (done.text, done.reasoning) == ("Answer.", "Thinking.")


async def test_a_hermes_answer_calls_only_what_is_offered_and_once_unless_parallel() -> None:
    """Hermes auto answers are not held by a grammar: a block naming a tool not offered, or a
    second call when one is allowed, is text; arguments written as a JSON string are a call."""
    template = ChatTemplate.builtin("chatml-tools").source
    backend = FakeBackend(chat_template=template, n_ctx=4096, pool_mode="batched", slots=1)
    engine = await Engine.start(backend, EngineConfig(pool_size=1, max_queue=1))
    block = '<tool_call>{{"name": "{}", "arguments": {}}}</tool_call>'
    try:
        backend.enqueue(block.format("rm_rf", "{}") + block.format("get_weather", '"{}"'))
        first = (await collect(engine, tool_request()))[-1]
        backend.enqueue(block.format("get_weather", "{}") + block.format("get_weather", "{}"))
        single = (await collect(engine, tool_request(parallel_tool_calls=False)))[-1]
    finally:
        await engine.aclose()
    assert isinstance(first, Finished) and [c.name for c in first.tool_calls] == ["get_weather"]
    assert first.text == block.format("rm_rf", "{}")
    assert isinstance(single, Finished) and len(single.tool_calls) == 1
    assert single.text == block.format("get_weather", "{}")


@pytest.mark.parametrize("syntax", ["generic", "hermes"])
async def test_an_answer_cut_inside_a_call_shows_no_markup(syntax: str) -> None:
    template = ChatTemplate.builtin("chatml-tools").source if syntax == "hermes" else None
    backend = FakeBackend(chat_template=template, n_ctx=4096, pool_mode="contexts", slots=1)
    engine = await Engine.start(backend, EngineConfig(pool_size=1, max_queue=1))
    reply = (
        'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Par'
        if syntax == "hermes"
        else '{"tool_c'
    )
    try:
        backend.enqueue(reply)
        done = (
            await collect(engine, tool_request(sampling=SamplingParams(max_tokens=len(reply))))
        )[-1]
    finally:
        await engine.aclose()
    assert isinstance(done, Finished) and done.finish_reason is FinishReason.LENGTH
    assert "tool_c" not in done.text and done.tool_calls == ()


async def test_a_required_call_after_a_template_that_opens_the_think_block() -> None:
    """The tools' grammar holds the whole answer: it is not taken for reasoning."""
    template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|><think>\n"
    )
    async with templated(template) as (backend, engine):
        done = await required_call(backend, engine)
    assert isinstance(done, Finished) and done.finish_reason is FinishReason.TOOL_CALLS
    assert done.reasoning == "" and done.tool_calls[0].name == "get_weather"


# -- embeddings ------------------------------------------------------------------------------


async def test_embeddings_on_the_fake() -> None:
    backend = FakeBackend(n_ctx=64, embeddings=True)
    engine = await Engine.start(backend, EngineConfig(pool_size=1, max_queue=1))
    try:
        assert engine.embedding_dimensions == 8
        vectors, tokens = await engine.embed(EmbeddingRequest(texts=("ab", "ab", "cd")))
        assert tokens == 9 and vectors[0] == vectors[1] != vectors[2]  # BOS + 2 bytes each
        assert all(abs(sum(x * x for x in v) - 1) < 1e-9 for v in vectors)
        by_ids, _ = await engine.embed(EmbeddingRequest(token_inputs=((BOS, 97, 98),)))
        assert by_ids[0] == vectors[0]
        for request, field in (
            (EmbeddingRequest(texts=("x" * 64,)), "input[0]"),  # 65 tokens > n_ctx
            (EmbeddingRequest(token_inputs=((1, 9999),)), "input[0]"),
        ):
            with pytest.raises(InvalidRequestError) as err:
                await engine.embed(request)
            assert err.value.field == field
    finally:
        await engine.aclose()
    plain = await Engine.start(FakeBackend(), EngineConfig(pool_size=1, max_queue=1))
    try:
        with pytest.raises(InvalidRequestError) as err:
            await plain.embed(EmbeddingRequest(texts=("ab",)))
        assert err.value.field == "model"
    finally:
        await plain.aclose()


@pytest.mark.parametrize(
    ("fields", "field"),
    [({}, "input"), ({"texts": ("a",), "token_inputs": ((1,),)}, "input"),
     ({"texts": ("a", "")}, "input[1]"), ({"texts": ("a",) * 2049}, "input")],
)  # fmt: skip
def test_bad_embedding_requests_name_their_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        EmbeddingRequest(**fields)  # type: ignore[arg-type]
    assert err.value.field == field


async def test_tools_reach_a_template_that_refuses_a_system_role() -> None:
    """Gemma 2's template raises on a system message: the tools' text goes to the first user
    turn instead; the request's own system message is still refused, naming messages."""
    template = (
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    )
    async with templated(template) as (backend, engine):
        done = await required_call(backend, engine)
        assert isinstance(done, Finished) and done.finish_reason is FinishReason.TOOL_CALLS
        prompt = backend.history[-1].prompt
        assert (
            prompt.startswith("<user>")
            and "get_weather" in prompt
            and "Weather in Paris?" in prompt
        )
        own = GenerationRequest(
            messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"))
        )
        with pytest.raises(InvalidRequestError, match="System role not supported") as err:
            await collect(engine, own)
        assert err.value.field == "messages"
