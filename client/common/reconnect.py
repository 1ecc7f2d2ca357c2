"""How a client keeps its conversation connected (shared by ``voxlens talk`` and ``voxlens
desktop``).

The policy is plain values and functions: ``ending_of_session`` and ``ending_of_failure`` say
how a session ended (or why connecting failed) and whether trying again can help;
``Backoff.wait_s`` says how long to wait before the next try. ``Reconnecting`` is the loop both
clients run: it opens a session (a new client, configured as the first: the same
``session.start`` or offer), waits until it ends, and opens the next as the policy says.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from client.common.access import AccessError
from client.common.eventlog import EventLog, TurnRecord
from client.common.events import Error, SessionClosing, decode_event

RETRY_LATER = frozenset({"draining", "busy", "not_ready", "rate_limited", "unavailable",
                         "internal"})
"""Refusals and fatal errors after which connecting again works, later or through the balancer
on another node. Any other fatal code is the client's own problem and ends it: a credential the
server refuses (``unauthorized``, ``forbidden``), a configuration it does not take
(``unsupported``, ``bad_message``), or the session's own limits (``session_expired``,
``idle_timeout``)."""

_PLAIN = {
    "draining": "the server is shutting down",
    "busy": "the assistant is busy with other people",
    "not_ready": "the assistant is still starting up",
    "rate_limited": "too many connections in a short time",
    "unavailable": "no server is available",
    "internal": "the session failed on the server",
}


class Refused(ConnectionError):
    """The server (or the balancer in front of it) refused a new session with ``code``
    (``busy``, ``draining``, ``not_ready`` …) and ``message``; ``retry_after`` is when it said
    trying again will work (seconds), where it said."""

    def __init__(self, code: str, message: str = "", retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.retry_after = retry_after


def refusal(status: int, body: Mapping[str, Any], retry_after: str | None = None) -> Refused:
    """The HTTP answer ``status`` with JSON ``body`` (``{"error", "message", "retry_after"}``,
    or nothing a balancer's own page gives) and its ``Retry-After`` header, as a Refused."""
    code = body.get("error")
    if not isinstance(code, str) or not code:
        code = ("unavailable" if status in (502, 503, 504)
                else "rate_limited" if status == 429 else f"http_{status}")
    message = body.get("message")
    wait = body.get("retry_after", retry_after)
    try:
        seconds = float(wait) if wait is not None else None
    except (TypeError, ValueError):
        seconds = None
    return Refused(code, message if isinstance(message, str) and message
                   else f"the server answered HTTP {status}", seconds)


EndingKind = Literal["closing", "refused", "lost", "denied"]


@dataclass(frozen=True, slots=True)
class Ending:
    """How a session ended, or why a connection could not be made, as the policy sees it.

    ``kind``: ``closing`` (the server ended it on purpose: ``session.closing``), ``refused``
    (a fatal ``error`` or a refused connection, ``code`` says which), ``lost`` (the
    connection dropped, or none could be made) or ``denied`` (the credential). ``retry``:
    whether connecting again can help; ``words``: what the person is told."""

    kind: EndingKind
    retry: bool
    words: str
    code: str | None = None
    retry_after: float | None = None


def _refused(code: str, message: str, retry_after: float | None) -> Ending:
    retry = code in RETRY_LATER
    words = _PLAIN.get(code) or message or code
    return Ending("refused", retry, words, code, retry_after if retry else None)


def ending_of_session(events: Sequence[Mapping[str, Any]]) -> Ending:
    """How a session that was open ended, from its last event (as it came on the wire):
    ``session.closing``, a fatal ``error``, or neither (the connection dropped: a server
    killed, a network gone)."""
    match decode_event(events[-1]) if events else None:
        case SessionClosing(reconnect=True):
            return Ending("closing", True, "the server is restarting")
        case SessionClosing(message=message):
            return Ending("closing", False, message or "the server ended the session")
        case Error(code=code, message=message, fatal=True, retry_after=after):
            return _refused(code or "internal", message, after)
    return Ending("lost", True, "the connection was lost")


def ending_of_failure(error: BaseException, server: str) -> Ending | None:
    """Why connecting to ``server`` failed; None when ``error`` is no connection failure (a
    bug, to be raised)."""
    if isinstance(error, AccessError):
        return Ending("denied", False, str(error), "unauthorized")
    if isinstance(error, Refused):
        return _refused(error.code, error.message, error.retry_after)
    if isinstance(error, ConnectionError | OSError | TimeoutError):
        detail = str(error) or type(error).__name__
        return Ending("lost", True, f"could not connect to {server}: {detail}")
    return None


@dataclass(frozen=True, slots=True)
class Backoff:
    """When to try again: ``first_s``, doubling up to ``max_s``, each wait jittered to between
    half and all of it (clients cut off together come back spread out), and never before a
    refusal's ``retry_after``; at most ``tries`` tries in a row. A session that lasted
    ``settled_s`` starts the count afresh (one that fails at once does not)."""

    first_s: float = 0.5
    factor: float = 2.0
    max_s: float = 20.0
    tries: int = 10
    settled_s: float = 10.0

    def wait_s(self, ending: Ending, attempt: int, rand: float, *,
               connected: bool = True) -> float | None:
        """Seconds to wait before try ``attempt`` (1: the first after the session ended or
        the connection failed), or None: give up. ``rand`` in [0, 1) is the jitter.
        ``connected``: a session was open before; a client that never had one tries again
        only when the server said to try later (nothing listening is more likely a wrong
        address than a restart)."""
        if not ending.retry or attempt > self.tries:
            return None
        if not connected and ending.kind == "lost":
            return None
        base = min(self.max_s, self.first_s * self.factor ** (attempt - 1))
        wait = base * (0.5 + rand / 2)
        if ending.retry_after is not None:
            wait = max(wait, ending.retry_after + rand * self.first_s)
        return wait


@dataclass(frozen=True, slots=True)
class Retry:
    """The reconnect loop's news for the person: the last session (or try) ended as
    ``ending``; try ``attempt`` of ``tries`` comes in ``wait_s`` seconds."""

    ending: Ending
    attempt: int
    tries: int
    wait_s: float

    def words(self) -> str:
        return (f"{self.ending.words}: reconnecting in {self.wait_s:.1f} s "
                f"(try {self.attempt} of {self.tries})")


def gave_up_words(ending: Ending, retried: int) -> str:
    """What the person is told when the loop ends after ``retried`` tries in a row."""
    return (f"{ending.words} (gave up after {retried} tries)" if ending.retry and retried
            else ending.words)


class GaveUp(ConnectionError):
    """The reconnect loop has ended (the policy gave up, or it was stopped): ``ending``."""

    def __init__(self, ending: Ending, words: str) -> None:
        super().__init__(words)
        self.ending = ending


S = TypeVar("S", bound=EventLog)
CLOSE_NOTICED_S = 5.0  # a send that failed: how long the reader may take to see the end


class Reconnecting(Generic[S]):
    """Keeps one conversation connected. ``open_session`` opens one session: a new client,
    configured as every other (the same ``session.start``, the same offer), entered once it
    is ready. ``run`` opens it, waits until it ends, and opens the next as ``backoff`` says,
    telling ``on_retry`` before each wait and ``on_session`` of each new session; it returns
    the ending that made it stop. Cancelling it closes the open session at once.

    ``current`` is the open session (None between sessions); ``session()`` waits for one.
    Used as an async context manager it owns its ``run`` task."""

    def __init__(self, open_session: Callable[[], contextlib.AbstractAsyncContextManager[S]],
                 server: str, *, on_retry: Callable[[Retry], None],
                 on_session: Callable[[S], None] | None = None, backoff: Backoff = Backoff(),
                 rand: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._open = open_session
        self.server = server
        self.on_retry = on_retry
        self.on_session = on_session
        self.backoff = backoff
        self._rand = rand
        self._clock = clock
        self.current: S | None = None
        self.sessions = 0  # how many were opened
        self.ended: Ending | None = None  # why run() stopped
        self.retried = 0  # the tries in a row it made before it stopped
        self._change = asyncio.Event()  # replaced after each change (its waiters wake)
        self._task: asyncio.Task[Ending] | None = None

    def _changed(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    def _set(self, session: S | None) -> None:
        self.current = session
        self._changed()

    async def run(self) -> Ending:
        attempt = 0
        try:
            while True:
                opened_at: float | None = None
                try:
                    async with self._open() as session:
                        opened_at = self._clock()
                        self.sessions += 1
                        self._set(session)
                        if self.on_session is not None:
                            self.on_session(session)
                        await session.closed.wait()
                        ending = ending_of_session(session.events)
                except Exception as e:  # a failed connection (CancelledError passes)
                    failure = ending_of_failure(e, self.server)
                    if failure is None:
                        raise
                    ending = failure
                finally:
                    self._set(None)
                if opened_at is not None and self._clock() - opened_at >= self.backoff.settled_s:
                    attempt = 0
                attempt += 1
                wait = self.backoff.wait_s(ending, attempt, self._rand(),
                                           connected=self.sessions > 0)
                if wait is None:
                    self.ended, self.retried = ending, attempt - 1
                    return ending
                self.on_retry(Retry(ending, attempt, self.backoff.tries, wait))
                await asyncio.sleep(wait)
        finally:
            if self.ended is None:
                self.ended = Ending("lost", False, "stopped")
            self._changed()

    def words(self) -> str:
        """Why ``run`` stopped, for the person."""
        assert self.ended is not None
        return gave_up_words(self.ended, self.retried)

    def gave_up(self) -> GaveUp:
        assert self.ended is not None
        return GaveUp(self.ended, self.words())

    async def session(self) -> S:
        """The open session, waiting for one; GaveUp once ``run`` has ended."""
        while True:
            if self.ended is not None:
                raise self.gave_up()
            session = self.current
            if session is not None and not session.closed.is_set():
                return session
            await self._change.wait()

    async def ask(self, send: Callable[[S], Awaitable[None]], *,
                  on_again: Callable[[S], None] | None = None) -> tuple[S, TurnRecord]:
        """One turn: ``send`` it on the open session and wait for its reply; when the session
        ends before the reply, ``on_again`` is told and the turn is sent again on the next
        session. GaveUp once ``run`` has ended. Bound it with a timeout."""
        while True:
            session = await self.session()
            try:
                await _unless_closed(session, send(session))
                return session, await session.wait_reply(timeout_s=None)
            except ConnectionError:
                with contextlib.suppress(TimeoutError):  # a send may fail before the reader
                    async with asyncio.timeout(CLOSE_NOTICED_S):  # has seen the end
                        await session.closed.wait()
                if not session.closed.is_set():
                    raise
            if on_again is not None:
                on_again(session)

    async def __aenter__(self) -> Reconnecting[S]:
        self._task = asyncio.create_task(self.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.wait([self._task])
        if not self._task.cancelled() and (error := self._task.exception()) is not None:
            raise error


async def _unless_closed(session: EventLog, sending: Awaitable[None]) -> None:
    """Await ``sending``; ConnectionError when the session closes first (a microphone
    waiting to be drained by a connection that is gone would wait for ever)."""
    send = asyncio.ensure_future(sending)
    closed = asyncio.ensure_future(session.closed.wait())
    try:
        await asyncio.wait([send, closed], return_when=asyncio.FIRST_COMPLETED)
    finally:
        closed.cancel()
        if not send.done():
            send.cancel()
            await asyncio.wait([send])
    if send.cancelled():
        raise ConnectionError("the session ended while the turn was being sent")
    send.result()
