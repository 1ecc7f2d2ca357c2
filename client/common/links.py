"""Connections for device clients (``voxlens speaker``): the same conversation over MQTT or a
WebSocket. A link opens one connection at a time; the caller reconnects. Every transport
failure surfaces as ``ConnectionError``, so the caller needs to know no library's errors; a
server that refuses the client's credential raises ``client.common.access.AccessError`` (reconnecting
will not help)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
import aiomqtt

from client.common import access
from client.common.events import JsonEvent, Ready, decode_event
from streaming.mqtt import (
    AUDIO_IN,
    AUDIO_OUT,
    CONTROL,
    EVENTS,
    HEADER,
    QOS,
    SEQ_MOD,
    Reorderer,
    check_prefix,
    pack_frame,
    topic,
    unpack_frame,
    valid_device_id,
)
from streaming.mqtt_calls import publish, subscribe

Incoming = JsonEvent | bytes  # an event (as it came), or a piece of reply audio
FLUSH_AFTER_S = 0.25  # numbered reply audio held for a missing frame: played after this long
REORDER_WINDOW = 8


class Connection(Protocol):
    """One open connection. Sends wait for the transport (cancelling one abandons that
    message); a transport failure is a ConnectionError."""

    async def send(self, message: dict[str, Any]) -> None: ...

    async def send_audio(self, pcm: bytes) -> None: ...

    def incoming(self) -> AsyncIterator[Incoming]:
        """Events and reply audio until the connection drops (then ConnectionError)."""
        ...


class Link(Protocol):
    name: str
    resend_start: bool  # repeat session.start until session.ready (nobody may be listening yet)

    def connect(self) -> contextlib.AbstractAsyncContextManager[Connection]: ...


# ---- MQTT ---------------------------------------------------------------------------------


class MqttLink:
    resend_start = True

    def __init__(self, url: str, device_id: str, *, prefix: str = "voxlens",
                 sequence: bool = False, ca_file: Path | None = None,
                 cert_file: Path | None = None, key_file: Path | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"MQTT URL {url!r}: use mqtt://[user:password@]host[:port] or mqtts://…")
        if not valid_device_id(device_id):
            raise ValueError(f"device id {device_id!r}: letters, digits and _ . : @ - only "
                             "(at most 64, not starting with a separator)")
        self.url = parts
        self.device_id = device_id
        self.prefix = check_prefix(prefix)
        self.sequence = sequence
        self.tls = (aiomqtt.TLSParameters(
            ca_certs=str(ca_file) if ca_file else None, certfile=str(cert_file) if cert_file else None,
            keyfile=str(key_file) if key_file else None) if parts.scheme == "mqtts" else None)
        self.name = f"mqtt {parts.hostname}:{self.port} as {device_id}"
        self._identifier = f"voxlens-{device_id}-{uuid.uuid4().hex[:6]}"

    @property
    def port(self) -> int:
        return self.url.port or (8883 if self.tls else 1883)

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[MqttConnection]:
        u = self.url
        try:
            async with aiomqtt.Client(
                    u.hostname or "", self.port, identifier=self._identifier, keepalive=15,
                    username=unquote(u.username) if u.username else None,
                    password=unquote(u.password) if u.password else None,
                    tls_params=self.tls, max_queued_incoming_messages=1000) as client:
                await subscribe(client, topic(self.prefix, self.device_id, EVENTS), qos=QOS[EVENTS])
                await subscribe(client, topic(self.prefix, self.device_id, AUDIO_OUT),
                                qos=QOS[AUDIO_OUT])
                yield MqttConnection(self, client)
        except aiomqtt.MqttError as e:
            raise ConnectionError(f"MQTT: {e}") from e


class MqttConnection:
    def __init__(self, link: MqttLink, client: aiomqtt.Client) -> None:
        self._client = client
        self._topics = {kind: topic(link.prefix, link.device_id, kind)
                        for kind in (CONTROL, AUDIO_IN, EVENTS, AUDIO_OUT)}
        self._sequence = link.sequence
        self._seq = 0  # next audio/in sequence number
        self._out: Reorderer[bytes] | None = None

    async def _publish(self, kind: str, payload: bytes) -> None:
        try:
            await publish(self._client, self._topics[kind], payload, qos=QOS[kind])
        except aiomqtt.MqttError as e:
            raise ConnectionError(f"MQTT: {e}") from e

    async def send(self, message: dict[str, Any]) -> None:
        if message.get("type") == "session.start":
            self._seq = 0  # both sides number afresh after each session.start
        await self._publish(CONTROL, json.dumps(message).encode())

    async def send_audio(self, pcm: bytes) -> None:
        if self._sequence:
            pcm = pack_frame(self._seq, pcm)
            self._seq = (self._seq + 1) % SEQ_MOD
        await self._publish(AUDIO_IN, pcm)

    async def incoming(self) -> AsyncIterator[Incoming]:
        messages = aiter(self._client.messages)
        while True:
            try:
                if self._out is not None and self._out.pending:
                    async with asyncio.timeout(FLUSH_AFTER_S):
                        message = await anext(messages)
                else:
                    message = await anext(messages)
            except TimeoutError:  # a numbered frame went missing and nothing follows it
                assert self._out is not None
                for item in _with_gaps(self._out.flush()):
                    yield item
                continue
            except aiomqtt.MqttError as e:
                raise ConnectionError(f"MQTT: {e}") from e
            payload = message.payload
            if not isinstance(payload, bytes):
                continue
            if message.topic.matches(self._topics[EVENTS]):
                event = _event(payload)
                if event is None:
                    continue
                match decode_event(event):
                    case Ready(output_sequence=numbered):
                        self._out = Reorderer(REORDER_WINDOW) if numbered else None
                yield event
            elif self._out is not None:
                if len(payload) < HEADER.size:
                    continue
                seq, pcm = unpack_frame(payload)
                for item in _with_gaps(self._out.push(seq, pcm)):
                    yield item
            else:
                yield payload


def _event(payload: bytes | str) -> JsonEvent | None:
    """A JSON event, or None for anything else (never trusted to be well formed)."""
    try:
        event = json.loads(payload)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _with_gaps(frames: list[tuple[int, bytes]]) -> list[bytes]:
    """Reordered frames, with silence for the lost ones (the speaker keeps its timing)."""
    out: list[bytes] = []
    for missing, pcm in frames:
        if missing:
            out.append(bytes(len(pcm) * min(missing, REORDER_WINDOW)))
        out.append(pcm)
    return out


# ---- WebSocket ----------------------------------------------------------------------------


class WsLink:
    resend_start = False  # the server reads the socket in order: audio waits behind the start

    def __init__(self, url: str, *, api_key: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"WebSocket URL {url!r}: use ws://host:port/ws or wss://…")
        self.url = url
        self.api_key = api_key  # exchanged for a new token before each connection
        self.name = f"websocket {urlunsplit(parts._replace(query=''))}"  # no ?token= shown

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[WsConnection]:
        async with aiohttp.ClientSession() as http:
            try:
                ws = await access.ws_connect(http, self.url, self.api_key, heartbeat=20,
                                             max_msg_size=0)
            except (aiohttp.ClientError, OSError) as e:
                raise ConnectionError(f"WebSocket: {e}") from e
            async with ws:
                yield WsConnection(ws)


class WsConnection:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws

    async def send(self, message: dict[str, Any]) -> None:
        try:
            await self._ws.send_str(json.dumps(message))
        except (aiohttp.ClientError, ConnectionResetError) as e:
            raise ConnectionError(f"WebSocket: {e}") from e

    async def send_audio(self, pcm: bytes) -> None:
        try:
            await self._ws.send_bytes(pcm)
        except (aiohttp.ClientError, ConnectionResetError) as e:
            raise ConnectionError(f"WebSocket: {e}") from e

    async def incoming(self) -> AsyncIterator[Incoming]:
        async for msg in self._ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                if (event := _event(msg.data)) is not None:
                    yield event
            elif msg.type == aiohttp.WSMsgType.BINARY:
                yield msg.data
            else:
                break
        raise ConnectionError(f"WebSocket closed ({self._ws.close_code})")
