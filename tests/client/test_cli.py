"""``llm_cli`` as a person uses it: a real terminal (pty) for chat, pipes, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pexpect
import pytest

from llm_service.client import Client
from tests.client.conftest import options, target
from tests.harness.service import Certs, Service, free_port

pytestmark = pytest.mark.model

LLM_CLI = str(Path(sys.executable).parent / "llm_cli")
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"


@pytest.fixture
def cli_env(service: Service, certs: Certs, tmp_path: Path) -> dict[str, str]:
    """The environment of a person who set LLM_TARGET and keeps the certificates where
    ``llm_service certs`` puts them by default (the user's configuration folder)."""
    config = tmp_path / "config"
    certs_dir = config / "llm-service" / "certs"
    certs_dir.mkdir(parents=True)
    for name in ("ca.crt", "client.crt", "client.key"):
        shutil.copy(certs.dir / name, certs_dir / name)  # with its mode: keys stay private
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "XDG_"))}
    return env | {
        "LLM_TARGET": target(service),
        "XDG_CONFIG_HOME": str(config),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "TERM": "dumb",
    }


def llm_cli(
    *args: str, env: dict[str, str], stdin: str = "", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LLM_CLI, *args], input=stdin, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


def test_generate_streams_a_prompt_from_stdin(
    cli_env: dict[str, str], service: Service, client: Callable[..., Client]
) -> None:
    result = llm_cli(
        "generate", "--temperature", "0", "--max-tokens", "8", "--stats",
        "--request-id", "rq-cli", env=cli_env, stdin=COUNTING,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    time.sleep(0.2)
    assert "[rq-cli] finished: length" in service.log
    # The command ends right after `done`; the call must be over by then, not cancelled.
    assert "[rq-cli] call cancelled" not in service.log
    # What the model says depends on the CPU: the same request through the client library.
    text = client().generate(COUNTING, max_tokens=8, temperature=0).text
    assert result.stdout == (text if text.endswith("\n") else text + "\n")  # (ends the line)
    assert result.stderr.startswith("[length: 8 tokens, prompt ")
    assert "first token after" in result.stderr and "tokens/s" in result.stderr


def test_an_empty_answer_is_explained(cli_env: dict[str, str], tmp_path: Path) -> None:
    # A grammar that allows only the empty text: the model can only end at once.
    nothing = tmp_path / "nothing.gbnf"
    nothing.write_text('root ::= ""\n')
    instruction = "Write a haiku about rain."
    raw = llm_cli("generate", instruction, "--grammar", str(nothing), env=cli_env)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == "\n"
    assert raw.stderr == (
        "llm_cli: the model ended at once, with no text (an instruction reads better as --chat)\n"
    )
    chat = llm_cli("generate", "--chat", instruction, "--grammar", str(nothing), env=cli_env)
    assert chat.returncode == 0, chat.stderr
    assert chat.stderr == "llm_cli: the model ended at once, with no text\n"
    # One letter at least, then anything: an answer with text, and no word about it.
    some = tmp_path / "some.gbnf"
    some.write_text("root ::= [A-Za-z] [^\\x00]*\n")
    answered = llm_cli(
        "generate", "--chat", instruction, "--grammar", str(some), "--max-tokens", "4", env=cli_env
    )
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip() and answered.stderr == ""


def test_generate_json_events(cli_env: dict[str, str], client: Callable[..., Client]) -> None:
    result = llm_cli(
        "generate", COUNTING, "--json", "--temperature", "0", "--max-tokens", "4", env=cli_env
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events] == ["started", "delta", "delta", "delta", "delta", "done"]
    assert events[-1]["finish_reason"] == "length"
    assert events[-1]["usage"] == {
        "prompt_tokens": events[0]["prompt_tokens"],
        "completion_tokens": 4,
    }
    text = client().generate(COUNTING, max_tokens=4, temperature=0).text
    assert "".join(e.get("text", "") for e in events) == text


def test_generate_with_a_grammar_file(cli_env: dict[str, str], tmp_path: Path) -> None:
    grammar = tmp_path / "answer.gbnf"
    grammar.write_text('root ::= "yes" | "no"\n')
    result = llm_cli(
        "generate", "Is the sky blue?", "--chat", "--grammar", str(grammar), "--json", env=cli_env
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert "".join(e.get("text", "") for e in events) in ("yes", "no")
    assert events[-1]["finish_reason"] == "stop"


def test_generate_shows_the_tool_calls(cli_env: dict[str, str], tmp_path: Path) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]))  # fmt: skip
    result = llm_cli(
        "generate", "Weather in Paris?", "--tools", str(tools), "--tool-choice", "get_weather",
        "--max-tokens", "48", "--temperature", "0", env=cli_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()  # (a small model may repeat its call)
    assert lines and all(x.startswith("[tool call call_") and "] get_weather({" in x for x in lines)
    assert isinstance(json.loads(lines[0].split("get_weather(", 1)[1][:-1])["city"], str)
    as_json = llm_cli(
        "generate", "Weather in Paris?", "--tools", str(tools), "--tool-choice", "required",
        "--max-tokens", "48", "--temperature", "0", "--json", env=cli_env,
    )  # fmt: skip
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    pieces = [p for e in events for p in e.get("tool_calls", [])]
    assert pieces[0]["name"] == "get_weather" and events[-1]["finish_reason"] == "tool_calls"
    bad = llm_cli("generate", "Hi", "--tools", str(tools), "--tool-choice", "nope", env=cli_env)
    assert bad.returncode == 2 and "--tool-choice 'nope'" in bad.stderr


def test_info_status_health_tokenize(cli_env: dict[str, str]) -> None:
    info = llm_cli("info", "--json", env=cli_env)
    assert info.returncode == 0 and json.loads(info.stdout)["pool_size"] == 2
    status = llm_cli("status", env=cli_env)
    assert status.returncode == 0 and "state               serving" in status.stdout
    health = llm_cli("health", env=cli_env)
    assert (health.returncode, health.stdout) == (0, "SERVING\n")
    tokens = llm_cli("tokenize", "Hello world", "--no-special", env=cli_env)
    assert tokens.returncode == 0 and len(json.loads(tokens.stdout)) == 2


def test_bench_prints_a_table_and_writes_json(cli_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = llm_cli(
        "bench", "-c", "1,2", "-n", "4", "--max-tokens", "8", "--json", str(out), env=cli_env
    )
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header[:4] == ["streams", "requests", "ok", "tokens/s"]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["concurrency"], r["completed"], r["errors"]) for r in runs] == [
        (1, 4, {}),
        (2, 4, {}),
    ]
    assert all(r["tokens"] == 32 and r["ttft_ms"]["p50"] > 0 for r in runs)


def test_exit_codes(
    cli_env: dict[str, str], start_service: Callable[..., Service], certs: Certs
) -> None:
    def rc(*args: str, env: dict[str, str] = cli_env) -> tuple[int, str]:
        result = llm_cli(*args, env=env)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr  # one readable line, never a traceback
        return result.returncode, lines[0]

    usage = llm_cli("generate", "Hi", "--bogus", env=cli_env)
    assert usage.returncode == 2 and "unrecognized arguments: --bogus" in usage.stderr
    assert rc("bench", "-c", "0")[0] == 2
    assert rc("generate", "Hi", "--tls-ca", "/nonexistent/ca.crt") == (
        2,
        "llm_cli: error: --tls-ca / LLM_TLS_CA: cannot read CA certificate /nonexistent/ca.crt:"
        " No such file or directory",
    )
    code, line = rc("generate", "Hi", "--target", f"127.0.0.1:{free_port()}", "--max-retries", "0")
    assert code == 3 and "cannot reach the service: nothing is listening there" in line
    assert rc("generate", "Hi", "--insecure", "--max-retries", "0")[0] == 3
    intruder = cli_env | {
        "LLM_TLS_CERT": str(certs.intruder.cert),
        "LLM_TLS_KEY": str(certs.intruder.key),
        "LLM_TLS_CA": str(certs.ca),
    }
    code, line = rc("info", env=intruder)
    assert code == 3 and "PERMISSION_DENIED" in line
    code, line = rc("generate", "Hi", "--grammar", "/nonexistent/g.gbnf")
    assert code == 2 and "--grammar: cannot read file /nonexistent/g.gbnf" in line
    code, line = rc("generate", "Hi", "--top-p", "2")
    assert code == 4 and line.startswith("llm_cli: error: sampling.top_p: must be in (0, 1]")
    assert "INVALID_ARGUMENT, request " in line
    code, line = rc(
        "generate", COUNTING, "--timeout", "0.3", "--max-tokens", "900", "--temperature", "0"
    )
    assert code == 1 and "DEADLINE_EXCEEDED" in line

    busy = start_service({"LLM_LLAMA_SERVICE_THREADS": "1", "LLM_MAX_QUEUE": "0"})
    with Client(target(busy), **options(certs)) as c:
        hold = c.stream(COUNTING, max_tokens=900, temperature=0)
        next(hold)
        code, line = rc(
            "generate", "Hi", "--max-retries", "0", env=cli_env | {"LLM_TARGET": target(busy)}
        )
        hold.close()
    assert code == 5 and "RESOURCE_EXHAUSTED" in line


def test_ctrl_c_interrupts_generate_with_130(
    cli_env: dict[str, str], client: Callable[..., Client]
) -> None:
    process = subprocess.Popen(
        [LLM_CLI, "generate", COUNTING, "--max-tokens", "900", "--temperature", "0"],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    process.stdout.read(8)  # it is streaming
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert err.strip() == "llm_cli: interrupted"
    c = client()
    deadline = time.monotonic() + 1
    while (pool := c.status().pool).free != pool.size:
        assert time.monotonic() < deadline, pool
        time.sleep(0.02)


def read_reply(chat: pexpect.spawn) -> str:  # type: ignore[type-arg]
    """The reply to the line just sent: what the terminal shows up to the next prompt."""
    chat.expect("\r\n> ")
    shown = chat.before
    assert isinstance(shown, str)
    return shown.split("\r\n", 1)[1].strip()  # the first line is the echo of what was typed


def test_chat_in_a_terminal(cli_env: dict[str, str], client: Callable[..., Client]) -> None:
    chat = pexpect.spawn(
        LLM_CLI, ["chat", "--temperature", "0", "--max-tokens", "300"],
        env=cli_env, encoding="utf-8", timeout=60, dimensions=(40, 200),
    )  # fmt: skip
    chat.expect("chatting with ")
    chat.expect("> ")
    chat.sendline("Name a fruit. Answer with one word.")
    first = read_reply(chat)
    chat.sendline("Repeat your previous answer.")
    second = read_reply(chat)
    assert first and first in second  # the second answer depends on the first

    chat.sendline("/reset")
    chat.expect(r"\(conversation forgotten\)")
    chat.expect("> ")
    chat.sendline("Repeat your previous answer.")
    assert first not in read_reply(chat)  # nothing left of the earlier turns

    chat.sendline("Write a long story about a dragon.")
    chat.expect("dragon named")  # the reply is streaming (greedy: it always starts so)
    chat.sendintr()  # Ctrl-C: stops the reply, not the session
    chat.expect(r"\[stopped\]")
    chat.expect("> ")
    c = client()
    deadline = time.monotonic() + 1
    while (pool := c.status().pool).free != pool.size:
        assert time.monotonic() < deadline, pool
        time.sleep(0.02)
    chat.sendline("/system You are a pirate.")
    chat.expect(r"\(system message set; conversation reset\)")
    chat.expect("> ")

    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
    history = Path(cli_env["XDG_STATE_HOME"]) / "llm-service" / "chat_history"
    assert "Repeat your previous answer." in history.read_text()
