"""The one settings module: every knob, its default, bounds and description.

Values come from ``LLM_*`` environment variables, and from command-line flags generated from
these same fields (see ``llm_service.cli``). Nothing else in the package reads ``os.environ``.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from llm_service.errors import ConfigurationError
from llm_service.types import ChatTemplateName, PoolMode

__all__ = [
    "ClientSettings",
    "GatewaySettings",
    "ReplicaAddress",
    "ServiceSettings",
    "default_certs_dir",
    "read_file",
    "read_pem",
    "read_text",
]

DEFAULT_TARGET = "127.0.0.1:50051"
# How the pool's entries map onto llama.cpp (``LLM_POOL_MODE``): one ``llama_context`` per
# entry, or one shared context with one sequence per entry, decoded together a step at a time.


# Permission bits a file holding a secret must not have: write or execute by its group, or any
# access by others. Owner read/write and group read (0640: a Kubernetes Secret mounted with
# fsGroup) are allowed.
_LOOSE_SECRET_BITS = stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO


def read_file(path: Path, option: str, what: str = "file", *, secret: bool = False) -> bytes:
    """The bytes of a file a setting or flag names; ConfigurationError names the option.

    ``secret``: the file holds a secret (a private key, API keys), and is refused if other users
    may read it or its group may change it.
    """
    path = path.expanduser()
    try:
        data = path.read_bytes()
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise ConfigurationError(f"{option}: cannot read {what} {path}: {exc.strerror}") from None
    if secret and mode & _LOOSE_SECRET_BITS:
        raise ConfigurationError(
            f"{option}: {what} {path} has permissions {mode:04o}, so other users may read or"
            f" change it; a secret must be private (0600, 0400, 0640 or 0440): run"
            f"  chmod 600 {path}"
        )
    return data


def read_text(path: Path, option: str, what: str = "file", *, secret: bool = False) -> str:
    """A UTF-8 text file a setting or flag names; ConfigurationError names the option."""
    try:
        return read_file(path, option, what, secret=secret).decode()
    except UnicodeDecodeError:
        raise ConfigurationError(f"{option}: {path} is not UTF-8 text") from None


def read_pem(path: Path, option: str, what: str, *, secret: bool = False) -> bytes:
    """A PEM file (certificate or key) a setting names; ConfigurationError if it is not PEM.

    ``secret``: a private key, refused if its permissions let other users read it.
    """
    data = read_file(path, option, what, secret=secret)
    if b"-----BEGIN " not in data:
        raise ConfigurationError(f"{option}: {path} is not a PEM file ({what})")
    return data


def default_certs_dir() -> Path:
    """Where ``llm_service certs`` writes development certificates, and clients look for them."""
    return Path(platformdirs.user_config_dir("llm-service")) / "certs"


class ServiceSettings(BaseSettings):
    """Settings of llm_service (environment prefix ``LLM_``)."""

    model_config = SettingsConfigDict(
        env_prefix="LLM_",
        protected_namespaces=(),
        extra="ignore",
        validate_default=True,
        env_ignore_empty=True,  # VAR= (as manifests and compose files write it) means unset
    )

    backend: Literal["llama", "fake"] = Field(
        "llama",
        description="What generates the tokens: 'llama', the model through llama.cpp; 'fake', a"
        " testing aid with no model and no llama.cpp: every reply counts '1, 2, 3, ...' at about"
        " 100 tokens/s, with a byte-level tokenizer.",
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
    chat_template: ChatTemplateName | None = Field(
        None,
        description="A built-in chat template to render chat messages with, instead of the"
        " model's own (its GGUF's): 'chatml', or 'chatml-tools' (ChatML with tool calls in the"
        " Hermes / Qwen2.5 style). For a model whose GGUF has no template, or a wrong one. Not"
        " with --chat-template-file.",
    )
    chat_template_file: Path | None = Field(
        None,
        description="A Jinja chat template file to render chat messages with, instead of the"
        " model's own, written as Hugging Face chat templates are (it is given messages,"
        " add_generation_prompt, bos_token, eos_token). It is compiled at start-up: an error"
        " stops the service. Not with --chat-template.",
    )
    embeddings: bool | None = Field(
        None,
        description="Also serve embeddings (the Embed call, the gateway's /v1/embeddings): an"
        " embedding context beside the pool, inputs of one request as sequences of one batch,"
        " pooled and L2-normalised. Unset: on when the GGUF says how to pool (an embedding"
        " model); a chat model's embeddings are the mean of its last hidden states.",
    )
    llama_service_threads: int = Field(
        2,
        ge=1,
        le=256,  # llama.cpp's LLAMA_MAX_SEQ: the most sequences one context holds (batched)
        description="Pool size: requests served at once (slots of the shared context, or"
        " contexts); requests beyond it queue.",
    )
    pool_mode: PoolMode = Field(
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
        512,
        ge=1,
        description="Prompt tokens evaluated per llama_decode call, in either pool mode.",
    )
    prefill_chunk: int = Field(
        512,
        ge=1,
        le=65_536,
        description="Batched mode: prompt tokens the decoding streams wait for at most between"
        " two of their tokens. New prompts are evaluated first, LLM_N_BATCH tokens a step, so"
        " that requests arriving together start together; past this many prompt tokens the"
        " streams decode a step before the prompts go on. Lower: a long prompt stretches the"
        " streams' inter-token time less, and waits longer for its first token.",
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
    stall_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a stream may wait for its client to read the next message; a"
        " client that stops reading longer is cut off and its context freed.",
    )
    max_message_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest gRPC request message accepted, in bytes (RESOURCE_EXHAUSTED above).",
    )
    max_prompt_chars: int = Field(
        1_000_000, ge=1, description="Characters of one prompt (or all its chat messages)."
    )
    max_messages: int = Field(1024, ge=1, description="Chat messages in one request.")
    max_stop_strings: int = Field(16, ge=0, description="Stop strings in one request.")
    max_stop_chars: int = Field(256, ge=1, description="Characters of one stop string.")
    max_grammar_bytes: int = Field(65_536, ge=1, description="Bytes of one GBNF grammar.")
    max_schema_bytes: int = Field(
        65_536, ge=1, description="Bytes of one JSON schema, or of all tools of a request."
    )
    grpc_addr: str = Field(
        DEFAULT_TARGET, description="Address the gRPC API listens on (HOST:PORT; port 0 = any)."
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
    failure_exit_after: float = Field(
        10.0,
        ge=0,
        description="When the engine fails for good (its scheduler died, no context is left,"
        " llama.cpp fails evaluation after evaluation), seconds the service stays up, not"
        " ready, before it exits with status 1 for its supervisor to restart it.",
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

    @field_validator("chat_template_file")
    @classmethod
    def _one_chat_template(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        name = info.data.get("chat_template")
        if value is not None and name is not None:
            raise ValueError(
                f"--chat-template / LLM_CHAT_TEMPLATE ({name}) is given too: choose a built-in"
                " template or a file, not both"
            )
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


class ClientSettings(BaseSettings):
    """Settings of the clients (``llm_cli``, ``llm_service.client``), environment prefix ``LLM_``.

    With no TLS file given and ``insecure`` off, the development certificates in ``certs_dir``
    are used when they exist (``./scripts/run`` writes them there), so that a client works with
    no flags against the service the README starts.
    """

    model_config = SettingsConfigDict(
        env_prefix="LLM_",
        protected_namespaces=(),
        extra="ignore",
        validate_default=True,
        env_ignore_empty=True,  # VAR= (as manifests and compose files write it) means unset
    )

    target: str = Field(
        DEFAULT_TARGET, description="Address of llm_service's gRPC port (HOST:PORT)."
    )
    tls_ca: Path | None = Field(None, description="CA (PEM) that signed the server's certificate.")
    tls_cert: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    tls_key: Path | None = Field(None, description="Private key (PEM) of the client certificate.")
    tls_server_name: str | None = Field(
        None, description="Name to expect in the server's certificate (default: the target's host)."
    )
    certs_dir: Path = Field(
        default_factory=default_certs_dir,
        description="Development certificates (ca.crt, client.crt, client.key) used when no TLS"
        " file is given.",
    )
    insecure: bool = Field(
        False, description="Connect in plaintext, without TLS (only to an --insecure service)."
    )
    timeout: float | None = Field(
        None, gt=0, description="Deadline of each call, in seconds (default: none)."
    )
    max_retries: int = Field(
        3,
        ge=0,
        le=20,
        description="Retries of a call refused with UNAVAILABLE or RESOURCE_EXHAUSTED before its"
        " first token, with jittered back-off.",
    )

    @model_validator(mode="after")
    def _development_certificates(self) -> ClientSettings:
        if not self.insecure:
            _use_development_certificates(self)
        return self


def _use_development_certificates(settings: ClientSettings | GatewaySettings) -> None:
    """With no TLS file given, take the client files in ``certs_dir`` when they all exist."""
    if any((settings.tls_ca, settings.tls_cert, settings.tls_key)):
        return
    files = [settings.certs_dir / n for n in ("ca.crt", "client.crt", "client.key")]
    if all(f.is_file() for f in files):
        settings.tls_ca, settings.tls_cert, settings.tls_key = files


_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")


def split_host_port(address: str, expected: str = "HOST:PORT") -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) as (host, port), the one parser of addresses.

    Raises:
        ValueError: anything else, naming the ``expected`` form.
    """
    match = _HOST_PORT.match(address.strip())
    if match is None or int(match[2]) > 65535:
        raise ValueError(f"expected {expected}, got {address!r}")
    return match[1].removeprefix("[").removesuffix("]"), int(match[2])


def _is_host_port(address: str) -> bool:
    try:
        split_host_port(address)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class ReplicaAddress:
    """One llm_service replica the gateway sends requests to.

    Attributes:
        target: its gRPC address, ``HOST:PORT``.
        health: its plain-HTTP health address, ``HOST:PORT``; None: the gRPC host with the
            port the replica reports (``ModelInfo.http_port``).
    """

    target: str
    health: str | None = None

    @classmethod
    def parse(cls, spec: str) -> ReplicaAddress:
        """``HOST:PORT`` or ``HOST:PORT,health=HOST:PORT``.

        Raises:
            ValueError: anything else (the message shows the expected form).
        """
        target, _, rest = spec.strip().partition(",")
        health = None
        if rest:
            key, _, health = rest.partition("=")
            if key.strip() != "health" or not _is_host_port(health):
                raise ValueError(f"{spec!r}: expected HOST:PORT or HOST:PORT,health=HOST:PORT")
            health = health.strip()
        if not _is_host_port(target):
            raise ValueError(f"{spec!r}: expected HOST:PORT or HOST:PORT,health=HOST:PORT")
        return cls(target.strip(), health)

    def __str__(self) -> str:
        return self.target


class GatewaySettings(BaseSettings):
    """Settings of llm-gateway (environment prefix ``LLM_GATEWAY_``)."""

    model_config = SettingsConfigDict(
        env_prefix="LLM_GATEWAY_",
        protected_namespaces=(),
        extra="ignore",
        validate_default=True,
        env_ignore_empty=True,  # VAR= (as manifests and compose files write it) means unset
    )

    backends: Annotated[tuple[ReplicaAddress, ...], NoDecode] = Field(
        (),
        description="An llm_service replica: HOST:PORT of its gRPC port, or"
        " HOST:PORT,health=HOST:PORT to name its HTTP health port too (default: the port the"
        " replica reports). Repeat the flag for each replica; the variable takes them separated"
        " by spaces.",
    )
    discover: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="NAME:PORT: every address NAME resolves to is a replica's gRPC host (a"
        " Kubernetes headless Service); NAME is resolved again every --discovery-interval, and"
        " replicas that come and go are followed. Repeat the flag for more names; the variable"
        " takes them separated by spaces.",
    )
    discovery_interval: float = Field(
        5.0, gt=0, description="Seconds between two resolutions of each --discover name."
    )
    dns_server: str | None = Field(
        None,
        description="HOST:PORT of a DNS server to resolve --discover names with (default: the"
        " system's resolver, /etc/hosts included).",
    )
    listen: str = Field("127.0.0.1:8000", description="Address the HTTP API listens on.")
    tls_ca: Path | None = Field(
        None, description="CA (PEM) that signed the replicas' certificates."
    )
    tls_cert: Path | None = Field(
        None, description="The gateway's client certificate (PEM) for mutual TLS to the replicas."
    )
    tls_key: Path | None = Field(None, description="Private key (PEM) of that certificate.")
    tls_server_name: str | None = Field(
        None, description="Name to expect in the replicas' certificates (default: each host)."
    )
    certs_dir: Path = Field(
        default_factory=default_certs_dir,
        description="Development certificates (ca.crt, client.crt, client.key) used when no TLS"
        " file is given.",
    )
    insecure_backends: bool = Field(
        False, description="Talk to the replicas in plaintext (only to --insecure replicas)."
    )
    api_keys_file: Path | None = Field(
        None,
        description="File of accepted API keys, one per line: the key, or sha256:HEX of it;"
        " '#' starts a comment. No file: no authentication (a warning is logged).",
    )
    rate_limit_rpm: int = Field(
        0, ge=0, description="Requests per minute allowed to each API key (0: no limit)."
    )
    rate_limit_tpm: int = Field(
        0,
        ge=0,
        description="Tokens (prompt + completion) per minute allowed to each API key"
        " (0: no limit).",
    )
    request_timeout: float = Field(
        600.0, gt=0, description="Seconds a request may take in all before it fails with 504."
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        le=15 * 1024 * 1024,  # under the gRPC message limit (16 MiB) to the replicas
        description="Largest request body accepted; larger ones get 400.",
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a client gets to send a request's headers (on a new connection, or"
        " after a response); connections that send nothing are closed after it.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=10,
        description="Replicas tried for one request when one refuses it before its first token"
        " (connection refused, unavailable, overloaded).",
    )
    retry_budget: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Retries allowed as a fraction of requests (over the last 10 s, plus 10),"
        " so that retries cannot multiply the load of a failing fleet.",
    )
    health_interval: float = Field(
        2.0, gt=0, description="Seconds between health checks of each replica."
    )
    health_timeout: float = Field(
        2.0, gt=0, description="Seconds a health check may take before it counts as failed."
    )
    healthy_after: int = Field(
        2,
        ge=1,
        description="Passed checks in a row that bring an unhealthy replica back (one"
        " never in rotation yet joins at its first).",
    )
    unhealthy_after: int = Field(
        2, ge=1, description="Failed checks in a row that take a replica out of rotation."
    )
    eject_after: int = Field(
        3,
        ge=1,
        description="Failed requests in a row (connection refused, unavailable) that eject a"
        " replica before its health check notices.",
    )
    ejection_time: float = Field(
        5.0,
        gt=0,
        description="Seconds a replica stays ejected the first time; doubled at each ejection"
        " in a row, up to 60 x this.",
    )
    keepalive_interval: float = Field(
        3.0,
        gt=0,
        description="While a stream waits for its first token, a ': ping' comment is sent every"
        " this many seconds, so proxies and clients do not time out.",
    )
    shutdown_grace: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM/SIGINT, seconds open requests get to finish before the"
        " gateway closes them.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of llm-gateway."
    )
    log_json: bool = Field(False, description="Write logs as JSON lines.")

    @field_validator("backends", mode="before")
    @classmethod
    def _parse_backends(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split()
        if isinstance(value, list | tuple):
            return tuple(
                v if isinstance(v, ReplicaAddress) else ReplicaAddress.parse(str(v)) for v in value
            )
        return value

    @field_validator("discover", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        return tuple(value.split()) if isinstance(value, str) else value

    @field_validator("discover", mode="after")
    @classmethod
    def _names_with_ports(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not _is_host_port(name):
                raise ValueError(f"{name!r}: expected NAME:PORT (the replicas' gRPC port)")
        return value

    @field_validator("dns_server")
    @classmethod
    def _dns_server_address(cls, value: str | None) -> str | None:
        if value is not None and not _is_host_port(value):
            raise ValueError(f"{value!r}: expected HOST:PORT")
        return value

    @field_validator("backends", mode="after")
    @classmethod
    def _no_duplicates(cls, value: tuple[ReplicaAddress, ...]) -> tuple[ReplicaAddress, ...]:
        targets = [b.target for b in value]
        if len(set(targets)) != len(targets):
            twice = sorted({t for t in targets if targets.count(t) > 1})
            raise ValueError(f"a replica is given more than once: {', '.join(twice)}")
        return value

    @model_validator(mode="after")
    def _development_certificates(self) -> GatewaySettings:
        if not self.insecure_backends:
            _use_development_certificates(self)
        return self
