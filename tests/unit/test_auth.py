"""The pure parts of deploying safely (server/auth.py): keys, tokens, origins, the exposure
check, the token secret, settings, and the access log without query strings."""

from __future__ import annotations

import logging
import stat
import time
from pathlib import Path

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from pydantic import ValidationError

from server.auth import (
    AccessLog,
    Auth,
    exposure_refusal,
    is_loopback,
    load_secret,
    origin_allowed,
    parse_keys,
    tls_context,
)
from server.origins import canonical_origin
from server.settings import AuthSettings, load_settings

KEY = "k-0123456789abcdef-alpha"
OTHER = "k-0123456789abcdef-beta"


@pytest.fixture(autouse=True)
def _no_voxlens_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("VOXLENS_"):
            monkeypatch.delenv(name)


def auth(tmp_path: Path, keys: list[str] | None = None, **fields: object) -> Auth:
    return Auth(AuthSettings(api_keys=keys if keys is not None else [KEY],  # type: ignore[arg-type]
                             state_dir=tmp_path, **fields))


def test_keys_file_lines() -> None:
    text = "# the kitchen tablet\nk1\n\n  k2  # car\n#k3\n\t\nk4"
    assert parse_keys(text) == ["k1", "k2", "k4"]


def test_keys_are_matched_by_value_and_named_without_revealing_them(tmp_path: Path) -> None:
    a = auth(tmp_path, [KEY, OTHER])
    first, second = a.check_key(KEY), a.check_key(OTHER)
    assert first is not None and second is not None and first != second
    assert first.startswith("key-") and KEY not in first
    for wrong in ["", KEY[:-1], KEY + "x", KEY.upper(), "Bearer " + KEY]:
        assert a.check_key(wrong) is None
    assert a.enabled and a.key_count == 2


def test_tokens_carry_the_key_name_and_expire(tmp_path: Path) -> None:
    a = auth(tmp_path, token_ttl_s=600)
    client = a.check_key(KEY)
    token, expires = a.mint(client or "")
    assert abs(expires - (time.time() + 600)) < 60
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == client and KEY not in token
    assert a.check_token(token) == client
    assert a.check_key(token) is None  # a token is not a key

    old, _ = a.mint(client or "", now=time.time() - 3600)  # expired an hour after minting
    assert a.check_token(old) is None


def test_tampered_forged_and_foreign_tokens_are_refused(tmp_path: Path) -> None:
    a = auth(tmp_path)
    client = a.check_key(KEY) or ""
    token, _ = a.mint(client)
    head, _, signature = token.split(".")
    longer = jwt.encode({"sub": client, "iat": 0, "exp": int(time.time()) + 10**6,
                         "aud": "voxlens"}, "x" * 32, algorithm="HS256").split(".")[1]
    assert a.check_token(f"{head}.{longer}.{signature}") is None  # payload changed
    assert a.check_token(token[:-4] + ("AAAA" if token[-4:] != "AAAA" else "BBBB")) is None
    forged = jwt.encode({"sub": client, "iat": 0, "exp": int(time.time()) + 600,
                         "aud": "voxlens"}, "y" * 40, algorithm="HS256")
    assert a.check_token(forged) is None  # another secret
    unsigned = jwt.encode({"sub": client, "iat": 0, "exp": int(time.time()) + 600,
                           "aud": "voxlens"}, None, algorithm="none")
    assert a.check_token(unsigned) is None
    stranger = a.mint("key-0000000000000000")[0]  # our signature, but no such key
    assert a.check_token(stranger) is None
    assert a.check_token("not a token") is None


async def test_reload_reads_the_file_and_revokes_tokens_of_removed_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# devices\nfile-key-1\n")
    a = Auth(AuthSettings(api_keys_file=keys, state_dir=tmp_path))
    client = a.check_key("file-key-1")
    assert client is not None
    token, _ = a.mint(client)
    keys.write_text("file-key-2\n")
    await a.reload()
    assert a.check_key("file-key-1") is None and a.check_key("file-key-2") is not None
    assert a.check_token(token) is None
    keys.unlink()
    await a.reload()  # unreadable: the keys in use stay
    assert a.check_key("file-key-2") is not None


def test_an_empty_keys_file_still_closes_the_server(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# nobody yet\n")
    a = Auth(AuthSettings(api_keys_file=keys, state_dir=tmp_path))
    assert a.enabled and a.key_count == 0
    with pytest.raises(ValueError, match="cannot read the access keys file"):
        Auth(AuthSettings(api_keys_file=tmp_path / "missing", state_dir=tmp_path))


def test_the_token_secret_is_made_once_private_and_reused(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    first = load_secret(AuthSettings(state_dir=folder))
    path = folder / "token_secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 32
    assert load_secret(AuthSettings(state_dir=folder)) == first  # a restart, another node
    a, b = auth(folder), auth(folder)
    assert b.check_token(a.mint(a.check_key(KEY) or "")[0]) is not None
    explicit = "s" * 40
    assert load_secret(AuthSettings(token_secret=explicit, state_dir=folder)) == explicit.encode()  # type: ignore[arg-type]
    path.write_text("short\n")
    with pytest.raises(ValueError, match="shorter than 32"):
        load_secret(AuthSettings(state_dir=folder))


def test_an_open_server_keeps_no_secret_on_disk(tmp_path: Path) -> None:
    a = Auth(AuthSettings(state_dir=tmp_path))
    assert not a.enabled and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("origin", "canonical"), [
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("HTTPS://Voice.Example.org", "https://voice.example.org:443"),
    ("https://voice.example.org/", "https://voice.example.org:443"),
    ("http://[::1]:9000", "http://[::1]:9000"),
    ("null", None), ("file://", None), ("ws://host:1", None), ("http://host:99999", None),
    ("https://user@host", None), ("https://host/path", None), ("", None),
])
def test_origins_are_compared_in_one_form(origin: str, canonical: str | None) -> None:
    assert canonical_origin(origin) == canonical


@pytest.mark.parametrize(("origin", "host", "trust_names", "allowed"), [
    ("http://127.0.0.1:8080", "127.0.0.1:8080", False, True),  # the page of this server
    ("http://localhost:8080", "127.0.0.1:8080", False, True),  # localhost on its port
    ("https://127.0.0.1:8080", "127.0.0.1:8080", False, True),
    ("http://[::1]:8080", "[::1]:8080", False, True),
    ("http://192.168.1.5:8080", "192.168.1.5:8080", False, True),  # a LAN address
    ("https://voice.example.org", "voice.example.org", True, True),  # behind a TLS proxy
    ("https://voice.example.org", "voice.example.org:443", True, True),
    ("http://evil.example", "127.0.0.1:8080", False, False),  # cross-site hijacking
    ("http://evil.example", "127.0.0.1:8080", True, False),
    ("http://127.0.0.1:9999", "127.0.0.1:8080", False, False),  # another local port
    ("http://localhost:9999", "127.0.0.1:8080", False, False),
    ("http://rebound.example:8080", "rebound.example:8080", False, False),  # DNS rebinding
    ("https://voice.example.org:8443", "voice.example.org", True, False),
    ("null", "127.0.0.1:8080", False, False),
    ("https://app.example.test", "127.0.0.1:8080", False, True),  # listed
])
def test_which_origins_may_use_the_server(origin: str, host: str, trust_names: bool,
                                          allowed: bool) -> None:
    listed = ["https://app.example.test:443"]
    assert origin_allowed(origin, host, 8080, listed, trust_names=trust_names) is allowed


def test_loopback_addresses() -> None:
    for host in ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"]:
        assert is_loopback(host), host
    for host in ["0.0.0.0", "::", "", "192.168.1.5", "voice.example.org"]:
        assert not is_loopback(host), host


def test_a_public_address_needs_keys_or_insecure(tmp_path: Path) -> None:
    public = load_settings(server={"host": "0.0.0.0"})
    message = exposure_refusal(public)
    assert message is not None and "--insecure" in message and "0.0.0.0" in message
    assert "VOXLENS_AUTH__API_KEYS" in message
    assert exposure_refusal(load_settings()) is None  # 127.0.0.1: open, as before
    assert exposure_refusal(load_settings(server={"host": "0.0.0.0", "insecure": True})) is None
    assert exposure_refusal(load_settings(server={"host": "0.0.0.0"},
                                          auth={"api_keys": [KEY]})) is None
    assert exposure_refusal(load_settings(server={"host": "::"},
                                          auth={"api_keys_file": tmp_path / "k"})) is None


def test_auth_settings_from_the_environment_stay_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOXLENS_AUTH__API_KEYS", f'["{KEY}", "{OTHER}"]')
    monkeypatch.setenv("VOXLENS_SERVER__ALLOWED_ORIGINS", '["https://App.example.test"]')
    monkeypatch.setenv("VOXLENS_SERVER__INSECURE", "true")
    s = load_settings()
    assert [k.get_secret_value() for k in s.auth.api_keys] == [KEY, OTHER]
    assert KEY not in repr(s) and KEY not in str(s.model_dump())
    assert s.server.allowed_origins == ["https://app.example.test:443"]
    assert s.server.insecure and s.auth.token_ttl_s == 600


@pytest.mark.parametrize("fields", [
    {"auth": {"api_keys": [""]}}, {"auth": {"api_keys": ["two words"]}},
    {"auth": {"token_secret": "too short"}}, {"server": {"allowed_origins": ["evil.example"]}},
    {"server": {"tls_cert": "cert.pem"}}, {"auth": {"token_ttl_s": 0}},
])
def test_bad_security_settings_are_refused(fields: dict[str, dict[str, object]]) -> None:
    with pytest.raises(ValidationError):
        load_settings(**fields)


def test_tls_needs_a_matching_pair(tmp_path: Path) -> None:
    assert tls_context(load_settings().server) is None
    (tmp_path / "c.pem").write_text("not a certificate")
    settings = load_settings(server={"tls_cert": tmp_path / "c.pem", "tls_key": tmp_path / "k"})
    with pytest.raises(ValueError, match="cannot use the TLS certificate"):
        tls_context(settings.server)


def test_the_access_log_leaves_tokens_out(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.access")
    request = make_mocked_request("GET", "/ws?token=eyJsecret.payload.sig")
    with caplog.at_level(logging.INFO, logger="test.access"):
        AccessLog(logger, "").log(request, web.Response(status=101), 0.25)
    assert "/ws" in caplog.text and "eyJ" not in caplog.text and "token" not in caplog.text
