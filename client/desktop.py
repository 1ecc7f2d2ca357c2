"""`voxlens desktop`: microphone, camera and speaker talking to a running server over WebRTC,
in a Tk window (``client/desktop_window.py``) or headless (events printed as JSON lines).

Threads. The network side, ``DesktopApp`` (the aiortc peer connection, the devices, playback
reports), runs on one asyncio loop. With a window, Tk owns the main thread and the loop runs on
a thread of its own ("voxlens-net"); neither ever calls into the other directly: the app hands
each event to a bounded queue that the window drains every 40 ms (``root.after``), and the
window's commands (mute, camera, typed text, quit) are scheduled on the loop with
``call_soon_threadsafe`` (``LoopCommands``). The camera captures on its own thread into a
keep-latest slot that the preview and the video track both read; reply audio is played from a
thread-safe buffer by PortAudio's callback thread (or by a recorder thread with ``--record``).
Headless, the loop runs on the main thread. Every thread is joined on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from aiortc.mediastreams import MediaStreamTrack

from client.desktop_audio import (
    AudioDeviceError,
    DesktopMicrophone,
    MicrophoneDevice,
    Output,
    PacedOutput,
    PlaybackBuffer,
    SpeakerOutput,
)
from client.desktop_camera import CameraError, CameraSource, CameraTrack, FrameSlot
from client.desktop_state import (
    CAMERA,
    CLOSED,
    MUTED,
    PLAYED,
    RECONNECTING,
    TYPED,
    WARNING,
    DesktopState,
    ReplyGate,
)
from client.events import Reconnecting, Retry, stdin_lines
from client.rtc_client import RATE, WebRtcClient
from client.wavio import read_wav
from streaming.audio import Float32Array
from streaming.webrtc import mono_pcm

PLAYBACK_EVERY_S = 0.2  # how often the server hears how much of a reply has played
JsonEvent = dict[str, Any]  # a protocol event or a desktop.* event, as JSON


@dataclass
class DesktopOptions:
    url: str = "http://127.0.0.1:8080"
    language: str | None = None
    camera: int | Path | None = 0  # a device index, an image or video file, or no camera
    mic_file: Path | None = None  # a WAV played once as the microphone (real time)
    record: Path | None = None  # reply audio to this WAV instead of the speaker
    ice_hosts: list[str] = field(default_factory=list)  # offer ICE host candidates on these only
    api_key: str | None = None  # a new token is minted with it for each connection
    stdin: bool = False  # headless: each line of standard input is a typed turn


class DesktopRtcClient(WebRtcClient):
    """The WebRTC client with a mutable, device-fed microphone, whose reply audio goes to
    ``on_audio`` frame by frame, silence included (to be played, not kept in memory)."""

    def __init__(self, options: DesktopOptions, mic: DesktopMicrophone,
                 camera: MediaStreamTrack | None, on_event: Callable[[JsonEvent], None],
                 on_audio: Callable[[npt.NDArray[np.int16]], None]) -> None:
        base = options.url.replace("ws://", "http://").replace("wss://", "https://")
        # a speaker playing into a microphone echoes, and the app cancels no echo: the server
        # removes it (files have no echo); playback is reported by the app, which plays it
        echoes = options.record is None and options.mic_file is None
        super().__init__(base.removesuffix("/ws"), camera=camera, language=options.language,
                         host_addresses=options.ice_hosts or None, on_event=on_event,
                         echo_cancellation=not echoes, report_playback=False,
                         api_key=options.api_key)
        self.microphone = mic
        self._on_audio = on_audio

    async def _record(self, track: MediaStreamTrack) -> None:
        async for pcm in mono_pcm(track, RATE):
            self._on_audio(pcm)


class DesktopApp:
    """One conversation with the devices, kept connected: when the server ends the session
    (``session.closing``: it restarts) or the connection drops, the app connects again to the
    same URL (the balancer) with the same settings, as ``client.events.Reconnecting`` says,
    and tells the person (``desktop.reconnecting``). ``notify`` receives every event (the
    server's and the app's own ``desktop.*``) on the loop thread. The commands
    (``set_muted``, ``set_camera``, ``send_text``, ``stop``) must be called on the loop
    thread."""

    def __init__(self, options: DesktopOptions, notify: Callable[[JsonEvent], None]) -> None:
        self.options = options
        self.notify = notify
        self.camera = CameraSource(options.camera) if options.camera is not None else None
        self.frames: FrameSlot | None = self.camera.slot if self.camera is not None else None
        self.mic = DesktopMicrophone()
        self.buffer = PlaybackBuffer(RATE)
        self.gate = ReplyGate(RATE)
        self.client: DesktopRtcClient | None = None  # the session open now
        self._video: CameraTrack | None = None  # the camera's track in that session
        self._camera_on = True
        self._utterance: tuple[Float32Array, int] | None = None  # --mic-file, said once
        self._playing: int | None = None  # the reply whose audio plays (or is still queued)
        self._stop = asyncio.Event()
        self._connected = asyncio.Event()  # a session is open

    # ---- commands ---------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def set_muted(self, muted: bool) -> None:
        self.mic.muted = muted
        self.notify({"type": MUTED, "muted": muted})

    def set_camera(self, on: bool) -> None:
        if self.camera is None:
            return
        self._camera_on = on
        self.camera.set_enabled(on)
        if self._video is not None:
            self._video.set_enabled(on)
        self.notify({"type": CAMERA, "on": on})

    def interrupt(self) -> None:
        """Stop the reply: silent here at once; the server cuts it (reply.interrupted)."""
        if self._playing is not None:
            self.buffer.cut(self._playing)
        self._send({"type": "interrupt"})

    def send_text(self, text: str) -> None:
        text = text.strip()
        if not text:
            return
        if not self._send({"type": "text", "text": text}):
            self.notify({"type": WARNING, "message": "not connected: the text was not sent"})
            return
        self.notify({"type": TYPED, "text": text})

    # ---- the conversation -------------------------------------------------------------

    async def run(self) -> int:
        """Open the devices, connect, converse (reconnecting when the session ends) until
        ``stop()``, then close the peer connection, the devices and their threads. Returns 0
        after ``stop()``, 1 when no connection could be made, or none again. Cancelling it
        closes everything the same way."""
        async with contextlib.AsyncExitStack() as stack:
            await self._open_camera(stack)
            output = await self._open_output()
            stack.push_async_callback(asyncio.to_thread, output.close)
            self._utterance = await self._open_microphone(stack)
            server = self.options.url
            keeper = Reconnecting(self._session, server, on_retry=self._retrying,
                                  on_session=self._opened)
            async with asyncio.TaskGroup() as tg:  # stop() also ends a connection attempt
                keeping = tg.create_task(keeper.run())
                stopping = tg.create_task(self._stop.wait())
                reporting = tg.create_task(self._report_playback())
                await asyncio.wait([keeping, stopping], return_when=asyncio.FIRST_COMPLETED)
                for task in (keeping, stopping, reporting):
                    task.cancel()
        if keeping.cancelled():
            self.notify({"type": CLOSED, "reason": None})
            return 0
        self.notify({"type": CLOSED, "reason": keeper.words()})
        return 1

    async def _open_camera(self, stack: contextlib.AsyncExitStack) -> None:
        if self.camera is None:
            self.notify({"type": CAMERA, "available": False})
            return
        try:
            await asyncio.to_thread(self.camera.start)
        except CameraError as e:
            self.notify({"type": WARNING, "message": f"no camera: {e}"})
            self.notify({"type": CAMERA, "available": False})
            self.camera = None
            return
        stack.push_async_callback(asyncio.to_thread, self.camera.close)
        self.notify({"type": CAMERA, "on": True})

    async def _open_output(self) -> Output:
        if self.options.record is not None:
            return PacedOutput(self.buffer, self.options.record)
        try:  # PortAudio may take a while to probe its devices: off the loop
            return await asyncio.to_thread(SpeakerOutput, self.buffer)
        except AudioDeviceError as e:
            self.notify({"type": WARNING, "message": f"{e}: replies are shown, not heard"})
            return PacedOutput(self.buffer, None)

    async def _open_microphone(self, stack: contextlib.AsyncExitStack
                               ) -> tuple[Float32Array, int] | None:
        """The WAV to say (file mode), or None after opening the device."""
        if self.options.mic_file is not None:
            return await asyncio.to_thread(read_wav, self.options.mic_file)
        try:
            device = await asyncio.to_thread(MicrophoneDevice, self.mic,
                                             asyncio.get_running_loop())
        except AudioDeviceError as e:
            self.notify({"type": WARNING, "message": str(e)})
            return None
        stack.push_async_callback(asyncio.to_thread, device.close)
        return None

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[DesktopRtcClient]:
        """One session: a new peer connection with the same microphone, camera and settings,
        entered once it is ready; on the way out it says ``session.end`` and closes."""
        video = None
        if self.camera is not None:
            video = CameraTrack(self.camera.slot)
            video.set_enabled(self._camera_on)
        client = DesktopRtcClient(self.options, self.mic, video, self._on_event, self._on_audio)
        async with client:
            self.client, self._video = client, video
            self._connected.set()
            try:
                yield client
            finally:
                self._connected.clear()
                self._send({"type": "session.end"})
                self.client = self._video = None
                self._forget_replies()

    async def until_connected(self) -> None:
        """Return once a session is open (at once when one is)."""
        await self._connected.wait()

    def _opened(self, client: DesktopRtcClient) -> None:
        if self._utterance is not None:  # --mic-file is said once, in the first session
            self.mic.say(*self._utterance)
            self._utterance = None

    def _retrying(self, retry: Retry) -> None:
        self.notify({"type": RECONNECTING, "message": retry.words(),
                     "reason": retry.ending.words, "attempt": retry.attempt,
                     "tries": retry.tries, "wait_s": round(retry.wait_s, 2)})

    def _forget_replies(self) -> None:
        """The session is over: its reply stops (the next session numbers turns afresh)."""
        if self.gate.active is not None:
            self.gate.interrupted(self.gate.active)
        if self._playing is not None:
            self.buffer.cut(self._playing)
            self._playing = None

    def _send(self, message: JsonEvent) -> bool:
        """Send on the events channel; False when not connected (or no longer)."""
        if self.client is None or self.client.ready is None:
            return False
        try:
            self.client.send(message)
        except ConnectionError:  # the channel is closing
            return False
        return True

    def _on_event(self, ev: JsonEvent) -> None:
        match ev.get("type"):
            case "reply.started":
                self.gate.started(ev["turn_id"])
            case "reply.done":
                self.gate.done(ev["turn_id"])
            case "reply.interrupted":  # stop playing it at once
                self.gate.interrupted(ev["turn_id"])
                self.buffer.cut(ev["turn_id"])
                if self._playing == ev["turn_id"]:
                    self._playing = None
        self.notify(ev)

    def _on_audio(self, pcm: npt.NDArray[np.int16]) -> None:
        turn = self.gate.feed(pcm)
        if turn is not None:
            self.buffer.write(turn, pcm.astype("<i2").tobytes())
            self._playing = turn

    async def _report_playback(self) -> None:
        """While a reply plays, tell the server every 200 ms how much of it was played; once
        it has played out, say so locally (``desktop.played``). Runs until cancelled."""
        while True:
            await asyncio.sleep(PLAYBACK_EVERY_S)
            turn = self._playing
            if turn is None:
                continue
            played = round(self.buffer.played_ms(turn))
            self._send({"type": "playback", "turn_id": turn, "played_ms": played})
            if self.gate.active != turn and self.buffer.queued_ms(turn) == 0:
                self._playing = None
                self.notify({"type": PLAYED, "turn_id": turn, "played_ms": played})


class LoopCommands:
    """The window's commands, scheduled on the app's loop from the Tk thread."""

    def __init__(self, app: DesktopApp, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.loop = loop

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has already closed
            self.loop.call_soon_threadsafe(fn, *args)

    def set_muted(self, muted: bool) -> None:
        self._call(self.app.set_muted, muted)

    def set_camera(self, on: bool) -> None:
        self._call(self.app.set_camera, on)

    def send_text(self, text: str) -> None:
        self._call(self.app.send_text, text)

    def interrupt(self) -> None:
        self._call(self.app.interrupt)

    def quit(self) -> None:
        self._call(self.app.stop)


def print_json(ev: JsonEvent) -> None:
    """One JSON line on stdout, with the characters themselves; where stdout cannot encode
    them (Chinese in a non-UTF-8 locale), with \\u escapes instead of failing."""
    try:
        print(json.dumps(ev, ensure_ascii=False), flush=True)
    except UnicodeEncodeError:
        print(json.dumps(ev), flush=True)


def print_event(ev: JsonEvent) -> None:
    """One JSON line per event (reply text deltas are left out: reply.done has the text); why
    a connection failed or ended also goes to stderr, as an ``error:`` line."""
    if ev.get("type") != "reply.text":
        print_json(ev)
    if ev.get("type") == CLOSED and ev.get("reason"):
        print(f"error: {ev['reason']}", file=sys.stderr, flush=True)


def put_latest(inbox: queue.Queue[JsonEvent], ev: JsonEvent) -> None:
    """Queue an event for the window; when the queue is full (the window hangs), the oldest
    event goes."""
    try:
        inbox.put_nowait(ev)
    except queue.Full:
        with contextlib.suppress(queue.Empty):
            inbox.get_nowait()
        inbox.put_nowait(ev)


async def type_from_stdin(app: DesktopApp) -> None:
    """Each line of standard input, a typed turn (headless ``--stdin``), until its end; a
    line that comes while the app (re)connects is sent once it is connected."""
    async for line in stdin_lines():
        await app.until_connected()
        app.send_text(line)


async def run_headless(options: DesktopOptions) -> int:
    """The app without a window: events printed, a summary line at the end. SIGINT and
    SIGTERM end it cleanly; cancelling it closes everything the same way."""
    state = DesktopState()

    def notify(ev: JsonEvent) -> None:
        state.apply(ev)
        print_event(ev)

    app = DesktopApp(options, notify)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, app.stop)
    typing = asyncio.create_task(type_from_stdin(app)) if options.stdin else None
    try:
        code = await app.run()
    finally:
        if typing is not None:
            typing.cancel()
            await asyncio.wait([typing])
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    print_json({"type": "desktop.exit", **state.summary()})
    return code


def main(options: DesktopOptions, *, headless: bool = False) -> int:
    for path in (options.mic_file, options.camera):
        if isinstance(path, Path) and not path.is_file():
            print(f"error: {path} not found", file=sys.stderr)
            return 2
    if headless:
        return asyncio.run(run_headless(options))
    from client.desktop_window import run_window  # Tk only when there is a window

    return run_window(options)
