"""Chat templates chosen instead of the model's own: the built-in ones render what they promise,
a broken template is refused with its origin and line, and the fake backend applies one."""

from __future__ import annotations

import json
from typing import Any, get_args

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from llm_service.engine import ChatMessage, Engine, EngineConfig, FakeBackend, GenerationRequest
from llm_service.engine.chat_template import ChatTemplate, builtin_template_names, render_messages
from llm_service.errors import ConfigurationError, InvalidRequestError
from llm_service.settings import ServiceSettings
from llm_service.types import ChatTemplateName
from tests.support import collect

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Weather in Paris?"},
]
CHATML = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n"
    "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city (°C)",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
# Two calls (one with arguments as an object, Qwen's form; one as a JSON string, OpenAI's form)
# and their two results.
TOOL_TURNS = [
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            },
            {"function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "content": '{"temp": 23}'},
]
TOOLS_SYSTEM = (
    "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist"
    " with the user query.\n\nYou are provided with function signatures within <tools></tools>"
    " XML tags:\n<tools>\n"
    + json.dumps(WEATHER_TOOL, ensure_ascii=False)
    + "\n</tools>\n\nFor each function call, return a json object with function name and"
    " arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)


def formatter(name: str) -> Jinja2ChatFormatter:
    """The built-in template in the formatter the llama backend renders with."""
    return Jinja2ChatFormatter(ChatTemplate.builtin(name).source, eos_token="</s>", bos_token="")


def render(name: str, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return str(formatter(name)(messages=messages, **kwargs).prompt)  # type: ignore[arg-type]


def test_the_built_in_templates_are_the_settings_choices() -> None:
    assert builtin_template_names() == get_args(ChatTemplateName) == ("chatml", "chatml-tools")
    assert ServiceSettings.model_fields["chat_template"].annotation == ChatTemplateName | None
    # The engine detects the Hermes tool-call syntax by this string in the template.
    assert "<tool_call>" in ChatTemplate.builtin("chatml-tools").source
    assert ChatTemplate.builtin("chatml").origin == "built-in chatml"


def test_chatml_is_plain_chatml() -> None:
    assert render("chatml", CONVERSATION) == CHATML


def test_chatml_tools_without_tools_is_chatml() -> None:
    assert render("chatml-tools", CONVERSATION) == CHATML
    assert render("chatml-tools", CONVERSATION, tools=[]) == CHATML


def test_chatml_tools_lists_the_tools_and_renders_calls_and_results() -> None:
    prompt = render("chatml-tools", CONVERSATION + TOOL_TURNS, tools=[WEATHER_TOOL])
    assert prompt == TOOLS_SYSTEM + (
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>user\n"
        '<tool_response>\n{"temp": 21}\n</tool_response>\n'
        '<tool_response>\n{"temp": 23}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )


def test_chatml_tools_with_no_system_message_starts_with_the_tools() -> None:
    prompt = render("chatml-tools", [{"role": "user", "content": "Hi"}], tools=[WEATHER_TOOL])
    assert prompt.startswith("<|im_start|>system\n# Tools\n\n")
    assert prompt.endswith(
        "</tool_call><|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("name", get_args(ChatTemplateName))
def test_the_fake_renders_as_the_llama_backend_does(name: str) -> None:
    """The fake's Jinja environment is the bindings' (loop controls, generation tags, tojson
    as Transformers writes it, not HTML-escaped), so a template renders the same in both."""
    template = ChatTemplate(
        ChatTemplate.builtin(name).source
        + "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}",
        "test",
    )
    messages = [{"role": "user", "content": "<é & ü>"}, *CONVERSATION]
    expected = Jinja2ChatFormatter(template.source, eos_token="", bos_token="")(messages=messages)  # type: ignore[arg-type]
    rendered = render_messages(template.compile(), messages)
    assert rendered == expected.prompt
    assert '{"role": "user", "content": "<é & ü>"}' in rendered


def test_a_template_jinja_cannot_compile_is_refused_with_its_origin_and_line() -> None:
    broken = ChatTemplate("line one\n{% for m in messages %}\n{{ m.content }\n{% endfor %}", "x")
    with pytest.raises(ConfigurationError) as caught:
        broken.compile()
    assert str(caught.value) == "the chat template (x) is not valid Jinja: line 3: unexpected '}'"
    with pytest.raises(ConfigurationError, match="line 1: Encountered unknown tag 'nope'"):
        ChatTemplate("{% nope %}", "x").compile()


def test_an_unknown_built_in_template_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError) as caught:
        ChatTemplate.builtin("llama3")
    assert str(caught.value) == (
        "unknown chat template 'llama3'; the built-in ones are: chatml, chatml-tools"
    )


async def test_the_fake_backend_applies_a_chosen_template() -> None:
    source = ChatTemplate.builtin("chatml").source
    backend = FakeBackend(chat_template=source, pool_mode="contexts", slots=1)
    assert backend.info.chat_template == source
    messages = tuple(ChatMessage(m["role"], m["content"]) for m in CONVERSATION)
    assert backend.render_chat(CONVERSATION, None) == CHATML
    engine = await Engine.start(backend, EngineConfig(pool_size=1, max_queue=1))
    try:
        await collect(engine, GenerationRequest(messages=messages))
    finally:
        await engine.aclose()
    assert backend.history[-1].prompt == CHATML  # what was evaluated


def test_the_fake_backends_own_format_without_a_template() -> None:
    backend = FakeBackend()
    assert backend.info.chat_template == "(fake)"
    assert backend.render_chat([{"role": "user", "content": "hi"}], None) == "<user>hi\n<assistant>"


def test_the_fake_backend_reports_a_template_that_rejects_messages() -> None:
    backend = FakeBackend(chat_template="{{ raise_exception('no system messages') }}")
    with pytest.raises(InvalidRequestError, match="rejected them: no system messages"):
        backend.render_chat([{"role": "system", "content": "hi"}], None)
    with pytest.raises(ConfigurationError, match="given to FakeBackend"):
        FakeBackend(chat_template="{% if %}")
