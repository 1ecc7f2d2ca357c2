"""The MQTT bridge's registry without a broker: dispatch, sessions per device, answers to
strangers, the session limit and idle expiry (fake engines, virtual clock)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pipelines.compute import Compute
from pipelines.engines.fakes import FakeAsr, FakeLlm, FakeTts, FakeVad
from pipelines.session import Engines
from server.engines import session_config
from server.mqtt import MqttBridge
from server.settings import load_settings
from server.state import AppState

pytestmark = pytest.mark.looptime

START = b'{"type": "session.start", "audio": {"echo_cancellation": true}}'


@contextlib.asynccontextmanager
async def bridge(**mqtt: Any) -> AsyncIterator[MqttBridge]:
    settings = load_settings(server={"max_sessions": 2},
                             mqtt={"url": "mqtt://127.0.0.1:1", "prefix": "home/vx", **mqtt})
    compute = Compute()
    state = AppState(settings, compute, session_config(settings))
    state.engines = Engines(FakeVad(), FakeAsr(), FakeLlm(), FakeTts())
    b = MqttBridge(state, settings.mqtt, clock=asyncio.get_running_loop().time)
    b.connected = True  # as if on the broker: what it publishes waits in its outbox
    try:
        async with b.serving():
            yield b
    finally:
        compute.close()


async def published(b: MqttBridge) -> list[tuple[str, dict[str, Any]]]:
    """(topic, event) of everything in the outbox, emptying it."""
    out = []
    while len(b.outbox):
        name, payload, qos, retain = await b.outbox.get()
        assert qos == 1 and name.endswith("/events") and not retain
        out.append((name, json.loads(payload)))
    return out


async def settle() -> None:
    await asyncio.sleep(0.05)


async def test_session_start_opens_one_session_per_device() -> None:
    async with bridge() as b:
        b.dispatch("home/vx/kitchen/control", START)
        b.dispatch("home/vx/car/control", START)
        await settle()
        sent = await published(b)
        assert sorted(name for name, _ in sent) == ["home/vx/car/events", "home/vx/kitchen/events"]
        assert all(ev["type"] == "session.ready" for _, ev in sent)
        assert set(b.devices) == {"car", "kitchen"}
        assert set(b.state.transports.values()) == {"mqtt"}
        b.dispatch("home/vx/kitchen/control", START)  # again: the same session, resumed
        await settle()
        (name, ev), = await published(b)
        assert name == "home/vx/kitchen/events" and ev["type"] == "session.ready"
        assert len(b.state.sessions) == 2
        b.dispatch("home/vx/kitchen/control", b'{"type": "session.end"}')
        await settle()
        assert set(b.devices) == {"car"} and len(b.state.sessions) == 1


async def test_messages_that_are_not_for_a_device_session_are_ignored_or_answered() -> None:
    async with bridge() as b:
        for name in ("home/vx/kitchen/events", "home/vx/kitchen/audio/out", "home/vx/status",
                     "other/kitchen/control", "home/vx/$bad/control", "home/vx/a b/control",
                     "home/vx/" + "x" * 70 + "/control"):
            b.dispatch(name, START)
        await settle()
        assert await published(b) == [] and not b.devices
        b.dispatch("home/vx/kitchen/audio/in", bytes(640))
        b.dispatch("home/vx/kitchen/audio/in", bytes(640))  # within a second: not answered again
        b.dispatch("home/vx/car/control", b'{"type": "text", "text": "hi"}')
        b.dispatch("home/vx/van/control", b"{not json")
        await settle()
        sent = {name: ev["code"] for name, ev in await published(b)}
        assert sent == {"home/vx/kitchen/events": "no_session", "home/vx/car/events": "no_session",
                        "home/vx/van/events": "bad_message"}
        await asyncio.sleep(1.5)
        b.dispatch("home/vx/kitchen/audio/in", bytes(640))
        await settle()
        assert [ev["code"] for _, ev in await published(b)] == ["no_session"]
        assert not b.devices and not b.state.sessions


async def test_the_session_limit_is_answered_busy() -> None:
    async with bridge() as b:
        for device in ("a", "b", "c"):
            b.dispatch(f"home/vx/{device}/control", START)
        await settle()
        busy = [(name, ev) for name, ev in await published(b) if ev["type"] == "error"]
        assert busy == [("home/vx/c/events", {"type": "error", "code": "busy", "fatal": True,
                                              "message": busy[0][1]["message"]})]
        assert set(b.devices) == {"a", "b"}


async def test_silent_devices_expire_and_traffic_keeps_a_session() -> None:
    async with bridge(idle_timeout_s=60) as b:
        b.dispatch("home/vx/quiet/control", START)
        b.dispatch("home/vx/busy/control", START)
        await settle()
        await published(b)
        for _ in range(12):  # two minutes; the busy device sends audio every 10 s
            await asyncio.sleep(10)
            b.dispatch("home/vx/busy/audio/in", bytes(640))
        await settle()
        expired = [(name, ev) for name, ev in await published(b) if ev.get("code") == "expired"]
        assert [name for name, _ in expired] == ["home/vx/quiet/events"]
        assert expired[0][1]["fatal"] is True
        assert set(b.devices) == {"busy"} and len(b.state.sessions) == 1


async def test_nothing_is_queued_while_the_broker_is_away() -> None:
    async with bridge() as b:
        b.connected = False
        b.dispatch("home/vx/kitchen/control", START)
        await settle()
        assert await published(b) == [] and set(b.devices) == {"kitchen"}
