"""The clients' access helper (client/common/access.py): where tokens are minted, which key is used."""

import pytest

from client.common.access import API_KEY_ENV, api_key, http_base


@pytest.mark.parametrize(("url", "base"), [
    ("ws://127.0.0.1:8080/ws", "http://127.0.0.1:8080"),
    ("wss://voice.example.org/ws?token=abc", "https://voice.example.org"),
    ("wss://example.org/voxlens/ws/", "https://example.org/voxlens"),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("https://[::1]:8443/", "https://[::1]:8443"),
])
def test_tokens_come_from_the_server_of_the_url(url: str, base: str) -> None:
    assert http_base(url) == base


def test_the_key_is_given_or_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert api_key(None) is None
    assert api_key(" given ") == "given"
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert api_key(None) == "from-env"
    assert api_key("given") == "given"  # the option wins
    monkeypatch.setenv(API_KEY_ENV, "  ")
    assert api_key(None) is None  # blank is no key
