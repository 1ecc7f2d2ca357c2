"""Deploying safely: access keys, short-lived tokens, origin checks, the exposure check, TLS.

- Keys come from ``auth.api_keys`` and ``auth.api_keys_file`` (one per line, re-read on
  SIGHUP). With any configured, every endpoint but the open ones (``/``, ``/static/…``,
  ``/healthz``, ``/webrtc/config``) needs ``Authorization: Bearer <key or token>``; ``/ws``
  also takes ``?token=`` (browsers cannot set headers on a WebSocket). A missing or wrong
  credential is answered 401 by the middleware, before any handler (so before any session
  or model work) runs.
- ``POST /v1/tokens`` exchanges a key for a JWT (HS256, PyJWT) that lives ``auth.token_ttl_s``
  seconds. Its ``sub`` names the key that minted it (a keyed hash, never the key), so a token
  stops working when its key is removed, and per-client accounting can count per key.
- A request that carries ``Origin`` (a browser) to ``/ws``, ``/offer`` or any POST must come
  from the server's own origin, localhost on its port, or ``server.allowed_origins``: this is
  what stops a web page from using a server on the visitor's machine (cross-site WebSocket
  hijacking), with or without keys.

Keys are compared in constant time and never logged; neither are tokens (``AccessLog`` leaves
query strings out of aiohttp's access log).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import jwt
import platformdirs
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler, Middleware

from server.origins import DEFAULT_PORTS, canonical_origin, join_origin
from server.settings import AuthSettings, ServerSettings, Settings

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/", "/healthz", "/webrtc/config"})  # the page loads, probes, ICE list
OPEN_PREFIX = "/static/"
TOKEN_QUERY_PATHS = frozenset({"/ws", "/v1/realtime"})  # where ?token= is accepted
ORIGIN_CHECKED_PATHS = frozenset({"/ws", "/v1/realtime", "/offer"})  # and every method but GET/HEAD/OPTIONS
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
AUDIENCE = "voxlens"
ALGORITHM = "HS256"
LEEWAY_S = 5  # clock skew between nodes sharing the secret
SECRET_FILE = "token_secret"
OPEN_CLIENT = "open"  # the sub of tokens minted while no key is configured (valid nowhere else)


# ---- origins -------------------------------------------------------------------------------

def _is_name(host: str) -> bool:
    """A DNS name other than localhost (an attacker's page can make its own name point here:
    DNS rebinding), as opposed to an IP address."""
    if host == "localhost":
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def origin_allowed(origin: str, host: str | None, port: int, allowed: list[str], *,
                   trust_names: bool) -> bool:
    """May a browser page from ``origin`` use this server?

    Yes for ``allowed`` (canonical origins), for http(s)://localhost|127.0.0.1|[::1]:``port``,
    and for the server's own origin: the Origin's host:port equals the ``Host`` header (a
    Host without a port means the Origin scheme's default port). The own-origin rule accepts
    a DNS name only when ``trust_names`` (keys are configured): without keys a rebound name
    would let any page in, so such a name must be listed in ``allowed``."""
    canonical = canonical_origin(origin)
    if canonical is None:
        return False
    if canonical in allowed:
        return True
    scheme = canonical.split("://", 1)[0]
    if canonical in {join_origin(s, h, port) for s in DEFAULT_PORTS
                     for h in ("localhost", "127.0.0.1", "::1")}:
        return True
    if not host:
        return False
    own = urlsplit(f"//{host}")
    try:
        own_port = own.port or DEFAULT_PORTS[scheme]
    except ValueError:
        return False
    if not own.hostname or (_is_name(own.hostname) and not trust_names):
        return False
    return canonical == join_origin(scheme, own.hostname, own_port)


# ---- exposure and TLS ----------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_refusal(settings: Settings) -> str | None:
    """Why ``voxlens serve`` must not start as configured, or None: a non-loopback address
    without access keys, unless ``server.insecure``."""
    server = settings.server
    if server.insecure or settings.auth.configured or is_loopback(server.host):
        return None
    where = server.host or "every interface"
    return (f"voxlens will not serve on {where} without access keys: anyone who can reach "
            "this address could use the assistant, its models and its sessions. Set access "
            "keys (VOXLENS_AUTH__API_KEYS='[\"<a long random key>\"]', or auth.api_keys_file), "
            "or, if every machine that can reach this address is trusted, pass --insecure "
            "(server.insecure = true). "
            "See \"Deploying safely\" in the README.")


def tls_context(server: ServerSettings) -> ssl.SSLContext | None:
    """The server's TLS context when ``server.tls_cert``/``tls_key`` are set."""
    if server.tls_cert is None or server.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot use the TLS certificate {server.tls_cert} with the key "
                         f"{server.tls_key}: {e}") from e
    return context


# ---- keys and tokens -----------------------------------------------------------------------

def parse_keys(text: str) -> list[str]:
    """Keys of a keys file: one per line; blank lines and ``#`` comments are skipped."""
    keys = []
    for line in text.splitlines():
        key = line.split("#", 1)[0].strip()
        if key:
            keys.append(key)
    return keys


def _read_secret(path: Path) -> bytes:
    secret = path.read_bytes().strip()
    if len(secret) < 32:
        raise ValueError(f"the token secret in {path} is shorter than 32 bytes; delete the "
                         "file to have a new one made")
    return secret


def load_secret(auth: AuthSettings) -> bytes:
    """``auth.token_secret``, else the secret kept in the state directory — made once (random,
    file mode 0600), so tokens survive a restart and servers sharing the file (or the
    setting) accept each other's tokens."""
    if auth.token_secret is not None:
        return auth.token_secret.get_secret_value().encode()
    folder = auth.state_dir or Path(platformdirs.user_state_dir("voxlens"))
    path = folder / SECRET_FILE
    if path.exists():
        return _read_secret(path)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    draft = folder / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48) + "\n")
    try:
        os.link(draft, path)  # atomic, and never over a secret another server just made
    except FileExistsError:
        pass
    finally:
        draft.unlink()
    log.info("made a new token secret in %s", path)
    return _read_secret(path)


@dataclass(frozen=True)
class Credential:
    """Who is asking: ``client`` names the access key (``key-`` + 16 hex digits of a keyed
    hash; never the key), ``key`` says whether the key itself or a token minted from it came."""
    client: str
    key: bool


class Auth:
    """The configured keys (``reload()`` re-reads the file) and the token signer."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        # without keys nothing checks tokens, so no secret is kept on disk for them
        self.secret = (load_secret(settings) if settings.configured or settings.token_secret
                       else secrets.token_bytes(32))
        self._keys: list[tuple[bytes, str]] = []  # (keyed digest, client id)
        self._set(self._read())

    @property
    def enabled(self) -> bool:
        return self.settings.configured

    @property
    def key_count(self) -> int:
        return len(self._keys)

    def _digest(self, key: str) -> bytes:
        return hmac.new(self.secret, b"key:" + key.encode(), hashlib.sha256).digest()

    def client_id(self, key: str) -> str:
        return "key-" + hmac.new(self.secret, b"id:" + key.encode(), hashlib.sha256).hexdigest()[:16]

    def _read(self) -> list[str]:
        keys = [k.get_secret_value() for k in self.settings.api_keys]
        path = self.settings.api_keys_file
        if path is not None:
            try:
                keys += parse_keys(path.read_text("utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"cannot read the access keys file {path}: {e}") from e
        return keys

    def _set(self, keys: list[str]) -> None:
        self._keys = [(self._digest(k), self.client_id(k)) for k in keys]

    async def reload(self) -> None:
        """Re-read the keys file (SIGHUP); a file that cannot be read keeps the old keys."""
        try:
            keys = await asyncio.to_thread(self._read)
        except ValueError as e:
            log.warning("%s; keeping the %d keys in use", e, len(self._keys))
            return
        self._set(keys)
        log.info("access keys re-read: %d keys", len(self._keys))

    def check_key(self, candidate: str) -> str | None:
        """The client id of a configured key equal to ``candidate``. Equal-length digests,
        compared with every key without stopping early: the time says nothing about the keys."""
        given = self._digest(candidate)
        found = None
        for digest, client in self._keys:
            if hmac.compare_digest(given, digest) and found is None:
                found = client
        return found

    def mint(self, client: str, now: float | None = None) -> tuple[str, int]:
        """A token for ``client`` and when it expires (unix seconds)."""
        issued = int(time.time() if now is None else now)
        expires = issued + self.settings.token_ttl_s
        claims = {"sub": client, "iat": issued, "exp": expires, "aud": AUDIENCE}
        return jwt.encode(claims, self.secret, algorithm=ALGORITHM), expires

    def check_token(self, token: str) -> str | None:
        """The client id of a valid token (signature, audience, not expired, its key still
        configured), else None."""
        try:
            claims = jwt.decode(token, self.secret, algorithms=[ALGORITHM], audience=AUDIENCE,
                                leeway=LEEWAY_S,
                                options={"require": ["sub", "iat", "exp", "aud"]})
        except jwt.PyJWTError:
            return None
        client = claims.get("sub")
        if not isinstance(client, str) or all(client != c for _, c in self._keys):
            return None
        return client

    def authenticate(self, request: web.Request) -> Credential | None:
        """The request's credential: ``Authorization: Bearer`` (a key or a token), or on
        ``/ws`` a ``?token=`` query parameter."""
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            client = self.check_key(value)
            if client is not None:
                return Credential(client, key=True)
            client = self.check_token(value)
            return None if client is None else Credential(client, key=False)
        token = request.query.get("token") if request.path in TOKEN_QUERY_PATHS else None
        client = self.check_token(token) if token else None
        return None if client is None else Credential(client, key=False)


AUTH = web.AppKey("auth", Auth)
CREDENTIAL = web.RequestKey("credential", Credential)  # set on requests that carried one


def _refuse(status: int, code: str, message: str) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="voxlens"'} if status == 401 else None
    return web.json_response({"error": code, "message": message}, status=status,
                             headers=headers)


def _port(request: web.Request, server: ServerSettings) -> int:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return int(sockname[1]) if isinstance(sockname, tuple) else server.port


def guard(auth: Auth, server: ServerSettings) -> Middleware:
    """The middleware: the origin check (403), then the credential check (401)."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        origin = request.headers.get("Origin")
        if (origin is not None and (path in ORIGIN_CHECKED_PATHS
                                    or request.method not in SAFE_METHODS)
                and not origin_allowed(origin, request.host, _port(request, server),
                                       server.allowed_origins, trust_names=auth.enabled)):
            log.info("refused %s %s from %s: origin %r is not allowed", request.method, path,
                     request.remote, origin[:100])
            return _refuse(403, "forbidden_origin", f"pages from {origin[:100]} may not use "
                           "this server (the server's server.allowed_origins lists the others)")
        if auth.enabled and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIX):
            credential = auth.authenticate(request)
            if credential is None:
                log.info("refused %s %s from %s: no valid credential", request.method, path,
                         request.remote)
                return _refuse(401, "unauthorized", "this server needs a credential: "
                               "'Authorization: Bearer <access key or token>' (on /ws also "
                               "?token=<token>); it was missing, wrong or expired")
            request[CREDENTIAL] = credential
        return await handler(request)

    return check


async def tokens(request: web.Request) -> web.Response:
    """``POST /v1/tokens`` (Bearer access key) → ``{"token", "expires_at"}``."""
    auth = request.app[AUTH]
    client = OPEN_CLIENT
    if auth.enabled:
        credential = request[CREDENTIAL]  # the middleware let only credentials through
        if not credential.key:
            return _refuse(403, "forbidden", "a token cannot mint tokens: use an access key")
        client = credential.client
    token, expires = auth.mint(client)
    return web.json_response({"token": token, "expires_at": expires})


class AccessLog(AbstractAccessLogger):
    """aiohttp's access log, without query strings (``?token=`` stays out of the logs)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info('%s "%s %s" %d %d %.3fs', request.remote, request.method, request.path,
                         response.status, response.body_length, time)
