"""API keys (file, bearer header) and per-caller rate limits on a fake clock."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from llm_service.errors import AuthenticationError, ConfigurationError, RateLimitedError
from llm_service.gateway.keys import ApiKeys, RateLimiter

KEY = "sk-test-0123456789abcdef"
OTHER_KEY = "sk-other-key"
HASHED_KEY = "sk-hashed-secret"


def keys_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture
def keys(tmp_path: Path) -> ApiKeys:
    digest = hashlib.sha256(HASHED_KEY.encode()).hexdigest()
    text = f"# gateway keys\n\n{KEY}\n  {OTHER_KEY}  # the batch jobs\nsha256:{digest.upper()}\n"
    return ApiKeys.load(keys_file(tmp_path, text))


def test_keys_are_named_by_their_line(keys: ApiKeys) -> None:
    assert len(keys) == 3
    assert keys.identify(f"Bearer {KEY}") == "key-3"
    assert keys.identify(f"Bearer {OTHER_KEY}") == "key-4"


def test_a_hashed_key_is_matched_by_its_digest(keys: ApiKeys) -> None:
    assert keys.identify(f"Bearer {HASHED_KEY}") == "key-5"
    digest = hashlib.sha256(HASHED_KEY.encode()).hexdigest()
    with pytest.raises(AuthenticationError):
        keys.identify(f"Bearer sha256:{digest}")  # the digest is not itself a key


def test_the_scheme_is_case_insensitive(keys: ApiKeys) -> None:
    assert keys.identify(f"bearer {KEY}") == "key-3"


def test_an_x_api_key_header_is_read_when_there_is_no_authorization(keys: ApiKeys) -> None:
    assert keys.identify(None, OTHER_KEY) == "key-4"
    assert keys.identify(f"Bearer {KEY}", OTHER_KEY) == "key-3"  # Authorization comes first
    for wrong in ("", " ", f"{KEY}x", f"Bearer {KEY}"):
        with pytest.raises(AuthenticationError):
            keys.identify(None, wrong)
    with pytest.raises(AuthenticationError):
        keys.identify("Bearer sk-wrong", KEY)  # a wrong Authorization is not passed over


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Basic {KEY}",
        f"Token {KEY}",
        KEY,
        f"Bearer {KEY}x",
        f"Bearer {KEY[:-1]}",
        "Bearer sk-not-a-key-at-all",
    ],
)
def test_anything_but_a_known_bearer_key_is_refused(keys: ApiKeys, header: str | None) -> None:
    with pytest.raises(AuthenticationError) as info:
        keys.identify(header)
    for presented in (w for w in (header or "").split() if w.startswith("sk-")):
        assert presented not in str(info.value)
        assert all(presented not in str(arg) for arg in info.value.args)


def test_a_line_of_two_words_is_refused_by_number_not_content(tmp_path: Path) -> None:
    path = keys_file(tmp_path, f"{KEY}\n# comment\nsk-first sk-second\n")
    with pytest.raises(ConfigurationError) as info:
        ApiKeys.load(path)
    message = str(info.value)
    assert "line 3" in message
    assert "sk-first" not in message and "sk-second" not in message
    assert KEY not in message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   # another\n"])
def test_a_file_without_keys_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigurationError, match="no key"):
        ApiKeys.load(keys_file(tmp_path, text))


def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        ApiKeys.load(tmp_path / "missing.txt")
    with pytest.raises(ConfigurationError, match="cannot read"):
        ApiKeys.load(tmp_path)  # a directory


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o620, 0o601])
def test_a_keys_file_others_may_read_or_change_is_refused(tmp_path: Path, mode: int) -> None:
    path = keys_file(tmp_path, f"{KEY}\n")
    path.chmod(mode)
    with pytest.raises(ConfigurationError, match=f"permissions {mode:04o}.*chmod 600"):
        ApiKeys.load(path)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440])
def test_a_private_keys_file_is_read(tmp_path: Path, mode: int) -> None:
    path = keys_file(tmp_path, f"{KEY}\n")
    path.chmod(mode)
    assert len(ApiKeys.load(path)) == 1


def test_a_binary_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.bin"
    path.write_bytes(b"\xff\xfe\x00key")
    path.chmod(0o600)
    with pytest.raises(ConfigurationError, match="UTF-8"):
        ApiKeys.load(path)


# -- rate limits -----------------------------------------------------------------------------


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_requests_per_minute(clock: FakeClock) -> None:
    limiter = RateLimiter(2, 0, clock=clock)
    limiter.admit("key-1")
    limiter.admit("key-1")
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("key-1")
    assert info.value.retry_after_s == pytest.approx(30.0)
    assert "2 requests per minute" in str(info.value)
    clock.advance(29.0)
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("key-1")
    assert info.value.retry_after_s == pytest.approx(1.0)
    clock.advance(1.0)
    limiter.admit("key-1")
    with pytest.raises(RateLimitedError):
        limiter.admit("key-1")


def test_a_refused_request_takes_nothing(clock: FakeClock) -> None:
    limiter = RateLimiter(1, 0, clock=clock)
    limiter.admit("key-1")
    for _ in range(5):
        with pytest.raises(RateLimitedError):
            limiter.admit("key-1")
    clock.advance(60.0)
    limiter.admit("key-1")


def test_the_allowance_does_not_grow_past_a_minute(clock: FakeClock) -> None:
    limiter = RateLimiter(2, 0, clock=clock)
    clock.advance(3600.0)
    limiter.admit("key-1")
    limiter.admit("key-1")
    with pytest.raises(RateLimitedError):
        limiter.admit("key-1")


def test_tokens_per_minute(clock: FakeClock) -> None:
    limiter = RateLimiter(0, 60, clock=clock)
    limiter.admit("key-1")
    limiter.charge("key-1", 90)  # one large request overdraws by 30 tokens
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("key-1")
    assert info.value.retry_after_s == pytest.approx(30.0)
    assert "60 tokens per minute" in str(info.value)
    clock.advance(20.0)
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("key-1")
    assert info.value.retry_after_s == pytest.approx(10.0)
    clock.advance(10.0)
    limiter.admit("key-1")


def test_tokens_within_the_allowance_do_not_limit(clock: FakeClock) -> None:
    limiter = RateLimiter(0, 100, clock=clock)
    for _ in range(3):
        limiter.admit("key-1")
        limiter.charge("key-1", 33)
    limiter.admit("key-1")
    limiter.charge("key-1", 2)
    with pytest.raises(RateLimitedError):
        limiter.admit("key-1")


def test_callers_are_limited_apart(clock: FakeClock) -> None:
    limiter = RateLimiter(1, 10, clock=clock)
    limiter.admit("key-1")
    with pytest.raises(RateLimitedError):
        limiter.admit("key-1")
    limiter.admit("key-2")
    limiter.charge("key-3", 100)
    with pytest.raises(RateLimitedError):
        limiter.admit("key-3")
    clock.advance(60.0)
    limiter.admit("key-1")
    limiter.admit("key-2")


def test_no_limits_never_limit(clock: FakeClock) -> None:
    limiter = RateLimiter(0, 0, clock=clock)
    assert not limiter.enabled
    for _ in range(1000):
        limiter.admit("key-1")
        limiter.charge("key-1", 10_000)


def test_either_limit_enables_the_limiter() -> None:
    assert RateLimiter(1, 0).enabled
    assert RateLimiter(0, 1).enabled


# -- what a key may hold ---------------------------------------------------------------------


def utf8_keys_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.txt"
    path.write_bytes(text.encode())
    path.chmod(0o600)
    return path


def test_a_hash_inside_a_key_is_part_of_it(tmp_path: Path) -> None:
    keys = ApiKeys.load(keys_file(tmp_path, "abc#def\n"))
    assert len(keys) == 1
    assert keys.identify("Bearer abc#def") == "key-1"
    for cut in ("abc", "abc#", "def"):
        with pytest.raises(AuthenticationError):
            keys.identify(f"Bearer {cut}")


def test_a_comment_after_a_space_is_not_part_of_the_key(tmp_path: Path) -> None:
    keys = ApiKeys.load(keys_file(tmp_path, "abc  # note\nxyz\t# a tab too\n#abc#def\n"))
    assert len(keys) == 2
    assert keys.identify("Bearer abc") == "key-1"
    assert keys.identify("Bearer xyz") == "key-2"
    with pytest.raises(AuthenticationError):
        keys.identify("Bearer abc  # note")


def test_a_non_ascii_key_matches_its_utf8_bytes_read_as_latin1(tmp_path: Path) -> None:
    key = "clé-ü"
    keys = ApiKeys.load(utf8_keys_file(tmp_path, f"{key}\n"))
    header = "Bearer " + key.encode().decode("latin-1")  # how an ASGI server hands it over
    assert keys.identify(header) == "key-1"
    with pytest.raises(AuthenticationError):
        keys.identify("Bearer " + key.encode().decode("latin-1")[:-1])


def test_a_hashed_non_ascii_key_matches_too(tmp_path: Path) -> None:
    key = "ключ-🔑"
    digest = hashlib.sha256(key.encode()).hexdigest()
    keys = ApiKeys.load(utf8_keys_file(tmp_path, f"sha256:{digest}\n"))
    assert keys.identify("Bearer " + key.encode().decode("latin-1")) == "key-1"


def test_a_key_whose_last_byte_python_calls_whitespace_still_matches(tmp_path: Path) -> None:
    # "à" is C3 A0 in UTF-8; read as latin-1, A0 is a no-break space, which str.strip() drops.
    keys = ApiKeys.load(utf8_keys_file(tmp_path, "clé-à\n"))
    assert keys.identify("Bearer " + "clé-à".encode().decode("latin-1")) == "key-1"
