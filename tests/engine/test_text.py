from __future__ import annotations

import pytest

from llm_service.engine.text import ReasoningSplitter, StreamDecoder


def feed(decoder: StreamDecoder, pieces: list[bytes]) -> list[str]:
    return [decoder.push(p) for p in pieces]


def test_multibyte_character_is_held_until_complete() -> None:
    d = StreamDecoder()
    data = "é🙂".encode()
    out = feed(d, [bytes([b]) for b in data])
    assert out == ["", "é", "", "", "", "🙂"]
    assert d.finish() == ""


def test_unfinished_character_at_end_becomes_replacement() -> None:
    d = StreamDecoder()
    assert d.push("🙂".encode()[:2]) == ""
    assert d.finish() == "\ufffd"


def test_stop_string_inside_one_piece() -> None:
    d = StreamDecoder(["END"])
    assert d.push(b"hello END world") == "hello "
    assert d.stopped
    assert d.push(b"more") == ""
    assert d.finish() == ""


def test_stop_string_across_pieces_is_never_half_emitted() -> None:
    d = StreamDecoder(["<stop>"])
    out = feed(d, [b"ab<", b"st", b"op", b">tail"])
    assert out == ["ab", "", "", ""]
    assert d.stopped


def test_false_start_of_stop_string_is_released() -> None:
    d = StreamDecoder(["<stop>"])
    assert d.push(b"a<st") == "a"
    assert d.push(b"x") == "<stx"
    assert not d.stopped
    assert d.push(b"<") == ""
    assert d.finish() == "<"


def test_earliest_of_several_stop_strings_wins() -> None:
    d = StreamDecoder(["world", "lo w"])
    assert d.push(b"hello world") == "hel"


@pytest.mark.parametrize(
    "text", ["plain ascii", "naïve café", "日本語のテキスト", "emoji 🙂🚀 mix"]
)
def test_byte_by_byte_roundtrip(text: str) -> None:
    d = StreamDecoder(["zzz"])
    out = "".join(feed(d, [bytes([b]) for b in text.encode()])) + d.finish()
    assert out == text


# -- reasoning -------------------------------------------------------------------------------


def split_everywhere(text: str, *, inside: bool = False) -> tuple[str, str]:
    """(content, reasoning) of ``text``, the same wherever it is cut in two (and fed whole)."""
    results = set()
    for cut in range(len(text) + 1):
        splitter = ReasoningSplitter(inside=inside)
        content = reasoning = ""
        for piece in (text[:cut], text[cut:]):
            c, r = splitter.feed(piece)
            content, reasoning = content + c, reasoning + r
        c, r = splitter.finish()
        results.add((content + c, reasoning + r))
    assert len(results) == 1, results
    return results.pop()


@pytest.mark.parametrize(
    ("text", "inside", "expected"),
    [
        ("<think>2 + 2 is 4</think>\n\nIt is 4.", False, ("It is 4.", "2 + 2 is 4")),
        ("\n<think>a</think>b", False, ("b", "a")),
        ("planning</think> Done", True, ("Done", "planning")),  # the template opened it
        ("No reasoning <think>here</think>", False, ("No reasoning <think>here</think>", "")),
        ("<think>never closed", False, ("", "never closed")),
        ("<thin", False, ("<thin", "")),
        ("<b>bold</b>", False, ("<b>bold</b>", "")),
        ("", False, ("", "")),
    ],
)
def test_a_leading_think_block_is_reasoning(
    text: str, inside: bool, expected: tuple[str, str]
) -> None:
    assert split_everywhere(text, inside=inside) == expected
