"""The desktop window in a real Tk on a virtual display (Xvfb): events become what is shown,
keys and the text box become commands. No server, no network thread."""

from __future__ import annotations

import queue
import tkinter as tk
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from client.desktop.camera import FrameSlot
from client.desktop.window import DesktopWindow


class Recorder:
    """The window's commands, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def set_muted(self, muted: bool) -> None:
        self.calls.append(("muted", muted))

    def set_camera(self, on: bool) -> None:
        self.calls.append(("camera", on))

    def send_text(self, text: str) -> None:
        self.calls.append(("text", text))

    def interrupt(self) -> None:
        self.calls.append(("interrupt", None))

    def quit(self) -> None:
        self.calls.append(("quit", None))


@pytest.fixture
def window(xdisplay: str) -> Iterator[tuple[DesktopWindow, Recorder, queue.Queue[dict[str, Any]], FrameSlot]]:
    root = tk.Tk(screenName=xdisplay)
    inbox: queue.Queue[dict[str, Any]] = queue.Queue()
    slot = FrameSlot()
    commands = Recorder()
    w = DesktopWindow(root, commands, inbox, slot)
    root.update()
    yield w, commands, inbox, slot
    root.destroy()


def feed(w: DesktopWindow, inbox: queue.Queue[dict[str, Any]], *events: dict[str, Any]) -> None:
    for ev in events:
        inbox.put(ev)
    w.poll()
    w.root.update()


def press(w: DesktopWindow, widget: tk.Misc, key: str) -> None:
    widget.focus_force()
    w.root.update()
    widget.event_generate(key, when="tail")
    w.root.update()


def test_events_become_captions_state_log_and_scene(window) -> None:  # type: ignore[no-untyped-def]
    w, _, inbox, slot = window
    assert w.shown()["preview"] is False  # no frame yet: a placeholder
    slot.put(np.full((300, 400, 3), 200, np.uint8))
    feed(w, inbox,
         {"type": "session.ready", "models": {"asr": "whisper-base"}},
         {"type": "desktop.camera", "on": True},
         {"type": "transcript", "turn_id": 1, "text": "What do", "final": False})
    shown = w.shown()
    assert (shown["state"], shown["you"], shown["preview"]) == ("listening", "What do", True)
    feed(w, inbox,
         {"type": "transcript", "turn_id": 1, "text": "What do you see?", "final": True},
         {"type": "reply.started", "turn_id": 1},
         {"type": "reply.text", "turn_id": 1, "delta": "I see a cat"},
         {"type": "scene", "text": "likely a tabby cat", "t_ms": 1, "engine": "scene"})
    shown = w.shown()
    assert shown["state"] == "speaking"
    assert (shown["you"], shown["reply"]) == ("What do you see?", "I see a cat")
    assert shown["scene"] == "Camera: likely a tabby cat"
    assert shown["log"] == "You: What do you see?\n\nvoxlens: I see a cat"
    feed(w, inbox, {"type": "reply.done", "turn_id": 1, "text": "I see a cat."},
         {"type": "desktop.played", "turn_id": 1, "played_ms": 1500},
         {"type": "desktop.camera", "on": False})
    slot.put(None)
    feed(w, inbox)
    shown = w.shown()
    assert (shown["state"], shown["reply"], shown["camera"]) == ("listening", "I see a cat.",
                                                                 "Camera on (c)")
    assert shown["preview"] is False
    feed(w, inbox, {"type": "error", "code": "busy", "message": "", "fatal": True})
    assert w.shown()["state"] == "error" and "busy" in w.shown()["notice"]


def test_keys_and_the_text_box_become_commands(window) -> None:  # type: ignore[no-untyped-def]
    w, commands, inbox, _ = window
    feed(w, inbox, {"type": "desktop.camera", "on": True})
    press(w, w.canvas, "<KeyPress-m>")
    press(w, w.canvas, "<KeyPress-c>")
    assert commands.calls == [("muted", True), ("camera", False)]
    feed(w, inbox, {"type": "desktop.muted", "muted": True})
    assert w.shown()["mute"] == "Unmute (m)"
    press(w, w.canvas, "<KeyPress-m>")
    assert commands.calls[-1] == ("muted", False)
    press(w, w.canvas, "<KeyPress-s>")  # s: stop the reply
    assert commands.calls[-1] == ("interrupt", None)

    press(w, w.canvas, "<KeyPress-t>")  # t: into the text box
    assert w.root.focus_get() is w.entry
    w.entry.insert(0, "I a")
    press(w, w.entry, "<KeyPress-m>")  # a letter typed there, not a shortcut
    press(w, w.entry, "<Return>")
    assert commands.calls[-1] == ("text", "I am") and w.entry.get() == ""
    assert len(commands.calls) == 5
    press(w, w.entry, "<Escape>")  # Esc leaves the box first
    assert ("quit", None) not in commands.calls and w.root.focus_get() is w.canvas
    press(w, w.canvas, "<Escape>")
    assert commands.calls[-1] == ("quit", None) and w.closing
    assert w.shown()["state"] == "closing…"
