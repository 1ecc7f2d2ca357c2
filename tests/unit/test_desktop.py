"""The desktop app's logic without a server: events → what the window shows, which reply frames
play, the playback buffer as the desktop sets it up and its recorder, and the playback reports
the app sends."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import numpy as np

from client.common.events import JsonEvent
from client.common.playback import PlaybackBuffer
from client.desktop.app import DesktopApp, DesktopOptions
from client.desktop.audio import PacedOutput
from client.desktop.state import DesktopState, ReplyGate
from tests.conftest import until

RATE = 48_000
FRAME = RATE // 50  # 20 ms


def loud(n: int = FRAME) -> np.ndarray:
    return (np.sin(np.arange(n) / 8) * 8000).astype(np.int16)


def quiet(n: int = FRAME) -> np.ndarray:
    return np.zeros(n, np.int16)


def test_a_spoken_turn_moves_through_the_states() -> None:
    s = DesktopState()
    assert s.state == "connecting"
    s.apply({"type": "session.ready", "session_id": "x", "models": {"asr": "whisper", "llm": "qwen"}})
    assert (s.state, s.models) == ("listening", "whisper · qwen")
    s.apply({"type": "speech.started", "t_ms": 10})
    s.apply({"type": "transcript", "turn_id": 1, "text": "What is", "final": False})
    assert (s.you, s.you_final, s.state) == ("What is", False, "listening")
    s.apply({"type": "transcript", "turn_id": 1, "text": "What is this?", "final": True})
    assert (s.you, s.you_final, s.state) == ("What is this?", True, "thinking")
    s.apply({"type": "reply.started", "turn_id": 1})
    assert s.state == "speaking" and s.you == "What is this?"  # the question stays on screen
    s.apply({"type": "reply.text", "turn_id": 1, "delta": "A "})
    s.apply({"type": "reply.text", "turn_id": 1, "delta": "cat."})
    assert s.reply == "A cat."
    s.apply({"type": "reply.done", "turn_id": 1, "text": "A cat."})
    s.apply({"type": "metrics", "turn_id": 1, "stages": {"first_audio_sent": 812.4}})
    assert s.state == "speaking" and s.latency_ms == 812.4  # still playing
    s.apply({"type": "desktop.played", "turn_id": 1, "played_ms": 900})
    assert s.state == "listening"
    assert [f"{line.who}: {line.text}" for line in s.log] == ["you: What is this?", "assistant: A cat."]
    # the next utterance replaces the captions
    s.apply({"type": "transcript", "turn_id": 2, "text": "And", "final": False})
    assert (s.you, s.reply) == ("And", "")


def test_typed_turns_interruptions_scene_errors_and_toggles() -> None:
    s = DesktopState()
    s.apply({"type": "session.ready", "models": {}})
    s.apply({"type": "desktop.typed", "text": "Tell me a story"})
    assert (s.state, s.you, s.you_final) == ("thinking", "Tell me a story", True)
    s.apply({"type": "reply.started", "turn_id": 4})
    assert s.you == "Tell me a story"  # the typed words belong to this reply
    s.apply({"type": "reply.text", "turn_id": 4, "delta": "Once upon a time there was"})
    s.apply({"type": "reply.interrupted", "turn_id": 4, "played_ms": 700, "heard_text": "Once upon"})
    assert (s.state, s.reply) == ("listening", "Once upon")
    assert s.log[-1].interrupted and s.log[-1].text == "Once upon"
    s.apply({"type": "desktop.played", "turn_id": 4, "played_ms": 700})  # late: changes nothing
    assert s.state == "listening"

    s.apply({"type": "scene", "text": "likely a tabby cat (0.61)", "t_ms": 100, "engine": "scene"})
    assert s.scene == "likely a tabby cat (0.61)"
    s.apply({"type": "desktop.muted", "muted": True})
    s.apply({"type": "desktop.camera", "on": False})
    assert s.muted and not s.camera_on and s.camera_available
    s.apply({"type": "desktop.camera", "available": False})
    assert not s.camera_available and not s.camera_on
    s.apply({"type": "error", "code": "engine_failed", "message": "boom", "fatal": False})
    assert s.state == "listening" and s.error is not None and "went wrong" in s.error
    s.apply({"type": "error", "code": "busy", "message": "", "fatal": True})
    assert s.state == "error" and s.error is not None and "busy" in s.error
    s.apply({"type": "desktop.closed", "reason": None})
    assert s.state == "error"  # the reason stays visible


def test_only_changes_bump_the_version() -> None:
    s = DesktopState()
    s.apply({"type": "speech.stopped", "t_ms": 5})
    s.apply({"type": "unknown.event"})
    assert s.version == 0
    s.apply({"type": "desktop.closed", "reason": "could not connect"})
    assert (s.version, s.state, s.error) == (1, "disconnected", "could not connect")


def test_reply_gate_follows_the_reply_in_the_continuous_track() -> None:
    gate = ReplyGate(RATE, end_silence_ms=100, no_audio_ms=200)
    assert gate.feed(loud()) is None  # no reply yet: ignored
    gate.started(1)
    assert gate.feed(quiet()) is None  # silence before the first sound is not part of it
    assert gate.feed(loud()) == 1
    assert [gate.feed(quiet()) for _ in range(10)] == [1] * 10  # a pause before reply.done
    gate.done(1)
    assert gate.feed(loud()) == 1
    assert [gate.feed(quiet()) for _ in range(6)] == [1, 1, 1, 1, None, None]  # 100 ms: over
    assert gate.active is None
    gate.started(2)
    gate.feed(loud())
    gate.interrupted(2)
    assert gate.feed(loud()) is None and gate.active is None
    gate.started(3)
    gate.done(3)  # a reply that never sounds ends too
    assert [gate.feed(quiet()) for _ in range(10)] == [None] * 10
    assert gate.active is None


def test_playback_buffer_counts_played_audio_per_reply_and_cuts() -> None:
    buf = PlaybackBuffer(RATE, max_ms=1000)
    buf.write(1, bytes(2 * FRAME * 5))  # 100 ms
    buf.write(2, bytes(2 * FRAME * 5))
    assert len(buf.read(2 * FRAME * 2)) == 2 * FRAME * 2
    assert buf.played_ms(1) == 40 and buf.queued_ms(1) == 60
    assert len(buf.read(10 * FRAME * 2)) == 2 * FRAME * 3  # never two replies in one read
    buf.read(2 * FRAME)
    buf.cut(2)
    assert buf.queued_ms(2) == 0 and buf.played_ms(2) == 20
    assert buf.read(100) == b""
    buf.write(3, bytes(2 * RATE * 2))  # 2 s into a 1 s buffer: the oldest second goes
    assert buf.queued_ms(3) == 1000


async def test_recorder_writes_reply_audio_in_real_time(tmp_path: Path) -> None:
    buf = PlaybackBuffer(RATE)
    pcm = loud(RATE // 5).astype("<i2").tobytes()  # 200 ms
    out = PacedOutput(buf, tmp_path / "reply.wav")
    buf.write(1, pcm)
    await until(lambda: buf.played_ms(1) == 200, timeout_s=10)
    out.close()
    with wave.open(str(tmp_path / "reply.wav")) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2)
        assert w.readframes(w.getnframes()) == pcm  # the reply, no silence around it


class FakeClient:
    """Stands in for the WebRTC client: records what the app sends."""

    def __init__(self) -> None:
        self.sent: list[JsonEvent] = []
        self.ready: JsonEvent | None = {"type": "session.ready"}

    def send(self, message: JsonEvent) -> None:
        self.sent.append(message)


def offline_app() -> tuple[DesktopApp, FakeClient, list[JsonEvent]]:
    """The app with no devices and no server: a connected stand-in client that records what
    the app sends, and the list of events the app tells (``notify``)."""
    events: list[JsonEvent] = []
    app = DesktopApp(DesktopOptions(camera=None), events.append)
    client = FakeClient()
    app.client = client  # type: ignore[assignment]
    return app, client, events


async def test_app_reports_playback_and_stops_an_interrupted_reply() -> None:
    app, client, events = offline_app()
    out = PacedOutput(app.buffer, None)  # plays in real time, like a speaker
    reporter = asyncio.create_task(app.reporter.run())
    try:
        app._on_event({"type": "reply.started", "turn_id": 1})
        for _ in range(25):  # 500 ms of reply arrive
            app._on_audio(loud())
        app._on_event({"type": "reply.done", "turn_id": 1, "text": "Hi."})
        for _ in range(40):  # then the track's silence
            app._on_audio(quiet())
        await until(lambda: any(e["type"] == "desktop.played" for e in events), timeout_s=10)
        reports = [m for m in client.sent if m["type"] == "playback"]
        assert reports and all(m["turn_id"] == 1 for m in reports)
        played = [m["played_ms"] for m in reports]
        assert played == sorted(set(played)) and played[-1] >= 500  # changes only, the end too
        done = next(e for e in events if e["type"] == "desktop.played")
        assert done["played_ms"] == played[-1]

        app._on_event({"type": "reply.started", "turn_id": 2})
        for _ in range(100):  # 2 s queued
            app._on_audio(loud())
        await until(lambda: app.buffer.played_ms(2) > 0, timeout_s=10)
        app._on_event({"type": "reply.interrupted", "turn_id": 2, "played_ms": 100,
                       "heard_text": ""})
        assert app.buffer.queued_ms(2) == 0  # the rest of it is never played
        app._on_audio(loud())  # its audio still in flight is dropped too
        assert app.buffer.queued_ms(2) == 0
        app.send_text("  hello ")
        assert client.sent[-1] == {"type": "text", "text": "hello"}
        assert events[-1] == {"type": "desktop.typed", "text": "hello"}
        app.set_muted(True)
        assert app.mic.muted and events[-1] == {"type": "desktop.muted", "muted": True}
    finally:
        reporter.cancel()
        await asyncio.wait([reporter])
        out.close()


async def test_camera_files_fill_the_slot_and_the_track_pauses_while_off(tmp_path: Path) -> None:
    import cv2

    from client.desktop.camera import CameraSource, CameraTrack

    clip = tmp_path / "clip.avi"  # 10 frames, each a different grey
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 25, (160, 120))
    for k in range(10):
        writer.write(np.full((120, 160, 3), 20 * k + 20, np.uint8))
    writer.release()
    still = tmp_path / "still.png"
    cv2.imwrite(str(still), np.full((900, 1200, 3), (255, 0, 0), np.uint8))  # BGR blue

    video = CameraSource(clip)
    video.start()
    try:
        _, frame = video.slot.get()
        assert frame is not None and frame.shape == (120, 160, 3)
        greys: set[int] = set()

        def next_grey() -> bool:
            _, f = video.slot.get()
            if f is not None:
                greys.add(int(f[60, 80, 0]) // 20)
            return len(greys) >= 10  # the clip played to its end...
        await until(next_grey, timeout_s=10)
        seq = video.slot.seq
        await until(lambda: video.slot.seq > seq + 12, timeout_s=10)  # ...and on, in a loop
        video.set_enabled(False)
        assert video.slot.get()[1] is None
        video.set_enabled(True)
        await until(lambda: video.slot.get()[1] is not None, timeout_s=10)
    finally:
        video.close()

    camera = CameraSource(still)
    camera.start()
    try:
        _, frame = camera.slot.get()
        assert frame is not None and frame.shape == (480, 640, 3)  # downscaled to 640
        assert tuple(frame[0, 0]) == (0, 0, 255)  # RGB
        track = CameraTrack(camera.slot, fps=20)
        out = await track.recv()
        assert (out.width, out.height) == (640, 480)
        camera.set_enabled(False)
        track.set_enabled(False)
        assert camera.slot.get()[1] is None and not track.enabled.is_set()
        camera.set_enabled(True)
        track.set_enabled(True)
        later = await track.recv()
        assert later.pts > out.pts and later.to_ndarray(format="rgb24")[0, 0, 2] > 200
        track.stop()
    finally:
        camera.close()
