"""``llm_cli chat``: an interactive, multi-turn chat with a running llm_service."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, TextIO

import platformdirs

from llm_service.client.sync import Client
from llm_service.client.types import ChatMessage, Sampling, ToolCall, Tools
from llm_service.errors import LLMServiceError

__all__ = ["ChatSession", "describe_call"]

HELP = """\
commands: /reset (forget the conversation), /system TEXT (set the system message and reset),
          /exit (or Ctrl-D). Ctrl-C stops the current reply (that question is then forgotten)."""


class ChatSession:
    """A conversation: the history is kept here, the server applies the model's chat template.

    Args:
        client: a connected client.
        sampling: sampling options for every reply.
        system: the system message, if any.
        history_file: where line-editing history is kept (None: not kept).
        tools: functions the model may call; its calls are shown (and kept in the
            conversation), not run.
    """

    def __init__(
        self,
        client: Client,
        sampling: Sampling,
        *,
        system: str | None = None,
        history_file: Path | None = None,
        out: TextIO = sys.stdout,
        tools: Tools | None = None,
    ) -> None:
        self.client = client
        self.sampling = sampling
        self.system = system
        self.tools = tools
        self.turns: list[ChatMessage] = []
        self._history_file = history_file
        self._out = out

    def messages(self, user_text: str) -> list[ChatMessage]:
        """The conversation so far, with the system message first and ``user_text`` last."""
        head = [ChatMessage("system", self.system)] if self.system else []
        return [*head, *self.turns, ChatMessage("user", user_text)]

    def run(self) -> int:
        """Read, reply, repeat, until /exit or end of input. Returns the exit code (0)."""
        readline = _line_editing(self._history_file)
        info = self.client.model_info()
        self._say(f"chatting with {info.name} at {self.client.target}. {HELP}\n")
        try:
            while True:
                try:
                    line = input("> ")
                except KeyboardInterrupt:
                    self._say("\n(Ctrl-D or /exit to leave)\n")
                    continue
                except EOFError:
                    self._say("\n")
                    return 0
                text = line.strip()
                if not text:
                    continue
                if text.startswith("/"):
                    if self._command(text):
                        return 0
                    continue
                self.reply(text)
        finally:
            if readline is not None and self._history_file is not None:
                with contextlib.suppress(OSError):
                    readline.write_history_file(self._history_file)

    def reply(self, user_text: str) -> str | None:
        """Stream the model's answer to ``user_text``; keep the turn unless it was interrupted."""
        parts: list[str] = []
        calls: tuple[ToolCall, ...] = ()
        try:
            messages = self.messages(user_text)
            with self.client.stream(messages, tools=self.tools, **self.sampling) as stream:
                for chunk in stream:
                    parts.append(chunk.text)
                    self._say(chunk.text)
                if stream.completion is not None:
                    calls = stream.completion.tool_calls
        except KeyboardInterrupt:
            self._say(" [stopped]\n")
            return None
        except LLMServiceError as exc:
            self._say(f"\nerror: {exc} ({exc.status}, request {exc.request_id})\n")
            return None
        answer = "".join(parts)
        if answer:
            self._say("\n")
        for call in calls:
            self._say(describe_call(call) + "\n")
        self.turns += [ChatMessage("user", user_text), ChatMessage("assistant", answer, calls)]
        return answer

    def _command(self, text: str) -> bool:
        """Run a /command; True when the session should end."""
        name, _, arg = text.partition(" ")
        if name in ("/exit", "/quit"):
            return True
        if name == "/reset":
            self.turns.clear()
            self._say("(conversation forgotten)\n")
        elif name == "/system":
            self.system = arg.strip() or None
            self.turns.clear()
            self._say(
                f"(system message {'set' if self.system else 'removed'}; conversation reset)\n"
            )
        else:
            self._say(f"unknown command {name}. {HELP}\n")
        return False

    def _say(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


def describe_call(call: ToolCall) -> str:
    """A tool call, as the terminal shows it."""
    return f"[tool call {call.id}] {call.name}({call.arguments})"


def default_history_file() -> Path:
    """Where chat input history is kept between sessions."""
    return Path(platformdirs.user_state_dir("llm-service")) / "chat_history"


def _line_editing(history_file: Path | None) -> Any:
    """Turn on line editing and history for ``input()`` where readline exists."""
    try:
        import readline
    except ImportError:  # pragma: no cover - not on this platform
        return None
    if history_file is not None:
        history_file.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            readline.read_history_file(history_file)
        readline.set_history_length(1000)
    return readline
