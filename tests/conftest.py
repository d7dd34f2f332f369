from __future__ import annotations

from collections.abc import Iterator

import pytest

from llm_service.engine import Backend
from llm_service.log import configure_logging
from llm_service.settings import ServiceSettings
from llm_service.wiring import load_backend

# The shared harness: certificates, the model, services and gateways as second processes.
pytest_plugins = ["tests.harness.fixtures"]

TEST_N_CTX = 1024
# Batched mode: slots of the session's shared context (engines on it use the first ones), and
# prompt tokens a running stream waits for at most between two of its tokens.
TEST_SLOTS = 4
TEST_PREFILL_CHUNK = 64


@pytest.fixture(scope="session", params=["contexts", "batched"])
def llama_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The real default model, loaded once per pool mode for the whole run (fetched if not
    cached). Tests that take it run in both modes."""
    configure_logging("INFO", llama_level="WARNING")
    settings = ServiceSettings(
        n_ctx=TEST_N_CTX,
        n_threads=2,
        pool_mode=request.param,
        llama_service_threads=TEST_SLOTS,
        prefill_chunk=TEST_PREFILL_CHUNK,
    )
    backend = load_backend(settings, progress=False)
    yield backend
    backend.close()
