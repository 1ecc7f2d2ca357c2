"""The MQTT bridge: one broker connection serving many devices, each with its own session.

Per device (``<prefix>/<device_id>/…``, docs/PROTOCOL.md): the first ``session.start`` on its
control topic opens a session; a device that comes back (or a bridge that reconnects to the
broker) finds its session where it left it; a session with no traffic either way for
``idle_timeout_s`` is closed. The dispatch loop never waits on a device: each device's
messages go to its bounded inbox (streaming/mqtt_device.py) and everything the bridge
publishes goes through one bounded outbox, dropped while the broker is unreachable (live audio
and events are worth nothing later).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from urllib.parse import unquote, urlsplit

import aiomqtt
from aiohttp import web

from pipelines.session import Session
from server.settings import MqttSettings
from server.state import STATE, AppState, Busy
from streaming.channels import Channel
from streaming.errors import ProtocolError
from streaming.events import Error
from streaming.mqtt import (
    AUDIO_IN,
    CONTROL,
    EVENTS,
    QOS,
    Kind,
    parse_topic,
    subscriptions,
    topic,
    valid_device_id,
)
from streaming.mqtt_device import DeviceAdapter
from streaming.protocol import MAX_TEXT_MESSAGE_BYTES, SessionStart, event_to_json, parse_client_message

log = logging.getLogger(__name__)

OUTBOX = 4096  # messages waiting for the broker (all devices; 40 ms audio chunks mostly)
PUBLISHERS = 8  # publishes in flight at once (QoS 1 waits for the broker's ack)
INCOMING = 4096  # aiomqtt's queue of received messages, drained by the dispatch loop
RECONNECT_MIN_S = 0.5
STRANGERS = 1024  # devices without a session remembered for rate-limiting answers to them
STRANGER_ANSWER_S = 1.0  # at most one answer a second to a device without a session


def broker_client(s: MqttSettings, client_id: str) -> aiomqtt.Client:
    """A client for the configured broker (``mqtts``: TLS with the CA/cert/key settings)."""
    url = urlsplit(s.url or "")
    tls = url.scheme == "mqtts"
    tls_params = (aiomqtt.TLSParameters(
        ca_certs=str(s.ca_file) if s.ca_file else None,
        certfile=str(s.cert_file) if s.cert_file else None,
        keyfile=str(s.key_file) if s.key_file else None) if tls else None)
    return aiomqtt.Client(
        url.hostname or "", url.port or (8883 if tls else 1883),
        username=unquote(url.username) if url.username else None,
        password=unquote(url.password) if url.password else None,
        identifier=client_id, clean_session=True, keepalive=s.keepalive_s,
        max_queued_incoming_messages=INCOMING, tls_params=tls_params)


class MqttBridge:
    def __init__(self, state: AppState, settings: MqttSettings, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert settings.url is not None
        self.state = state
        self.settings = settings
        self.prefix = settings.prefix
        self.client_id = settings.client_id or f"voxlens-{uuid.uuid4().hex[:8]}"
        self.devices: dict[str, DeviceAdapter] = {}
        self.connected = False
        self.connects = 0  # successful connections to the broker so far
        self._clock = clock
        self.outbox: Channel[tuple[str, bytes, int]] = Channel(OUTBOX)
        self._answered: dict[str, float] = {}  # device without a session → last answer
        self._tg: asyncio.TaskGroup | None = None
        self._device_tasks: set[asyncio.Task[None]] = set()

    # ---- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Serve devices until cancelled: keep a broker connection (reconnecting with
        backoff), dispatch device messages, expire idle sessions. Cancelling it closes every
        device session."""
        async with self.serving():
            await self._connect_forever()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Inside it, devices get sessions (their tasks are owned here) and idle ones expire;
        leaving it (or cancelling) ends every device's session."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tasks = [tg.create_task(self._expire_idle())]
            try:
                yield
            finally:
                self._tg = None
                tasks += self._device_tasks
                for task in tasks:
                    task.cancel()

    async def _connect_forever(self) -> None:
        delay = RECONNECT_MIN_S
        where = urlsplit(self.settings.url or "").hostname
        while True:
            try:
                async with broker_client(self.settings, self.client_id) as client:
                    delay = RECONNECT_MIN_S
                    await self._serve(client)
            except* aiomqtt.MqttError as group:
                log.warning("MQTT broker %s: %s; reconnecting in %.1f s", where,
                            group.exceptions[0], delay)
            except* Exception:  # a bug: logged, and the devices are served again
                log.exception("MQTT bridge failed; reconnecting in %.1f s", delay)
            finally:
                self.connected = False
                self.outbox.clear()
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.settings.reconnect_max_s)

    async def _serve(self, client: aiomqtt.Client) -> None:
        for topic_filter, qos in subscriptions(self.prefix):
            await client.subscribe(topic_filter, qos=qos)
        self.connected = True
        self.connects += 1
        log.info("MQTT: connected as %s, serving %s/+/…", self.client_id, self.prefix)
        async with asyncio.TaskGroup() as tg:
            for _ in range(PUBLISHERS):
                tg.create_task(self._publish(client))
            async for message in client.messages:
                payload = message.payload
                self.dispatch(str(message.topic),
                              bytes(payload) if isinstance(payload, bytes | bytearray) else b"")

    async def _publish(self, client: aiomqtt.Client) -> None:
        # No await between taking a message and handing it to paho: messages leave in order.
        while True:
            name, payload, qos = await self.outbox.get()
            await client.publish(name, payload, qos=qos)

    async def _expire_idle(self) -> None:
        idle = self.settings.idle_timeout_s
        while True:
            await asyncio.sleep(min(idle / 4, 5.0))
            now = self._clock()
            for adapter in list(self.devices.values()):
                if not adapter.ended and now - adapter.last_active > idle:
                    log.info("MQTT device %s: idle for %.0f s, closing its session",
                             adapter.device_id, now - adapter.last_active)
                    adapter.expire(idle)

    # ---- messages ---------------------------------------------------------------------

    def send(self, device_id: str, kind: Kind, payload: bytes, qos: int) -> None:
        """Publish on a device's topic without waiting; dropped while the broker is away."""
        if self.connected and not self.outbox.put_nowait(
                (topic(self.prefix, device_id, kind), payload, qos)):
            self.outbox.dropped += 1
            if self.outbox.dropped % 1000 == 1:
                log.warning("MQTT outbox full: %d messages dropped so far", self.outbox.dropped)

    def dispatch(self, name: str, payload: bytes) -> None:
        """One message from the broker. Never waits: it only queues, or answers."""
        where = parse_topic(self.prefix, name)
        if where is None or where.kind not in (CONTROL, AUDIO_IN):
            return
        device_id = where.device_id
        if not valid_device_id(device_id):
            log.debug("MQTT: ignoring a message for the invalid device id %r", device_id[:80])
            return
        adapter = self.devices.get(device_id)
        if adapter is not None and not adapter.ended:
            adapter.offer(where.kind, payload)
            return
        if where.kind == AUDIO_IN:
            self._answer(device_id, Error("no_session", "this device has no session: send "
                                          "session.start on its control topic first"))
            return
        try:
            if len(payload) > MAX_TEXT_MESSAGE_BYTES:
                raise ProtocolError("a device without a session must start with session.start",
                                    code="too_large")
            message = parse_client_message(payload.decode("utf-8", errors="replace"))
        except ProtocolError as e:
            self._answer(device_id, Error(e.code, e.message))
            return
        if not isinstance(message, SessionStart):
            self._answer(device_id, Error("no_session", "this device has no session: send "
                                          "session.start first"))
            return
        self._open(device_id, payload)

    def _answer(self, device_id: str, error: Error) -> None:
        """An error to a device without a session, at most once a second per device."""
        now = self._clock()
        if now - self._answered.get(device_id, -STRANGER_ANSWER_S) < STRANGER_ANSWER_S:
            return
        if len(self._answered) >= STRANGERS:
            self._answered.clear()
        self._answered[device_id] = now
        self.send(device_id, EVENTS, json.dumps(event_to_json(error)).encode(), QOS[EVENTS])

    def _open(self, device_id: str, start: bytes) -> None:
        if self._tg is None:
            return
        try:
            session = self.state.open_session("mqtt")
        except Busy as e:
            self._answer(device_id, Error(e.code, e.message, True))
            return
        b = self.state.settings.bargein
        adapter = DeviceAdapter(device_id, session, partial(self.send, device_id),
                                lead_ms=b.lead_ms, client_buffer_ms=b.client_buffer_ms,
                                clock=self._clock)
        adapter.offer(CONTROL, start)
        self.devices[device_id] = adapter
        self._answered.pop(device_id, None)
        log.info("session %s opened over MQTT for device %s", session.session_id, device_id)
        task = self._tg.create_task(self._serve_device(adapter, session), name=f"mqtt-{device_id}")
        self._device_tasks.add(task)
        task.add_done_callback(self._device_tasks.discard)

    async def _serve_device(self, adapter: DeviceAdapter, session: Session) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(session.run())
                await adapter.run()
        except Exception:  # one device's failure never ends the bridge
            log.exception("MQTT device %s failed", adapter.device_id)
        finally:
            self.state.forget(session)
            if self.devices.get(adapter.device_id) is adapter:
                del self.devices[adapter.device_id]
            log.info("session %s of device %s closed", session.session_id, adapter.device_id)

    def health(self) -> dict[str, object]:
        return {"connected": self.connected, "devices": len(self.devices),
                "connects": self.connects}


MQTT = web.AppKey("mqtt", MqttBridge)


def setup_mqtt(app: web.Application) -> None:
    """When ``mqtt.url`` is set: the bridge starts with the app, owned by the app's supervisor
    (cancelled at shutdown). Devices that come before the models are loaded are answered
    ``not_ready``."""
    state = app[STATE]
    if state.settings.mqtt.url is None:
        return
    bridge = MqttBridge(state, state.settings.mqtt)
    app[MQTT] = bridge

    async def serve(app: web.Application) -> AsyncIterator[None]:
        state.supervisor.spawn(bridge.run(), "mqtt")
        yield

    app.cleanup_ctx.append(serve)
