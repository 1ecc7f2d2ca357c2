"""Access keys and tokens for the Python clients (docs/PROTOCOL.md, "Access: keys, tokens,
origins").

A client holding an access key (``--api-key`` or ``VOXLENS_API_KEY``) exchanges it for a
short-lived token with ``POST /v1/tokens`` before each connection and connects with
``Authorization: Bearer <token>`` (the WebSocket handshake, ``POST /offer``); a 401 on connect
mints once more (the token may have expired on the way), a 401 on ``/v1/tokens`` means the key
is wrong. Without a key the client connects as it is (a server without keys needs none).

aiohttp only: the speaker client runs with numpy, soxr, aiohttp, aiomqtt and sounddevice.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp

API_KEY_ENV = "VOXLENS_API_KEY"
T = TypeVar("T")


class AccessError(Exception):
    """The server refused this client: no key where one is needed, a wrong key, a credential
    it does not take. Not a network failure: connecting again will not help."""


class Unauthorized(Exception):
    """A connection attempt was answered 401 (raised by an ``authorized`` attempt)."""


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_at: float  # unix seconds


def api_key(given: str | None) -> str | None:
    """The access key: ``given`` (``--api-key``), else ``VOXLENS_API_KEY``; blank is none."""
    key = given if given is not None else os.environ.get(API_KEY_ENV)
    return (key or "").strip() or None


def http_base(url: str) -> str:
    """The server's ``http(s)://host:port[/prefix]`` for a ``ws(s)://…/ws`` or ``http(s)://…``
    URL (a query, such as ``?token=``, is left out)."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/").removesuffix("/ws")
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def _body(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body = await response.json(content_type=None)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


async def mint(http: aiohttp.ClientSession, url: str, key: str) -> Token:
    """``POST /v1/tokens`` with ``key``: a new token. AccessError when the server refuses the
    key; ConnectionError when it cannot be reached or cannot answer now (try again later)."""
    base = http_base(url)
    try:
        async with http.post(f"{base}/v1/tokens", headers=bearer(key)) as response:
            status, body = response.status, await _body(response)
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        raise ConnectionError(f"{base}/v1/tokens: {e or type(e).__name__}") from e
    token = body.get("token")
    if status == 200 and isinstance(token, str):
        return Token(token, float(body.get("expires_at") or 0))
    message = body.get("message") or body.get("error") or f"HTTP {status}"
    if status == 401:
        raise AccessError(f"{base} did not accept the access key (401 on /v1/tokens): check "
                          f"--api-key or {API_KEY_ENV}")
    if status == 403:
        raise AccessError(f"{base} would not mint a token with this credential (403): {message}")
    raise ConnectionError(f"{base}/v1/tokens answered {status}: {message}")


async def authorized(http: aiohttp.ClientSession, url: str, key: str | None,
                     attempt: Callable[[dict[str, str]], Awaitable[T]]) -> T:
    """``attempt(headers)`` with a token minted just now (no headers without a key). When it
    raises Unauthorized, mint once more and try again; then give up with AccessError."""
    for _ in range(2 if key else 1):
        headers = bearer((await mint(http, url, key)).value) if key else {}
        try:
            return await attempt(headers)
        except Unauthorized:
            continue
    base = http_base(url)
    if key is None:
        raise AccessError(f"{base} needs an access key (401): give --api-key KEY or set "
                          f"{API_KEY_ENV}")
    raise AccessError(f"{base} refused the tokens minted with the access key (401)")


async def ws_connect(http: aiohttp.ClientSession, url: str, key: str | None,
                     **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
    """A WebSocket to ``url`` opened with a fresh token (see ``authorized``)."""
    async def attempt(headers: dict[str, str]) -> aiohttp.ClientWebSocketResponse:
        try:
            ws: aiohttp.ClientWebSocketResponse = await http.ws_connect(url, headers=headers,
                                                                       **kwargs)
        except aiohttp.WSServerHandshakeError as e:
            if e.status == 401:
                raise Unauthorized from e
            raise
        return ws
    return await authorized(http, url, key, attempt)
