"""llm_service's command line, run as a person runs it: a subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_service.cli import main
from tests.support import run_llm_service


@pytest.mark.model
def test_fetch_model_prints_the_path_last() -> None:
    result = run_llm_service("fetch-model")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


@pytest.mark.model
def test_generate_streams_text_and_a_summary(tmp_path: Path) -> None:
    counting = tmp_path / "counting.gbnf"  # the text is forced: what the model says varies by CPU
    counting.write_text('root ::= " 5, 6, 7, 8, 9, 10, 11, 12, 13"\n')
    result = run_llm_service(
        "generate", "1, 2, 3, 4,", "--grammar", str(counting), "--max-tokens", "8",
        "--n-ctx", "512",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" 5, 6,")
    assert "[length: 8 tokens" in result.stderr


@pytest.mark.model
def test_generate_reads_the_prompt_from_stdin() -> None:
    result = run_llm_service(
        "generate", "--chat", "--max-tokens", "4", "--n-ctx", "512", stdin="Say hello."
    )
    assert result.returncode == 0, result.stderr
    assert "tokens, prompt" in result.stderr


def test_missing_model_file_is_one_clear_line(tmp_path: Path) -> None:
    result = run_llm_service("generate", "hi", "--model", str(tmp_path / "absent.gguf"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"llm_service: error: model file not found: {tmp_path / 'absent.gguf'}"
    )
    assert "Traceback" not in result.stderr


def test_bad_setting_is_a_usage_error() -> None:
    result = run_llm_service("generate", "hi", "--n-ctx", "lots")
    assert result.returncode == 2
    assert (
        "invalid setting --n-ctx / LLM_N_CTX" in result.stderr and "Traceback" not in result.stderr
    )


def test_bad_sampling_value_names_the_field() -> None:
    result = run_llm_service("generate", "hi", "--backend", "fake", "--top-p", "2")
    assert result.returncode == 2
    assert "sampling.top_p" in result.stderr and "Traceback" not in result.stderr


def test_fake_backend_demo_needs_no_model() -> None:
    result = run_llm_service("generate", "hi", "--backend", "fake", "--max-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1, 2, 3, 4,"  # 12 tokens of one byte each
    assert "LLM_BACKEND=fake: serving the fake backend, a testing aid" in result.stderr


def test_settings_errors_name_the_flag_and_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLM_MAX_QUEUE", "abc")
    assert main(["serve"]) == 2
    assert "--max-queue / LLM_MAX_QUEUE" in capsys.readouterr().err


def test_serve_help_shows_defaults_and_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in (
        "Default: 127.0.0.1:50051",
        "Default: 127.0.0.1:8080",
        "Default: 30.0",
        "[LLM_TLS_ALLOWED_CLIENTS]",
        "[LLM_INSECURE]",
        "{DEBUG,INFO,WARNING,ERROR}",
        "--chat-template {chatml,chatml-tools}",
        "--chat-template-file FILE",
        "[LLM_CHAT_TEMPLATE_FILE]",
    ):
        assert expected in text, expected


def test_generate_takes_a_chat_template(tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    result = run_llm_service(
        "generate", "--chat", "hi", "--backend", "fake", "--chat-template-file", str(template),
        "--max-tokens", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "prompt 2," in result.stderr  # "hi", as the template renders it (the fake's own: 20)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    result = run_llm_service(
        "generate", "--chat", "hi", "--backend", "fake", "--chat-template-file", str(broken)
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"llm_service: error: the chat template (file {broken}) is not valid Jinja: line 2:"
        " unexpected '}'"
    )
    assert "Traceback" not in result.stderr


def test_certs_does_not_replace_a_ca_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["certs", "--out", str(tmp_path)]) == 0
    ca = (tmp_path / "ca.crt").read_bytes()
    assert main(["certs", "--out", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "ca.crt").read_bytes() == ca
    assert main(["certs", "--out", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "ca.crt").read_bytes() != ca
