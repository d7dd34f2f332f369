"""OpenAI's ``POST /v1/embeddings``: the request body, and the answer of a replica's ``Embed``.

A replica serves embeddings when its model is loaded for them (``LLM_EMBEDDINGS``); the
gateway routes by model id as for completions, so chat and embedding replicas can serve side
by side. ``dimensions`` is refused: the model's vectors have its own size.
"""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Any, Literal

from pydantic import Field

from llm_service.client.types import Embeddings
from llm_service.gateway.openai import IGNORED, _Body

__all__ = ["EmbeddingRequest", "embedding_inputs", "embeddings_object"]

MAX_INPUTS = 2048  # as OpenAI's


class EmbeddingRequest(_Body):
    """``POST /v1/embeddings``."""

    model: str = Field(description="A model id from GET /v1/models, served for embeddings.")
    input: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[list[int]], Field(min_length=1, max_length=MAX_INPUTS)]
    ) = Field(description="A text, texts, a token-id list, or token-id lists.")
    encoding_format: Literal["float", "base64"] | None = Field(
        None, description="float (default): lists of numbers; base64: little-endian float32."
    )
    dimensions: int | None = Field(
        None,
        description="Not served: the model's vectors have its own size (only null).",
        json_schema_extra={"enum": [None]},
    )
    user: str | None = Field(None, description="Recorded in the gateway's log only.")
    metadata: dict[str, str] | None = Field(None, description=IGNORED)


def embedding_inputs(body: EmbeddingRequest) -> list[str] | list[list[int]]:
    """The inputs, as texts or token-id lists (one kind)."""
    given = body.input
    if isinstance(given, str):
        return [given]
    if given and isinstance(given[0], int):
        return [given]  # one token-id list
    return given  # type: ignore[return-value]


def embeddings_object(result: Embeddings, model: str, encoding: str | None) -> dict[str, Any]:
    """OpenAI's ``list`` of ``embedding`` objects, in input order, with the usage."""
    data = []
    for index, vector in enumerate(result.vectors):
        embedding: list[float] | str = list(vector)
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}
