"""The desktop app's network side, ``DesktopApp``: microphone, camera and speaker talking to a
running server over WebRTC, kept connected, on one asyncio loop. It tells every event (the
server's and its own, as JSON) to ``notify`` and knows nothing of what shows them (the window,
or stdout: client/desktop/main.py wires it to either).

The camera captures on its own thread into a keep-latest slot that the preview and the video
track both read; reply audio is played from the shared playback buffer by PortAudio's callback
thread (or by a recorder thread with ``--record``); the playback reporter tells the server how
much of a reply has played. Every thread is joined on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from aiortc.mediastreams import MediaStreamTrack

from client.common.events import (
    JsonEvent,
    ReplyDone,
    ReplyInterrupted,
    ReplyStarted,
    decode_event,
)
from client.common.playback import PlaybackBuffer, PlaybackReporter
from client.common.reconnect import Reconnecting, Retry
from client.common.rtc_client import RATE, WebRtcClient
from client.common.wavio import read_wav
from client.desktop.audio import (
    AudioDeviceError,
    DesktopMicrophone,
    MicrophoneDevice,
    Output,
    PacedOutput,
    SpeakerOutput,
)
from client.desktop.camera import CameraError, CameraSource, CameraTrack, FrameSlot
from client.desktop.events import (
    AppWarning,
    CameraChanged,
    Closed,
    Muted,
    Played,
    Retrying,
    Typed,
)
from client.desktop.state import ReplyGate
from streaming.audio import Float32Array
from streaming.webrtc import mono_pcm

MAX_QUEUED_MS = 3000  # reply audio waiting for the speaker (the track is real time)


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
    same URL (the balancer) with the same settings, as ``Reconnecting``
    (client/common/reconnect.py) says, and tells the person (``desktop.reconnecting``).
    ``notify`` receives every event (the server's and the app's own ``desktop.*``) on the loop
    thread. The commands (``set_muted``, ``set_camera``, ``send_text``, ``interrupt``,
    ``stop``) must be called on the loop thread. It owns its tasks (the reconnect loop, the
    playback reporter) for as long as ``run`` runs."""

    def __init__(self, options: DesktopOptions, notify: Callable[[JsonEvent], None]) -> None:
        self.options = options
        self.notify = notify
        self.camera = CameraSource(options.camera) if options.camera is not None else None
        self.frames: FrameSlot | None = self.camera.slot if self.camera is not None else None
        self.mic = DesktopMicrophone()
        self.buffer = PlaybackBuffer(RATE, max_ms=MAX_QUEUED_MS)
        self.reporter = PlaybackReporter(self._played_now, self._send_report)
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
        self.notify(Muted(muted).json())

    def set_camera(self, on: bool) -> None:
        if self.camera is None:
            return
        self._camera_on = on
        self.camera.set_enabled(on)
        if self._video is not None:
            self._video.set_enabled(on)
        self.notify(CameraChanged(on).json())

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
            self.notify(AppWarning("not connected: the text was not sent").json())
            return
        self.notify(Typed(text).json())

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
                reporting = tg.create_task(self.reporter.run())
                await asyncio.wait([keeping, stopping], return_when=asyncio.FIRST_COMPLETED)
                for task in (keeping, stopping, reporting):
                    task.cancel()
        if keeping.cancelled():
            self.notify(Closed(None).json())
            return 0
        self.notify(Closed(keeper.words()).json())
        return 1

    async def _open_camera(self, stack: contextlib.AsyncExitStack) -> None:
        if self.camera is None:
            self.notify(CameraChanged(False, available=False).json())
            return
        try:
            await asyncio.to_thread(self.camera.start)
        except CameraError as e:
            self.notify(AppWarning(f"no camera: {e}").json())
            self.notify(CameraChanged(False, available=False).json())
            self.camera = None
            return
        stack.push_async_callback(asyncio.to_thread, self.camera.close)
        self.notify(CameraChanged(True).json())

    async def _open_output(self) -> Output:
        if self.options.record is not None:
            return PacedOutput(self.buffer, self.options.record)
        try:  # PortAudio may take a while to probe its devices: off the loop
            return await asyncio.to_thread(SpeakerOutput, self.buffer)
        except AudioDeviceError as e:
            self.notify(AppWarning(f"{e}: replies are shown, not heard").json())
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
            self.notify(AppWarning(str(e)).json())
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
        self.notify(Retrying(retry.words(), retry.ending.words, retry.attempt, retry.tries,
                             round(retry.wait_s, 2)).json())

    def _forget_replies(self) -> None:
        """The session is over: its reply stops, and the buffer forgets its turns (the next
        session numbers turns afresh)."""
        if self.gate.active is not None:
            self.gate.interrupted(self.gate.active)
        self.buffer.clear()
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
        match decode_event(ev):
            case ReplyStarted(turn_id):
                self.gate.started(turn_id)
            case ReplyDone(turn_id):
                self.gate.done(turn_id)
            case ReplyInterrupted(turn_id):  # stop playing it at once
                self.gate.interrupted(turn_id)
                self.buffer.cut(turn_id)
                if self._playing == turn_id:
                    self._playing = None
        self.notify(ev)

    def _on_audio(self, pcm: npt.NDArray[np.int16]) -> None:
        turn = self.gate.feed(pcm)
        if turn is not None:
            self.buffer.write(turn, pcm.astype("<i2").tobytes())
            self._playing = turn

    def _played_now(self) -> tuple[int, int] | None:
        """For the reporter: the reply playing (or still queued) and the ms of it played. Once
        it has played out, the person is told here (``desktop.played``) and it is no longer
        the reply playing."""
        turn = self._playing
        if turn is None:
            return None
        played = round(self.buffer.played_ms(turn))
        if self.gate.active != turn and self.buffer.queued_ms(turn) == 0:
            self._playing = None
            self.notify(Played(turn, played).json())
        return turn, played

    async def _send_report(self, report: JsonEvent) -> None:
        if not self._send(report):
            raise ConnectionError("not connected: the playback report waits")
