"""The reconnect policy of `voxlens talk` and `voxlens desktop` (client/common/reconnect.py)
on plain values, and its loop (``Reconnecting``) with scripted sessions on a virtual clock
(looptime): which endings are tried again, the backoff sequence, what the person is told, the
same turn asked again after a session ended under it, and cancellation closing at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from client.common.access import AccessError
from client.common.eventlog import EventLog
from client.common.reconnect import (
    RETRY_LATER,
    Backoff,
    Ending,
    GaveUp,
    Reconnecting,
    Refused,
    Retry,
    ending_of_failure,
    ending_of_session,
    gave_up_words,
    refusal,
)

SERVER = "ws://127.0.0.1:9/ws"
CLOSING = {"type": "session.closing", "reason": "draining", "reconnect": True,
           "message": "this server is shutting down; connect again to go on"}


def fatal(code: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": f"{code} message", "fatal": True, **extra}


# ---- which endings are tried again ----------------------------------------------------------

def test_a_closing_session_is_tried_again_unless_the_server_says_not_to() -> None:
    ending = ending_of_session([{"type": "session.ready"}, CLOSING])
    assert (ending.kind, ending.retry, ending.words) == ("closing", True, "the server is restarting")
    final = ending_of_session([{**CLOSING, "reconnect": False, "message": "gone for good"}])
    assert (final.kind, final.retry, final.words) == ("closing", False, "gone for good")


@pytest.mark.parametrize("code", sorted(RETRY_LATER))
def test_refusals_that_say_later_are_tried_again(code: str) -> None:
    ending = ending_of_session([{"type": "session.ready"}, fatal(code)])
    assert (ending.kind, ending.retry, ending.code) == ("refused", True, code)
    assert ending.words != code  # plain words, not the code


@pytest.mark.parametrize("code", ["unauthorized", "forbidden", "forbidden_origin",
                                  "session_expired", "idle_timeout", "bad_message", "unsupported"])
def test_fatal_errors_of_the_client_itself_end_it(code: str) -> None:
    ending = ending_of_session([fatal(code)])
    assert (ending.kind, ending.retry, ending.code) == ("refused", False, code)
    assert ending.words == f"{code} message"
    assert not ending_of_failure(Refused(code, "no"), SERVER).retry  # type: ignore[union-attr]


def test_a_session_that_just_stopped_was_lost() -> None:
    for events in ([], [{"type": "session.ready"}],
                   [{"type": "error", "code": "engine_failed", "message": "x", "fatal": False}]):
        ending = ending_of_session(events)
        assert (ending.kind, ending.retry, ending.words) == ("lost", True, "the connection was lost")


def test_retry_after_is_kept_where_a_retry_can_follow() -> None:
    assert ending_of_session([fatal("rate_limited", retry_after=7)]).retry_after == 7.0
    assert ending_of_session([fatal("forbidden", retry_after=7)]).retry_after is None


def test_failures_to_connect() -> None:
    denied = ending_of_failure(AccessError("the server did not accept the access key"), SERVER)
    assert denied == Ending("denied", False, "the server did not accept the access key",
                            "unauthorized")
    busy = ending_of_failure(Refused("busy", "full", 3.0), SERVER)
    assert busy is not None and (busy.kind, busy.retry, busy.retry_after) == ("refused", True, 3.0)
    for error in (ConnectionRefusedError(111, "Connect call failed"), TimeoutError(),
                  ConnectionError("reset")):
        lost = ending_of_failure(error, SERVER)
        assert lost is not None and (lost.kind, lost.retry) == ("lost", True)
        assert lost.words.startswith(f"could not connect to {SERVER}: ")
    assert ending_of_failure(ValueError("a bug"), SERVER) is None  # raised, never retried


def test_http_refusals() -> None:
    draining = refusal(503, {"error": "draining", "message": "shutting down"})
    assert (draining.code, draining.message, draining.retry_after) == ("draining", "shutting down", None)
    assert refusal(503, {}).code == "unavailable"  # a balancer with no node up
    assert refusal(502, {"weird": 1}).code == "unavailable"
    limited = refusal(429, {"error": "rate_limited", "message": "slow down", "retry_after": 2})
    assert (limited.code, limited.retry_after) == ("rate_limited", 2.0)
    assert refusal(429, {}, "4").retry_after == 4.0  # the header, when the body says nothing
    assert refusal(429, {}).code == "rate_limited"
    assert refusal(400, {"error": "bad_offer", "message": "no audio"}).code == "bad_offer"
    assert refusal(418, {}).code == "http_418"
    assert refusal(503, {"error": "busy", "retry_after": "soon"}).retry_after is None
    assert isinstance(draining, ConnectionError)  # callers that know no Refused see one


# ---- when -----------------------------------------------------------------------------------

LOST = Ending("lost", True, "the connection was lost")


def test_backoff_doubles_up_to_its_cap_with_jitter_then_gives_up() -> None:
    b = Backoff(first_s=0.5, factor=2, max_s=20, tries=10)
    low = [b.wait_s(LOST, n, 0.0) for n in range(1, 11)]
    high = [b.wait_s(LOST, n, 1.0) for n in range(1, 11)]
    assert low == [0.25, 0.5, 1, 2, 4, 8, 10, 10, 10, 10]  # half of each base at least
    assert high == [0.5, 1, 2, 4, 8, 16, 20, 20, 20, 20]  # and all of it at most
    assert b.wait_s(LOST, 11, 0.5) is None  # bounded
    assert b.wait_s(Ending("denied", False, "no"), 1, 0.5) is None  # never for a refused key


def test_backoff_honours_retry_after_and_a_first_connection() -> None:
    b = Backoff(first_s=0.5)
    later = Ending("refused", True, "busy", "busy", retry_after=5.0)
    assert b.wait_s(later, 1, 0.0) == 5.0
    assert b.wait_s(later, 1, 0.5) == 5.25  # spread out after it too
    # nothing listening at the first try: more likely a wrong address than a restart
    assert b.wait_s(LOST, 1, 0.5, connected=False) is None
    draining = Ending("refused", True, "the server is shutting down", "draining")
    assert b.wait_s(draining, 1, 0.5, connected=False) == 0.375


def test_what_the_person_is_told() -> None:
    retry = Retry(Ending("closing", True, "the server is restarting"), 1, 10, 0.42)
    assert retry.words() == "the server is restarting: reconnecting in 0.4 s (try 1 of 10)"
    assert gave_up_words(LOST, 10) == "the connection was lost (gave up after 10 tries)"
    assert gave_up_words(Ending("denied", False, "wrong key"), 0) == "wrong key"


# ---- the loop, with scripted sessions on a virtual clock -------------------------------------

class FakeSession(EventLog):
    """A session the test ends (``end``); it answers a turn when ``answers``."""

    def __init__(self, number: int, answers: bool) -> None:
        super().__init__()
        self.number = number
        self.answers = answers
        self.sent: list[str] = []
        self.exited = False

    async def send(self, text: str) -> None:
        self.sent.append(text)
        if self.answers:
            await self.add_event({"type": "reply.started", "turn_id": 1})
            await self.add_event({"type": "reply.text", "turn_id": 1, "delta": f"#{self.number}"})
            await self.add_event({"type": "reply.done", "turn_id": 1, "text": f"#{self.number}"})
        else:  # the server restarts instead
            asyncio.get_running_loop().call_soon(asyncio.ensure_future, self.end(CLOSING))

    async def end(self, *events: dict[str, Any]) -> None:
        for ev in events:
            await self.add_event(ev)
        await self.mark_closed()


class FakeServer:
    """What each connection attempt meets, in order: an exception, or a session (answering
    or not). Past the script, every attempt meets ``then``."""

    def __init__(self, *script: BaseException | bool, then: BaseException | bool = True) -> None:
        self.script = list(script)
        self.then = then
        self.attempts = 0
        self.sessions: list[FakeSession] = []

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[FakeSession]:
        self.attempts += 1
        step = self.script.pop(0) if self.script else self.then
        if isinstance(step, BaseException):
            raise step
        session = FakeSession(len(self.sessions) + 1, step)
        await session.add_event({"type": "session.ready", "session_id": str(session.number)})
        self.sessions.append(session)
        try:
            yield session
        finally:
            session.exited = True


def keeper_for(server: FakeServer, retries: list[Retry], **kw: Any) -> Reconnecting[FakeSession]:
    return Reconnecting(server.open, SERVER, on_retry=retries.append, **kw)


@pytest.mark.looptime
async def test_session_closing_opens_the_next_session_and_the_turn_is_asked_there() -> None:
    server = FakeServer(False, True)  # the first session closes when asked; the next answers
    retries: list[Retry] = []
    again: list[int] = []
    opened: list[int] = []
    keeper = keeper_for(server, retries, on_session=lambda s: opened.append(s.number))
    async with keeper:
        session, reply = await keeper.ask(lambda s: s.send("hello"),
                                          on_again=lambda s: again.append(s.number))
    assert (session.number, reply.text) == (2, "#2")
    assert [s.sent for s in server.sessions] == [["hello"], ["hello"]]  # asked again, once
    assert again == [1] and opened == [1, 2] and keeper.sessions == 2
    assert [(r.ending.kind, r.attempt) for r in retries] == [("closing", 1)]
    assert retries[0].words().startswith("the server is restarting: reconnecting in")
    assert all(s.exited for s in server.sessions)  # every session was closed


@pytest.mark.looptime
async def test_a_server_down_for_a_while_is_waited_for_with_growing_waits() -> None:
    down = [ConnectionRefusedError(111, "Connect call failed")] * 4
    server = FakeServer(True, *down)
    retries: list[Retry] = []
    keeper = keeper_for(server, retries, rand=lambda: 0.5)
    async with keeper:
        first = await keeper.session()
        await first.end()  # killed: no last word
        await until_sessions(server, 2)
    assert server.attempts == 6
    assert [r.ending.kind for r in retries] == ["lost"] * 5
    assert [r.attempt for r in retries] == [1, 2, 3, 4, 5]
    waits = [r.wait_s for r in retries]
    assert waits == [Backoff().wait_s(LOST, n, 0.5) for n in range(1, 6)]
    assert waits == sorted(waits)
    assert retries[1].ending.words.startswith(f"could not connect to {SERVER}")


async def until_sessions(server: FakeServer, n: int) -> None:
    while len(server.sessions) < n:  # noqa: ASYNC110 (virtual time: each sleep is free)
        await asyncio.sleep(0.01)


@pytest.mark.looptime
async def test_it_gives_up_after_its_tries_and_says_so() -> None:
    server = FakeServer(True, then=ConnectionRefusedError(111, "refused"))
    retries: list[Retry] = []
    keeper = keeper_for(server, retries, backoff=Backoff(tries=3))
    task = asyncio.create_task(keeper.run())
    await (await keeper.session()).end()
    ending = await task
    assert ending.kind == "lost" and server.attempts == 4  # the session, then 3 tries
    assert len(retries) == 3
    with pytest.raises(GaveUp, match="gave up after 3 tries"):
        await keeper.session()
    with pytest.raises(GaveUp):
        await keeper.ask(lambda s: s.send("too late"))


@pytest.mark.looptime
async def test_a_refused_key_and_a_forbidden_session_are_never_retried() -> None:
    for failure in (AccessError("the server did not accept the access key"),
                    Refused("forbidden", "not for you")):
        server = FakeServer(True, failure)
        retries: list[Retry] = []
        keeper = keeper_for(server, retries)
        task = asyncio.create_task(keeper.run())
        await (await keeper.session()).end(CLOSING)
        ending = await task
        assert not ending.retry and server.attempts == 2 and len(retries) == 1
        assert keeper.words() == ending.words  # no "gave up after": it never tried again


@pytest.mark.looptime
async def test_busy_and_draining_refusals_are_waited_out() -> None:
    server = FakeServer(True, Refused("draining", "bye"), Refused("busy", "full", 30.0), True)
    retries: list[Retry] = []
    keeper = keeper_for(server, retries)
    async with keeper:
        await (await keeper.session()).end(CLOSING)
        await until_sessions(server, 2)
    assert [r.ending.code for r in retries] == [None, "draining", "busy"]
    assert retries[2].wait_s >= 30.0  # its retry_after


@pytest.mark.looptime
async def test_a_first_connection_to_nothing_fails_at_once() -> None:
    server = FakeServer(ConnectionRefusedError(111, "refused"))
    retries: list[Retry] = []
    keeper = keeper_for(server, retries)
    ending = await keeper.run()
    assert ending.kind == "lost" and server.attempts == 1 and not retries
    assert keeper.words().startswith(f"could not connect to {SERVER}")


@pytest.mark.looptime
async def test_only_a_session_that_lasted_starts_the_count_afresh() -> None:
    now = [0.0]
    server = FakeServer(then=True)
    retries: list[Retry] = []
    keeper = keeper_for(server, retries, backoff=Backoff(tries=3, settled_s=10),
                        clock=lambda: now[0])
    async with keeper:
        for lasted in (1, 1, 1, 60, 1):  # sessions that drop at once, then one that lasted
            session = await keeper.session()
            now[0] += lasted
            await session.end()
        await until_sessions(server, 6)
    assert [r.attempt for r in retries] == [1, 2, 3, 1, 2]


@pytest.mark.looptime
async def test_cancelling_closes_the_open_session_at_once() -> None:
    server = FakeServer(True)
    keeper = keeper_for(server, [])
    async with keeper:
        session = await keeper.session()
        assert not session.exited
    assert session.exited and keeper.current is None
    with pytest.raises(GaveUp):
        await keeper.session()


@pytest.mark.looptime
async def test_a_bug_is_raised_not_retried() -> None:
    server = FakeServer(ValueError("a bug"))
    keeper = keeper_for(server, [])
    with pytest.raises(ValueError, match="a bug"):
        await keeper.run()
    with pytest.raises(GaveUp):  # whoever waits for a session is not left waiting
        await keeper.session()
