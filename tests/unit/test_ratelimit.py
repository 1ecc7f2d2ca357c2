"""The limiters on a virtual clock: the token bucket, the per-session message rates, the
per-client counts, and session expiry (looptime: no real time passes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from pipelines.engines.fakes import FakeAsr, FakeLlm, FakeTts, FakeVad
from pipelines.session import Engines, Session, SessionConfig
from server.limits import PRUNE_AT, Busy, ClientLimits, expire_session
from server.settings import LimitSettings
from streaming.events import Error
from streaming.protocol import parse_client_message
from streaming.ratelimit import MessageLimits, RateLimited, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


TEXT = parse_client_message('{"type": "text", "text": "hi"}')
IMAGE = parse_client_message('{"type": "image", "data": "aGk="}')
PLAYBACK = parse_client_message('{"type": "playback", "played_ms": 5}')


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(2.0, 3, clock=clock)
    assert bucket.full
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after() == pytest.approx(0.5)  # one token at 2 a second
    clock.now += 0.25
    assert not bucket.take() and bucket.retry_after() == pytest.approx(0.25)
    clock.now += 0.25
    assert bucket.take() and not bucket.take()
    clock.now += 60  # refills to the burst, never beyond it
    assert bucket.full and bucket.retry_after() == 0
    assert sum(bucket.take() for _ in range(10)) == 3


def test_a_bucket_survives_a_clock_that_steps_back() -> None:
    clock = Clock()
    bucket = TokenBucket(1.0, 1, clock=clock)
    assert bucket.take()
    clock.now -= 5
    assert not bucket.take()
    clock.now += 1
    assert bucket.take()


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0.5)])
def test_a_bucket_needs_a_rate_and_a_burst(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_message_limits_drop_what_is_over_the_rate_and_say_when_to_come_back() -> None:
    clock = Clock()
    limits = MessageLimits(texts_per_second=1, images_per_second=2, clock=clock)
    for _ in range(3):  # a burst of 3 s' worth, at least 3
        limits.check(TEXT)
    with pytest.raises(RateLimited) as over:
        limits.check(TEXT)
    assert over.value.code == "rate_limited" and over.value.recoverable
    assert over.value.retry_after == pytest.approx(1.0) and "typed turns" in over.value.message
    for _ in range(6):  # images have a bucket of their own: 2 a second, 6 at once
        limits.check(IMAGE)
    with pytest.raises(RateLimited, match="image messages"):
        limits.check(IMAGE)
    for _ in range(100):  # other messages are not counted
        limits.check(PLAYBACK)
    clock.now += 1
    limits.check(TEXT)
    with pytest.raises(RateLimited):
        limits.check(TEXT)


def test_zero_means_no_limit() -> None:
    limits = MessageLimits(0, 0, clock=Clock())
    for _ in range(1000):
        limits.check(TEXT)
        limits.check(IMAGE)
    clients = ClientLimits(LimitSettings(sessions_per_client=0, connections_per_minute=0,
                                         vision_asks_per_client=0))
    for _ in range(1000):
        clients.admit("a")
        clients.opened("a")
    assert clients.sessions("a") == 1000


def test_sessions_per_client_are_counted_per_client() -> None:
    limits = ClientLimits(LimitSettings(sessions_per_client=2, connections_per_minute=0))
    for _ in range(2):
        limits.admit("a")
        limits.opened("a")
    with pytest.raises(Busy) as refused:
        limits.admit("a")
    assert refused.value.code == "busy" and refused.value.status == 429
    assert refused.value.retry_after is None
    limits.admit("b")  # another client is not affected
    limits.closed("a")
    limits.admit("a")  # a place came free
    limits.closed("a")
    limits.closed("a")
    limits.closed("a")  # (more closes than opens never go negative)
    assert limits.sessions("a") == 0 and limits._sessions == {}


def test_connections_per_minute_count_every_attempt_of_one_client() -> None:
    clock = Clock()
    limits = ClientLimits(LimitSettings(sessions_per_client=1, connections_per_minute=3),
                          clock=clock)
    limits.admit("a")
    limits.opened("a")
    with pytest.raises(Busy, match="holds 1 sessions"):  # at its session limit: a token is spent
        limits.admit("a")
    limits.closed("a")
    limits.admit("a")
    with pytest.raises(Busy) as refused:  # the 4th attempt within the minute
        limits.admit("a")
    assert refused.value.code == "rate_limited" and refused.value.status == 429
    assert refused.value.retry_after == pytest.approx(20.0)  # 3 a minute: one every 20 s
    limits.admit("b")
    clock.now += 20
    limits.admit("a")


def test_connection_buckets_of_clients_gone_quiet_are_forgotten() -> None:
    clock = Clock()
    limits = ClientLimits(LimitSettings(connections_per_minute=60), clock=clock)
    for i in range(300):  # 300 clients at once: all remembered
        limits.admit(f"10.0.{i // 256}.{i % 256}")
    assert len(limits._buckets) == 300
    most = 0
    for i in range(5000):  # a client a second, each once: a bucket is as new a second later
        clock.now += 1
        limits.admit(f"10.1.{i // 256}.{i % 256}")
        most = max(most, len(limits._buckets))
    assert most <= 600 and len(limits._buckets) <= PRUNE_AT
    assert "10.0.0.0" not in limits._buckets


def test_vision_asks_per_client() -> None:
    limits = ClientLimits(LimitSettings(vision_asks_per_client=2))
    with limits.running("vision", "a"), limits.running("vision", "a"):
        with pytest.raises(Busy) as refused, limits.running("vision", "a"):
            pass
        assert refused.value.status == 429 and refused.value.code == "busy"
        with limits.running("vision", "b"):
            pass
    with pytest.raises(RuntimeError), limits.running("vision", "a"):  # a failed ask frees its place
        raise RuntimeError
    assert limits._running["vision"] == {}


def test_model_requests_are_counted_apart_from_vision_asks() -> None:
    limits = ClientLimits(LimitSettings(vision_asks_per_client=1, model_requests_per_client=1))
    with limits.running("vision", "a"), limits.running("model", "a"):
        with pytest.raises(Busy) as refused, limits.running("model", "a"):
            pass
        assert refused.value.status == 429 and "model requests" in refused.value.message
    assert limits._running == {"vision": {}, "model": {}}


# ---- session expiry (virtual clock) -------------------------------------------------------

def session() -> Session:
    engines = Engines(FakeVad(), FakeAsr(), FakeLlm(), FakeTts())
    return Session("s1", engines, SessionConfig(), clock=asyncio.get_running_loop().time)


async def last_event(s: Session) -> Error:
    events = [event async for event in s.events]
    assert isinstance(events[-1], Error)
    return events[-1]


@pytest.mark.looptime
async def test_a_session_without_input_expires_after_the_idle_timeout() -> None:
    s = session()
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(s.run())
        watch = tg.create_task(expire_session(s, LimitSettings(idle_timeout_s=300,
                                                               max_session_s=3600)))
        await asyncio.sleep(200)
        s.playback(0, None)  # a message: the idle time starts again
        await asyncio.sleep(200)
        s.submit_text("hello")
        await asyncio.sleep(250)
        assert not watch.done()
        error = await last_event(s)
    assert error.code == "idle_timeout" and error.fatal and "300 s" in error.message
    assert loop.time() - start == pytest.approx(400 + 300)  # 300 s after the typed turn


@pytest.mark.looptime
async def test_a_busy_session_ends_at_its_maximum_length() -> None:
    s = session()
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def talk() -> None:  # silence, but audio: the session is not idle
        while True:
            await s.push_audio(np.zeros(512, np.float32))
            await asyncio.sleep(1)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(s.run())
        tg.create_task(expire_session(s, LimitSettings(idle_timeout_s=5, max_session_s=60)))
        talking = tg.create_task(talk())
        error = await last_event(s)
        talking.cancel()
    assert error.code == "session_expired" and error.fatal
    assert loop.time() - start == pytest.approx(60)


@pytest.mark.looptime
async def test_no_expiry_when_both_limits_are_off() -> None:
    s = session()
    await expire_session(s, LimitSettings(idle_timeout_s=0, max_session_s=0))  # returns at once
    s.close()


def test_the_defaults_are_the_documented_ones() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text("utf-8")
    defaults = LimitSettings()
    assert defaults.model_dump() == {
        "sessions_per_client": 4, "connections_per_minute": 30, "texts_per_second": 1.0,
        "images_per_second": 2.0, "vision_asks_per_client": 2, "model_requests_per_client": 32,
        "max_session_s": 3600.0,
        "idle_timeout_s": 300.0}
    for name in defaults.model_dump():
        assert f"`limits.{name}`" in readme, name
