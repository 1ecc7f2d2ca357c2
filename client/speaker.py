"""``voxlens speaker``: the smart-speaker / car client.

Microphone and speaker through sounddevice (PortAudio), or WAV files in their place (paced in
real time, for tests and demos), over MQTT or a WebSocket (client/links.py). Always listening
(the server's VAD decides what is speech, and its echo canceller removes the assistant's own
voice: the client declares it has none) or push-to-talk (Enter, or SIGUSR1 from a button
daemon). Reply audio goes through a jitter buffer (client/playback.py); every 200 ms while a
reply plays the client reports how much of it its speaker has played, so barge-in knows what
was heard; ``reply.interrupted`` drops the rest. It reconnects by itself, and over MQTT the
server resumes the same conversation; when the node serving it drains (``session.closing``) or
dies (``no_session``), it starts again by itself, and another node goes on with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np

from client.links import Connection, Link
from client.playback import JitterBuffer
from client.wavio import read_wav, write_wav
from streaming.audio import float_to_pcm16, resample
from streaming.channels import Channel, Full

log = logging.getLogger(__name__)

FRAME_MS = 20  # microphone message length
REPORT_EVERY_S = 0.2  # playback reports while a reply plays
START_RETRY_S = 2.0  # session.start is repeated this often until session.ready (MQTT)
PTT_TAIL_MS = 1000  # silence sent when push-to-talk ends: the server's VAD closes the utterance
FILE_TAIL_MS = 1500  # silence after the input file, for the same reason
RECONNECT_MAX_S = 10.0
SESSION_LOST = ("no_session", "expired")  # MQTT: the server forgot us; start again


@dataclass(frozen=True, slots=True)
class SpeakerOptions:
    input_rate: int = 16_000
    output_rate: int = 24_000
    language: str | None = None
    push_to_talk: bool = False
    prebuffer_ms: int = 120
    json_events: bool = False
    linger_s: float = 2.0  # file mode: quiet time after the last reply before exiting
    timeout_s: float = 120.0  # file mode: give up after this long


class AudioIO(Protocol):
    finite: bool  # a file: the client ends once it has been said and answered
    input_done: asyncio.Event

    @property
    def latency_ms(self) -> float:
        """Audio handed to the speaker that has not reached the air yet."""
        ...

    def microphone(self, gate: asyncio.Event) -> AsyncIterator[bytes]:
        """20 ms of s16le mono at the input rate per item. A file waits while ``gate`` is
        clear (not connected), a live microphone does not wait for anyone."""
        ...

    async def speaker(self, jitter: JitterBuffer) -> None:
        """Drain ``jitter`` in real time until cancelled."""
        ...

    async def close(self) -> None: ...


# ---- audio: WAV files ----------------------------------------------------------------------


class FileAudio:
    """A WAV as the microphone (then silence) and a WAV recording the speaker."""

    finite = True
    latency_ms = 0.0

    def __init__(self, input_wav: Path, output_wav: Path | None, input_rate: int,
                 output_rate: int) -> None:
        audio, rate = read_wav(input_wav)
        x = resample(audio, rate, input_rate)
        x = np.concatenate([x, np.zeros(input_rate * FILE_TAIL_MS // 1000, dtype=np.float32)])
        self._pcm = float_to_pcm16(x)
        self.output_wav = output_wav
        self.input_rate, self.output_rate = input_rate, output_rate
        self.input_done = asyncio.Event()
        self.recorded = bytearray()

    async def microphone(self, gate: asyncio.Event) -> AsyncIterator[bytes]:
        step = self.input_rate * FRAME_MS // 1000 * 2
        silence = bytes(step)
        loop = asyncio.get_running_loop()
        due = loop.time()
        pos = 0
        while True:
            await gate.wait()
            chunk = self._pcm[pos:pos + step] or silence
            pos += step
            due = max(due + FRAME_MS / 1000, loop.time() - 0.1)  # no burst after a pause
            await asyncio.sleep(due - loop.time())
            yield chunk
            if pos >= len(self._pcm):
                self.input_done.set()

    async def speaker(self, jitter: JitterBuffer) -> None:
        step = self.output_rate * FRAME_MS // 1000 * 2
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += FRAME_MS / 1000
            await asyncio.sleep(due - loop.time())
            self.recorded += jitter.read(step)

    async def close(self) -> None:
        if self.output_wav is not None:
            await asyncio.to_thread(write_wav, self.output_wav, bytes(self.recorded),
                                    self.output_rate)


# ---- audio: sound devices ------------------------------------------------------------------


def sounddevice() -> Any:
    """The sounddevice module, imported on first use: it needs the PortAudio library."""
    try:
        import sounddevice as sd  # type: ignore[import-untyped]
    except OSError as e:
        raise RuntimeError("sounddevice needs the PortAudio library: on Debian or Raspberry Pi "
                           "OS, sudo apt install libportaudio2") from e
    return sd


class SoundDevices:
    """The machine's microphone and speaker (PortAudio callbacks in its own threads)."""

    finite = False

    def __init__(self, input_rate: int, output_rate: int, *, input_device: str | None = None,
                 output_device: str | None = None) -> None:
        self.input_rate, self.output_rate = input_rate, output_rate
        self.input_device = _device(input_device)
        self.output_device = _device(output_device)
        self.input_done = asyncio.Event()  # never: a microphone does not run out
        self._output: Any = None

    @property
    def latency_ms(self) -> float:
        return float(self._output.latency) * 1000 if self._output is not None else 0.0

    def check(self) -> None:
        """Fail now, in words, if the sound devices cannot be opened as asked."""
        sd = sounddevice()
        try:
            sd.check_input_settings(device=self.input_device, channels=1, dtype="int16",
                                    samplerate=self.input_rate)
            sd.check_output_settings(device=self.output_device, channels=1, dtype="int16",
                                     samplerate=self.output_rate)
        except (sd.PortAudioError, ValueError) as e:
            raise RuntimeError(f"sound device: {e} (see --list-devices; --rate and --output-rate "
                               "choose rates the devices support)") from e

    async def microphone(self, gate: asyncio.Event) -> AsyncIterator[bytes]:
        sd = sounddevice()
        loop = asyncio.get_running_loop()
        frames: Channel[bytes] = Channel(50, Full.DROP_OLDEST)  # the newest second of sound

        def put(data: bytes) -> None:
            if not frames.closed:
                frames.put_nowait(data)

        def captured(indata: Any, n: int, when: Any, status: Any) -> None:
            loop.call_soon_threadsafe(put, bytes(indata))

        stream = await _open(sd, sd.RawInputStream, samplerate=self.input_rate,
                             blocksize=self.input_rate * FRAME_MS // 1000,
                             device=self.input_device, callback=captured)
        try:
            async for data in frames:
                yield data
        finally:
            frames.close()
            await asyncio.to_thread(stream.close)

    async def speaker(self, jitter: JitterBuffer) -> None:
        sd = sounddevice()

        def play(outdata: Any, n: int, when: Any, status: Any) -> None:
            outdata[:] = jitter.read(len(outdata))

        stream = await _open(sd, sd.RawOutputStream, samplerate=self.output_rate,
                             blocksize=self.output_rate * FRAME_MS // 1000,
                             device=self.output_device, callback=play)
        self._output = stream
        try:
            await asyncio.Event().wait()  # plays until cancelled
        finally:
            self._output = None
            await asyncio.to_thread(stream.close)

    async def close(self) -> None:
        return None


async def _open(sd: Any, kind: Any, **settings: Any) -> Any:
    """A started 16-bit mono PortAudio stream (opening a device can take a while: off the loop)."""
    def start() -> Any:
        stream = kind(channels=1, dtype="int16", **settings)
        stream.start()
        return stream
    try:
        return await asyncio.to_thread(start)
    except (sd.PortAudioError, ValueError) as e:
        raise RuntimeError(f"sound device: {e}") from e


def _device(name: str | None) -> int | str | None:
    return int(name) if name is not None and name.isdigit() else name


# ---- the client ----------------------------------------------------------------------------


class _Finished(Exception):
    pass


class Speaker:
    def __init__(self, link: Link, audio: AudioIO, options: SpeakerOptions = SpeakerOptions(),
                 *, out: TextIO = sys.stdout) -> None:
        self.link, self.audio, self.options, self.out = link, audio, options, out
        self.jitter = JitterBuffer(options.output_rate, prebuffer_ms=options.prebuffer_ms)
        self.ready = asyncio.Event()  # a session.ready answered our session.start
        self.talking = not options.push_to_talk
        self.failed = False
        self.session_id: str | None = None
        self._conn: Connection | None = None
        self._lost = asyncio.Event()  # the server forgot the session: start again
        self._moving = False  # ... because its node is draining: at once, another node takes it
        self._reply: int | None = None  # the turn last announced by reply.started
        self._open: set[int] = set()  # turns transcribed and not yet answered
        self._speaking = False  # the server heard speech start and not stop yet
        self._shown: str | None = None  # the session id last shown
        self._last_event = time.monotonic()

    async def run(self) -> int:
        """Run until cancelled (sound devices), or until the input file has been said and
        answered. Cancelling it closes the connection and the sound devices; the output file
        is written either way. Returns the exit status."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.audio.speaker(self.jitter))
                tg.create_task(self._send_microphone())
                tg.create_task(self._report_playback())
                tg.create_task(self._stay_connected())
                if self.options.push_to_talk:
                    tg.create_task(self._read_presses())
                await self._until_finished()
                raise _Finished
        except* _Finished:
            pass
        finally:
            await self.audio.close()
        return 1 if self.failed else 0

    async def _until_finished(self) -> None:
        if not self.audio.finite:
            await asyncio.Event().wait()  # a live speaker runs until it is stopped

        async def answered() -> None:
            await self.audio.input_done.wait()
            while not self._quiet():  # noqa: ASYNC110 (quiet means: for a while, by the clock)
                await asyncio.sleep(0.1)
        try:
            async with asyncio.timeout(self.options.timeout_s):
                await answered()
        except TimeoutError:
            _note(f"gave up after {self.options.timeout_s:g} s")
            self.failed = True

    def _quiet(self) -> bool:
        """Everything said was answered and played, and the server has gone quiet."""
        linger = self.options.linger_s
        return (not self._speaking and not self._open and self.jitter.idle_for() >= linger
                and time.monotonic() - self._last_event >= linger)

    # ---- connection ------------------------------------------------------------------

    async def _stay_connected(self) -> None:
        delay = 0.5
        while True:
            try:
                async with self.link.connect() as conn:
                    delay = 0.5
                    self._conn = conn
                    await self._converse(conn)
            except* ConnectionError as group:
                _note(f"{self.link.name}: {group.exceptions[0]}; reconnecting in {delay:.1f} s")
            finally:
                self._conn = None
                self.ready.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _converse(self, conn: Connection) -> None:
        self.ready.clear()
        self._lost.clear()
        await conn.send(self._start_message())  # before any audio can go out
        async with asyncio.TaskGroup() as tg:
            keeper = tg.create_task(self._keep_session(conn))
            try:
                async for item in conn.incoming():
                    if isinstance(item, bytes):
                        self.jitter.write(item)
                    else:
                        self._on_event(item)
            finally:
                keeper.cancel()
        raise ConnectionError("connection closed")

    def _start_message(self) -> dict[str, Any]:
        o = self.options
        numbered = {"sequence": True} if getattr(self.link, "sequence", False) else {}
        return {"type": "session.start", "language": o.language,
                "audio": {"sample_rate": o.input_rate, "channels": 1,
                          "echo_cancellation": False, **numbered},
                "output_audio": {"sample_rate": o.output_rate, **numbered}}

    async def _keep_session(self, conn: Connection) -> None:
        """Repeat ``session.start`` until it is answered (MQTT: the server may not be on the
        broker yet), and start again whenever the server says it lost the session."""
        while True:
            if self.link.resend_start and not self.ready.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(START_RETRY_S):
                        await self.ready.wait()
                if not self.ready.is_set():
                    await conn.send(self._start_message())
                    continue
            await self._lost.wait()
            if not self._moving:
                await asyncio.sleep(START_RETRY_S)  # e.g. busy: do not hammer the server
            self.ready.clear()
            self._lost.clear()
            self._moving = False
            await conn.send(self._start_message())

    def _on_event(self, ev: dict[str, Any]) -> None:
        self._last_event = time.monotonic()
        kind = ev.get("type")
        match kind:
            case "session.ready":
                self.session_id = ev.get("session_id")
                self.ready.set()
            case "speech.started":
                self._speaking = True
            case "speech.stopped":
                self._speaking = False
            case "transcript" if ev.get("final"):
                self._open.add(int(ev["turn_id"]))
            case "reply.started":
                self._reply = int(ev["turn_id"])
                self.jitter.start_turn(self._reply)
            case "reply.done":
                self._open.discard(int(ev["turn_id"]))
            case "reply.interrupted":
                self.jitter.flush(int(ev["turn_id"]))
                self._open.discard(int(ev["turn_id"]))
            case "error":
                self._open.clear()  # whatever was pending will not be answered
                if ev.get("code") in SESSION_LOST or ev.get("fatal"):
                    self.ready.clear()
                    self._lost.set()
            case "session.closing":  # the node drains: over MQTT another one takes us over
                self._open.clear()
                self._speaking = False
                self.ready.clear()
                if self.link.resend_start and ev.get("reconnect", True):
                    self._moving = True
                    self._lost.set()
        self._show(ev)

    def _show(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if self.options.json_events:
            if kind != "reply.text":
                _line(self.out, json.dumps(ev, ensure_ascii=False), json.dumps(ev))
            return
        match kind:
            case "session.ready" if ev.get("session_id") != self._shown or ev.get("resumed"):
                self._shown = ev.get("session_id")
                _note(f"session {self._shown}" + (" resumed" if ev.get("resumed") else ""))
            case "transcript" if ev.get("final"):
                _line(self.out, f"you: {ev.get('text')}")
            case "reply.done":
                _line(self.out, f"assistant: {ev.get('text')}")
            case "reply.interrupted":
                _line(self.out, f"assistant (interrupted): {ev.get('heard_text')}")
            case "error":
                _note(f"error {ev.get('code')}: {ev.get('message')}")
            case "session.closing":
                _note(f"session closing ({ev.get('reason')}): starting again")

    # ---- audio -----------------------------------------------------------------------

    async def _send(self, message: dict[str, Any]) -> None:
        if self._conn is not None:
            with contextlib.suppress(ConnectionError):  # the connection task notices
                await self._conn.send(message)

    async def _send_microphone(self) -> None:
        async for frame in self.audio.microphone(self.ready):
            conn = self._conn
            if conn is None or not self.ready.is_set() or not self.talking:
                continue
            with contextlib.suppress(ConnectionError):
                await conn.send_audio(frame)

    async def _report_playback(self) -> None:
        """``playback`` every 200 ms while a reply plays (and once more when it ends)."""
        last: tuple[int, int] | None = None
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            turn = self.jitter.last_turn
            if turn is None or not self.ready.is_set():
                continue
            played = round(self.jitter.played_ms(turn, self.audio.latency_ms))
            if (turn, played) != last:
                last = (turn, played)
                await self._send({"type": "playback", "turn_id": turn, "played_ms": played})

    # ---- push-to-talk ----------------------------------------------------------------

    async def _read_presses(self) -> None:
        """Enter on the terminal, or SIGUSR1 (a GPIO button daemon), toggles talking."""
        loop = asyncio.get_running_loop()
        presses: Channel[None] = Channel(8, Full.DROP_OLDEST)
        fd = sys.stdin.fileno()

        def readable() -> None:
            data = os.read(fd, 1024)
            if not data:
                loop.remove_reader(fd)
            for _ in range(data.count(b"\n")):
                presses.put_nowait(None)

        loop.add_reader(fd, readable)
        loop.add_signal_handler(signal.SIGUSR1, presses.put_nowait, None)
        _note("push-to-talk: press Enter to talk, Enter again when done")
        try:
            async for _ in presses:
                await self.toggle_talking()
        finally:
            loop.remove_reader(fd)
            loop.remove_signal_handler(signal.SIGUSR1)

    async def toggle_talking(self) -> None:
        """Push-to-talk: start talking (cutting a reply that plays), or stop and send the
        silence that ends the utterance. Cancelling it may leave part of that silence unsent."""
        if not self.talking:
            if self._reply is not None and (self._reply in self._open or self.jitter.queued_ms()):
                await self._send({"type": "interrupt"})  # the person wants the floor now
                self.jitter.flush(self._reply)
            self.talking = True
            _note("talking…")
            return
        self.talking = False
        _note("sent")
        if self._conn is not None:
            tail = bytes(self.options.input_rate * 100 // 1000 * 2)
            with contextlib.suppress(ConnectionError):
                for _ in range(PTT_TAIL_MS // 100):
                    await self._conn.send_audio(tail)


def _line(out: TextIO, text: str, escaped: str | None = None) -> None:
    """Print one line. Where ``out`` cannot encode it (Chinese on a stdout in a non-UTF-8
    locale), print ``escaped`` (the JSON with \\u escapes) or the text with backslash escapes
    instead of failing the conversation."""
    try:
        print(text, file=out, flush=True)
    except UnicodeEncodeError:
        if escaped is None:
            encoding = getattr(out, "encoding", None) or "ascii"
            escaped = text.encode(encoding, "backslashreplace").decode(encoding)
        print(escaped, file=out, flush=True)


def _note(text: str) -> None:
    print(f"[{text}]", file=sys.stderr, flush=True)  # stderr escapes what it cannot encode
