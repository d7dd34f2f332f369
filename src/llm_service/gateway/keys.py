"""API keys (checked in constant time, never logged) and per-key rate limits."""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llm_service.errors import AuthenticationError, ConfigurationError, RateLimitedError
from llm_service.settings import read_text

__all__ = ["ANONYMOUS", "ApiKeys", "RateLimiter"]

# The caller's name when the gateway runs without keys: every request shares its limits.
ANONYMOUS = "anonymous"
_HASHED = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


class ApiKeys:
    """The accepted API keys, kept as SHA-256 digests only.

    The file has one key per line, either the key itself or ``sha256:HEX`` (the hex digest of
    the key, so the file need not hold secrets); blank lines and ``#`` comments are skipped.
    A caller is named ``key-N`` after the line its key is on: that name, never the key, is what
    logs and limits use.
    """

    def __init__(self, digests: dict[str, bytes]) -> None:
        self._digests = digests

    @classmethod
    def load(cls, path: Path) -> ApiKeys:
        """Read a keys file.

        Raises:
            ConfigurationError: unreadable, not text, holding no key, or a line with spaces
                (the message names the line, never its content).
        """
        option = "--api-keys-file / LLM_GATEWAY_API_KEYS_FILE"
        text = read_text(path, option, "API keys file", secret=True)
        digests: dict[str, bytes] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            # A comment starts a line or follows a space: a key may hold "#".
            line = re.sub(r"(^|\s)#.*", "", raw).strip()
            if not line:
                continue
            if any(c.isspace() for c in line):
                raise ConfigurationError(
                    f"{option}: line {number} of {path} holds more than one word; write one key"
                    " (or sha256:HEX) per line"
                )
            hashed = _HASHED.match(line)
            digest = bytes.fromhex(hashed[1]) if hashed else hashlib.sha256(line.encode()).digest()
            digests[f"key-{number}"] = digest
        if not digests:
            raise ConfigurationError(f"{option}: {path} holds no key")
        return cls(digests)

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, authorization: str | None, api_key: str | None = None) -> str:
        """The caller's name for an ``Authorization: Bearer KEY`` header or, when there is no
        ``Authorization`` header, an ``x-api-key: KEY`` header (as Anthropic's clients send).

        Every stored digest is compared, each in constant time, so the time taken says nothing
        about which key (or how much of one) matched.

        Raises:
            AuthenticationError: no bearer key, or an unknown one.
        """
        if authorization is None and api_key is not None:
            scheme, key = "bearer", api_key
        else:
            scheme, _, key = (authorization or "").partition(" ")
        key = key.strip(" \t")  # HTTP's whitespace only: a key's last byte may be 0x85 or 0xA0
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationError(
                "no API key: send it in the Authorization header as 'Bearer KEY'"
                " (or as the x-api-key header)"
            )
        # Headers arrive decoded as latin-1; their bytes are the key's UTF-8 bytes.
        digest = hashlib.sha256(key.encode("latin-1", errors="replace")).digest()
        found = None
        for name, stored in self._digests.items():
            if hmac.compare_digest(stored, digest):
                found = name
        if found is None:
            raise AuthenticationError("the API key is not valid")
        return found


@dataclass
class _Bucket:
    """A token bucket: ``capacity`` at most, refilled at ``rate`` per second."""

    capacity: float
    rate: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the level reaches ``amount`` (0 if it has)."""
        return max(0.0, (amount - self.level) / self.rate)


@dataclass
class _Caller:
    """One caller's allowances (callers are the keys of the file, or one anonymous)."""

    requests: _Bucket | None
    tokens: _Bucket | None


class RateLimiter:
    """Requests and tokens per minute for each caller (token buckets, a minute's worth deep).

    A request is admitted when the caller has a request left and its token balance is not
    negative; its tokens (prompt + completion) are charged when it ends, so one large request
    can take the balance below zero and hold back the next ones until it refills.

    Args:
        requests_per_minute: 0 for no request limit.
        tokens_per_minute: 0 for no token limit.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        requests_per_minute: int,
        tokens_per_minute: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self._clock = clock
        self._callers: dict[str, _Caller] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def _caller(self, name: str, now: float) -> _Caller:
        caller = self._callers.get(name)
        if caller is None:
            caller = _Caller(
                _Bucket(self.rpm, self.rpm / 60, self.rpm, now) if self.rpm else None,
                _Bucket(self.tpm, self.tpm / 60, self.tpm, now) if self.tpm else None,
            )
            self._callers[name] = caller
        return caller

    def admit(self, name: str) -> None:
        """Take one request from ``name``'s allowance.

        Raises:
            RateLimitedError: no request left, or tokens overdrawn; ``retry_after_s`` says when.
        """
        if not self.enabled:
            return
        now = self._clock()
        caller = self._caller(name, now)
        # Tokens are charged after the fact, so only an overdrawn balance refuses a request.
        checks = (
            (caller.tokens, 0.0, f"{self.tpm} tokens"),
            (caller.requests, 1.0, f"{self.rpm} requests"),
        )
        for bucket, needed, allowance in checks:
            if bucket is None:
                continue
            bucket.refill(now)
            if bucket.level < needed:
                wait = bucket.wait_for(needed)
                raise RateLimitedError(
                    f"{name} used its {allowance} per minute; retry in {math.ceil(wait)} s",
                    retry_after_s=wait,
                )
        if caller.requests is not None:
            caller.requests.level -= 1

    def charge(self, name: str, tokens: int) -> None:
        """Charge ``tokens`` used by a request of ``name`` that ended."""
        if not self.tpm:
            return
        now = self._clock()
        bucket = self._caller(name, now).tokens
        assert bucket is not None
        bucket.refill(now)
        bucket.level -= tokens
