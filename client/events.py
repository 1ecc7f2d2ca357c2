"""What a client saw of a conversation (events, turns and reply audio), and how a client keeps
its conversation connected (shared by ``voxlens talk`` and ``voxlens desktop``).

Reconnecting. The policy is plain values and functions: ``ending_of_session`` and
``ending_of_failure`` say how a session ended (or why connecting failed) and whether trying
again can help; ``Backoff.wait_s`` says how long to wait before the next try. ``Reconnecting``
is the loop both clients run: it opens a session (a new client, configured as the first: the
same ``session.start`` or offer), waits until it ends, and opens the next as the policy says.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from client.access import AccessError


@dataclass
class TurnRecord:
    """What the client saw of one reply."""

    turn_id: int
    transcript: str | None = None
    partials: list[str] = field(default_factory=list)
    text: str = ""
    audio: bytearray = field(default_factory=bytearray)
    metrics: dict[str, float] = field(default_factory=dict)
    first_audio_at: float | None = None  # client clock (time.monotonic)
    last_audio_at: float | None = None
    done: bool = False
    interrupted: dict[str, Any] | None = None  # the reply.interrupted event
    late_audio: int = 0  # bytes of its audio that arrived after reply.interrupted
    played_when_cut: float | None = None  # ms its speaker had played at reply.interrupted


class EventLog:
    """Collects protocol events and reply audio; lets a caller wait for a condition.

    It also models the client's speaker: reply audio plays as it arrives, in real time, so
    ``played_ms`` is what a person would have heard so far (sent to the server as
    ``playback`` reports, and stopped at ``reply.interrupted``).
    """

    def __init__(self, on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.on_event = on_event
        self.on_audio: Callable[[bytes], None] | None = None  # every reply audio piece received
        self.events: list[dict[str, Any]] = []
        self.arrivals: list[float] = []  # client clock (time.monotonic) of each event
        self.turns: dict[int, TurnRecord] = {}
        self.ready: dict[str, Any] | None = None
        self.errors: list[dict[str, Any]] = []
        self.closed = asyncio.Event()
        self._current: int | None = None  # turn whose audio arrives now
        self._play_end = 0.0  # client clock when the received audio will have played
        self._returned: set[int] = set()  # turns already handed out by wait_reply
        self._changed = asyncio.Condition()

    @property
    def output_rate(self) -> int:
        assert self.ready is not None
        return int(self.ready["output"]["sample_rate"])

    def _turn(self, turn_id: int) -> TurnRecord:
        return self.turns.setdefault(turn_id, TurnRecord(turn_id))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def add_audio(self, pcm: bytes) -> None:
        """Reply audio (s16le mono at the output rate) of the turn last started."""
        if self.on_audio is not None:
            self.on_audio(pcm)
        if self._current is not None:
            turn = self.turns[self._current]
            now = time.monotonic()
            if turn.interrupted is not None:
                turn.late_audio += len(pcm)
            else:
                if turn.first_audio_at is None:
                    turn.first_audio_at = now
                turn.last_audio_at = now
                turn.audio.extend(pcm)
                self._play_end = max(self._play_end, now) + len(pcm) / 2 / self.output_rate
        await self._notify()

    def played_ms(self, turn_id: int) -> float:
        """How much of a turn's reply audio the speaker has played by now."""
        turn = self.turns[turn_id]
        if turn.played_when_cut is not None:
            return turn.played_when_cut
        received = len(turn.audio) / 2 * 1000 / self.output_rate
        if turn_id != self._current:
            return received
        return max(0.0, received - max(0.0, self._play_end - time.monotonic()) * 1000)

    def playback_report(self) -> dict[str, Any] | None:
        """The ``playback`` message for the reply playing now (None when none is)."""
        turn = self.turns.get(self._current) if self._current is not None else None
        if turn is None or not turn.audio or turn.interrupted is not None:
            return None
        if time.monotonic() > self._play_end + 0.5:
            return None  # played out a while ago: nothing more to say
        return {"type": "playback", "turn_id": turn.turn_id,
                "played_ms": round(self.played_ms(turn.turn_id))}

    async def add_event(self, ev: dict[str, Any]) -> None:
        self.events.append(ev)
        self.arrivals.append(time.monotonic())
        match ev.get("type"):
            case "session.ready":
                self.ready = ev
            case "transcript":
                turn = self._turn(ev["turn_id"])
                if ev["final"]:
                    turn.transcript = ev["text"]
                else:
                    turn.partials.append(ev["text"])
            case "reply.started":
                self._current = ev["turn_id"]
                self._turn(ev["turn_id"])
            case "reply.text":
                self._turn(ev["turn_id"]).text += ev["delta"]
            case "reply.done":
                self._turn(ev["turn_id"]).done = True
            case "reply.interrupted":
                turn = self._turn(ev["turn_id"])
                turn.played_when_cut = self.played_ms(turn.turn_id)
                if ev["turn_id"] == self._current:
                    self._play_end = time.monotonic()  # the speaker stops, what is queued is gone
                turn.interrupted = ev
            case "metrics":
                self._turn(ev["turn_id"]).metrics = ev["stages"]
            case "error":
                self.errors.append(ev)
        if self.on_event is not None:
            self.on_event(ev)
        await self._notify()

    async def mark_closed(self) -> None:
        self.closed.set()
        await self._notify()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float | None = 60) -> None:
        """Wait until ``predicate()`` holds (checked after every event and audio piece); None:
        for as long as it takes (the caller bounds it)."""
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate() or self.closed.is_set())
            if not predicate():
                raise ConnectionError("connection closed before the awaited event")
        try:
            await asyncio.wait_for(wait(), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"nothing awaited came in {timeout_s} s; the last events: "
                               f"{self.summary()}") from None

    def summary(self, last: int = 30) -> str:
        """The latest events in short, for the message of a failed wait."""
        def short(ev: dict[str, Any]) -> str:
            detail = {k: v for k, v in ev.items() if k != "type" and k != "data"}
            return f"{ev.get('type')} {detail}" if detail else str(ev.get("type"))
        evs = [e for e in self.events if e.get("type") != "reply.text"][-last:]
        turns = [f"turn {t}: {r.transcript!r} -> {r.text!r}" for t, r in sorted(self.turns.items())]
        return "; ".join(short(e) for e in evs) + " | " + "; ".join(turns)

    async def wait_reply(self, timeout_s: float | None = 120) -> TurnRecord:
        """The oldest finished reply (reply.done) not returned before, waiting for one."""
        def fresh() -> list[TurnRecord]:
            return [r for t, r in sorted(self.turns.items())
                    if r.done and t not in self._returned]
        await self.wait_for(lambda: bool(fresh()), timeout_s)
        reply = fresh()[0]
        self._returned.add(reply.turn_id)
        return reply


# ---- reconnecting: which endings are tried again, and when --------------------------------

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
    """How a session that was open ended, from its last event: ``session.closing``, a fatal
    ``error``, or neither (the connection dropped: a server killed, a network gone)."""
    last = events[-1] if events else {}
    if last.get("type") == "session.closing":
        again = bool(last.get("reconnect"))
        return Ending("closing", again, "the server is restarting" if again
                      else str(last.get("message") or "the server ended the session"))
    if last.get("type") == "error" and last.get("fatal"):
        after = last.get("retry_after")
        return _refused(str(last.get("code") or "internal"), str(last.get("message") or ""),
                        float(after) if isinstance(after, int | float) else None)
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


async def stdin_lines() -> AsyncIterator[str]:
    """The non-blank lines of standard input, as they come (a pipe or a terminal: read on
    the loop, so Ctrl-C never waits for one; a file: read at once), until its end."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except ValueError:  # a regular file: reading it never blocks for long
        for line in sys.stdin:
            if line.strip():
                yield line.strip()
        return
    try:
        while raw := await reader.readline():
            if text := raw.decode("utf-8", errors="replace").strip():
                yield text
    finally:
        transport.close()
        with contextlib.suppress(OSError, ValueError):  # the terminal's, as it was
            os.set_blocking(sys.stdin.fileno(), True)
