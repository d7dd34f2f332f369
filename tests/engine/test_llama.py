"""The engine on real llama.cpp and the real default model (SmolLM2-135M-Instruct Q4_1)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import psutil
import pytest

from llm_service.engine import (
    Backend,
    ChatMessage,
    Engine,
    EngineConfig,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    Started,
    TokenDelta,
    llama,
)
from llm_service.engine.backend import ContextResetError
from llm_service.engine.batching import BatchSlot
from llm_service.engine.chat_template import ChatTemplate
from llm_service.engine.llama import (
    LLAMA_CPP_COMMIT,
    LlamaBackend,
    grammar_nesting,
    grammar_repetitions,
)
from llm_service.errors import (
    InvalidRequestError,
    ModelLoadError,
    OverloadedError,
    PromptTooLongError,
)
from llm_service.settings import ServiceSettings
from llm_service.types import Tool
from llm_service.wiring import load_backend
from tests.conftest import TEST_N_CTX, TEST_PREFILL_CHUNK, TEST_SLOTS
from tests.support import collect, deltas, final

pytestmark = pytest.mark.model
# For the tests of what only batched mode does (the others run in both modes).
batched_only = pytest.mark.parametrize("llama_backend", ["batched"], indirect=True)

PROBE = GenerationRequest(
    prompt="The three primary colours are",
    sampling=SamplingParams(temperature=0, max_tokens=24),
)
LONG_PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step, for a curious child.",
]


@pytest.fixture
async def engine(llama_backend: Backend) -> AsyncIterator[Engine]:
    engine = await Engine.start(
        _Borrowed(llama_backend), EngineConfig(pool_size=2, max_queue=1, queue_timeout_s=60)
    )
    yield engine
    await engine.aclose()
    assert engine.pool_state().leased == 0


class _Borrowed:
    """The session's backend, lent to one engine: closing the engine must not free the model."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> object:
        return getattr(self._backend, name)

    def close(self) -> None:
        pass


async def probe_each_context(engine: Engine) -> list[str]:
    """The probe's output on every context of the pool, in context order.

    To steer the probe onto context i, every context is leased by a holder task, then only
    context i is released; the probe's Started event confirms where it ran.
    """
    outputs = []
    size = engine.pool_state().size
    for wanted in range(size):
        leased: asyncio.Queue[int] = asyncio.Queue()
        holders: dict[int, tuple[asyncio.Event, asyncio.Task[None]]] = {}

        async def hold(release: asyncio.Event, leased: asyncio.Queue[int] = leased) -> None:
            async with engine.pool.lease() as lease:
                await leased.put(lease.context.index)
                await release.wait()

        for _ in range(size):
            release = asyncio.Event()
            task = asyncio.create_task(hold(release))
            holders[await leased.get()] = (release, task)
        release, task = holders.pop(wanted)
        release.set()
        await task
        events = await collect(engine, PROBE)
        started = events[0]
        assert isinstance(started, Started) and started.slot == wanted
        outputs.append(final(events).text)
        for release, task in holders.values():
            release.set()
            await task
    return outputs


async def test_model_info(engine: Engine) -> None:
    info = engine.info
    assert info.n_ctx == TEST_N_CTX
    assert info.n_ctx_train == 8192
    assert info.n_params > 100_000_000
    assert info.llama_cpp_commit == LLAMA_CPP_COMMIT == "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
    assert info.chat_template and "im_start" in info.chat_template


def test_a_chosen_chat_template_replaces_the_ggufs_own(caplog: pytest.LogCaptureFixture) -> None:
    settings = ServiceSettings(
        chat_template="chatml-tools", n_ctx=256, n_threads=2, pool_mode="contexts"
    )
    with caplog.at_level(logging.INFO, "llm_service.engine"):
        backend = load_backend(settings, progress=False)
    try:
        assert "chat template: built-in chatml-tools" in caplog.messages
        assert backend.info.chat_template == ChatTemplate.builtin("chatml-tools").source
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        assert backend.render_chat(messages, None) == (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        # With tools: the tools section, with the model's real BOS and EOS in the environment.
        tool = {"type": "function", "function": {"name": "now", "parameters": {}}}
        prompt = backend.render_chat([{"role": "user", "content": "Time?"}], [tool])
        assert prompt.startswith(
            "<|im_start|>system\n# Tools\n\nYou may call one or more functions"
        )
        assert (
            '<tools>\n{"type": "function", "function": {"name": "now", "parameters": {}}}\n'
            "</tools>" in prompt
        )
        assert prompt.endswith("<|im_start|>user\nTime?<|im_end|>\n<|im_start|>assistant\n")
        # Its turn markers are the model's special tokens, one each.
        (im_start,) = backend.tokenize("<|im_start|>", add_special=False, parse_special=True)
        assert backend.tokenize(prompt, add_special=False, parse_special=True)[0] == im_start
    finally:
        backend.close()


async def test_greedy_probe_is_stable_on_every_context_after_other_work(engine: Engine) -> None:
    before = await probe_each_context(engine)
    assert before[0] and all(out == before[0] for out in before)

    # Unrelated long requests on both contexts at once.
    long_runs = [
        collect(engine, GenerationRequest(prompt=p, sampling=SamplingParams(max_tokens=64, seed=7)))
        for p in LONG_PROMPTS
    ]
    results = await asyncio.gather(*long_runs)
    assert {r[0].slot for r in results if isinstance(r[0], Started)} == {0, 1}

    after = await probe_each_context(engine)
    assert after == before


async def test_probe_is_stable_after_a_request_cancelled_halfway(engine: Engine) -> None:
    before = await probe_each_context(engine)
    for prompt in LONG_PROMPTS * 2:  # twice: lands on both contexts
        request = GenerationRequest(prompt=prompt, sampling=SamplingParams(max_tokens=200))
        n = 0
        async with contextlib.aclosing(engine.generate(request)) as stream:
            async for event in stream:
                n += isinstance(event, TokenDelta)
                if n == 20:
                    break
        await asyncio.wait_for(engine.pool.wait_idle(), 2)
    after = await probe_each_context(engine)
    assert after == before


async def test_isolation_check_fails_when_the_cache_is_not_cleared(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves the isolation tests can fail: skip the KV clear and the probe output changes."""
    before = await probe_each_context(engine)
    # A context of its own (contexts mode), or the shared one's clear of a sequence (batched
    # mode: the scheduler clears a slot as its request ends, and the pool's reset after it).
    if isinstance(engine.pool._free[0], BatchSlot):
        monkeypatch.setattr(llama.LlamaBatchDecoder, "clear", lambda self, seq: None)
    else:
        monkeypatch.setattr(type(engine.pool._free[0]), "reset", lambda self: None)
    await collect(
        engine, GenerationRequest(prompt=LONG_PROMPTS[0], sampling=SamplingParams(max_tokens=40))
    )
    await collect(
        engine, GenerationRequest(prompt=LONG_PROMPTS[1], sampling=SamplingParams(max_tokens=40))
    )
    leaked = [final(await collect(engine, PROBE)).text for _ in range(2)]
    assert any(out != before[0] for out in leaked)
    # Put things right for the fixture's teardown.
    monkeypatch.undo()
    for context in engine.pool._free:
        context.reset()


async def test_two_in_flight_third_waits_fourth_refused(engine: Engine) -> None:
    first_token: dict[int, float] = {}
    finished: dict[int, float] = {}

    async def run(i: int) -> None:
        request = GenerationRequest(
            prompt=LONG_PROMPTS[i % 2], sampling=SamplingParams(max_tokens=48, seed=i)
        )
        async with contextlib.aclosing(engine.generate(request)) as stream:
            async for event in stream:
                if isinstance(event, TokenDelta):
                    first_token.setdefault(i, time.monotonic())
        finished[i] = time.monotonic()

    tasks = [asyncio.create_task(run(i)) for i in range(3)]
    for _ in range(200):
        await asyncio.sleep(0.01)
        if engine.pool_state().waiting == 1 and engine.pool_state().leased == 2:
            break
    state = engine.pool_state()
    assert (state.leased, state.waiting, state.free) == (2, 1, 0)
    t0 = time.monotonic()
    with pytest.raises(OverloadedError):
        await collect(engine, PROBE)
    assert time.monotonic() - t0 < 0.5  # refused at once, not after a wait
    await asyncio.gather(*tasks)
    # The two that got contexts first each produced tokens before either finished.
    running_first = sorted(first_token, key=first_token.__getitem__)[:2]
    assert max(first_token[i] for i in running_first) < min(finished[i] for i in running_first)
    assert len(finished) == 3
    assert engine.pool_state().free == 2


async def test_200_requests_with_cancellations_and_errors_leak_nothing(engine: Engine) -> None:
    rng = random.Random(1234)
    process = psutil.Process()
    outcomes: dict[str, int] = {"ok": 0, "cancelled": 0, "error": 0}

    async def one(i: int) -> None:
        kind = rng.choice(["ok", "ok", "ok", "cancel", "error"])
        if kind == "error":
            bad = rng.choice(
                [
                    lambda: GenerationRequest(prompt="x " * 2000),
                    lambda: GenerationRequest(
                        prompt="hi", sampling=SamplingParams(grammar="root ::= (")
                    ),
                    lambda: GenerationRequest(
                        prompt="hi", sampling=SamplingParams(max_tokens=5000)
                    ),
                ]
            )
            with pytest.raises(InvalidRequestError):
                await collect(engine, bad())
            outcomes["error"] += 1
            return
        request = GenerationRequest(
            prompt=f"Request {i}: say something about the number {i}.",
            sampling=SamplingParams(max_tokens=rng.randint(2, 8), seed=i),
        )
        if kind == "cancel":
            task = asyncio.create_task(collect(engine, request))
            await asyncio.sleep(rng.uniform(0, 0.05))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            outcomes["cancelled"] += 1
        else:
            assert final(await collect(engine, request)).text is not None
            outcomes["ok"] += 1

    async def batch(start: int, count: int) -> None:
        sem = asyncio.Semaphore(2)  # two at a time: queue never overflows

        async def guarded(i: int) -> None:
            async with sem:
                await one(i)

        await asyncio.gather(*(guarded(i) for i in range(start, start + count)))

    await batch(0, 20)  # warm-up: allocator pools, code paths
    await engine.pool.wait_idle()
    rss_before = process.memory_info().rss
    await batch(20, 200)
    await asyncio.wait_for(engine.pool.wait_idle(), 5)
    rss_growth_mb = (process.memory_info().rss - rss_before) / 2**20
    state = engine.pool_state()
    assert (state.free, state.leased, state.waiting, state.replaced) == (2, 0, 0, 0)
    assert min(outcomes.values()) > 10, outcomes
    assert rss_growth_mb < 20, f"RSS grew by {rss_growth_mb:.1f} MB over 200 requests"
    print(f"\n200 requests {outcomes}: RSS growth {rss_growth_mb:.2f} MB")


async def test_bad_input_leaves_the_pool_whole(engine: Engine) -> None:
    cases: list[tuple[GenerationRequest, type[Exception], str]] = [
        (GenerationRequest(prompt="word " * 1500), PromptTooLongError, "prompt"),
        (
            GenerationRequest(prompt="hi", sampling=SamplingParams(max_tokens=TEST_N_CTX + 1)),
            PromptTooLongError,
            "sampling.max_tokens",
        ),
        (
            GenerationRequest(prompt="hi", sampling=SamplingParams(grammar='root ::= "a" (')),
            InvalidRequestError,
            "sampling.grammar",
        ),
        (
            GenerationRequest(
                prompt="hi", sampling=SamplingParams(grammar="root ::= undefined-rule")
            ),
            InvalidRequestError,
            "sampling.grammar",
        ),
        (
            GenerationRequest(
                prompt="hi",
                sampling=SamplingParams(json_schema=json.dumps({"$ref": "#/definitions/missing"})),
            ),
            InvalidRequestError,
            "sampling.json_schema",
        ),
        (
            GenerationRequest(
                prompt="hi",
                sampling=SamplingParams(json_schema=json.dumps({"type": "no-such-type"})),
            ),
            InvalidRequestError,
            "sampling.json_schema",
        ),
        # Found by the hostile-input suite: each crashed or swamped the service.
        (
            GenerationRequest(
                prompt="hi",
                sampling=SamplingParams(grammar="root ::= " + "(" * 20_000 + '"a"' + ")" * 20_000),
            ),
            InvalidRequestError,
            "sampling.grammar",
        ),  # llama.cpp's parser: a stack overflow
        (
            GenerationRequest(prompt="hi", sampling=SamplingParams(grammar='root ::= "a"{1,0}')),
            InvalidRequestError,
            "sampling.grammar",
        ),  # llama.cpp allocated without end (12 GB in a minute)
        (
            GenerationRequest(prompt="hi", sampling=SamplingParams(grammar='root ::= "a"{,99999}')),
            InvalidRequestError,
            "sampling.grammar",
        ),  # spelled out 99,999 times
        (
            GenerationRequest(prompt="hi", sampling=SamplingParams(penalty_last_n=2**31 - 1)),
            InvalidRequestError,
            "sampling.penalty_last_n",
        ),  # a ring buffer of 8 GiB
    ]
    for request, error, field in cases:
        with pytest.raises(error) as info:
            await collect(engine, request)
        assert isinstance(info.value, InvalidRequestError) and info.value.field == field, info.value
        assert engine.pool_state().free == 2 and engine.pool_state().leased == 0
    assert final(await collect(engine, PROBE)).finish_reason is FinishReason.LENGTH


# Each takes more than 0.2 off a logit of 1.0 once its token was generated (1.0 / 1.3 = 0.77).
PENALTIES = [
    {"repeat_penalty": 1.3},
    {"frequency_penalty": 1.5},
    {"presence_penalty": 2.0},
    {"repeat_penalty": 1.3, "penalty_last_n": -1},
]


@pytest.mark.parametrize("penalty", PENALTIES)
async def test_penalties_apply(engine: Engine, penalty: dict[str, Any]) -> None:
    """Found by the hostile-input suite: every penalty was an internal error (llama.cpp's
    penalties sampler takes n_vocab first, at this commit)."""
    request = GenerationRequest(
        prompt="one one one one one one one one",
        sampling=SamplingParams(max_tokens=12, temperature=0, **penalty),
    )
    assert final(await collect(engine, request)).finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("penalty", PENALTIES)
def test_penalties_push_down_what_was_generated(
    llama_backend: Backend, penalty: dict[str, Any]
) -> None:
    """The request's real sampler chain on made-up logits, where the outcome is arithmetic:
    token 7 leads token 8 by 0.2; once 7 was generated, each of these penalties takes more than
    that off it (1.0 / 1.3 = 0.77 < 0.8; 1.0 - 1.5; 1.0 - 2.0), and the greedy choice is 8."""
    backend = llama_backend
    assert isinstance(backend, LlamaBackend)
    logits = np.full(backend.info.n_vocab, -100.0, dtype=np.float32)
    logits[7], logits[8] = 1.0, 0.8
    plain = backend.create_sampler(SamplingParams(temperature=0))
    penalised = backend.create_sampler(SamplingParams(temperature=0, **penalty))
    try:
        assert [plain.sample_logits(logits) for _ in range(3)] == [7, 7, 7]
        assert [penalised.sample_logits(logits) for _ in range(2)] == [7, 8]
    finally:
        plain.close()
        penalised.close()


def test_logit_bias_moves_the_choice(llama_backend: Backend) -> None:
    """The request's real chain on made-up logits: -100 keeps the leader out, +100 lifts a
    token from the bottom to the top."""
    backend = llama_backend
    assert isinstance(backend, LlamaBackend)
    logits = np.full(backend.info.n_vocab, -50.0, dtype=np.float32)
    logits[7], logits[8] = 1.0, 0.8
    for bias, chosen in (((), 7), (((7, -100.0),), 8), (((9, 100.0),), 9)):
        sampler = backend.create_sampler(SamplingParams(temperature=0, logit_bias=bias))
        try:
            assert sampler.sample_logits(logits) == chosen, bias
        finally:
            sampler.close()


async def test_logit_bias_keeps_a_token_out_of_a_real_answer(engine: Engine) -> None:
    """Two runs on this machine: the greedy first token, then the same request with that token
    biased by -100 starts otherwise; an id outside the vocabulary is refused by name."""
    request = GenerationRequest(prompt="The capital of France is", sampling=SamplingParams(
        max_tokens=1, temperature=0))  # fmt: skip
    first = deltas(await collect(engine, request))[0].token_ids[0]
    biased = GenerationRequest(prompt=request.prompt, sampling=SamplingParams(
        max_tokens=1, temperature=0, logit_bias=((first, -100.0),)))  # fmt: skip
    assert deltas(await collect(engine, biased))[0].token_ids[0] != first
    outside = SamplingParams(logit_bias=((engine.info.n_vocab, 1.0),))
    with pytest.raises(InvalidRequestError) as info:
        await collect(engine, GenerationRequest(prompt="Hi", sampling=outside))
    assert info.value.field == "sampling.logit_bias"
    assert engine.pool_state().free == engine.pool_state().size


@pytest.mark.parametrize(
    "sampling", [{"temperature": 0}, {"temperature": 0, "grammar": "root ::= [a-z ]+"}]
)
async def test_logprobs_of_real_tokens(engine: Engine, sampling: dict[str, Any]) -> None:
    """Greedy: each token is its own top choice, with its own log probability; 20 alternatives
    hold at most all the probability; the tokens spell the text. With a grammar (its path
    samples from the logits itself) the log probabilities are still the model's, before the
    grammar: the chosen token may rank below tokens the grammar ruled out."""
    request = GenerationRequest(
        prompt="The capital of France is",
        sampling=SamplingParams(max_tokens=12, logprobs=20, **sampling),
    )
    events = await collect(engine, request)
    listed = [lp for d in deltas(events) for lp in d.logprobs]
    assert len(listed) == final(events).usage.completion_tokens
    assert b"".join(lp.piece for lp in listed).decode() == final(events).text
    for lp in listed:
        assert len(lp.top) == 20 and lp.logprob <= 0
        ranked = {t.token_id: t.logprob for t in lp.top}
        if "grammar" in sampling:
            assert (
                lp.logprob <= lp.top[0].logprob
                and ranked.get(lp.token_id, lp.logprob) == lp.logprob
            )
        else:
            assert lp.top[0].token_id == lp.token_id and lp.top[0].logprob == lp.logprob
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        assert sum(np.exp(t.logprob) for t in lp.top) <= 1 + 1e-5


@pytest.mark.parametrize(
    ("constraint", "after"),
    [
        ({"grammar": "root ::= [z-a]"}, 0),  # an empty class
        ({"grammar": 'root ::= "\\x00"'}, 0),  # NUL: in no token
        ({"json_schema": '{"const": "\\u0000"}'}, 1),  # '"', then NUL
        ({"grammar": 'root ::= "ab" "\\x00"'}, None),  # a dead end after some output
    ],
)
async def test_a_grammar_that_allows_no_token_ends_the_request_not_the_service(
    engine: Engine, constraint: dict[str, str], after: int | None
) -> None:
    """Found by the hostile-input suite: llama.cpp sampled a token all the same, its grammar
    threw through ctypes, and the process aborted."""
    request = GenerationRequest(
        prompt="hi", sampling=SamplingParams(max_tokens=8, temperature=0, **constraint)
    )
    end = final(await collect(engine, request))
    assert end.finish_reason is FinishReason.ERROR
    field = "sampling.json_schema" if "json_schema" in constraint else "sampling.grammar"
    assert end.error_field == field and "allows no token after" in (end.error or "")
    if after is not None:
        assert end.usage.completion_tokens == after
    else:
        assert end.usage.completion_tokens > 0
    assert engine.pool_state().free == 2
    assert final(await collect(engine, PROBE)).finish_reason is FinishReason.LENGTH


def test_grammar_nesting_skips_strings_classes_and_comments() -> None:
    assert grammar_nesting('root ::= ("a" | ("b" "c")*)+') == 2
    assert grammar_nesting('root ::= "((((" [(((] x  # (((((\nx ::= ("\\"(")') == 1
    assert grammar_nesting("root ::= " + "(" * 3000 + '"a"' + ")" * 3000) == 3000
    grammar = 'root ::= "a"{1,0} [b]{2} x{3,} "{9}" [{8}] # {7}\nx ::= "c"'
    assert grammar_repetitions(grammar) == [(1, 0), (2, 2), (3, None)]


def test_missing_and_non_gguf_model_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        LlamaBackend.load(tmp_path / "nope.gguf", n_ctx=256)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        LlamaBackend.load(junk, n_ctx=256)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="could not load"):
        LlamaBackend.load(truncated, n_ctx=256)


async def test_multibyte_grammar_streams_valid_utf8(engine: Engine) -> None:
    request = GenerationRequest(
        prompt="Some emoji and Japanese:",
        sampling=SamplingParams(
            temperature=0.9,
            seed=3,
            max_tokens=24,
            grammar='root ::= ("🙂" | "🚀" | "日本" | "語")+',
        ),
    )
    events = await collect(engine, request)
    chunks = [d.text for d in deltas(events)]
    done = final(events)
    assert "".join(chunks) == done.text
    assert done.text and set(done.text) <= set("🙂🚀日本語")
    for chunk in chunks:
        chunk.encode("utf-8")  # a lone surrogate or partial character would fail here
        assert "\ufffd" not in chunk
    # Some tokens carried only part of a character: their text was held back (empty delta).
    assert any(d.text == "" for d in deltas(events))


async def test_json_schema_output_validates(engine: Engine) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "likes_tea": {"type": "boolean"},
        },
        "required": ["name", "age", "likes_tea"],
        "additionalProperties": False,
    }
    request = GenerationRequest(
        messages=(ChatMessage("user", "Describe a person called Ada as JSON."),),
        sampling=SamplingParams(temperature=0, max_tokens=96, json_schema=json.dumps(schema)),
    )
    done = final(await collect(engine, request))
    assert done.finish_reason is FinishReason.STOP, done
    jsonschema.validate(json.loads(done.text), schema)


WEATHER = Tool(
    "get_weather",
    "The current weather in a city",
    json.dumps({
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40},
                       "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False,
    }),
)  # fmt: skip
CLOCK = Tool(
    "get_time",
    "The time in a timezone",
    json.dumps({"type": "object", "properties": {"tz": {"type": "string", "maxLength": 40}},
                "required": ["tz"]}),
)  # fmt: skip
ASK_WEATHER = (ChatMessage("user", "What is the weather in Paris?"),)


async def assert_calls_validate(engine: Engine, **fields: Any) -> list[Any]:
    """A tool request's calls: each a tool's, its arguments valid for the tool's schema; the
    streamed pieces add up to them, and the text holds no call markup."""
    request = GenerationRequest(
        messages=ASK_WEATHER, tools=(WEATHER, CLOCK),
        sampling=SamplingParams(temperature=0, max_tokens=96), **fields,
    )  # fmt: skip
    events = await collect(engine, request)
    done = final(events)
    assert done.finish_reason is FinishReason.TOOL_CALLS, done
    schemas = {t.name: json.loads(t.parameters) for t in (WEATHER, CLOCK)}
    for call in done.tool_calls:
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    pieces = [p for d in deltas(events) for p in d.tool_calls]
    for index, call in enumerate(done.tool_calls):
        mine = [p for p in pieces if p.index == index]
        assert (mine[0].id, mine[0].name) == (call.id, call.name)
        assert "".join(p.arguments for p in mine) == call.arguments
    assert "tool_call" not in "".join(d.text for d in deltas(events))
    return list(done.tool_calls)


async def test_required_and_named_tool_calls_follow_the_schema(engine: Engine) -> None:
    """The default model's template has no tool syntax: the generic JSON form, constrained."""
    named = await assert_calls_validate(engine, tool_choice="required", tool_name="get_time")
    assert {c.name for c in named} == {"get_time"}
    calls = await assert_calls_validate(engine, tool_choice="required", parallel_tool_calls=False)
    assert len(calls) == 1


async def test_auto_and_none_answer_in_text(engine: Engine) -> None:
    """The generic form's plain answer is its text, never its JSON; "none" offers no tool."""
    for choice in ("auto", "none"):
        request = GenerationRequest(
            messages=(ChatMessage("user", "Say hello to Ada."),), tools=(WEATHER,),
            tool_choice=choice, sampling=SamplingParams(temperature=0, max_tokens=24),
        )  # fmt: skip
        done = final(await collect(engine, request))
        if choice == "none":  # no tool offered: never a call
            assert done.finish_reason is not FinishReason.TOOL_CALLS and not done.tool_calls
        if done.finish_reason is not FinishReason.TOOL_CALLS:
            assert not done.text.lstrip().startswith('{"'), done.text


async def test_the_hermes_syntax_of_a_template_with_tools(tmp_path: Path) -> None:
    """With the built-in chatml-tools template (Qwen2.5's tool syntax), the tools are in the
    template's own system section and calls are <tool_call> blocks, constrained when required."""
    settings = ServiceSettings(
        chat_template="chatml-tools", n_ctx=2048, n_threads=2, pool_mode="contexts",
        llama_service_threads=1,
    )  # fmt: skip
    backend = load_backend(settings, progress=False)
    engine = await Engine.start(backend, EngineConfig(pool_size=1, max_queue=1))
    try:
        prompt = await engine.apply_chat_template(ASK_WEATHER)
        assert "<tools>" not in prompt  # no tools offered: no tools section
        calls = await assert_calls_validate(engine, tool_choice="required", tool_name="get_weather")
        assert {c.name for c in calls} == {"get_weather"}
    finally:
        await engine.aclose()


async def test_long_prefill_stops_on_cancel(engine: Engine) -> None:
    request = GenerationRequest(
        prompt="lorem ipsum dolor sit amet " * 90, sampling=SamplingParams(max_tokens=1)
    )  # about 900 prompt tokens: seconds of prefill on 2 cores
    task = asyncio.create_task(collect(engine, request))
    for _ in range(200):
        if engine.pool_state().leased:
            break
        await asyncio.sleep(0.005)
    assert engine.pool_state().leased == 1
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.wait_for(engine.pool.wait_idle(), 2)
    assert time.monotonic() - t0 < 1.0
    assert final(await collect(engine, PROBE)).text == (await probe_each_context(engine))[0]


async def test_deadline_ends_generation(engine: Engine) -> None:
    request = GenerationRequest(
        prompt="1, 2, 3, 4, 5, 6, 7, 8,",  # greedy: counts on for hundreds of tokens
        sampling=SamplingParams(temperature=0, max_tokens=900),
        deadline=time.monotonic() + 0.5,
    )
    done = final(await collect(engine, request))
    assert done.finish_reason is FinishReason.DEADLINE
    assert done.timings.total_ms < 1500


# -- a failed decode (both modes); what batched mode promises ---------------------------------

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy output keeps counting: long and predictable


def aclosing_stream(
    engine: Engine, request: GenerationRequest
) -> contextlib.aclosing[AsyncGenerator[GenerationEvent, None]]:
    return contextlib.aclosing(engine.generate(request))


def token_ids(events: list[GenerationEvent]) -> list[int]:
    return [t for d in deltas(events) for t in d.token_ids]


@batched_only  # contexts mode evaluates the prompt on a context of its own
async def test_a_long_prompt_does_not_stall_a_running_stream(engine: Engine) -> None:
    """While a long prompt is evaluated, a running stream goes on producing tokens.

    Counted in tokens, not timed: the running stream waits for TEST_PREFILL_CHUNK prompt
    tokens at most between two of its tokens, so it gets a token after each chunk of the
    prompt; without that it would get one or two in all.
    """
    running = GenerationRequest(
        prompt=COUNTING, sampling=SamplingParams(temperature=0, max_tokens=600)
    )
    long = GenerationRequest(
        prompt="lorem ipsum dolor sit amet " * 60, sampling=SamplingParams(max_tokens=1)
    )  # about 600 prompt tokens: about ten chunks
    arrivals: list[float] = []

    async def read(stream: AsyncIterator[GenerationEvent]) -> None:
        async for event in stream:
            if isinstance(event, TokenDelta) and event.token_ids:
                arrivals.append(time.monotonic())

    async with contextlib.aclosing(engine.generate(running)) as stream:
        reader = asyncio.create_task(read(stream))
        async with asyncio.timeout(10):
            while len(arrivals) < 3:
                await asyncio.sleep(0.005)
        events: list[tuple[float, GenerationEvent]] = []
        async with contextlib.aclosing(engine.generate(long)) as prompt_stream:
            async for event in prompt_stream:
                events.append((time.monotonic(), event))
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    started_at, started = events[0]
    first_token_at = next(t for t, e in events if isinstance(e, TokenDelta))
    assert isinstance(started, Started)
    chunks = -(-started.prompt_tokens // TEST_PREFILL_CHUNK)
    assert chunks >= 8, started.prompt_tokens
    during = [t for t in arrivals if started_at < t < first_token_at]
    # A token after most chunks; a third of them leaves room for a slow event loop.
    assert len(during) >= chunks // 3 + 1, (len(during), chunks)
    print(f"{len(during)} tokens of the running stream during {chunks} chunks of prompt")


async def test_a_failed_decode_ends_its_requests_with_an_error_and_the_engine_goes_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = await probe_each_context(engine)
    real_decode = llama.llama_cpp.llama_decode
    lock = threading.Lock()
    armed = False

    def failing_decode(ctx: object, batch: object) -> int:
        nonlocal armed
        with lock:
            fail, armed = armed, False
        return -3 if fail else int(real_decode(ctx, batch))

    monkeypatch.setattr(llama.llama_cpp, "llama_decode", failing_decode)
    requests = [
        GenerationRequest(prompt=p, sampling=SamplingParams(temperature=0, max_tokens=80))
        for p in (COUNTING, "Once upon a time")
    ]
    ends = []
    async with contextlib.AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(aclosing_stream(engine, r)) for r in requests]
        for stream in streams:  # both are decoding
            while not isinstance(await anext(stream), TokenDelta):
                pass
        with lock:
            armed = True
        for stream in streams:
            ends.append(final([e async for e in stream]))
    failed = [end for end in ends if end.finish_reason is FinishReason.ERROR]
    # Batched: the failed step held both streams. Contexts: one context failed.
    assert len(failed) == (2 if engine.pool_mode == "batched" else 1), ends
    for end in failed:
        assert end.error is not None and "llama_decode failed" in end.error
        assert "code -3" in end.error
    await asyncio.wait_for(engine.pool.wait_idle(), 2)
    state = engine.pool_state()
    assert (state.free, state.replaced) == (2, 0)
    monkeypatch.undo()
    assert await probe_each_context(engine) == before


@pytest.fixture
async def engine4(llama_backend: Backend) -> AsyncIterator[Engine]:
    """Every slot of the session's shared context (batched mode) in one engine."""
    engine = await Engine.start(
        _Borrowed(llama_backend), EngineConfig(pool_size=TEST_SLOTS, queue_timeout_s=60)
    )
    yield engine
    await engine.aclose()


async def run_in_order(engine: Engine, requests: list[GenerationRequest]) -> list[list[Any]]:
    """Run ``requests`` together, each started once the one before has its slot (so the i-th
    gets slot i of a free pool: the pool leases the lowest free one)."""
    tasks = []
    for request in requests:
        started = asyncio.Event()

        async def run(request: GenerationRequest, started: asyncio.Event) -> list[Any]:
            events: list[Any] = []
            async with contextlib.aclosing(engine.generate(request)) as stream:
                async for event in stream:
                    events.append(event)
                    started.set()
            return events

        tasks.append(asyncio.create_task(run(request, started)))
        await started.wait()
    return await asyncio.gather(*tasks)


@batched_only
async def test_greedy_output_is_bit_identical_alone_batched_and_on_any_slot(
    engine4: Engine,
) -> None:
    others = [
        GenerationRequest(prompt=p, sampling=SamplingParams(temperature=0, max_tokens=n))
        for p, n in ((COUNTING, 40), ("Here is a recipe for pancakes:", 12), ("Dear diary", 30))
    ]
    alone = token_ids(await collect(engine4, PROBE))
    assert len(alone) == 24
    others_alone = [token_ids(await collect(engine4, r)) for r in others]
    assert [len(t) for t in others_alone] == [40, 12, 30]
    assert await probe_each_context(engine4) == [engine4.backend.detokenize(alone)] * TEST_SLOTS
    # Together with three others, in every position: the probe's prompt shares steps with the
    # others' tokens, its tokens with their prompts; and it runs on every slot.
    slots = []
    for position in range(TEST_SLOTS):
        requests = [*others[:position], PROBE, *others[position:]]
        results = await run_in_order(engine4, requests)
        slots.append(results[position][0].slot)
        assert token_ids(results[position]) == alone, f"probe in position {position}"
        rest = results[:position] + results[position + 1 :]
        assert [token_ids(r) for r in rest] == others_alone
    assert sorted(slots) == list(range(TEST_SLOTS))


@batched_only
async def test_releasing_a_slot_clears_it_and_nothing_else(
    engine: Engine, llama_backend: Backend
) -> None:
    decoder = getattr(llama_backend, "decoder", None)
    assert decoder is not None
    counting = GenerationRequest(
        prompt=COUNTING, sampling=SamplingParams(temperature=0, max_tokens=120)
    )
    alone = token_ids(await collect(engine, counting))
    async with contextlib.aclosing(engine.generate(counting)) as running:
        events = [await anext(running)]
        while len(deltas(events)) < 5:
            events.append(await anext(running))
        other = GenerationRequest(prompt="Once upon a time", sampling=SamplingParams(seed=1))
        async with contextlib.aclosing(engine.generate(other)) as released:
            started = await anext(released)
            assert isinstance(started, Started) and started.slot != events[0].slot
            n = 0
            async for event in released:
                n += isinstance(event, TokenDelta)
                if n == 10:
                    break
        # Its lease is over, its slot cleared, while the first stream goes on decoding.
        assert engine.pool_state().leased == 1
        assert decoder.pos_max(started.slot) == -1
        assert decoder.pos_max(events[0].slot) >= 5
        events += [e async for e in running]
    assert final(events).finish_reason is FinishReason.LENGTH
    assert token_ids(events) == alone


class _SchedulerBug(BaseException):
    """What no step catches: the batch scheduler's thread dies of it (a test hook for a bug)."""


@pytest.mark.parametrize("broken", ["scheduler", "resets"])
async def test_a_broken_batched_engine_says_so(broken: str) -> None:
    """On a backend of its own (the session's must stay whole): the scheduler thread killed, or
    every slot's reset failing (each slot is then lost: its replacement fails its reset too)."""
    settings = ServiceSettings(
        n_ctx=256, n_threads=1, pool_mode="batched", llama_service_threads=2, prefill_chunk=64
    )
    backend = await asyncio.to_thread(load_backend, settings, progress=False)
    assert isinstance(backend, LlamaBackend) and backend.decoder is not None
    engine = await Engine.start(backend, EngineConfig(pool_size=2, max_queue=2))
    request = GenerationRequest(prompt="Hello", sampling=SamplingParams(max_tokens=2))
    try:
        assert final(await collect(engine, request)).finish_reason is FinishReason.LENGTH
        assert engine.failure() is None
        if broken == "scheduler":

            def crash(*args: object) -> None:
                raise _SchedulerBug("boom")

            backend.decoder.decode = crash  # type: ignore[method-assign]
            assert final(await collect(engine, request)).finish_reason is FinishReason.ERROR
            assert engine.failure() == "the batch scheduler failed: _SchedulerBug('boom')"
        else:

            def refuse(seq: int) -> None:
                raise ContextResetError(f"sequence {seq} kept its positions")

            backend.decoder.clear = refuse  # type: ignore[method-assign]
            for _ in range(2):
                await collect(engine, request)
                await engine.pool.wait_idle()
            assert engine.pool_state().size == 0
            assert engine.failure() == (
                "every context of the pool failed its reset and could not be replaced"
            )
    finally:
        await engine.aclose()
