"""End to end over MQTT: a real mosquitto (per-device passwords and ACLs), the real server with
the packaged models, test devices speaking the topic protocol of docs/PROTOCOL.md."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from client.common.acoustics import EchoRoom, live_microphone
from client.common.eventlog import EventLog, TurnRecord
from client.common.links import MqttLink
from client.common.wavio import write_wav
from server.launch import free_port, spawn_server
from server.mqtt import broker_client
from server.settings import load_settings
from streaming.audio import Float32Array, float_to_pcm16, resample
from streaming.mqtt import pack_frame, unpack_frame
from tests.broker import SERVER_USER, Broker
from tests.conftest import ARTIFACTS, MQTT_IDLE_PREFIX, MQTT_PREFIX, Server, speak, until

FRAME_MS = 20


class Device(EventLog):
    """A device on the broker (username = device id): its events and reply audio are collected
    like the WebSocket client's; it can reconnect (a broker restart) and keep its EventLog."""

    def __init__(self, broker: Broker, device_id: str, *, prefix: str = MQTT_PREFIX) -> None:
        super().__init__()
        self.broker, self.device_id, self.prefix = broker, device_id, prefix
        self.out_sequence = False  # audio/out carries the sequence header
        self.out_frames: list[int] = []  # their sequence numbers, in arrival order
        self.foreign: list[str] = []  # topics of messages that were not for this device
        self.last_audio_at = 0.0  # client clock of the last reply audio message
        self.client: aiomqtt.Client | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._reader: asyncio.Task[None] | None = None

    def topic(self, kind: str, device_id: str | None = None) -> str:
        return f"{self.prefix}/{device_id or self.device_id}/{kind}"

    async def __aenter__(self) -> Device:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()
        await self.mark_closed()
        ARTIFACTS.mkdir(exist_ok=True)  # what the device saw, for when a test fails
        with (ARTIFACTS / f"mqtt-{self.device_id}.jsonl").open("w") as f:
            f.writelines(json.dumps(e) + "\n" for e in self.events)

    async def connect(self, timeout_s: float = 30) -> None:
        """Connect (retrying while the broker is down) and subscribe to this device's topics."""
        async def attempt() -> None:
            while True:
                stack = contextlib.AsyncExitStack()
                try:
                    self.client = await stack.enter_async_context(aiomqtt.Client(
                        "127.0.0.1", self.broker.port, username=self.device_id,
                        password=self.broker.passwords[self.device_id],
                        identifier=f"test-{self.device_id}"))
                    self._stack = stack
                    return
                except aiomqtt.MqttError:
                    await stack.aclose()
                    await asyncio.sleep(0.2)
        await asyncio.wait_for(attempt(), timeout_s)
        assert self.client is not None
        await self.client.subscribe(self.topic("events"), qos=1)
        await self.client.subscribe(self.topic("audio/out"), qos=0)
        self._reader = asyncio.create_task(self._read(self.client))

    async def reconnect(self) -> None:
        """After the broker went away: once the reader has seen it go, connect again."""
        if self._reader is not None:
            await asyncio.wait_for(asyncio.shield(self._reader), 30)
        await self.disconnect()
        await self.connect()

    async def disconnect(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._stack is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._stack.aclose()
        self.client = self._stack = self._reader = None

    async def _read(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):  # the broker went away: reconnect() resumes
            async for message in client.messages:
                payload = message.payload
                assert isinstance(payload, bytes)
                if message.topic.matches(self.topic("events")):
                    await self.add_event(json.loads(payload))
                elif not message.topic.matches(self.topic("audio/out")):
                    self.foreign.append(str(message.topic))
                elif self.out_sequence:
                    seq, pcm = unpack_frame(payload)
                    self.out_frames.append(seq)
                    await self.add_audio(pcm)
                else:
                    await self.add_audio(payload)

    async def add_audio(self, pcm: bytes) -> None:
        self.last_audio_at = time.monotonic()
        await super().add_audio(pcm)

    async def spoken_reply(self, timeout_s: float = 90, quiet_s: float = 1.5) -> TurnRecord:
        """The next finished reply, once its audio stopped coming (reply audio is paced in real
        time, so most of it arrives after ``reply.done``)."""
        reply = await self.wait_reply(timeout_s)

        async def quiet() -> None:
            while (wait := self.last_audio_at + quiet_s - time.monotonic()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(wait)
        await asyncio.wait_for(quiet(), timeout_s)
        return reply

    def count(self, kind: str) -> int:
        return sum(e["type"] == kind for e in self.events)

    async def send(self, message: dict[str, Any], device_id: str | None = None) -> None:
        await self.publish(self.topic("control", device_id), json.dumps(message).encode(), 1)

    async def publish(self, name: str, payload: bytes, qos: int = 0) -> None:
        assert self.client is not None
        await self.client.publish(name, payload, qos=qos)

    async def start(self, timeout_s: float = 60, **fields: Any) -> dict[str, Any]:
        """``session.start`` until a new ``session.ready`` answers (the server may not be
        subscribed yet, after a broker restart); returns it."""
        before = self.count("session.ready")
        self.out_sequence = bool(fields.get("output_audio", {}).get("sequence"))

        async def ask() -> None:
            while self.count("session.ready") == before:
                await self.send({"type": "session.start", **fields})
                with contextlib.suppress(TimeoutError):
                    await self.wait_for(lambda: self.count("session.ready") > before, 2)
        await asyncio.wait_for(ask(), timeout_s)
        return next(e for e in reversed(self.events) if e["type"] == "session.ready")

    async def error(self, code: str, timeout_s: float = 30) -> dict[str, Any]:
        """Wait for an error event with this code (one not seen before)."""
        seen = sum(e["code"] == code for e in self.errors)
        await self.wait_for(lambda: sum(e["code"] == code for e in self.errors) > seen, timeout_s)
        return next(e for e in reversed(self.errors) if e["code"] == code)

    async def say(self, text: str) -> None:
        await self.send({"type": "text", "text": text})

    async def stream(self, payloads: list[bytes]) -> None:
        """Audio messages paced in real time, one per 20 ms."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for k, payload in enumerate(payloads):
            await asyncio.sleep(max(0.0, start + k * FRAME_MS / 1000 - loop.time()))
            await self.publish(self.topic("audio/in"), payload)


def frames(audio: Float32Array, rate: int, trailing_silence_ms: int = 1500) -> list[bytes]:
    """Mono audio as 16 kHz PCM s16le, 20 ms per message, with trailing silence."""
    x = resample(audio, rate, 16_000)
    x = np.concatenate([x, np.zeros(16 * trailing_silence_ms, dtype=np.float32)])
    step = 16 * FRAME_MS
    return [float_to_pcm16(x[i:i + step]) for i in range(0, x.size, step)]


def health(server: Server) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.http}/healthz") as r:
        body: dict[str, Any] = json.load(r)
    return body


# ---- a spoken question ----------------------------------------------------------------------


async def test_spoken_question_gets_transcript_and_reply_audio(  # type: ignore[no-untyped-def]
        mqtt_server: Server, broker: Broker, voice, transcriber) -> None:
    assert health(mqtt_server)["mqtt"]["connected"] is True
    audio, rate = speak(voice, "What is the capital of France?")
    async with Device(broker, "dev-1") as device:
        ready = await device.start(language="en")
        assert ready["resumed"] is False and ready["input"]["sample_rate"] == 16000
        await device.stream(frames(audio, rate))
        reply = await device.spoken_reply()
        await device.send({"type": "session.end"})
    assert reply.transcript is not None and "capital of france" in reply.transcript.lower()
    assert "paris" in reply.text.lower()
    assert any(e["type"] == "transcript" and not e["final"] for e in device.events)
    ARTIFACTS.mkdir(exist_ok=True)
    write_wav(ARTIFACTS / "reply-mqtt.wav", bytes(reply.audio), 24000)
    heard = transcriber(bytes(reply.audio), 24000)
    assert "paris" in heard.lower(), heard


async def test_a_speaker_without_echo_cancellation_never_interrupts_itself(
        mqtt_server: Server, broker: Broker) -> None:
    """A smart speaker streams its microphone all along and plays the reply as it arrives,
    120 ms late and loud, into a small room: the server's echo handling keeps the reply from
    cutting itself off or answering its own words (issue 17)."""
    async with Device(broker, "dev-12") as device:
        ready = await device.start(language="en", audio={"echo_cancellation": False})
        rate = ready["output"]["sample_rate"]
        per_ms = rate * 2 / 1000  # bytes of reply audio per ms
        room = EchoRoom(rate, delay_ms=120, gain_db=-3, noise_db=-50)
        mic = asyncio.create_task(live_microphone(
            device, room, lambda pcm: device.publish(device.topic("audio/in"), pcm)))
        try:
            await device.say("Tell me about the history of Rome in three sentences.")
            reply = await device.spoken_reply(timeout_s=120)
            await until(lambda: device.played_ms(reply.turn_id) >= len(reply.audio) / per_ms - 20
                        or reply.interrupted is not None, timeout_s=60)
            await asyncio.sleep(1.5)  # the echo tail is over
        finally:
            mic.cancel()
            await asyncio.gather(mic, return_exceptions=True)
        await device.send({"type": "session.end"})
    assert reply.interrupted is None, reply.interrupted
    assert not [e for e in device.events if e["type"] == "transcript" and e["final"]]
    assert len(reply.audio) / per_ms > 5000


# ---- one device's garbage is its own problem ------------------------------------------------

BAD_CONTROL: list[tuple[bytes, str]] = [
    (b"not json at all", "bad_message"),
    (b"\xff\xfe\xfd", "bad_message"),
    (b'{"type": "dance"}', "unknown_type"),
    (b'{"type": "text", "text": ""}', "bad_message"),
    (b'{"type": "session.start", "audio": {"sample_rate": 7000}}', "unsupported"),
    (json.dumps({"type": "text", "text": "x" * 70000}).encode(), "too_large"),
]


async def test_malformed_payloads_and_a_flood_affect_only_that_device(
        mqtt_server: Server, broker: Broker) -> None:
    async with Device(broker, "dev-2") as bystander, Device(broker, "dev-3") as bad:
        await bystander.start()
        # before any session.start: audio and messages are answered, no session is opened
        await bad.publish(bad.topic("audio/in"), b"\x00" * 640)
        assert (await bad.error("no_session"))["fatal"] is False
        await bad.start()
        for raw, code in BAD_CONTROL:
            await bad.publish(bad.topic("control"), raw, 1)
            assert (await bad.error(code))["fatal"] is False, raw[:40]
        await bad.publish(bad.topic("audio/in"), b"\x01\x02\x03")  # not whole s16 samples
        await bad.error("bad_audio")
        await bad.publish(bad.topic("audio/in"), b"\x00" * 300_000)
        await bad.error("too_large")
        # a flood of audio, faster than any session takes it, while the bystander converses
        await bystander.say("What is two plus two?")
        flood = [bad.publish(bad.topic("audio/in"), b"\x00" * 3200) for _ in range(3000)]
        await asyncio.gather(*flood)
        reply = await bystander.wait_reply(timeout_s=90)
        assert reply.text and not bystander.errors
        # and the flooding device's own session still works
        await bad.say("Say hello.")
        assert (await bad.wait_reply(timeout_s=90)).text
        for device in (bystander, bad):
            await device.send({"type": "session.end"})
    assert all(e["code"] in {c for _, c in BAD_CONTROL} | {"no_session", "bad_audio", "too_large",
                                                          "busy"} for e in bad.errors)


# ---- ACLs -------------------------------------------------------------------------------------


async def test_acl_keeps_a_device_to_its_own_topics(mqtt_server: Server, broker: Broker) -> None:
    with pytest.raises(aiomqtt.MqttError):  # a device's password is its own
        async with aiomqtt.Client("127.0.0.1", broker.port, username="dev-5",
                                  password=broker.passwords["dev-4"]):
            pass
    async with Device(broker, "dev-4") as intruder, Device(broker, "dev-5") as victim:
        # mosquitto grants the subscriptions but delivers nothing the ACL does not let it read
        assert intruder.client is not None
        for kind in ("events", "audio/out"):
            await intruder.client.subscribe(intruder.topic(kind, "dev-5"), qos=1)
        # and drops what it publishes on the victim's topics (a session, a turn, audio, and
        # fake events for the victim)
        await intruder.send({"type": "session.start"}, device_id="dev-5")
        await intruder.send({"type": "text", "text": "Say banana."}, device_id="dev-5")
        await intruder.publish(intruder.topic("audio/in", "dev-5"), b"\x00" * 640)
        await intruder.publish(intruder.topic("events", "dev-5"),
                               b'{"type": "error", "code": "spoofed"}', 1)
        # its own topics work; once its own session is ready, the server has seen all of it
        await intruder.start()
        ready = await victim.start()
        assert ready["resumed"] is False  # no session had been opened for dev-5
        assert [e["type"] for e in victim.events] == ["session.ready"]
        await victim.say("What is the capital of Italy?")
        reply = await victim.wait_reply(timeout_s=90)
        assert "rome" in reply.text.lower() and "banana" not in reply.text.lower()
        assert not victim.errors
        await intruder.say("Hello.")  # after its reply, nothing of the victim's can still come
        await intruder.wait_reply(timeout_s=90)
        assert intruder.foreign == []
        for device in (intruder, victim):
            await device.send({"type": "session.end"})


# ---- the broker restarts mid-conversation ----------------------------------------------------


async def test_broker_restart_resumes_the_conversation(mqtt_server: Server, broker: Broker) -> None:
    async with Device(broker, "dev-6") as device:
        first = await device.start()
        await device.say("My name is Alice. Please remember my name.")
        await device.wait_reply(timeout_s=90)
        connects = health(mqtt_server)["mqtt"]["connects"]
        await asyncio.to_thread(broker.restart)
        await device.reconnect()
        again = await device.start()  # repeated until the server is back on the broker
        assert again["resumed"] is True and again["session_id"] == first["session_id"]
        assert health(mqtt_server)["mqtt"]["connects"] > connects
        await device.say("What is my name?")
        reply = await device.wait_reply(timeout_s=90)
        await device.send({"type": "session.end"})
    assert "alice" in reply.text.lower(), reply.text


# ---- sequence-numbered audio in both directions ------------------------------------------------


def shuffled(payloads: list[bytes], rng: random.Random) -> list[bytes]:
    """Numbered frames with neighbours swapped, some sent twice (at once and far too late)."""
    out = [pack_frame(k, p) for k, p in enumerate(payloads)]
    for k in range(0, len(out) - 3, 3):
        j = k + rng.randint(1, 3)
        out[k], out[j] = out[j], out[k]
    dupes = sorted(rng.sample(range(len(out)), len(out) // 10), reverse=True)
    for k in dupes:
        out.insert(k + rng.randint(0, 2), out[k])
        out.insert(min(len(out), k + 60), out[k])
    return out


async def test_shuffled_and_duplicated_frames_give_the_right_transcript(  # type: ignore[no-untyped-def]
        mqtt_server: Server, broker: Broker, voice, transcriber) -> None:
    audio, rate = speak(voice, "What is the capital of France?")
    async with Device(broker, "dev-7") as device:
        await device.start(language="en", audio={"sequence": True},
                           output_audio={"sample_rate": 16000, "sequence": True})
        await device.stream(shuffled(frames(audio, rate), random.Random(7)))
        reply = await device.spoken_reply()
        await device.send({"type": "session.end"})
    assert reply.transcript is not None and "capital of france" in reply.transcript.lower()
    assert "paris" in reply.text.lower()
    assert device.out_frames == list(range(len(device.out_frames)))  # numbered from 0, in order
    heard = transcriber(bytes(reply.audio), 16000)
    assert "paris" in heard.lower(), heard


# ---- idle sessions expire ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def idle_server(broker: Broker) -> Iterator[Server]:
    """Small models, a 2 s idle timeout (nested env names), its own prefix on the same broker."""
    s = spawn_server(ARTIFACTS / "server-mqtt-idle.log",
                     env={"VOXLENS_ASR__MODEL": "tiny.en", "VOXLENS_LLM__MODEL": "smollm2-135m",
                          "VOXLENS_VISION__ENGINE": "none",
                          "VOXLENS_MQTT__URL": broker.url(broker.server_users[MQTT_IDLE_PREFIX]),
                          "VOXLENS_MQTT__PREFIX": MQTT_IDLE_PREFIX,
                          "VOXLENS_MQTT__IDLE_TIMEOUT_S": "2"})
    yield s
    s.stop()


async def test_a_silent_devices_session_expires(idle_server: Server, broker: Broker) -> None:
    async with (Device(broker, "dev-8", prefix=MQTT_IDLE_PREFIX) as quiet,
                Device(broker, "dev-9", prefix=MQTT_IDLE_PREFIX) as chatty):
        first = await quiet.start()
        kept = await chatty.start()
        silence = b"\x00" * 640
        keep_talking: Callable[[], Any] = lambda: chatty.publish(chatty.topic("audio/in"), silence)  # noqa: E731

        async def stream_until_expired() -> None:
            while not any(e["code"] == "expired" for e in quiet.errors):
                await keep_talking()
                await asyncio.sleep(FRAME_MS / 1000)
        await asyncio.wait_for(stream_until_expired(), 60)
        expired = next(e for e in quiet.errors if e["code"] == "expired")
        assert expired["fatal"] is True
        await until(lambda: health(idle_server)["mqtt"]["devices"] == 1, timeout_s=10)
        # the device that kept streaming kept its session; the quiet one must start again
        resumed = await chatty.start()
        assert resumed["resumed"] is True and resumed["session_id"] == kept["session_id"]
        await quiet.say("Hello?")
        await quiet.error("no_session")
        again = await quiet.start()
        assert again["resumed"] is False and again["session_id"] != first["session_id"]
        for device in (quiet, chatty):
            await device.send({"type": "session.end"})


# ---- TLS -----------------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost / 127.0.0.1 that is its own CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "broker.crt", directory / "broker.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_mqtts_with_the_brokers_ca(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    tls_port = free_port()
    b = Broker(tmp_path / "broker", free_port(), [MQTT_PREFIX], tls=(cert, key, tls_port))
    b.start()
    try:
        url = f"mqtts://{SERVER_USER}:{b.passwords[SERVER_USER]}@localhost:{tls_port}"
        settings = load_settings(mqtt={"url": url, "prefix": MQTT_PREFIX, "ca_file": str(cert)})
        async with broker_client(settings.mqtt, "voxlens-test") as server_side:  # as configured
            await server_side.subscribe(f"{MQTT_PREFIX}/+/control", qos=1)
            device_url = f"mqtts://dev-10:{b.passwords['dev-10']}@localhost:{tls_port}"
            async with MqttLink(device_url, "dev-10", prefix=MQTT_PREFIX,
                                ca_file=cert).connect() as device:
                await device.send({"type": "text", "text": "over TLS"})
            message = await asyncio.wait_for(anext(aiter(server_side.messages)), 10)
            assert json.loads(message.payload) == {"type": "text", "text": "over TLS"}  # type: ignore[arg-type]
        with pytest.raises(ConnectionError, match="certificate verify failed"):
            async with MqttLink(device_url, "dev-10", prefix=MQTT_PREFIX).connect():
                pass  # without the CA the broker's certificate is refused
    finally:
        b.stop()
