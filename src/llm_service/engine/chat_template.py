"""Chat templates chosen instead of the model's own: a built-in one, or a Jinja file.

The built-in templates are package data, ``templates/<name>.jinja``. A template is compiled
when it is chosen, before the model is loaded, in the same Jinja environment as the bindings'
``Jinja2ChatFormatter`` (which renders it in the llama backend), so that a broken template is a
configuration error at start-up, not a failure of every chat request.

Jinja2 comes with llama-cpp-python (the server extra); it is imported only to compile a
template, so the engine package still imports without it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, get_args

from llm_service.errors import ConfigurationError
from llm_service.types import ChatTemplateName

if TYPE_CHECKING:
    import jinja2

__all__ = ["ChatTemplate", "builtin_template_names", "render_messages"]


def builtin_template_names() -> tuple[str, ...]:
    """The names of the templates shipped in ``templates/``, sorted."""
    folder = resources.files(__package__).joinpath("templates")
    return tuple(
        sorted(f.name.removesuffix(".jinja") for f in folder.iterdir() if f.name.endswith(".jinja"))
    )


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """A chat template that replaces the model's own.

    Attributes:
        source: the Jinja text.
        origin: where it comes from, for logs and errors: ``built-in chatml``, ``file PATH``.
    """

    source: str
    origin: str

    @classmethod
    def builtin(cls, name: str) -> ChatTemplate:
        """A template shipped with the package.

        Raises:
            ConfigurationError: no template has that name (the message lists those that do).
        """
        if name not in get_args(ChatTemplateName):
            known = ", ".join(get_args(ChatTemplateName))
            raise ConfigurationError(
                f"unknown chat template {name!r}; the built-in ones are: {known}"
            )
        path = resources.files(__package__).joinpath("templates", f"{name}.jinja")
        return cls(path.read_text(encoding="utf-8"), f"built-in {name}")

    def compile(self) -> jinja2.Template:
        """The template compiled as the llama backend's formatter compiles it.

        Raises:
            ConfigurationError: it is not valid Jinja (the message names its origin and the
                line), or Jinja2 is not installed.
        """
        environment = _environment()
        import jinja2

        try:
            return environment.from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigurationError(
                f"the chat template ({self.origin}) is not valid Jinja: line {exc.lineno}:"
                f" {exc.message}"
            ) from None


def render_messages(
    template: jinja2.Template,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """Messages rendered by a compiled template, ready for the assistant's turn, given what
    the bindings' formatter gives it (but no BOS or EOS text: the fake backend has none).

    Raises:
        Exception: whatever the template raises (its ``raise_exception()``, a Jinja error).
    """

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    return template.render(
        messages=messages,
        tools=tools,
        add_generation_prompt=True,
        bos_token="",
        eos_token="",
        raise_exception=raise_exception,
    )


def _environment() -> jinja2.Environment:
    """The bindings' ``Jinja2ChatFormatter`` environment: sandboxed, blocks trimmed, loop
    controls, ``{% generation %}`` passed through, and tojson as Transformers writes it."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ModuleNotFoundError:
        raise ConfigurationError(
            "a chat template needs Jinja2, which comes with the server extra:"
            ' pip install "llm-service[server]"'
        ) from None

    class GenerationTags(jinja2.ext.Extension):
        tags = {"generation"}  # noqa: RUF012 (Jinja's own declaration)

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    environment = ImmutableSandboxedEnvironment(
        loader=jinja2.BaseLoader(),
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationTags, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    return environment


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
