"""Per-client limits: one client cannot take the whole server (README, "Deploying safely").

A *client* is the access key a request came with when keys are configured (a key and the
tokens minted from it are one client), else the remote address. Behind a reverse proxy
without keys every visitor has the proxy's address: configure keys there.

- ``ClientLimits`` counts per client: the sessions it holds (``limits.sessions_per_client``),
  the new sessions it opens (``limits.connections_per_minute``, a token bucket: every attempt
  counts, refused ones too), its running ``/v1/vision/ask`` requests
  (``limits.vision_asks_per_client``) and its running model API requests
  (``/v1/audio/…``, ``/v1/chat/completions``: ``limits.model_requests_per_client``).
  ``AppState.open_session`` asks it for every WebSocket and WebRTC session. A new
  per-client endpoint (``/v1/realtime``) opens its sessions the same way:
  ``state.open_session("realtime", client_of(request))``, and runs ``expire_session``
  beside the session. MQTT devices are not counted here: the broker's
  passwords and ACLs admit them and ``mqtt.idle_timeout_s`` expires them.
- ``expire_session`` closes a session that reached ``limits.max_session_s`` or got no audio
  and no message from its client for ``limits.idle_timeout_s``, with a fatal
  ``session_expired`` or ``idle_timeout`` error.
- ``refusal`` is the HTTP answer to a refused request: 429 when the client is over its own
  limit (with ``Retry-After`` when a wait is known), 503 when the whole server is full.

The per-session rates of typed turns and images are ``streaming.ratelimit.MessageLimits``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterator
from typing import Any, Literal

from aiohttp import web

from pipelines.session import Session
from server.auth import CREDENTIAL
from server.settings import LimitSettings
from streaming.errors import VoxlensError
from streaming.events import Error
from streaming.ratelimit import Clock, MessageLimits, TokenBucket

log = logging.getLogger(__name__)

Request = Literal["vision", "model"]  # the kinds of request counted per client while they run
PRUNE_AT = 256  # connection-rate buckets kept before full (as-new) ones are forgotten
MIN_SLEEP_S = 0.01  # the expiry watch never spins on a deadline it just missed by a hair


class Busy(VoxlensError):
    """A session or request refused: the server, or this client, is at a limit.

    ``status`` is the HTTP status that answers it (429: this client's own limit; 503: the
    server's); ``retry_after`` says when trying again will work, where that is known."""

    code = "busy"
    recoverable = False

    def __init__(self, message: str, *, code: str | None = None, status: int = 503,
                 retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.retry_after = retry_after


def client_of(request: web.Request) -> str:
    """Who is asking, for the per-client limits: the access key's id, else the address."""
    if CREDENTIAL in request:
        return request[CREDENTIAL].client
    return request.remote or "unknown"


def refusal(e: Busy) -> web.Response:
    """``{"error", "message", "retry_after"?}`` with the status of ``e`` (and ``Retry-After``)."""
    body: dict[str, Any] = {"error": e.code, "message": e.message}
    headers = None
    if e.retry_after is not None:
        seconds = max(1, math.ceil(e.retry_after))
        body["retry_after"] = seconds
        headers = {"Retry-After": str(seconds)}
    return web.json_response(body, status=e.status, headers=headers)


class ClientLimits:
    """What each client holds and how fast it comes (``LimitSettings``; 0 = no limit)."""

    def __init__(self, settings: LimitSettings, *, clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._sessions: dict[str, int] = {}  # open sessions per client (no zero entries)
        self._running: dict[Request, dict[str, int]] = {"vision": {}, "model": {}}  # per client
        self._buckets: dict[str, TokenBucket] = {}  # connection rate per client
        self._prune_at = PRUNE_AT

    def sessions(self, client: str) -> int:
        return self._sessions.get(client, 0)

    def admit(self, client: str) -> None:
        """May ``client`` open a new session now? Takes a token of its connection rate (so
        every attempt counts), then checks its session count; raises ``Busy`` (429)."""
        per_minute = self.settings.connections_per_minute
        if per_minute:
            bucket = self._bucket(client, per_minute)
            if not bucket.take():
                wait = bucket.retry_after()
                raise Busy(f"more than {per_minute} new sessions a minute from this client; "
                           f"try again in {math.ceil(wait)} s", code="rate_limited",
                           status=429, retry_after=wait)
        cap = self.settings.sessions_per_client
        if cap and self.sessions(client) >= cap:
            raise Busy(f"this client already holds {cap} sessions, its limit; end one to open "
                       "another", status=429)

    def opened(self, client: str) -> None:
        self._sessions[client] = self.sessions(client) + 1

    def closed(self, client: str) -> None:
        _release(self._sessions, client)

    @contextlib.contextmanager
    def running(self, kind: Request, client: str) -> Iterator[None]:
        """Hold one of ``client``'s places for requests of ``kind`` while the block runs;
        raises ``Busy`` (429) at once when they are all taken."""
        cap = (self.settings.vision_asks_per_client if kind == "vision"
               else self.settings.model_requests_per_client)
        counts = self._running[kind]
        running = counts.get(client, 0)
        if cap and running >= cap:
            what = "vision questions" if kind == "vision" else "model requests"
            raise Busy(f"this client already has {cap} {what} running, its limit; wait for "
                       "an answer", status=429)
        counts[client] = running + 1
        try:
            yield
        finally:
            _release(counts, client)

    def message_limits(self) -> MessageLimits:
        """A new session's rates of typed turns and image messages."""
        return MessageLimits(self.settings.texts_per_second, self.settings.images_per_second)

    def _bucket(self, client: str, per_minute: int) -> TokenBucket:
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self._prune_at:  # a full bucket is as good as a new one
                self._buckets = {c: b for c, b in self._buckets.items() if not b.full}
                self._prune_at = max(PRUNE_AT, 2 * len(self._buckets))
            bucket = TokenBucket(per_minute / 60, per_minute, clock=self._clock)
            self._buckets[client] = bucket
        return bucket


def _release(counts: dict[str, int], client: str) -> None:
    left = counts.get(client, 0) - 1
    if left > 0:
        counts[client] = left
    else:
        counts.pop(client, None)


async def expire_session(session: Session, settings: LimitSettings) -> None:
    """Close ``session`` with a fatal error when it reaches ``max_session_s`` or its client
    sent nothing for ``idle_timeout_s``; returns then (or at once when both are 0). The
    session's runner cancels it when the session ends first. Uses the session's clock."""
    longest, idle = settings.max_session_s, settings.idle_timeout_s
    clock = session.clock
    start = clock()
    while True:
        now = clock()
        if longest and now - start >= longest:
            log.info("session %s reached its maximum length (%g s)", session.session_id, longest)
            session.close(Error("session_expired", f"the session reached its maximum length "
                                f"({longest:g} s) and was closed; connect again to go on", True))
            return
        if idle and now - session.last_input >= idle:
            log.info("session %s idle for %g s, closing it", session.session_id, idle)
            session.close(Error("idle_timeout", f"no audio and no message came for {idle:g} s: "
                                "the session was closed; connect again to go on", True))
            return
        due = min(start + longest if longest else math.inf,
                  session.last_input + idle if idle else math.inf)
        if due == math.inf:
            return
        await asyncio.sleep(max(due - now, MIN_SLEEP_S))
