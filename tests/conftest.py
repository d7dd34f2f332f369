from __future__ import annotations

from collections.abc import Iterator

import pytest

from llm_service.engine import Backend, load_backend
from llm_service.log import configure_logging
from llm_service.settings import ServiceSettings

TEST_N_CTX = 1024


@pytest.fixture(scope="session")
def llama_backend() -> Iterator[Backend]:
    """The real default model, loaded once for the whole run (fetched if not cached)."""
    configure_logging("INFO", llama_level="WARNING")
    backend = load_backend(ServiceSettings(n_ctx=TEST_N_CTX, n_threads=2), progress=False)
    yield backend
    backend.close()
