"""llama-server's text utilities over HTTP: ``POST /tokenize``, ``/detokenize`` and
``/apply-template``, shaped as llama-server's, on a replica serving the request's model.

llama-server serves one model, so its bodies name none; here ``model`` may be left out when
the gateway serves exactly one.
"""

from __future__ import annotations

from pydantic import Field

from llm_service.gateway.openai import Message, _Body

__all__ = ["ApplyTemplateRequest", "DetokenizeRequest", "TokenizeRequest"]


class _ModelBody(_Body):
    model: str | None = Field(
        None, description="A model id from GET /v1/models; may be left out when only one is served."
    )


class TokenizeRequest(_ModelBody):
    """``POST /tokenize``: ``{"tokens": [ids]}``, or ``[{"id", "piece"}]`` with pieces."""

    content: str
    add_special: bool = Field(False, description="Add BOS where the model wants it.")
    parse_special: bool = Field(
        True, description='Special-token text ("<|im_start|>") becomes its token.'
    )
    with_pieces: bool = Field(False, description="Each token's text with its id.")


class DetokenizeRequest(_ModelBody):
    """``POST /detokenize``: ``{"content": text}``."""

    tokens: list[int]


class ApplyTemplateRequest(_ModelBody):
    """``POST /apply-template``: ``{"prompt": text}``, the prompt a chat completion of these
    messages starts from (the model's chat template, no tools)."""

    messages: list[Message] = Field(min_length=1)
