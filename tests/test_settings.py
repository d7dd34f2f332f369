"""The settings module: defaults derived from other settings, list parsing."""

from __future__ import annotations

import pytest

from llm_service.settings import ServiceSettings


def test_threads_are_shared_out_between_contexts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert ServiceSettings(llama_service_threads=1).threads_per_context == 8
    assert ServiceSettings(llama_service_threads=2).threads_per_context == 4
    assert ServiceSettings(llama_service_threads=16).threads_per_context == 1
    assert ServiceSettings(llama_service_threads=2, n_threads=3).threads_per_context == 3


def test_allowed_clients_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_TLS_ALLOWED_CLIENTS", " gateway , ops.example.com ,")
    assert ServiceSettings().tls_allowed_clients == ("gateway", "ops.example.com")
    monkeypatch.delenv("LLM_TLS_ALLOWED_CLIENTS")
    assert ServiceSettings().tls_allowed_clients == ()
