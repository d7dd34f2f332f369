"""Logging set-up, done once by each entry point."""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["RequestLogger", "configure_logging", "plural"]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def plural(n: int, noun: str) -> str:
    """``1 token``, ``2 tokens``: counts in log lines and error messages."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class RequestLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger for one request: ``[request_id]`` before each message, and ``request_id`` on the
    record (a field of its own in JSON logs)."""

    def __init__(self, logger: logging.Logger, request_id: str) -> None:
        super().__init__(logger, {"request_id": request_id})
        self.request_id = request_id

    def process(self, msg, kwargs):  # type: ignore[no-untyped-def]
        kwargs["extra"] = self.extra
        return f"[{self.request_id}] {msg}", kwargs


def configure_logging(
    level: str = "INFO", *, json_lines: bool = False, llama_level: str = "WARNING"
) -> None:
    """Send logs to stderr at ``level``; llama.cpp's native log at ``llama_level``."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("llm_service").setLevel(level)
    logging.getLogger("llm_service.llama_cpp").setLevel(llama_level)
