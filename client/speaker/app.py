"""``voxlens speaker``: the smart-speaker / car client.

Microphone and speaker through sounddevice (PortAudio), or WAV files in their place (paced in
real time, for tests and demos: client/speaker/audio.py), over MQTT or a WebSocket
(client/common/links.py). Always listening (the server's VAD decides what is speech, and its
echo canceller removes the assistant's own voice: the client declares it has none) or
push-to-talk (Enter, or SIGUSR1 from a button daemon). Reply audio waits in the shared playback
buffer with a prebuffer (client/common/playback.py), so network jitter becomes a small fixed
delay; every 200 ms while a reply plays the playback reporter tells the server how much of it
the speaker has played, so barge-in knows what was heard; ``reply.interrupted`` drops the
rest. It reconnects by itself, and over MQTT the server resumes the same conversation; when the
node serving it drains (``session.closing``) or dies (``no_session``), it starts again by
itself, and another node goes on with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from client.common.console import note, print_json, print_line
from client.common.events import (
    Error,
    JsonEvent,
    Ready,
    ReplyDone,
    ReplyInterrupted,
    ReplyStarted,
    ReplyText,
    SessionClosing,
    SpeechStarted,
    SpeechStopped,
    Transcript,
    WireEvent,
    decode_event,
)
from client.common.links import Connection, Link
from client.common.playback import PlaybackBuffer, PlaybackReporter
from client.speaker.audio import AudioIO
from streaming.channels import Channel, Full

log = logging.getLogger(__name__)

START_RETRY_S = 2.0  # session.start is repeated after this long without session.ready (MQTT),
# then after twice as long each time (up to RECONNECT_MAX_S)
PTT_TAIL_MS = 1000  # silence sent when push-to-talk ends: the server's VAD closes the utterance
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


class _Finished(Exception):
    pass


class Speaker:
    """One device's conversation: owns the tasks that play (``audio.speaker``), listen (the
    microphone), report playback and stay connected through ``link``; ``playback`` is the
    reply audio waiting for the speaker."""

    def __init__(self, link: Link, audio: AudioIO, options: SpeakerOptions = SpeakerOptions(),
                 *, out: TextIO = sys.stdout) -> None:
        self.link, self.audio, self.options, self.out = link, audio, options, out
        self.playback = PlaybackBuffer(options.output_rate, prebuffer_ms=options.prebuffer_ms)
        self.reporter = PlaybackReporter(self._playing, self._send)
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
                tg.create_task(self.audio.speaker(self.playback))
                tg.create_task(self._send_microphone())
                tg.create_task(self.reporter.run())
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
            note(f"gave up after {self.options.timeout_s:g} s")
            self.failed = True

    def _quiet(self) -> bool:
        """Everything said was answered and played, and the server has gone quiet."""
        linger = self.options.linger_s
        return (not self._speaking and not self._open and self.playback.idle_for() >= linger
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
                note(f"{self.link.name}: {group.exceptions[0]}; reconnecting in {delay:.1f} s")
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
                        if self._reply is not None:
                            self.playback.write(self._reply, item)
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
        wait_s = START_RETRY_S
        while True:
            if self.link.resend_start and not self.ready.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self.ready.wait()
                if not self.ready.is_set():  # again, waiting longer each time: a busy server
                    await conn.send(self._start_message())  # answers each one it gets
                    wait_s = min(wait_s * 2, RECONNECT_MAX_S)
                    continue
            wait_s = START_RETRY_S
            await self._lost.wait()
            if not self._moving:
                await asyncio.sleep(START_RETRY_S)  # e.g. busy: do not hammer the server
            self.ready.clear()
            self._lost.clear()
            self._moving = False
            await conn.send(self._start_message())

    def _on_event(self, raw: JsonEvent) -> None:
        self._last_event = time.monotonic()
        event = decode_event(raw)
        match event:
            case Ready(session_id=session_id, resumed=resumed):
                if session_id != self.session_id and not resumed:  # turns are numbered afresh
                    self.playback.clear()
                    self._reply = None
                self.session_id = session_id
                self.ready.set()
            case SpeechStarted():
                self._speaking = True
            case SpeechStopped():
                self._speaking = False
            case Transcript(turn_id, final=True):
                self._open.add(turn_id)
            case ReplyStarted(turn_id):
                self._reply = turn_id
            case ReplyDone(turn_id):
                self._open.discard(turn_id)
            case ReplyInterrupted(turn_id):
                self.playback.cut(turn_id)
                self._open.discard(turn_id)
            case Error(code=code, fatal=fatal):
                self._open.clear()  # whatever was pending will not be answered
                if code in SESSION_LOST or fatal:
                    self.ready.clear()
                    self._lost.set()
            case SessionClosing(reconnect=reconnect):  # the node drains: over MQTT another
                self._open.clear()  # one takes us over
                self._speaking = False
                self.ready.clear()
                if self.link.resend_start and reconnect:
                    self._moving = True
                    self._lost.set()
        self._show(event, raw)

    def _show(self, event: WireEvent, raw: JsonEvent) -> None:
        if self.options.json_events:
            if not isinstance(event, ReplyText):
                print_json(raw, self.out)
            return
        match event:
            case Ready(session_id=session_id, resumed=resumed) if (
                    session_id != self._shown or resumed):
                self._shown = session_id
                note(f"session {session_id}" + (" resumed" if resumed else ""))
            case Transcript(text=text, final=True):
                print_line(f"you: {text}", self.out)
            case ReplyDone(text=text):
                print_line(f"assistant: {text}", self.out)
            case ReplyInterrupted(heard_text=heard):
                print_line(f"assistant (interrupted): {heard}", self.out)
            case Error(code=code, message=message):
                note(f"error {code}: {message}")
            case SessionClosing(reason=reason):
                note(f"session closing ({reason}): starting again")

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

    def _playing(self) -> tuple[int, int] | None:
        """For the reporter: the turn heard last and the ms of it played (less what is still
        inside the sound device), while the session is ready."""
        turn = self.playback.last_turn
        if turn is None or not self.ready.is_set():
            return None
        return turn, round(self.playback.played_ms(turn, self.audio.latency_ms))

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
        note("push-to-talk: press Enter to talk, Enter again when done")
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
            if self._reply is not None and (self._reply in self._open
                                            or self.playback.queued_ms()):
                await self._send({"type": "interrupt"})  # the person wants the floor now
                self.playback.cut(self._reply)
            self.talking = True
            note("talking…")
            return
        self.talking = False
        note("sent")
        if self._conn is not None:
            tail = bytes(self.options.input_rate * 100 // 1000 * 2)
            with contextlib.suppress(ConnectionError):
                for _ in range(PTT_TAIL_MS // 100):
                    await self._conn.send_audio(tail)

