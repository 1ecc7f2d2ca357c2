"""The clients' one decoder from wire events to typed events (client/common/events.py), and the
desktop app's own events (client/desktop/events.py): every event the server encodes reads back
as what it was, and what a client cannot read (a newer server's type, a broken field) is an
``Unknown`` that every client ignores."""

from __future__ import annotations

import pytest

from client.common.eventlog import EventLog
from client.common.events import (
    Error,
    JsonEvent,
    Metrics,
    Ready,
    ReplyDone,
    ReplyInterrupted,
    ReplyStarted,
    ReplyText,
    Scene,
    SessionClosing,
    SpeechStarted,
    SpeechStopped,
    ToolCallRequested,
    ToolCancelled,
    Transcript,
    Unknown,
    decode_event,
)
from client.desktop.events import (
    AppEvent,
    AppWarning,
    CameraChanged,
    Closed,
    Muted,
    Played,
    Retrying,
    Typed,
    decode_desktop_event,
)
from streaming import events as server
from streaming.protocol import event_to_json

SERVER_EVENTS = [
    server.SpeechStarted(120),
    server.SpeechStopped(900),
    server.Transcript(2, "what is this", False, "en", 640),
    server.Transcript(2, "What is this?", True, "en"),
    server.ReplyStarted(2),
    server.ReplyText(2, "A cat"),
    server.ReplyDone(2, "A cat."),
    server.ReplyInterrupted(3, 700, "Once upon"),
    server.ToolCallRequested(4, "call-1", "lights", '{"on": true}'),
    server.ToolCancelled(4, "call-1"),
    server.Metrics(2, {"first_audio_sent": 812.5, "transcript_final": 0.0}),
    server.Scene("likely a tabby cat (0.61)", 1200, "scene"),
    server.SessionClosing("draining", "shutting down", True),
    server.Error("busy", "too many sessions", True, 3.0),
    server.Error("engine_failed", "boom", False, None, 5),
]


@pytest.mark.parametrize("event", SERVER_EVENTS, ids=lambda e: type(e).__name__)
def test_what_the_server_encodes_reads_back_as_it_was(event: server.Event) -> None:
    assert decode_event(event_to_json(event)) == event


def test_session_ready_as_a_client_reads_it() -> None:
    ready = server.SessionReady("s1", server.AudioFormat(16000), server.AudioFormat(24000),
                                {"asr": "whisper", "llm": "qwen"})
    assert decode_event(event_to_json(ready)) == Ready("s1", {"asr": "whisper", "llm": "qwen"},
                                                       24000)
    mqtt = {**event_to_json(ready), "resumed": True}
    mqtt["output"] = {**mqtt["output"], "sequence": True}
    assert decode_event(mqtt) == Ready("s1", {"asr": "whisper", "llm": "qwen"}, 24000,
                                       output_sequence=True, resumed=True)
    assert decode_event({"type": "session.ready"}) == Ready("")  # what fakes send


@pytest.mark.parametrize(("raw", "problem"), [
    ({"type": "reply.started"}, "no turn_id"),
    ({"type": "reply.text", "turn_id": "1", "delta": "x"}, "turn_id is not an integer"),
    ({"type": "transcript", "turn_id": True, "text": "x", "final": True},
     "turn_id is not an integer"),
    ({"type": "transcript", "turn_id": 1, "text": 5, "final": True}, "text is not a string"),
    ({"type": "metrics", "turn_id": 1, "stages": {"a": "fast"}}, "stages are not numbers"),
    ({"type": "session.ready", "output": []}, "output is not an object"),
    ({"type": "error", "code": "busy", "fatal": "yes"}, "fatal is not true or false"),
])
def test_a_broken_event_is_unknown_and_says_why(raw: dict[str, object], problem: str) -> None:
    assert decode_event(raw) == Unknown(str(raw["type"]), raw, problem)


def test_a_type_from_a_newer_server_is_unknown() -> None:
    for raw in ({"type": "reply.emotion", "turn_id": 1}, {"no": "type"}, {"type": 7}):
        event = decode_event(raw)
        assert isinstance(event, Unknown) and event.problem is None and event.raw is raw


async def test_the_event_log_keeps_what_came_and_skips_what_it_cannot_read() -> None:
    told: list[JsonEvent] = []
    log = EventLog(on_event=told.append)
    evs: list[JsonEvent] = [{"type": "session.ready", "session_id": "s", "output": {"sample_rate": 16000}},
           {"type": "reply.started", "turn_id": 1},
           {"type": "reply.text", "turn_id": "one", "delta": "broken"},
           {"type": "reply.emotion", "turn_id": 1, "mood": "cheerful"},
           {"type": "reply.text", "turn_id": 1, "delta": "Hi"},
           {"type": "error", "code": "rate_limited", "message": "slow down", "retry_after": 1},
           {"type": "reply.interrupted", "turn_id": 1, "played_ms": 0, "heard_text": ""}]
    for ev in evs:
        await log.add_event(ev)
    assert log.events == evs and told == evs  # every event, as it came
    assert log.output_rate == 16000 and log.readies == 1
    assert log.turns[1].text == "Hi"
    assert log.turns[1].interrupted == ReplyInterrupted(1, 0, "")
    assert log.errors == [evs[5]]
    assert log.playing() is None  # a cut reply is not reported


def test_the_desktop_apps_own_events_round_trip() -> None:
    own: list[AppEvent] = [Typed("hello"), Played(2, 1500), Muted(True), CameraChanged(True),
           CameraChanged(False, available=False), AppWarning("no camera"),
           Retrying("reconnecting in 0.4 s", "the server is restarting", 1, 10, 0.4),
           Closed(None), Closed("gave up")]
    for event in own:
        assert decode_desktop_event(event.json()) == event
    assert CameraChanged(True, available=False).json() == {"type": "desktop.camera",
                                                           "available": False}
    assert isinstance(decode_desktop_event({"type": "desktop.played", "turn_id": 1}), Unknown)
    assert decode_desktop_event({"type": "reply.started", "turn_id": 1}) == ReplyStarted(1)


def test_matching_on_typed_events() -> None:
    def kind(raw: dict[str, object]) -> str:
        match decode_event(raw):
            case Transcript(text=text, final=True):
                return f"final {text}"
            case ReplyText() | ReplyDone() | SpeechStarted() | SpeechStopped():
                return "reply or speech"
            case Error(code=code, fatal=True):
                return f"fatal {code}"
            case SessionClosing(reconnect=reconnect):
                return f"closing {reconnect}"
            case Metrics() | Scene() | ToolCallRequested() | ToolCancelled():
                return "other"
            case Unknown(type=type_):
                return f"unknown {type_}"
        return "ignored"
    assert kind({"type": "transcript", "turn_id": 1, "text": "hi", "final": True}) == "final hi"
    assert kind({"type": "error", "code": "busy", "message": "", "fatal": True}) == "fatal busy"
    assert kind({"type": "error", "code": "x", "message": ""}) == "ignored"
    assert kind({"type": "session.closing", "reason": "draining"}) == "closing False"
    assert kind({"type": "hello"}) == "unknown hello"
