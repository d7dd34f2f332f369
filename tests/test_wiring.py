"""The composition root: a chat template chosen in the settings reaches the backend, checked
before the model is loaded, and the log says which template is used."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from llm_service.engine.chat_template import ChatTemplate
from llm_service.errors import ConfigurationError
from llm_service.settings import ServiceSettings
from llm_service.wiring import chosen_chat_template, load_backend

TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "


def fake_settings(**settings: object) -> ServiceSettings:
    return ServiceSettings(backend="fake", pool_mode="contexts", **settings)  # type: ignore[arg-type]


def test_no_template_chosen_keeps_the_models_own() -> None:
    assert chosen_chat_template(fake_settings()) is None


def test_a_built_in_template() -> None:
    template = chosen_chat_template(fake_settings(chat_template="chatml"))
    assert template == ChatTemplate.builtin("chatml")


def test_a_template_file(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    assert chosen_chat_template(fake_settings(chat_template_file=path)) == ChatTemplate(
        TEMPLATE, f"file {path}"
    )


def test_a_missing_template_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.jinja"
    with pytest.raises(ConfigurationError) as caught:
        chosen_chat_template(fake_settings(chat_template_file=path))
    assert str(caught.value) == (
        f"--chat-template-file: cannot read chat template {path}: No such file or directory"
    )


def test_a_template_file_jinja_cannot_compile_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jinja"
    path.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}\n")
    with pytest.raises(ConfigurationError) as caught:
        load_backend(fake_settings(chat_template_file=path))
    assert str(caught.value) == (
        f"the chat template (file {path}) is not valid Jinja: line 2: unexpected '}}'"
    )


def test_the_fake_backend_is_given_the_template_and_the_log_says_which(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    with caplog.at_level(logging.INFO, "llm_service.engine"):
        backend = load_backend(fake_settings(chat_template_file=path))
    try:
        assert backend.info.chat_template == TEMPLATE
        text = backend.render_chat([{"role": "user", "content": "hi"}], None)
        assert text == "[user] hi\n[assistant] "
    finally:
        backend.close()
    assert f"chat template: file {path}" in caplog.messages


def test_the_log_says_when_the_backends_own_template_is_used(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, "llm_service.engine"):
        load_backend(fake_settings()).close()
    assert "chat template: the fake backend's own (<role>content lines)" in caplog.messages
