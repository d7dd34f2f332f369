"""gRPC metadata keys of ``llm.v1``, shared by the server and the client.

A failed call's trailing metadata says which error of ``llm_service.errors`` the server raised,
so that the client raises the same class with the same details.
"""

from __future__ import annotations

__all__ = [
    "CONTEXT_SIZE",
    "ERROR_FIELD",
    "ERROR_KIND",
    "PROMPT_TOKENS",
    "REQUESTED_TOKENS",
    "REQUEST_ID",
    "RETRY_AFTER_MS",
]

# Request and initial response metadata: the request's id.
REQUEST_ID = "x-request-id"
# Trailing metadata of a failed call.
ERROR_KIND = "llm-error"  # the error's ``kind`` (``invalid_request``, ``overloaded``, ...)
ERROR_FIELD = "llm-field"  # the request field at fault (``sampling.top_p``)
RETRY_AFTER_MS = "retry-after-ms"  # RESOURCE_EXHAUSTED: milliseconds to wait before retrying
PROMPT_TOKENS = "llm-prompt-tokens"  # prompt too long: tokens in the prompt
REQUESTED_TOKENS = "llm-requested-tokens"  # ... with max_tokens added
CONTEXT_SIZE = "llm-context-size"  # ... and the context size they must fit
