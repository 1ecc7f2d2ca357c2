"""Property-based fuzzing of every input parser (hypothesis), shared by the CI test
(tests/unit/test_fuzz.py, a bounded number of examples) and the bench (bench/fuzz.py, many).

What is fuzzed, each through the real code path:

- ``parser``, ``offer_parser``: ``parse_client_message`` (the one parser of client JSON
  messages on the WebSocket, the WebRTC data channel and MQTT control topics), ``parse_offer``.
- ``images``: ``decode_base64_image``/``decode_image`` (base64/JPEG/PNG garbage, huge and thin
  dimensions, truncated and bit-flipped files).
- ``ws``: text and binary frames on ``/ws`` of the real app (fake engines) on 127.0.0.1.
- ``datachannel``: messages on the ``events`` data channel of a real WebRTC session (an aiortc
  peer connected to the app's ``POST /offer``).
- ``offer``: ``POST /offer`` bodies: JSON with wrong types and extra fields, raw bytes, and
  mutated SDP text made from a real aiortc offer.
- ``mqtt``, ``mqtt_topics``: control and audio payloads of a device through the MQTT bridge (no
  broker: its ``dispatch`` and outbox, as tests/unit/test_mqtt_bridge.py does); random topics.
- ``vision``: ``POST /v1/vision/ask`` forms, multipart and JSON (a fake vision engine).

Inputs are structured: client messages of every type with fields of the right type or not,
extra fields, edge values (int64, float and 4300-digit limits, deep nesting, lone surrogates),
real pictures cut, flipped or lying about their size, a real SDP offer mutated line by line,
besides raw bytes and text. The session inputs also wait for a reply to start (so that
``playback`` and ``interrupt`` meet a playing reply) and let the server end the session midway
(as its idle timeout or maximum length would) while the client goes on sending.

The property, everywhere: no exception escapes (no 500, nothing logged at ERROR, no session
killed); each answer is a success or an error whose code is documented in docs/PROTOCOL.md
(parsed from it, not copied here); and a second, well-behaved session in the same app (a
WebSocket client, or an MQTT device) still gets its reply to a typed turn after each example.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import logging
import re
import reprlib
import struct
import time
import warnings
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiohttp
import cv2
import hypothesis
import numpy as np
from aiohttp import WSMsgType, web
from aiortc import RTCPeerConnection, RTCSessionDescription
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisWarning

from pipelines.compute import Compute, Priority
from pipelines.engines.fakes import FakeAsr, FakeLlm, FakeTts, FakeVad
from pipelines.session import Engines
from server.app import create_app
from server.engines import session_config
from server.mqtt import MqttBridge
from server.settings import Settings, load_settings
from server.state import STATE, AppState
from streaming.errors import ProtocolError
from streaming.images import KEEP_SIDE, Image, decode_base64_image
from streaming.mqtt import SEQ_MOD, pack_frame, valid_device_id
from streaming.protocol import (
    CLIENT_TYPES,
    MAX_AUDIO_MESSAGE_BYTES,
    MAX_OFFER_BYTES,
    MAX_TEXT_MESSAGE_BYTES,
    SessionEnd,
    parse_client_message,
    parse_offer,
)
from streaming.webrtc import EVENTS_LABEL, PcmTrack

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
GUARD_S = 20.0  # a hang guard, never a timing assertion: an example that waits this long hangs
REPLY = "Ok."  # the fake LLM's answer to every turn
SYNC = "fuzz.sync"  # an unknown message type: its error answer says everything before it was read
RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


# ---- what docs/PROTOCOL.md documents -------------------------------------------------------

@dataclass(frozen=True)
class Documented:
    """Error codes and event types as docs/PROTOCOL.md lists them."""

    session_codes: frozenset[str]  # `error` events on /ws, the data channel and MQTT
    mqtt_codes: frozenset[str]  # the codes MQTT adds
    event_types: frozenset[str]  # server → client event types
    offer: dict[int, frozenset[str]]  # POST /offer: HTTP status → error codes
    vision_statuses: frozenset[int]  # POST /v1/vision/ask: documented error statuses


def _table_column(lines: list[str], header: str) -> list[set[str]]:
    """The backticked first cells of every table whose header row is ``header``."""
    tables: list[set[str]] = []
    current: set[str] | None = None
    for line in lines:
        if re.fullmatch(header, line.strip()):
            current = set()
            tables.append(current)
        elif current is not None:
            if not line.startswith("|"):
                current = None
            elif m := re.match(r"\|\s*`([a-z_.]+)`\s*\|", line):
                current.add(m[1])
    return tables


def documented(path: Path = ROOT / "docs" / "PROTOCOL.md") -> Documented:
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    session, mqtt = _table_column(lines, r"\|\s*code\s*\|\s*cause\s*\|")[:2]
    events = _table_column(lines, r"\|\s*type\s*\|\s*fields\s*\|\s*when\s*\|")[0]
    offer: dict[int, frozenset[str]] = {}
    errors = re.search(r"Errors:(.*?)\.\n", text, re.S)
    assert errors is not None, "docs/PROTOCOL.md: the /offer errors are not where expected"
    for status, rest in re.findall(r"`(\d{3}) ([^`]*)`", errors[1]):
        quoted = set(re.findall(r'"([a-z_]+)"', rest)) - {"error", "message"}
        offer[int(status)] = frozenset(quoted or rest.split("|"))
    vision = next(line for line in lines if "`POST /v1/vision/ask`" in line and line.startswith("|"))
    statuses = frozenset(int(s) for s in re.findall(r"\b([45]\d\d)\b", vision))
    assert session and mqtt and events and offer and statuses
    return Documented(frozenset(session), frozenset(mqtt), frozenset(events), offer, statuses)


DOC = documented()
# `internal` is documented, but it means the session failed (a bug met): never an answer to input
INPUT_CODES = DOC.session_codes - {"internal"}


_repr = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_repr.maxstring = _repr.maxother = 160
_repr.maxlist = _repr.maxdict = 10


def short(obj: object) -> str:
    """A repr short enough for an assertion message (the inputs can be 12 000 brackets)."""
    return _repr.repr(obj)


def check_error_event(event: dict[str, Any], codes: frozenset[str] = INPUT_CODES) -> None:
    assert event.get("type") in DOC.event_types, f"undocumented event {event}"
    if event["type"] == "error":
        assert event.get("code") in codes, f"undocumented error code in {event}"
        assert isinstance(event.get("message"), str) and event["message"], event
        assert event.get("fatal") is False, f"bad input ended the session: {event}"


# ---- JSON values and client messages -------------------------------------------------------

# text with lone surrogates now and then: valid in JSON ("\ud800"), not encodable as UTF-8
def texts(max_size: int, min_size: int = 0) -> st.SearchStrategy[str]:
    return st.text(min_size=min_size, max_size=max_size) | st.text(
        st.characters() | st.characters(categories=["Cs"]), min_size=min_size, max_size=max_size)


# past int64, and past what a float holds (1.8e308)
huge_ints = st.integers(min_value=2**63 - 2, max_value=10**400) | st.integers(max_value=-(2**63))
json_scalars = (st.none() | st.booleans() | st.integers() | huge_ints
                | st.floats(allow_nan=True, allow_infinity=True) | texts(20))
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts(8), inner, max_size=4),
    max_leaves=8)


def _either(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field value: mostly plausible (right type, edge values), sometimes any JSON at all."""
    return st.one_of(plausible, plausible, json_values)


sample_rates = _either(st.sampled_from([*RATES, 0, -16000, 12345, 96000, 2**31, 2**63]))
# the usual suspects at the edges of int32, int64, float64 and 4300-digit strings
EDGE_INTS = [0, -1, 1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**308,
             10**309, -(10**309), 10**4299]
counts = st.one_of(st.integers(min_value=-5, max_value=10**7), st.sampled_from(EDGE_INTS),
                   huge_ints)
languages = _either(st.sampled_from(["en", "zh", "fr", "xx", "", "e", "en-US-xx", "\x00\x00"])
                    | texts(min_size=2, max_size=9))
user_texts = _either(texts(60) | st.sampled_from(["", " ", "x" * 4001]))


@st.composite
def pictures(draw: st.DrawFn) -> bytes:
    """A real JPEG or PNG: random pixels, square-ish or very thin, 8 or 16 bits, 1–4 channels."""
    thin = draw(st.booleans())
    w = draw(st.integers(1, 3000 if thin else 64))
    h = draw(st.integers(1, 3 if thin else 64))
    if draw(st.booleans()):
        w, h = h, w
    ext = draw(st.sampled_from([".jpg", ".png"]))
    channels = draw(st.sampled_from([1, 3] if ext == ".jpg" else [1, 3, 4]))
    dtype = np.uint16 if ext == ".png" and draw(st.booleans()) else np.uint8
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    top = 65535 if dtype == np.uint16 else 255
    pixels = rng.integers(0, top, size=(h, w, channels), endpoint=True).astype(dtype)
    ok, buf = cv2.imencode(ext, pixels)
    assert ok
    return bytes(buf)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


dimensions = st.sampled_from([0, 1, 2, 640, 6000, 65535, 2**20, 2**31 - 1, 2**32 - 1]) \
    | st.integers(0, 2**32 - 1)


@st.composite
def resized(draw: st.DrawFn, data: bytes) -> bytes:
    """A picture whose header claims other dimensions (the PNG's checksum fixed, so the decoder
    believes it): huge ones, zero, ones that disagree with the pixels."""
    w, h = draw(dimensions), draw(dimensions)
    if data.startswith(b"\x89PNG"):
        ihdr = struct.pack(">II", w, h) + data[24:29]
        return data[:8] + _png_chunk(b"IHDR", ihdr) + data[33:]
    sof = next((i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] in
                (0xC0, 0xC1, 0xC2)), None)
    if sof is None:
        return data
    return data[:sof + 5] + struct.pack(">HH", h % 65536, w % 65536) + data[sof + 9:]


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    match draw(st.sampled_from(["truncate", "flip", "splice", "resize", "none"])):
        case "truncate":
            return data[:draw(st.integers(0, len(data)))]
        case "flip":
            out = bytearray(data)
            for _ in range(draw(st.integers(1, 8))):
                out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
            return bytes(out)
        case "splice":
            at = draw(st.integers(0, len(data)))
            return data[:at] + draw(st.binary(max_size=64)) + data[at:]
        case "resize":
            return draw(resized(data))
    return data


@st.composite
def header_only(draw: st.DrawFn) -> bytes:
    """Just a PNG IHDR or a JPEG SOF claiming some dimensions, and maybe some garbage."""
    w, h = draw(dimensions), draw(dimensions)
    tail = draw(st.binary(max_size=32))
    if draw(st.booleans()):
        depth, colour = draw(st.sampled_from([(8, 2), (8, 0), (16, 2), (8, 6), (1, 0), (3, 9)]))
        ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + tail
    sof = struct.pack(">BHHB", 8, h % 65536, w % 65536, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + tail


image_bytes: st.SearchStrategy[bytes] = st.one_of(
    pictures(),
    pictures().flatmap(mutated),
    header_only(),
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
    st.binary(max_size=200).map(lambda b: b"\xff\xd8" + b),
)


@st.composite
def base64_images(draw: st.DrawFn) -> str:
    """An image message's ``data``: base64 or a data: URL of image bytes, mangled or not."""
    text = base64.b64encode(draw(image_bytes)).decode()
    match draw(st.sampled_from(["plain", "url", "odd_url", "unpadded", "spaced", "urlsafe"])):
        case "url":
            text = "data:image/jpeg;base64," + text
        case "odd_url":
            text = "data:" + draw(texts(20)) + "," + text
        case "unpadded":
            text = text.rstrip("=")
        case "spaced":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.sampled_from([" ", "\n", "\r\n", "\t"])) + text[at:]
        case "urlsafe":
            text = text.replace("+", "-").replace("/", "_")
    return text


image_data = st.one_of(base64_images(), base64_images(), texts(40), json_values)

audio_formats = _either(st.fixed_dictionaries({}, optional={
    "sample_rate": sample_rates, "channels": _either(st.integers(-1, 3)),
    "format": _either(st.sampled_from(["pcm_s16le", "opus", "PCM_S16LE"])),
    "echo_cancellation": _either(st.booleans()), "sequence": _either(st.booleans())}))
MESSAGE_FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "session.start": {"audio": audio_formats, "output_audio": audio_formats,
                      "language": languages, "instructions": user_texts,
                      "tools": st.lists(st.fixed_dictionaries(
                          {"name": user_texts}, optional={"description": user_texts,
                                                          "parameters": json_values}), max_size=3)},
    "text": {"text": user_texts},
    "image": {"data": image_data},
    "playback": {"played_ms": _either(counts), "turn_id": _either(counts)},
    "interrupt": {},
    "tool.result": {"call_id": user_texts, "output": user_texts},
    "session.end": {},
}
junk_types = _either(st.sampled_from(["", "Text", "session", "session.ready", "error", "text "])
                     | texts(12))


def message_dicts(types: tuple[str, ...] = CLIENT_TYPES) -> st.SearchStrategy[dict[str, Any]]:
    """Client messages that look right: each known type with its fields (some of them, of the
    right type or not), sometimes with extra fields or another ``type``."""
    base = st.sampled_from(types).flatmap(lambda t: st.fixed_dictionaries(
        {"type": st.just(t)}, optional=MESSAGE_FIELDS[t]))
    extra = st.dictionaries(texts(10), json_values, min_size=1, max_size=2)
    return st.one_of(
        base, base,
        st.tuples(base, extra).map(lambda p: {**p[1], **p[0]}),
        st.tuples(base, junk_types).map(lambda p: {**p[0], "type": p[1]}),
        st.tuples(base, st.booleans()).map(lambda p: {k: v for k, v in p[0].items()
                                                      if k != "type" or p[1]}),
    )


NESTABLE = ["[", '{"a":', '{"type": "text", "text": ', "[{}, "]
adversarial_texts = st.one_of(
    # nesting deeper than any parser's recursion
    st.tuples(st.sampled_from(NESTABLE), st.sampled_from([50, 990, 1_000, 3_000, 12_000])
              | st.integers(10, 12_000)).map(lambda p: p[0] * p[1]),
    # numbers with more digits than Python converts by default
    st.tuples(st.sampled_from(["played_ms", "turn_id", "sample_rate", "x"]),
              st.sampled_from([19, 309, 4300, 4301, 9000]) | st.integers(1, 9000),
              st.sampled_from(["playback", "session.start", "text"])).map(
        lambda p: f'{{"type": "{p[2]}", "{p[0]}": {"7" * p[1]}}}'),
    # JSON edge cases
    st.sampled_from(['{"type": "text", "text": "a", "type": "image"}', "\ufeff{}", "NaN", "",
                     '{"type": "playback", "played_ms": Infinity}', '{"type": null}', "{}",
                     '{"type": "text", "text": "\\ud800"}', '"text"', "[]", "null", "1e999",
                     '{"type": "image"' + " " * 300 + "}"]),
    # over the size limit
    st.integers(MAX_TEXT_MESSAGE_BYTES - 30, MAX_TEXT_MESSAGE_BYTES + 30).map(
        lambda n: json.dumps({"type": "text", "text": "a" * n})),
)


def _dumps(obj: Any) -> str:
    """JSON as UTF-8 text can carry it; lone surrogates escaped (they have no UTF-8)."""
    text = json.dumps(obj, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj)
    return text


client_texts: st.SearchStrategy[str] = st.one_of(
    message_dicts().map(_dumps),
    message_dicts().map(_dumps),
    message_dicts().map(_dumps).flatmap(  # valid-looking JSON, cut or with trailing garbage
        lambda s: st.one_of(st.integers(0, len(s)).map(lambda n: s[:n]),
                            st.text(max_size=8).map(lambda t: s + t))),
    json_values.map(_dumps),
    adversarial_texts,
    st.text(max_size=100),
)


def parses_as_end(raw: object) -> bool:
    """Whether this message is a valid ``session.end`` (the session closes after it)."""
    if not isinstance(raw, str):
        return False
    with contextlib.suppress(Exception):
        return isinstance(parse_client_message(raw), SessionEnd)
    return False


# ---- the app with fake engines on 127.0.0.1 --------------------------------------------------

class FakeVlm:
    """A vision engine that says what size the picture is."""

    name = "fake-vlm"

    async def look(self, image: Image, *, question: str | None = None,
                   priority: Priority = Priority.VISION, session: str | None = None,
                   key: Hashable | None = None) -> str:
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
        assert max(image.shape[:2]) <= KEEP_SIDE and min(image.shape[:2]) >= 1
        return f"a picture of {image.shape[1]}×{image.shape[0]} pixels"


def fake_engines() -> Engines:
    return Engines(FakeVad(), FakeAsr(latency_s=0.01),
                   FakeLlm(reply=REPLY, first_token_s=0.0, token_s=0.0),
                   FakeTts(ms_per_char=1.0, latency_s=0.0), FakeVlm())


# Per-client limits off: one client (127.0.0.1) opens a session per example, the
# well-behaved one types a turn per example and lives as long as a bench run; the limits have
# their own tests.
NO_LIMITS = {"sessions_per_client": 0, "connections_per_minute": 0, "texts_per_second": 0,
             "images_per_second": 0, "vision_asks_per_client": 0, "max_session_s": 0,
             "idle_timeout_s": 0}


def fuzz_settings(**overrides: Any) -> Settings:
    limits = {"limits": NO_LIMITS} if "limits" in Settings.model_fields else {}
    return load_settings(server={"max_sessions": 8}, webrtc={"host_addresses": ["127.0.0.1"]},
                         **limits, **overrides)


class ErrorLog(logging.Handler):
    """Everything logged at ERROR or above: an exception that escaped somewhere."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.dirty = False  # an example failed: what it set off may still be logged

    def fresh(self, runner: asyncio.Runner) -> None:
        """Before an example: forget what a failed one before it left (after letting it land,
        so that it is not blamed on this one)."""
        if self.dirty:
            runner.run(asyncio.sleep(0.2))
            self.dirty = False
        self.records.clear()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def check(self) -> None:
        if self.records:
            text = "\n".join(logging.Formatter().format(r) for r in self.records)
            self.records.clear()
            raise AssertionError(f"errors logged by the server:\n{text}")


@contextlib.contextmanager
def error_log() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Wait for ``predicate`` (polled); the guard only catches a hang."""
    deadline = time.monotonic() + GUARD_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {GUARD_S:.0f} s: {what}")
        await asyncio.sleep(0.005)


class WsPeer:
    """A well-behaved WebSocket client: its events are read as they come."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == WSMsgType.TEXT:
                self.events.append(json.loads(msg.data))

    def done(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "reply.done"]

    async def turn(self) -> None:
        """A typed turn gets its whole reply; the session never saw an error."""
        before = len(self.done())
        await self.ws.send_str(json.dumps({"type": "text", "text": "Are you still there?"}))
        await until(lambda: len(self.done()) > before or self.ws.closed,
                    "the well-behaved session's reply")
        assert not self.ws.closed, "the well-behaved session was closed"
        assert self.done()[-1]["text"] == REPLY
        errors = [e for e in self.events if e["type"] == "error"]
        assert not errors, f"the well-behaved session got errors: {errors}"

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


@dataclass
class App:
    """The real app (fake engines) serving on 127.0.0.1, with a well-behaved session open."""

    app: web.Application
    base: str
    http: aiohttp.ClientSession
    good: WsPeer
    errors: ErrorLog
    offer_sdp: str = ""  # a real aiortc offer (audio + data channel), for the SDP fuzzer

    @property
    def state(self) -> AppState:
        return self.app[STATE]

    async def only_the_good_session_left(self) -> None:
        await until(lambda: len(self.state.sessions) == 1, "the fuzzed session to be forgotten")

    async def after_example(self) -> None:
        await self.only_the_good_session_left()
        await self.good.turn()
        self.errors.check()


@contextlib.asynccontextmanager
async def serve_app(errors: ErrorLog) -> AsyncIterator[App]:
    engines = fake_engines()
    app = create_app(fuzz_settings(), lambda settings, compute: engines)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        await until(lambda: app[STATE].engines is not None, "the fake engines")
        host, port = runner.addresses[0][:2]
        base = f"http://{host}:{port}"
        async with aiohttp.ClientSession() as http:
            good = WsPeer(await http.ws_connect(f"{base}/ws", max_msg_size=0))
            try:
                await until(lambda: bool(good.events), "session.ready")
                yield App(app, base, http, good, errors)
            finally:
                await good.close()
    finally:
        await runner.cleanup()


# ---- the properties ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RawText:
    """A WebSocket text frame of raw bytes (maybe not UTF-8)."""

    data: bytes


WsFrame = str | bytes | RawText
loud_pcm = st.integers(0, 2**32 - 1).map(
    lambda seed: (np.random.default_rng(seed).standard_normal(1600) * 8000).astype("<i2").tobytes())
audio_payloads = st.one_of(
    st.binary(max_size=2000), loud_pcm,
    st.integers(MAX_AUDIO_MESSAGE_BYTES - 2, MAX_AUDIO_MESSAGE_BYTES + 2).map(bytes))


@dataclass(frozen=True)
class WaitForReply:
    """Not a message: wait (a second at most) for the fuzzed session's reply to start, so that
    the messages after it meet a reply that is playing (``playback``, ``interrupt``)."""


@dataclass(frozen=True)
class ServerEnds:
    """Not a message: the server ends the fuzzed session here, as its idle timeout or
    maximum length would, while the client goes on sending what follows."""


WAIT = WaitForReply()
SERVER_ENDS = ServerEnds()
TYPED_TURN = _dumps({"type": "text", "text": "hello"})


def conversation(steps: st.SearchStrategy[list[T]], turn: T, wait: T, end: T,
                 controls: Callable[[str], T]) -> st.SearchStrategy[list[T]]:
    """Steps; half of the time after a typed turn, its reply's start and what a client sends
    while a reply plays (``reply_bursts``); now and then the server ends the session somewhere
    among them. ``controls`` makes a step of a JSON message."""
    def build(p: tuple[list[str] | None, list[T], bool, int]) -> list[T]:
        steps = ([] if p[0] is None else [turn, wait, *map(controls, p[0])]) + p[1]
        return [*steps[:p[3]], end, *steps[p[3]:]] if p[2] else steps
    ends = st.sampled_from([False, False, False, False, False, True])  # in 1 example of 6
    return st.tuples(st.none() | reply_bursts, steps, ends, st.integers(0, 10)).map(build)


# what a client sends while a reply plays: playback reports (any number), interrupts
reply_controls = st.one_of(
    st.fixed_dictionaries({"type": st.just("playback"), "played_ms": counts},
                          optional={"turn_id": counts}),
    st.just({"type": "interrupt"}),
    message_dicts(("playback", "interrupt"))).map(_dumps)
# a few of them, then a playback report (any number) and the stop button
reply_bursts = st.tuples(
    st.lists(reply_controls, max_size=2),
    st.fixed_dictionaries({"type": st.just("playback"), "played_ms": counts}).map(_dumps)).map(
    lambda p: [*p[0], p[1], _dumps({"type": "interrupt"})])
Step = WaitForReply | ServerEnds
ws_frames: st.SearchStrategy[list[WsFrame | Step]] = conversation(st.lists(st.one_of(
    client_texts, client_texts, client_texts, reply_controls, reply_controls,
    message_dicts(("image",)).map(_dumps),
    audio_payloads,
    st.binary(max_size=64).map(RawText), st.just(WAIT)), min_size=1, max_size=8),
    TYPED_TURN, WAIT, SERVER_ENDS, str)


def is_turn(raw: object) -> bool:
    """Whether this message is a valid typed turn (a reply to wait for)."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    with contextlib.suppress(Exception):
        return isinstance(raw, str) and parse_client_message(raw).type == "text"
    return False


async def wait_for_reply(events: Callable[[], list[dict[str, Any]]], start: int,
                         sent: list[Any]) -> int:
    """When a typed turn was among ``sent`` (the messages since the last wait): until its
    ``reply.started`` or an error is among ``events()[start:]``, or a second went by. Returns
    where the next wait looks from, and empties ``sent``."""
    if any(is_turn(m) for m in sent):
        for _ in range(200):  # 200 × 5 ms
            if any(e.get("type") in ("reply.started", "error") for e in events()[start:]):
                break
            await asyncio.sleep(0.005)
    sent.clear()
    return len(events())


async def _send_ws(ws: aiohttp.ClientWebSocketResponse, frame: WsFrame) -> None:
    if isinstance(frame, RawText):
        await ws.send_frame(frame.data, WSMsgType.TEXT)
    elif isinstance(frame, bytes):
        await ws.send_bytes(frame)
    else:
        await ws.send_str(frame)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def outcome(events: list[dict[str, Any]]) -> str:
    """The error codes a fuzzed session was answered with, for the statistics."""
    codes = sorted({e["code"] for e in events if e.get("type") == "error"})
    cut = any(e.get("type") == "reply.interrupted" for e in events)
    return (" ".join(codes) or "no error") + (" (a reply cut)" if cut else "")


def is_sync(event: dict[str, Any]) -> bool:
    return event.get("type") == "error" and SYNC in event.get("message", "")


async def check_ws(app: App, frames: list[WsFrame | Step]) -> str:
    """Frames on a new /ws session: every answer documented, the session alive unless it was
    ended, the other session unharmed."""
    answers: list[dict[str, Any]] = []

    async def read() -> None:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                answers.append(json.loads(msg.data))

    async with app.http.ws_connect(f"{app.base}/ws", max_msg_size=0) as ws:
        ready = json.loads(await ws.receive_str())
        assert ready["type"] == "session.ready"
        reader = asyncio.create_task(read())
        waited, since, over = 0, list[WsFrame](), False
        for frame in frames:
            if isinstance(frame, WaitForReply):
                if not ws.closed and not over:
                    waited = await wait_for_reply(lambda: answers, waited, since)
            elif isinstance(frame, ServerEnds):
                over = True
                if (session := app.state.sessions.get(ready["session_id"])) is not None:
                    session.close()
            elif not ws.closed:
                with contextlib.suppress(ConnectionResetError):  # the server closed it just now
                    await _send_ws(ws, frame)
                since.append(frame)
        if not ws.closed:
            with contextlib.suppress(ConnectionResetError):
                await ws.send_str(json.dumps({"type": SYNC}))
        await until(lambda: ws.closed or any(is_sync(e) for e in answers), "the sync answer")
        synced = any(is_sync(e) for e in answers)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        code = ws.close_code
    answers = [e for e in answers if not is_sync(e)]
    for event in answers:
        check_error_event(event)
    if not synced:  # the server closed the session: only session.end or a WebSocket violation may
        ended = any(parses_as_end(f) or f == SERVER_ENDS for f in frames)
        invalid = any(isinstance(f, RawText) and not _is_utf8(f.data) for f in frames)
        assert ended or (invalid and code == 1007), (
            f"the session was closed (code {code}) by {short(frames)}; answers {short(answers)}")
    await app.after_example()
    return outcome(answers) if synced else f"closed with {code}"


dc_messages: st.SearchStrategy[list[str | bytes | Step]] = conversation(st.lists(
    st.one_of(client_texts, client_texts, reply_controls, st.binary(max_size=200), st.just(WAIT)),
    min_size=1, max_size=8), TYPED_TURN, WAIT, SERVER_ENDS, str)


DC_MAX_MESSAGE = 262_144  # what aiortc's SDP offers (a=max-message-size): it sends no more


class Silence(PcmTrack):
    """A microphone that sends silence."""


@dataclass
class DataChannelPeer:
    """An aiortc peer connected to the app over POST /offer, with its ``events`` channel."""

    pc: RTCPeerConnection
    channel: Any
    session_id: str
    events: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    async def connect(cls, app: App) -> DataChannelPeer:
        pc = RTCPeerConnection()
        channel = pc.createDataChannel(EVENTS_LABEL)
        pc.addTrack(Silence())
        await pc.setLocalDescription(await pc.createOffer())
        async with app.http.post(f"{app.base}/offer", json={
                "sdp": pc.localDescription.sdp, "type": "offer"}) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        peer = cls(pc, channel, answer["session_id"])
        channel.on("message", peer._on_message)
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        await until(lambda: bool(peer.events), "session.ready on the data channel")
        assert peer.events[0]["type"] == "session.ready"
        return peer

    def _on_message(self, raw: str | bytes) -> None:
        assert isinstance(raw, str), "the server sent binary on the events channel"
        self.events.append(json.loads(raw))

    @property
    def alive(self) -> bool:
        return self.channel.readyState == "open" and self.pc.connectionState == "connected"

    async def close(self) -> None:
        await self.pc.close()


async def check_datachannel(app: App, peer: DataChannelPeer,
                            messages: list[str | bytes | Step]) -> str:
    """Messages on a live data channel: every answer documented; the session goes on (a typed
    turn is answered) unless it was ended."""
    start = waited = len(peer.events)
    since: list[str | bytes] = []
    for raw in messages:
        if isinstance(raw, WaitForReply):
            if peer.session_id in app.state.sessions:
                waited = await wait_for_reply(lambda: peer.events, waited, since)
        elif isinstance(raw, ServerEnds):
            if (session := app.state.sessions.get(peer.session_id)) is not None:
                session.close()
        elif peer.channel.readyState == "open" and len(
                raw.encode() if isinstance(raw, str) else raw) <= DC_MAX_MESSAGE:
            peer.channel.send(raw)
            since.append(raw)
    if peer.channel.readyState == "open":
        peer.channel.send(json.dumps({"type": SYNC}))

    def synced() -> bool:
        return any(e.get("type") == "error" and SYNC in e.get("message", "")
                   for e in peer.events[start:])
    ended = any(parses_as_end(m) or m == SERVER_ENDS for m in messages)
    await until(lambda: synced() or (ended and peer.session_id not in app.state.sessions),
                "the answer to the sync message")
    answers = [e for e in peer.events[start:] if SYNC not in e.get("message", "")]
    for event in answers:
        check_error_event(event)
    for raw in [] if ended else messages:  # over WebRTC these two are refused, politely
        with contextlib.suppress(ProtocolError):
            if isinstance(raw, str) and parse_client_message(raw).type in ("image", "session.start"):
                assert any(e.get("code") == "unsupported" for e in answers), answers
    if ended:
        await until(lambda: peer.session_id not in app.state.sessions, "the ended session to go")
    else:
        assert peer.session_id in app.state.sessions, "the fuzzed WebRTC session died"
        before = sum(e["type"] == "reply.done" for e in peer.events)
        peer.channel.send(json.dumps({"type": "text", "text": "and you?"}))
        await until(lambda: sum(e["type"] == "reply.done" for e in peer.events) > before,
                    "the fuzzed WebRTC session's own reply")
    await app.good.turn()
    app.errors.check()
    return "ended" if ended else outcome(answers)


# SDP mutations of a real offer

@st.composite
def mutated_sdp(draw: st.DrawFn, sdp: str) -> str:
    lines = sdp.split("\r\n")
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        match draw(st.sampled_from(["drop", "dup", "replace", "numbers", "media", "many",
                                    "truncate", "newlines"])):
            case "drop" if lines:
                del lines[i]
            case "dup" if lines:
                lines.insert(i, lines[i])
            case "replace" if lines:
                lines[i] = draw(st.text(max_size=40) | st.sampled_from(
                    ["m=audio 9 UDP/TLS/RTP/SAVPF", "a=sendonly", "a=inactive", "a=recvonly",
                     "a=rtpmap:111 opus/0/0", "a=fingerprint:sha-256 00", "a=setup:holdconn",
                     "a=ice-ufrag:", "c=IN IP4 999.1.1.1", "a=candidate:x", "v=1",
                     "m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "a=mid:", "a=group:"]))
            case "numbers" if lines:
                lines[i] = re.sub(r"\d+", lambda _: str(draw(
                    st.sampled_from([0, -1, 65536, 2**31, 2**64, 10**30]) | st.integers())),
                                  lines[i], count=1)
            case "media":
                lines = [re.sub(r"^m=audio", draw(st.sampled_from(
                    ["m=video", "m=text", "m=audio", "m=application"])), ln) for ln in lines]
            case "many":  # the audio section again and again (more transceivers)
                start = next((k for k, ln in enumerate(lines) if ln.startswith("m=audio")), 0)
                end = next((k for k, ln in enumerate(lines) if k > start and
                            ln.startswith("m=")), len(lines))
                lines[end:end] = lines[start:end] * draw(st.integers(1, 6))
            case "truncate":
                return "\r\n".join(lines)[:draw(st.integers(0, len(sdp)))]
            case "newlines":
                return "\n".join(lines)
    return "\r\n".join(lines)


def offer_bodies(sdp: str) -> st.SearchStrategy[tuple[str, bytes]]:
    """(content type, body) of a POST /offer."""
    sdps = st.one_of(st.just(sdp), mutated_sdp(sdp), mutated_sdp(sdp), mutated_sdp(sdp),
                     texts(200), json_values, st.just("v=0\r\n" * (MAX_OFFER_BYTES // 5)))
    fields = {"sdp": sdps, "type": _either(st.sampled_from(["offer", "answer", "pranswer", ""])),
              "language": languages, "instructions": user_texts,
              "echo_cancellation": _either(st.booleans())}
    offers = st.fixed_dictionaries({"sdp": sdps, "type": st.just("offer")}, optional={
        k: v for k, v in fields.items() if k not in ("sdp", "type")})
    extra = st.dictionaries(texts(10), json_values, max_size=2)
    clean = st.fixed_dictionaries({"sdp": sdps, "type": st.just("offer")})
    json_bodies = st.one_of(clean, clean, offers, offers,
                            st.tuples(offers, extra).map(lambda p: {**p[1], **p[0]}),
                            st.fixed_dictionaries({}, optional=fields), json_values)
    as_json = json_bodies.map(lambda o: _dumps(o).encode())
    raw = st.one_of(as_json, as_json, as_json,
                    adversarial_texts.map(str.encode), st.binary(max_size=300),
                    st.integers(MAX_OFFER_BYTES - 2, MAX_OFFER_BYTES + 2).map(
                        lambda n: b'{"sdp": "' + b"a" * n + b'", "type": "offer"}'))
    types = st.just("application/json") | st.sampled_from(
        ["text/plain", "application/sdp", "application/json; charset=bogus"])
    return st.tuples(types, raw)


async def check_offer(app: App, body: tuple[str, bytes]) -> str:
    content_type, data = body
    async with app.http.post(f"{app.base}/offer", data=data,
                             headers={"Content-Type": content_type}) as r:
        assert r.content_type == "application/json", f"{r.status}: {await r.text()}"
        answer = await r.json()
        status = r.status
    if status == 200:
        assert answer["type"] == "answer" and answer["sdp"], answer
        assert "m=audio" in answer["sdp"]
        session = app.state.sessions.get(answer["session_id"])
        assert session is not None
        session.close()  # the peer never comes: end it as if it left
    else:
        assert answer.get("error") in DOC.offer.get(status, ()), f"{status}: {answer}"
        assert isinstance(answer.get("message"), str) and answer["message"], answer
    await app.after_example()
    return f"{status} {answer.get('error', 'answer')}"


async def aiortc_offer() -> str:
    """A real offer: a sendrecv audio transceiver and the events data channel."""
    pc = RTCPeerConnection()
    pc.createDataChannel(EVENTS_LABEL)
    pc.addTrack(Silence())
    await pc.setLocalDescription(await pc.createOffer())
    sdp: str = pc.localDescription.sdp
    await pc.close()
    return sdp


# /v1/vision/ask forms

MultipartPart = tuple[str, bytes, str | None, str | None]  # name, data, filename, content type


def _multipart(parts: list[MultipartPart], boundary: str = "fuzzboundary") -> bytes:
    out = b""
    for name, data, filename, content_type in parts:
        out += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if content_type is not None:
            out += f"Content-Type: {content_type}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


part_headers = st.sampled_from([None, "image/jpeg", "image/png", "text/plain; charset=utf-8",
                                "text/plain; charset=bogus", "application/octet-stream"])
image_parts: st.SearchStrategy[MultipartPart] = st.tuples(
    st.just("image"), image_bytes, st.sampled_from([None, "cat.jpg", ""]), part_headers)
multipart_parts: st.SearchStrategy[MultipartPart] = st.one_of(
    image_parts,
    st.tuples(st.just("question"), st.one_of(st.text(max_size=40), st.just("?" * 1001)).map(
        str.encode), st.none(), part_headers),
    st.tuples(st.just("question"), st.binary(max_size=40), st.none(), part_headers),
    st.tuples(st.text(st.characters(codec="ascii", exclude_characters='"\r\n'), max_size=8),
              st.binary(max_size=40), st.none(), part_headers),
)


@st.composite
def multipart_forms(draw: st.DrawFn) -> tuple[str, bytes]:
    parts = draw(st.lists(multipart_parts, max_size=3))
    if draw(st.integers(0, 4)):  # mostly with an image
        parts.append(draw(image_parts))
    body = _multipart(draw(st.permutations(parts)))
    match draw(st.sampled_from(["fine", "fine", "fine", "fine", "cut", "no_boundary",
                                "other_boundary", "transfer_encoding", "garbage"])):
        case "cut":
            body = body[:draw(st.integers(0, len(body)))]
        case "no_boundary":
            return "multipart/form-data", body
        case "other_boundary":
            printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
            return "multipart/form-data; boundary=" + draw(st.text(printable, max_size=10)), body
        case "transfer_encoding":
            body = body.replace(b"Content-Disposition", draw(st.sampled_from(
                [b"Content-Transfer-Encoding: bogus\r\nContent-Disposition",
                 b"Content-Transfer-Encoding: base64\r\nContent-Disposition",
                 b"Content-Encoding: gzip\r\nContent-Disposition",
                 b"Content-Encoding: bogus\r\nContent-Disposition"])), 1)
        case "garbage":
            body = draw(st.binary(max_size=300))
    return "multipart/form-data; boundary=fuzzboundary", body


vision_json = st.one_of(
    st.fixed_dictionaries({"image": base64_images()}, optional={"question": user_texts}),
    st.fixed_dictionaries({"image": image_data}, optional={"question": user_texts}),
    st.fixed_dictionaries({}, optional={"image": image_data, "question": user_texts,
                                        "extra": json_values}),
    json_values)
vision_forms: st.SearchStrategy[tuple[str, bytes]] = st.one_of(
    multipart_forms(), multipart_forms(),
    st.tuples(st.sampled_from(["application/json", "application/json; charset=utf-16",
                               "application/json; charset=bogus", "text/plain", ""]),
              vision_json.map(lambda o: _dumps(o).encode())),
    st.tuples(st.sampled_from(["application/json", "application/octet-stream"]),
              st.one_of(adversarial_texts.map(str.encode), st.binary(max_size=200))),
)


async def check_vision(app: App, form: tuple[str, bytes]) -> str:
    content_type, data = form
    headers = {"Content-Type": content_type} if content_type else {}
    async with app.http.post(f"{app.base}/v1/vision/ask", data=data, headers=headers) as r:
        assert r.content_type == "application/json", f"{r.status}: {await r.text()}"
        answer = await r.json()
        status = r.status
    if status == 200:
        assert answer["answer"] == REPLY and answer["model"] == "fake-vlm", answer
        assert answer["observations"][0].startswith("a picture of"), answer
    else:
        assert status in DOC.vision_statuses - {404}, f"{status}: {answer}"  # vision is on
        assert answer.get("error") in INPUT_CODES, f"{status}: {answer}"
    await app.after_example()
    return f"{status} {answer.get('error', 'answer')}"


# MQTT

@dataclass
class Mqtt:
    """The MQTT bridge of an app (fake engines) without a broker: messages go in through
    ``dispatch``, what it publishes is read from its outbox."""

    bridge: MqttBridge
    errors: ErrorLog
    published: dict[str, list[bytes]] = field(default_factory=dict)
    examples: int = 0

    @property
    def state(self) -> AppState:
        return self.bridge.state

    def events(self, device: str) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.published.get(f"{PREFIX}/{device}/events", [])]

    async def drain(self) -> None:
        while True:
            name, payload, _, _ = await self.bridge.outbox.get()  # (topic, payload, qos, retain)
            self.published.setdefault(name, []).append(payload)

    async def good_turn(self) -> None:
        before = sum(e["type"] == "reply.done" for e in self.events(GOOD_DEVICE))
        self.bridge.dispatch(f"{PREFIX}/{GOOD_DEVICE}/control",
                             b'{"type": "text", "text": "Are you still there?"}')
        await until(lambda: sum(e["type"] == "reply.done" for e in self.events(GOOD_DEVICE))
                    > before, "the well-behaved device's reply")
        errors = [e for e in self.events(GOOD_DEVICE) if e["type"] == "error"]
        assert not errors, f"the well-behaved device got errors: {errors}"

    async def after_example(self) -> None:
        for device, adapter in list(self.bridge.devices.items()):
            if device != GOOD_DEVICE and not adapter.ended:
                adapter.expire(0)
        await until(lambda: len(self.state.sessions) == 1, "the fuzzed device to be forgotten")
        await self.good_turn()
        self.errors.check()


PREFIX = "vx/fuzz"
GOOD_DEVICE = "good"
START = b'{"type": "session.start"}'


@contextlib.asynccontextmanager
async def serve_mqtt(errors: ErrorLog) -> AsyncIterator[Mqtt]:
    settings = fuzz_settings(mqtt={"url": "mqtt://127.0.0.1:1", "prefix": PREFIX})
    compute = Compute()
    state = AppState(settings, compute, session_config(settings), engines=fake_engines())
    bridge = MqttBridge(state, settings.mqtt)
    bridge.connected = True  # as if on the broker: what it publishes waits in its outbox
    mqtt = Mqtt(bridge, errors)
    try:
        async with bridge.serving():
            drain = asyncio.create_task(mqtt.drain())
            bridge.dispatch(f"{PREFIX}/{GOOD_DEVICE}/control", START)
            await until(lambda: bool(mqtt.events(GOOD_DEVICE)), "the good device's session")
            try:
                yield mqtt
            finally:
                drain.cancel()
    finally:
        compute.close()


control_payloads = st.one_of(client_texts.map(str.encode), client_texts.map(str.encode),
                             message_dicts(("session.start",)).map(lambda o: _dumps(o).encode()),
                             st.binary(max_size=100))
numbered_audio = st.tuples(st.integers(0, SEQ_MOD - 1), audio_payloads).map(
    lambda p: pack_frame(*p))
# wait: as WaitForReply; end: as ServerEnds (the device's session expires there)
MqttStep = tuple[Literal["control", "audio/in", "wait", "end"], bytes]
mqtt_steps = st.tuples(
    st.sampled_from([None, START, b'{"type": "session.start", "audio": {"sequence": true}}',
                     b'{"type": "session.start", "audio": {"sample_rate": 48000, "channels": 2, '
                     b'"sequence": true}, "output_audio": {"sequence": true}}']),
    conversation(st.lists(st.one_of(
        st.tuples(st.just("control"), control_payloads),
        st.tuples(st.just("control"), reply_controls.map(str.encode)),
        st.tuples(st.just("audio/in"), audio_payloads | numbered_audio),
        st.just(("wait", b""))), min_size=1, max_size=6),
        ("control", TYPED_TURN.encode()), ("wait", b""), ("end", b""),
        lambda m: ("control", m.encode())))


async def check_mqtt(mqtt: Mqtt, steps: tuple[bytes | None, list[MqttStep]]) -> str:
    """A fresh device sends these; every answer on its events topic is documented, and the
    well-behaved device keeps its conversation."""
    mqtt.examples += 1
    mqtt.published.clear()
    device = f"fuzz-{mqtt.examples}"
    start, messages = steps
    sent: list[MqttStep] = ([("control", start)] if start is not None else []) + messages
    waited, since = 0, list[bytes]()
    for kind, payload in sent:
        if kind == "wait":
            if (adapter := mqtt.bridge.devices.get(device)) is not None and not adapter.ended:
                waited = await wait_for_reply(lambda: mqtt.events(device), waited, since)
        elif kind == "end":
            if (adapter := mqtt.bridge.devices.get(device)) is not None and not adapter.ended:
                adapter.expire(mqtt.bridge.settings.idle_timeout_s)
        else:
            mqtt.bridge.dispatch(f"{PREFIX}/{device}/{kind}", payload)
            since.append(payload if kind == "control" else b"")
    adapter = mqtt.bridge.devices.get(device)
    if adapter is not None:  # its messages are read by its own task: wait for them to be read
        adapter.offer("control", json.dumps({"type": SYNC}).encode())
        await until(lambda: adapter.ended or any(SYNC in e.get("message", "")
                                                 for e in mqtt.events(device)),
                    "the answer to the sync message")
    codes = INPUT_CODES | DOC.mqtt_codes
    answers = [e for e in mqtt.events(device) if SYNC not in e.get("message", "")]
    for event in answers:
        if event.get("code") != "expired" or ("end", b"") not in sent:  # (fatal, as documented)
            check_error_event(event, codes)
    for name in mqtt.published:
        assert name.startswith(f"{PREFIX}/"), name
    await mqtt.after_example()
    return outcome(answers)


topic_levels = st.one_of(st.sampled_from(["control", "audio/in"]), st.sampled_from(
    ["events", "audio/out", "", "+", "#", "control/x", "audio", "$SYS"]), st.text(max_size=12))
device_ids = st.one_of(st.sampled_from(["kitchen", "a", "_", "x" * 64, "car:1@home.lan"]),
                       st.sampled_from(["$bad", "a/b", "a b", "é", "+", "#", "-x", "x" * 65]),
                       st.text(max_size=20))
mqtt_topics = st.lists(st.tuples(
    st.one_of(st.tuples(device_ids, topic_levels).map(lambda p: f"{PREFIX}/{p[0]}/{p[1]}"),
              st.text(max_size=30)),
    control_payloads), min_size=1, max_size=6)


async def check_mqtt_topics(mqtt: Mqtt, messages: list[tuple[str, bytes]]) -> str:
    """Messages on any topic at all: events go only to valid device ids, documented."""
    mqtt.published.clear()
    for name, payload in messages:
        if not name.startswith(f"{PREFIX}/{GOOD_DEVICE}/"):  # the well-behaved device's own
            mqtt.bridge.dispatch(name, payload)
    for adapter in list(mqtt.bridge.devices.values()):
        if adapter.device_id != GOOD_DEVICE:
            adapter.offer("control", json.dumps({"type": SYNC}).encode())
            await until(lambda a=adapter: a.ended or any(
                SYNC in e.get("message", "") for e in mqtt.events(a.device_id)), "the sync")
    codes = INPUT_CODES | DOC.mqtt_codes
    answered = sorted({name.split("/")[-2] for name in mqtt.published} - {GOOD_DEVICE})
    for name, payloads in mqtt.published.items():
        prefix, _, rest = name.partition(f"{PREFIX}/")
        device, _, kind = rest.partition("/")
        assert not prefix and valid_device_id(device) and kind in ("events", "audio/out"), name
        if kind == "events" and device != GOOD_DEVICE:
            for payload in payloads:
                event = json.loads(payload)
                if SYNC not in event.get("message", "") and event.get("code") != "expired":
                    check_error_event(event, codes)
    await mqtt.after_example()
    return f"{len(answered)} devices answered"


# ---- pure parsers ---------------------------------------------------------------------------

def check_parser(raw: str) -> str:
    try:
        message = parse_client_message(raw)
    except ProtocolError as e:
        assert e.code in INPUT_CODES, f"undocumented code {e.code}"
        assert e.message
        return e.code
    assert message.type in CLIENT_TYPES
    return f"valid {message.type}"


def check_offer_parser(raw: bytes) -> str:
    try:
        offer = parse_offer(raw)
    except ProtocolError as e:
        assert e.code in DOC.offer[413 if e.code == "too_large" else 400], e.code
        return e.code
    assert offer.type == "offer" and offer.sdp
    return "valid"


def check_image(data: str) -> str:
    try:
        image = decode_base64_image(data)
    except ProtocolError as e:
        assert e.code in ("bad_image", "too_large"), e.code
        return e.code
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    assert 1 <= min(image.shape[:2]) and max(image.shape[:2]) <= KEEP_SIDE
    return "decoded"


# ---- running them -----------------------------------------------------------------------------

Outcomes = collections.Counter[str]  # how the examples were answered (shrinking included)


@dataclass(frozen=True)
class Property:
    name: str
    what: str
    run: Callable[[int], Outcomes]  # examples asked → their outcomes; raises on a failure


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without hypothesis's warning about the repr of 100 kB inputs (built for its reports)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Generating overly large repr", HypothesisWarning)
        yield


def _record(outcomes: Outcomes, label: str) -> None:
    outcomes[label] += 1
    hypothesis.event(label)  # pytest --hypothesis-show-statistics lists them


def _pure(strategy: st.SearchStrategy[T], check: Callable[[T], str]) -> Callable[[int], Outcomes]:
    def run(examples: int) -> Outcomes:
        outcomes: Outcomes = collections.Counter()

        @_settings(examples)
        @given(strategy)
        def prop(value: T) -> None:
            _record(outcomes, check(value))
        with _quiet():
            prop()
        return outcomes
    return run


H = TypeVar("H")


def _served(serve: Callable[[ErrorLog], contextlib.AbstractAsyncContextManager[H]],
            strategy: Callable[[asyncio.Runner, H], st.SearchStrategy[T]],
            check: Callable[[H, T], Awaitable[str]]) -> Callable[[int], Outcomes]:
    """A property over a served harness (one per run, shared by its examples), each example
    run to completion in the harness's event loop."""
    def run(examples: int) -> Outcomes:
        outcomes: Outcomes = collections.Counter()
        with asyncio.Runner() as runner, error_log() as errors, _quiet():
            stack = contextlib.AsyncExitStack()
            harness = runner.run(stack.enter_async_context(serve(errors)))
            try:
                @_settings(examples)
                @given(strategy(runner, harness))
                def prop(value: T) -> None:
                    errors.fresh(runner)
                    try:
                        _record(outcomes, runner.run(check(harness, value)))
                    except BaseException:
                        errors.dirty = True
                        raise
                prop()
            finally:
                runner.run(stack.aclose())
            errors.check()
        return outcomes
    return run


def _with_offer(runner: asyncio.Runner, app: App) -> st.SearchStrategy[tuple[str, bytes]]:
    app.offer_sdp = runner.run(aiortc_offer())
    return offer_bodies(app.offer_sdp)


def _datachannel(examples: int) -> Outcomes:
    """One WebRTC session carries the examples; a new one after a ``session.end``."""
    outcomes: Outcomes = collections.Counter()
    with asyncio.Runner() as runner, error_log() as errors, _quiet():
        stack = contextlib.AsyncExitStack()
        app = runner.run(stack.enter_async_context(serve_app(errors)))
        peers: list[DataChannelPeer] = []
        try:
            @_settings(examples)
            @given(dc_messages)
            def prop(messages: list[str | bytes | Step]) -> None:
                errors.fresh(runner)
                if not peers or not peers[-1].alive:
                    peers.append(runner.run(DataChannelPeer.connect(app)))
                try:
                    label = runner.run(check_datachannel(app, peers[-1], messages))
                except BaseException:
                    errors.dirty = True
                    runner.run(peers[-1].close())  # the next example gets a fresh session
                    raise
                if label == "ended":
                    runner.run(peers[-1].close())
                _record(outcomes, label)
            prop()
        finally:
            for peer in peers:
                runner.run(peer.close())
            runner.run(stack.aclose())
        errors.check()
    return outcomes


PROPERTIES: dict[str, Property] = {p.name: p for p in [
    Property("parser", "client JSON messages (WebSocket, data channel, MQTT control)",
             _pure(client_texts, check_parser)),
    Property("offer_parser", "POST /offer bodies, parsed",
             _pure(offer_bodies("v=0\r\n").map(lambda b: b[1]), check_offer_parser)),
    Property("images", "base64 / data: URL images, decoded",
             _pure(st.one_of(base64_images(), image_data.filter(lambda d: isinstance(d, str))),
                   check_image)),
    Property("ws", "/ws text and binary frames, next to a well-behaved session",
             _served(serve_app, lambda runner, app: ws_frames, check_ws)),
    Property("datachannel", "messages on a WebRTC session's events data channel",
             _datachannel),
    Property("offer", "POST /offer: JSON bodies and mutated SDP", _served(
        serve_app, _with_offer, check_offer)),
    Property("vision", "POST /v1/vision/ask: multipart and JSON forms",
             _served(serve_app, lambda runner, app: vision_forms, check_vision)),
    Property("mqtt", "MQTT control and audio payloads of a device, next to a well-behaved one",
             _served(serve_mqtt, lambda runner, mqtt: mqtt_steps, check_mqtt)),
    Property("mqtt_topics", "MQTT messages on random topics",
             _served(serve_mqtt, lambda runner, mqtt: mqtt_topics, check_mqtt_topics)),
]}
