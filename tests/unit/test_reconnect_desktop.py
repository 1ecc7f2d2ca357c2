"""What the desktop app shows and does while it reconnects (client/desktop/state.py,
client/desktop/app.py), without a server: the state and the words on screen, a new session's
turns kept apart from the old one's, and the old session's reply stopped."""

from __future__ import annotations

from client.common.reconnect import Ending, Retry
from client.desktop.events import RECONNECTING
from client.desktop.state import DesktopState
from tests.unit.test_desktop import loud, offline_app

CLOSING = {"type": "session.closing", "reason": "draining", "reconnect": True,
           "message": "this server is shutting down; connect again to go on"}


def test_the_window_says_it_reconnects_then_goes_on_with_the_new_session() -> None:
    s = DesktopState()
    s.apply({"type": "session.ready", "session_id": "a", "models": {}})
    s.apply({"type": "desktop.typed", "text": "Hello"})
    s.apply({"type": "reply.started", "turn_id": 1})
    s.apply({"type": "reply.text", "turn_id": 1, "delta": "Hi there."})
    s.apply(CLOSING)
    assert (s.state, s.error) == ("reconnecting", "The assistant is restarting; reconnecting…")
    s.apply({"type": RECONNECTING, "message": "the server is restarting: reconnecting in 0.4 s "
             "(try 1 of 10)", "reason": "the server is restarting", "attempt": 1, "tries": 10,
             "wait_s": 0.4})
    assert s.state == "reconnecting"
    assert s.error == "The server is restarting: reconnecting in 0.4 s (try 1 of 10)"
    s.apply({"type": "session.ready", "session_id": "b", "models": {}})
    assert s.state == "listening" and s.error is None
    # the new session numbers its turns afresh: its turn 1 is not the old one
    s.apply({"type": "desktop.typed", "text": "Are you back?"})
    s.apply({"type": "reply.started", "turn_id": 1})
    s.apply({"type": "reply.text", "turn_id": 1, "delta": "Yes."})
    s.apply({"type": "reply.done", "turn_id": 1, "text": "Yes."})
    assert [f"{line.who}: {line.text}" for line in s.log] == [
        "you: Hello", "assistant: Hi there.", "you: Are you back?", "assistant: Yes."]
    assert s.reply == "Yes."


def test_a_closing_without_reconnect_and_a_final_ending_are_shown() -> None:
    s = DesktopState()
    s.apply({**CLOSING, "reconnect": False, "message": "Maintenance until noon."})
    assert (s.state, s.error) == ("disconnected", "Maintenance until noon.")
    s.apply({"type": "desktop.closed", "reason": "the connection was lost (gave up after 10 tries)"})
    assert (s.state, s.error) == ("disconnected", "the connection was lost (gave up after 10 tries)")


def test_the_app_tells_each_retry_and_stops_the_old_sessions_reply() -> None:
    app, _, events = offline_app()
    app._on_event({"type": "reply.started", "turn_id": 1})
    for _ in range(10):
        app._on_audio(loud())
    assert app.buffer.queued_ms(1) > 0
    app._on_event({"type": "reply.interrupted", "turn_id": 1, "played_ms": 0, "heard_text": ""})
    app._forget_replies()  # the session ended under the reply
    assert app.buffer.queued_ms() == 0 and app.gate.active is None
    app._on_audio(loud())  # nothing of the old reply plays any more
    assert app.buffer.queued_ms(1) == 0
    # the next session numbers its turns afresh: its turn 1 plays, though the old one was cut
    app._on_event({"type": "reply.started", "turn_id": 1})
    app._on_audio(loud())
    assert app.buffer.queued_ms(1) == 20
    app._retrying(Retry(Ending("closing", True, "the server is restarting"), 2, 10, 1.234))
    assert events[-1] == {"type": RECONNECTING, "reason": "the server is restarting",
                          "message": "the server is restarting: reconnecting in 1.2 s "
                          "(try 2 of 10)", "attempt": 2, "tries": 10, "wait_s": 1.23}
    app.client = None  # between sessions
    app.send_text("hello?")
    assert events[-1]["type"] == "desktop.warning"  # not sent, and the person is told
