"""The MQTT bridge: one broker connection serving many devices, each with its own session.

Per device (``<prefix>/<device_id>/…``, docs/PROTOCOL.md): the first ``session.start`` on its
control topic opens a session; a device that comes back (or a bridge that reconnects to the
broker) finds its session where it left it; a session with no traffic either way for
``idle_timeout_s`` is closed. The dispatch loop never waits on a device: each device's
messages go to its bounded inbox (streaming/mqtt_device.py) and everything the bridge
publishes goes through one bounded outbox, dropped while the broker is unreachable (live audio
and events are worth nothing later).

``MqttBridge`` serves every device of its prefix alone. With ``mqtt.share_group`` set,
``ClusterBridge`` is one of several nodes on one broker, each device served by one of them
(docs/ARCHITECTURE.md, "MQTT across nodes"): its decisions are ``streaming.mqtt_fleet.Fleet``'s, on
plain values; this module does the broker's side of them.
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
from functools import cache, partial
from urllib.parse import unquote, urlsplit

import aiomqtt
from aiohttp import web
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

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
from streaming.mqtt_calls import publish, subscribe, unsubscribe
from streaming.mqtt_device import DeviceAdapter, Restore
from streaming.mqtt_fleet import Fleet, Route, Verdict
from streaming.mqtt_records import (
    CLUSTER_SUB,
    DIRECT,
    SHARED,
    STATE_SUB,
    Claim,
    ClusterKind,
    HistoryItems,
    Presence,
    cluster_filters,
    cluster_topic,
    decode_history,
    device_filters,
    encode_history,
    parse_cluster_topic,
    shared_filter,
)
from streaming.protocol import (
    MAX_TEXT_MESSAGE_BYTES,
    ClientMessage,
    SessionEnd,
    SessionStart,
    event_to_json,
    parse_client_message,
)

log = logging.getLogger(__name__)

OUTBOX = 4096  # messages waiting for the broker (all devices; 40 ms audio chunks mostly)
PUBLISHERS = 8  # publishes in flight at once (QoS 1 waits for the broker's ack)
INCOMING = 4096  # aiomqtt's queue of received messages, drained by the dispatch loop
RECONNECT_MIN_S = 0.5
STRANGERS = 1024  # devices without a session remembered for rate-limiting answers to them
STRANGER_ANSWER_S = 1.0  # at most one answer a second to a device without a session
FAREWELL_S = 2.0  # at shutdown: time left to publish what waits (a drain's session.closing)
# several nodes (ClusterBridge)
SAVE_EVERY_S = 1.0  # a served device's conversation goes to the broker when it changed
SWEEP_EVERY_S = 0.5  # devices of dead nodes are looked for this often
DRAIN_POLL_S = 0.25
BARRIER_S = 5.0  # the longest wait for the node's own barrier message to come back
MAX_TAKES = 64  # devices being taken over at once (a device repeats its session.start)

Outgoing = tuple[str, bytes, int, bool]  # topic, payload, QoS, retain


def broker_client(s: MqttSettings, client_id: str, *,
                  will: aiomqtt.Will | None = None) -> aiomqtt.Client:
    """A client for the configured broker (``mqtts``: TLS with the CA/cert/key settings): MQTT
    3.1.1, or MQTT 5 when several nodes share the prefix (shared subscriptions, subscription
    identifiers); a clean session either way."""
    url = urlsplit(s.url or "")
    tls = url.scheme == "mqtts"
    tls_params = (aiomqtt.TLSParameters(
        ca_certs=str(s.ca_file) if s.ca_file else None,
        certfile=str(s.cert_file) if s.cert_file else None,
        keyfile=str(s.key_file) if s.key_file else None) if tls else None)
    version = ({"protocol": aiomqtt.ProtocolVersion.V5, "clean_start": True}
               if s.share_group is not None else {"clean_session": True})
    return aiomqtt.Client(
        url.hostname or "", url.port or (8883 if tls else 1883),
        username=unquote(url.username) if url.username else None,
        password=unquote(url.password) if url.password else None,
        identifier=client_id, keepalive=s.keepalive_s, will=will,
        max_queued_incoming_messages=INCOMING, tls_params=tls_params, **version)


class MqttBridge:
    """Serves every device of the prefix: owns the broker connection, the outbox, the devices'
    adapters and their sessions' tasks."""

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
        self.outbox: Channel[Outgoing] = Channel(OUTBOX)
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
                async with self._client_for_broker() as client:
                    delay = RECONNECT_MIN_S
                    try:
                        await self._serve(client)
                    except asyncio.CancelledError:
                        await self._farewell(client)
                        raise
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

    def _client_for_broker(self) -> aiomqtt.Client:
        return broker_client(self.settings, self.client_id)

    async def _serve(self, client: aiomqtt.Client) -> None:
        for topic_filter, qos in subscriptions(self.prefix):
            await subscribe(client, topic_filter, qos=qos)
        self.connected = True
        self.connects += 1
        log.info("MQTT: connected as %s, serving %s/+/…", self.client_id, self.prefix)
        async with asyncio.TaskGroup() as tg:
            for _ in range(PUBLISHERS):
                tg.create_task(self._publish(client))
            async for message in client.messages:
                self.dispatch(str(message.topic), _payload(message))

    async def _publish(self, client: aiomqtt.Client) -> None:
        # No await between taking a message and handing it to paho: messages leave in order.
        while True:
            name, payload, qos, retain = await self.outbox.get()
            await publish(client, name, payload, qos=qos, retain=retain)

    async def _farewell(self, client: aiomqtt.Client) -> None:
        """Shutting down: publish what still waits in the outbox (the ``session.closing`` of a
        drain), for at most ``FAREWELL_S``."""
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(FAREWELL_S):
                while len(self.outbox):
                    name, payload, qos, retain = await self.outbox.get()
                    await publish(client, name, payload, qos=qos, retain=retain)

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
        self._queue(topic(self.prefix, device_id, kind), payload, qos)

    def _queue(self, name: str, payload: bytes, qos: int, retain: bool = False) -> None:
        if self.connected and not self.outbox.put_nowait((name, payload, qos, retain)):
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
        if isinstance(self._stranger(device_id, where.kind, payload), SessionStart):
            self._open(device_id, payload)

    def _stranger(self, device_id: str, kind: Kind, payload: bytes) -> ClientMessage | None:
        """A message of a device without a session: answered (``no_session``, or what is wrong
        with it) unless it is a ``session.start``. Returns the message, when it is one."""
        if kind == AUDIO_IN:
            self._answer(device_id, Error("no_session", "this device has no session: send "
                                          "session.start on its control topic first"))
            return None
        try:
            if len(payload) > MAX_TEXT_MESSAGE_BYTES:
                raise ProtocolError("a device without a session must start with session.start",
                                    code="too_large")
            message = parse_client_message(payload.decode("utf-8", errors="replace"))
        except ProtocolError as e:
            self._answer(device_id, Error(e.code, e.message))
            return None
        if not isinstance(message, SessionStart):
            self._answer(device_id, Error("no_session", "this device has no session: send "
                                          "session.start first"))
        return message

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
        session = self._admit(device_id)
        if session is not None:
            self._attach(device_id, session, start)

    def _admit(self, device_id: str) -> Session | None:
        """A new registered session for the device, or None (the device was told why not)."""
        try:
            return self.state.open_session("mqtt")
        except Busy as e:
            self._answer(device_id, Error(e.code, e.message, True))
            return None

    def _attach(self, device_id: str, session: Session, start: bytes,
                restore: Restore | None = None) -> None:
        """The device's adapter on its new session, which ``start`` starts; its task is the
        bridge's."""
        if self._tg is None:
            self.state.forget(session)
            return
        b = self.state.settings.bargein
        adapter = DeviceAdapter(device_id, session, partial(self.send, device_id),
                                lead_ms=b.lead_ms, clock=self._clock, restore=restore)
        adapter.offer(CONTROL, start)
        self.devices[device_id] = adapter
        self._answered.pop(device_id, None)
        log.info("session %s opened over MQTT for device %s", session.session_id, device_id)
        task = self._tg.create_task(self._serve_device(adapter, session), name=f"mqtt-{device_id}")
        self._device_tasks.add(task)
        task.add_done_callback(self._device_tasks.discard)

    async def _serve_device(self, adapter: DeviceAdapter, session: Session) -> None:
        try:  # (a device's idle expiry is the bridge's: DeviceAdapter.expire)
            await self.state.serve(session, adapter.run(), expire=False)
        except Exception:  # one device's failure never ends the bridge
            log.exception("MQTT device %s failed", adapter.device_id)
        finally:
            current = self.devices.get(adapter.device_id) is adapter
            if current:
                del self.devices[adapter.device_id]
            self._ended(adapter, session, current)

    def _ended(self, adapter: DeviceAdapter, session: Session, current: bool) -> None:
        """A device's session ended (``current``: no newer one took its place)."""

    def health(self) -> dict[str, object]:
        return {"connected": self.connected, "devices": len(self.devices),
                "connects": self.connects}


def _payload(message: aiomqtt.Message) -> bytes:
    payload = message.payload
    return bytes(payload) if isinstance(payload, bytes | bytearray) else b""


def _identifiers(message: aiomqtt.Message) -> set[int]:
    """The MQTT 5 subscription identifiers of the subscriptions that brought a message."""
    ids = getattr(message.properties, "SubscriptionIdentifier", None) or []
    return set(ids if isinstance(ids, list) else [ids])


def _subscription(identifier: int) -> Properties:
    properties = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
    properties.SubscriptionIdentifier = identifier
    return properties


def _starts_session(payload: bytes) -> Callable[[], bool]:
    """Whether a control message is a ``session.start``, worked out once, when asked."""
    @cache
    def check() -> bool:
        if len(payload) > MAX_TEXT_MESSAGE_BYTES:
            return False
        try:
            message = parse_client_message(payload.decode("utf-8", errors="replace"))
        except ProtocolError:
            return False
        return isinstance(message, SessionStart)
    return check


def conversation(session: Session) -> HistoryItems:
    """What another node needs to go on with a conversation: its words, as heard (tool calls,
    their results and the visual memory stay behind)."""
    return [(item.kind, item.text)
            for item in session.history.items if item.kind in ("user", "assistant") and item.text]


def restore_conversation(session: Session, items: HistoryItems) -> bool:
    """Put a conversation carried from another node into a new session (before its first turn)."""
    for kind, text in items:
        session.add_message(kind, text)
    return bool(items)


class ClusterBridge(MqttBridge):
    """One of several nodes serving the devices of one prefix (``mqtt.share_group``).

    A device's ``session.start`` reaches one node of the group through the shared subscription;
    that node claims the device (a retained owner record), subscribes the device's own topics,
    reads the conversation the device had on another node if any, and serves it; what reaches
    the other nodes through the shared subscription they leave alone. The node announces itself
    with a retained presence that its Last Will clears, puts each served conversation on the
    broker when it changes, and, when another node is gone, tells the devices it served to
    start again (each of them by one node). Owns, besides the base's: the fleet view, the
    per-connection tasks (publishers, joining, sweeping, saving, following a drain) and the
    take-overs in flight.
    """

    def __init__(self, state: AppState, settings: MqttSettings, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(state, settings, clock=clock)
        assert settings.share_group is not None
        self.group = settings.share_group
        self.node_id = settings.node_id or self.client_id
        self.fleet = Fleet(self.node_id)
        self.sessions: dict[str, Session] = {}  # the sessions of the devices served here
        self.shared = False  # subscribed to the shared subscription (not draining)
        self._client: aiomqtt.Client | None = None
        self._links: asyncio.TaskGroup | None = None  # the current connection's tasks
        self._takes: dict[str, asyncio.Task[None]] = {}
        self._carried: dict[str, bytes] = {}  # device being taken → its conversation record
        self._barriers: dict[str, asyncio.Future[None]] = {}
        self._saved: dict[str, HistoryItems] = {}  # device → conversation last put on the broker

    def _record_topic(self, kind: ClusterKind, name: str) -> str:
        return cluster_topic(self.prefix, kind, name)

    def _client_for_broker(self) -> aiomqtt.Client:
        gone = aiomqtt.Will(self._record_topic("node", self.node_id), b"", qos=1, retain=True)
        return broker_client(self.settings, self.client_id, will=gone)

    # ---- the connection ---------------------------------------------------------------

    async def _serve(self, client: aiomqtt.Client) -> None:
        self.fleet.disconnected()
        self._client = client
        try:
            async with asyncio.TaskGroup() as tg:
                self._links = tg
                for _ in range(PUBLISHERS):
                    tg.create_task(self._publish(client))
                tg.create_task(self._join(client, tg))
                async for message in client.messages:
                    self._on_message(message)
        finally:
            self._links = self._client = None
            self.shared = False
            self._barriers.clear()

    async def _join(self, client: aiomqtt.Client, tg: asyncio.TaskGroup) -> None:
        """Read every node's presence and every owner record, say this node is here, reconcile
        what it serves with what the broker says, then take devices."""
        filters = [(f, QOS[CONTROL]) for f in cluster_filters(self.prefix, self.node_id)]
        await subscribe(client, filters, properties=_subscription(CLUSTER_SUB))
        self.fleet.draining = self.state.draining
        await self._announce(client)
        await self._barrier(client)  # the retained records came before it
        rejoin = self.fleet.rejoined(self._clock())
        for device in rejoin.yielded:
            self._leave(device)
        for device in rejoin.reclaim:
            await self._publish_claim(client, device, self.fleet.claim(device))
        for device in rejoin.release:
            if (released := self.fleet.release(device)) is not None:
                await self._publish_claim(client, device, released)
        served = [f for device in sorted(self.fleet.local)
                  for f in device_filters(self.prefix, device)]
        if served:
            await subscribe(client, served, properties=_subscription(DIRECT))
        self._saved.clear()  # every conversation goes to the broker again (it may have restarted)
        self.connected = True
        self.connects += 1
        log.info("MQTT: node %s connected as %s, share group %s, serving %s/+/… (%d nodes, "
                 "%d devices here)", self.node_id, self.client_id, self.group, self.prefix,
                 len(self.fleet.nodes), len(self.fleet.local))
        tg.create_task(self._sweep())
        if self.settings.history_on_broker:
            tg.create_task(self._save_conversations())
        await self._follow_drain(client)

    async def _announce(self, client: aiomqtt.Client) -> None:
        await publish(client, self._record_topic("node", self.node_id),
                      self.fleet.presence().encode(), qos=1, retain=True)

    async def _publish_claim(self, client: aiomqtt.Client, device: str, claim: Claim) -> None:
        await publish(client, self._record_topic("owner", device), claim.encode(), qos=1,
                      retain=True)

    async def _barrier(self, client: aiomqtt.Client) -> None:
        """Publish to this node's own sync topic and wait for it to come back: the broker sends
        a client's messages in order, so whatever a subscription made before brought (retained
        records) has arrived by then."""
        token = uuid.uuid4().hex
        arrived = asyncio.get_running_loop().create_future()
        self._barriers[token] = arrived
        try:
            await publish(client, self._record_topic("sync", self.node_id), token.encode(), qos=1)
            async with asyncio.timeout(BARRIER_S):
                await arrived
        except TimeoutError:
            log.warning("MQTT: the broker did not echo node %s's sync message in %.0f s",
                        self.node_id, BARRIER_S)
        finally:
            self._barriers.pop(token, None)

    async def _follow_drain(self, client: aiomqtt.Client) -> None:
        """Take devices through the shared subscription until the node drains; then tell the
        other nodes (presence) and leave the shared subscription, so new devices and those
        this node closes go elsewhere."""
        if not self.state.draining:
            await subscribe(client, shared_filter(self.prefix, self.group), qos=QOS[CONTROL],
                            properties=_subscription(SHARED))
            self.shared = True
        while not self.state.draining:  # noqa: ASYNC110 (AppState has no drain event to wait on)
            await asyncio.sleep(DRAIN_POLL_S)
        self.fleet.draining = True
        await self._announce(client)
        if self.shared:
            await unsubscribe(client, shared_filter(self.prefix, self.group))
            self.shared = False
        log.info("MQTT: node %s is draining: it takes no more devices", self.node_id)

    async def _farewell(self, client: aiomqtt.Client) -> None:
        """Shutting down: what waits goes out, then the presence goes (the other nodes tell
        this node's devices to start again, with them)."""
        await super()._farewell(client)
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(FAREWELL_S):
                await publish(client, self._record_topic("node", self.node_id), b"", qos=1,
                              retain=True)

    # ---- messages ---------------------------------------------------------------------

    def _on_message(self, message: aiomqtt.Message) -> None:
        name, payload = str(message.topic), _payload(message)
        record = parse_cluster_topic(self.prefix, name)
        if record is not None:
            self._on_record(*record, payload)
            return
        ids = _identifiers(message) & {SHARED, DIRECT} or {SHARED}
        for via in sorted(ids):  # one delivery per subscription that matched
            self.dispatch(name, payload, shared=via == SHARED)

    def dispatch(self, name: str, payload: bytes, *, shared: bool = True) -> None:
        """A device's message, through the shared subscription or the device's own."""
        where = parse_topic(self.prefix, name)
        if where is None or where.kind not in (CONTROL, AUDIO_IN):
            return
        device = where.device_id
        if not valid_device_id(device):
            return
        match self.fleet.route(device, where.kind, shared=shared,
                               is_start=_starts_session(payload), now=self._clock()):
            case Route.HANDLE:
                adapter = self.devices.get(device)
                if adapter is not None and not adapter.ended:
                    adapter.offer(where.kind, payload)
            case Route.TAKE:
                self._take(device, payload)
            case Route.ANSWER:
                if (isinstance(self._stranger(device, where.kind, payload), SessionEnd)
                        and device in self.fleet.claims):
                    self._clear(device)  # its node is gone and it ended the conversation
            case Route.IGNORE:
                pass

    def _on_record(self, kind: ClusterKind, name: str, payload: bytes) -> None:
        """A record of the nodes (presence, owner, the node's barrier, a carried conversation)."""
        try:
            match kind:
                case "node":
                    presence = Presence.decode(payload)
                    if (name == self.node_id and presence is not None
                            and presence.incarnation != self.fleet.incarnation):
                        log.error("MQTT: another process uses this node's id %r: give every "
                                  "node its own mqtt.node_id", name)
                    self.fleet.on_presence(name, presence)
                case "owner" if valid_device_id(name):
                    self._on_claim(name, Claim.decode(payload))
                case "state" if name in self._carried:
                    self._carried[name] = payload
                case "sync" if name == self.node_id:
                    arrived = self._barriers.get(payload.decode("ascii", errors="replace"))
                    if arrived is not None and not arrived.done():
                        arrived.set_result(None)
        except ValueError as e:
            log.warning("MQTT: ignoring a malformed %s record for %r: %s", kind, name[:80], e)

    def _on_claim(self, device: str, claim: Claim | None) -> None:
        held = self.fleet.own.get(device)
        match self.fleet.on_claim(device, claim):
            case Verdict.YIELD:
                assert claim is not None
                log.info("MQTT device %s: node %s serves it now", device, claim.node)
                self._leave(device)
                self._put_claim(device, claim)  # after ours: the record the broker keeps
            case Verdict.REASSERT:
                assert held is not None
                self._put_claim(device, held)
            case Verdict.RECLAIM:
                self._put_claim(device, self.fleet.claim(device))
            case Verdict.KEEP:
                pass

    def _put_claim(self, device: str, claim: Claim | None) -> None:
        if claim is not None:
            self._queue(self._record_topic("owner", device), claim.encode(), QOS[CONTROL],
                        retain=True)

    # ---- devices ----------------------------------------------------------------------

    def _take(self, device: str, start: bytes) -> None:
        """Take a device over (or on): open its session now (or tell it why not), then claim
        it, subscribe its topics and read its carried conversation, then serve it."""
        client, links = self._client, self._links
        if (client is None or links is None or self._tg is None or device in self._takes
                or len(self._takes) >= MAX_TAKES):
            return  # the device repeats its session.start
        session = self._admit(device)
        if session is None:
            return
        claim = self.fleet.claim(device)
        task = links.create_task(self._taking(client, device, start, session, claim),
                                 name=f"mqtt-take-{device}")
        self._takes[device] = task
        task.add_done_callback(partial(self._took, device))

    def _took(self, device: str, task: asyncio.Task[None]) -> None:
        if self._takes.get(device) is task:
            del self._takes[device]

    async def _taking(self, client: aiomqtt.Client, device: str, start: bytes,
                      session: Session, claim: Claim) -> None:
        attached = False
        try:
            # the claim is on the broker before the device can hear session.ready, so every
            # node knows the device is served before its next message reaches one of them
            await self._publish_claim(client, device, claim)
            await subscribe(client, device_filters(self.prefix, device),
                            properties=_subscription(DIRECT))
            carried = (await self._read_conversation(client, device)
                       if self.settings.history_on_broker else [])
            if device not in self.fleet.local:
                return  # another node's claim came after ours meanwhile: it has the device
            restore = partial(restore_conversation, session, carried) if carried else None
            self._attach(device, session, start, restore)
            attached = self._tg is not None
            log.info("MQTT device %s: taken by node %s%s", device, self.node_id,
                     " with its conversation" if carried else "")
        finally:
            if not attached:
                self.state.forget(session)
                if device in self.fleet.local:  # (not handed to another node meanwhile)
                    self._put_claim(device, self.fleet.release(device))

    async def _read_conversation(self, client: aiomqtt.Client, device: str) -> HistoryItems:
        """The conversation the device's previous node left on the broker ([] for none)."""
        record = self._record_topic("state", device)
        self._carried[device] = b""
        try:
            await subscribe(client, record, qos=QOS[CONTROL], properties=_subscription(STATE_SUB))
            await self._barrier(client)
            await unsubscribe(client, record)
            payload = self._carried.get(device, b"")
        finally:
            self._carried.pop(device, None)
        try:
            return decode_history(payload)
        except ValueError as e:
            log.warning("MQTT device %s: its carried conversation is unreadable (%s); it "
                        "starts afresh", device, e)
            return []

    def _attach(self, device_id: str, session: Session, start: bytes,
                restore: Restore | None = None) -> None:
        super()._attach(device_id, session, start, restore)
        if self._tg is not None:
            self.sessions[device_id] = session

    def _leave(self, device: str) -> None:
        """Another node serves the device: whatever this node had of it ends, silently (a
        take-over in flight stops at its next step)."""
        self.fleet.forget(device)
        adapter = self.devices.get(device)
        if adapter is not None and not adapter.ended:
            adapter.leave()
        self._unsubscribe(device)

    def _ended(self, adapter: DeviceAdapter, session: Session, current: bool) -> None:
        """The conversation ended for good (``session.end``, expiry): its records go. Ended
        otherwise (a drain, a failure): released, so the next node goes on with it."""
        device = adapter.device_id
        if not current:
            return
        if self.sessions.get(device) is session:
            del self.sessions[device]
        if device in self.fleet.local:  # (else another node serves it)
            if adapter.outcome is not None:
                self.fleet.forget(device)
                self._clear(device)
            else:
                self._save(device, session)  # its last words, before another node goes on
                self._put_claim(device, self.fleet.release(device))
            self._unsubscribe(device)
        self._saved.pop(device, None)

    def _clear(self, device: str) -> None:
        """Nobody has the device and nobody will go on with its conversation: both records go
        (an empty retained message deletes one)."""
        for kind in ("owner", "state"):
            self._queue(self._record_topic(kind, device), b"", QOS[CONTROL], retain=True)

    def _unsubscribe(self, device: str) -> None:
        client, links = self._client, self._links
        if client is None or links is None:
            return  # off the broker: the next connection subscribes only what is served

        async def leave() -> None:
            with contextlib.suppress(aiomqtt.MqttError):
                await unsubscribe(client, [f for f, _ in device_filters(self.prefix, device)])
        links.create_task(leave())

    # ---- housekeeping -----------------------------------------------------------------

    async def _sweep(self) -> None:
        """Tell the devices of a node that is gone to start again (their next session.start
        finds a node that takes them), and clear records nobody took for the idle timeout."""
        gone = Error("no_session", "the node that served this device is gone: send "
                     "session.start to go on (the conversation is kept)")
        prompt_payload = json.dumps(event_to_json(gone)).encode()
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            prompt, forget = self.fleet.sweep(self._clock(), self.settings.idle_timeout_s)
            for device in prompt:
                log.info("MQTT device %s: its node is gone; telling it to start again", device)
                self.send(device, EVENTS, prompt_payload, QOS[EVENTS])
            for device in forget:
                self._clear(device)

    async def _save_conversations(self) -> None:
        """Each served conversation, when it changed, as a retained record only nodes read."""
        while True:
            await asyncio.sleep(SAVE_EVERY_S)
            for device, session in list(self.sessions.items()):
                if device in self.fleet.local:
                    self._save(device, session)

    def _save(self, device: str, session: Session) -> None:
        if not self.settings.history_on_broker:
            return
        items = conversation(session)
        if items != self._saved.get(device, []):
            self._saved[device] = items
            self._queue(self._record_topic("state", device), encode_history(items),
                        QOS[CONTROL], retain=True)

    def health(self) -> dict[str, object]:
        return {**super().health(), "node": self.node_id, "nodes": len(self.fleet.nodes),
                "shared": self.shared}


MQTT = web.AppKey("mqtt", MqttBridge)


def setup_mqtt(app: web.Application) -> None:
    """When ``mqtt.url`` is set: the bridge starts with the app, owned by the app's supervisor
    (cancelled at shutdown): one node's, or one of several (``mqtt.share_group``). Devices that
    come before the models are loaded are answered ``not_ready``."""
    state = app[STATE]
    if state.settings.mqtt.url is None:
        return
    bridge = (MqttBridge(state, state.settings.mqtt) if state.settings.mqtt.share_group is None
              else ClusterBridge(state, state.settings.mqtt))
    app[MQTT] = bridge

    async def serve(app: web.Application) -> AsyncIterator[None]:
        state.supervisor.spawn(bridge.run(), "mqtt")
        yield

    app.cleanup_ctx.append(serve)
