"""The settings module: defaults derived from other settings, list parsing."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError

from llm_service.settings import ServiceSettings
from llm_service.types import PoolMode


def test_threads_are_shared_out_between_contexts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)

    def threads(**settings: object) -> int:
        return ServiceSettings(pool_mode="contexts", **settings).threads_per_context  # type: ignore[arg-type]

    assert threads(llama_service_threads=1) == 8
    assert threads(llama_service_threads=2) == 4
    assert threads(llama_service_threads=16) == 1
    assert threads(llama_service_threads=2, n_threads=3) == 3


def test_batched_mode_gives_its_one_context_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.delenv("LLM_POOL_MODE", raising=False)
    assert ServiceSettings().pool_mode == "batched"
    assert ServiceSettings(llama_service_threads=16).threads_per_context == 8
    assert ServiceSettings(llama_service_threads=16, n_threads=3).threads_per_context == 3


def test_pool_modes_are_the_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    annotation = ServiceSettings.model_fields["pool_mode"].annotation
    assert get_args(annotation) == get_args(PoolMode)
    monkeypatch.setenv("LLM_POOL_MODE", "contexts")
    assert ServiceSettings().pool_mode == "contexts"
    monkeypatch.setenv("LLM_POOL_MODE", "threads")
    with pytest.raises(ValidationError, match="pool_mode"):
        ServiceSettings()


def test_allowed_clients_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_TLS_ALLOWED_CLIENTS", " gateway , ops.example.com ,")
    assert ServiceSettings().tls_allowed_clients == ("gateway", "ops.example.com")
    monkeypatch.delenv("LLM_TLS_ALLOWED_CLIENTS")
    assert ServiceSettings().tls_allowed_clients == ()


def test_a_chat_template_is_a_built_in_name_or_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_CHAT_TEMPLATE", "chatml-tools")
    assert ServiceSettings().chat_template == "chatml-tools"
    monkeypatch.delenv("LLM_CHAT_TEMPLATE")
    monkeypatch.setenv("LLM_CHAT_TEMPLATE_FILE", "~/t.jinja")
    assert ServiceSettings().chat_template_file == Path("~/t.jinja")
    monkeypatch.delenv("LLM_CHAT_TEMPLATE_FILE")
    settings = ServiceSettings()
    assert settings.chat_template is None and settings.chat_template_file is None


def test_an_unknown_chat_template_lists_the_built_in_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_CHAT_TEMPLATE", "llama3")
    with pytest.raises(ValidationError) as caught:
        ServiceSettings()
    (error,) = caught.value.errors()
    assert error["loc"] == ("chat_template",)
    assert error["msg"] == "Input should be 'chatml' or 'chatml-tools'"


def test_a_built_in_chat_template_and_a_file_are_refused_together() -> None:
    with pytest.raises(ValidationError) as caught:
        ServiceSettings(chat_template="chatml", chat_template_file=Path("t.jinja"))
    (error,) = caught.value.errors()
    assert error["loc"] == ("chat_template_file",)
    assert "--chat-template / LLM_CHAT_TEMPLATE (chatml) is given too" in error["msg"]
    assert "not both" in error["msg"]
