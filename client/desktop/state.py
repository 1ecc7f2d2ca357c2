"""The desktop app's logic without I/O: what the window shows (``DesktopState``, fed with
protocol events and the app's own ``desktop.*`` events, client/desktop/events.py) and which
frames of the continuous reply track belong to a reply (``ReplyGate``). Both are plain classes,
unit-tested without a server."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

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
    Transcript,
)
from client.desktop.events import (
    AppWarning,
    CameraChanged,
    Closed,
    Muted,
    Played,
    Retrying,
    Typed,
    decode_desktop_event,
)

LOG_LINES = 200  # conversation lines the window keeps
SILENT_PEAK = 64  # a reply frame quieter than this (of 32768) counts as silence


@dataclass
class Line:
    """One line of the conversation log."""

    who: str  # "you" or "assistant"
    text: str
    turn_id: int | None = None
    interrupted: bool = False


def plain_error(code: str, message: str) -> str:
    match code:
        case "busy":
            return "The assistant is busy with other people right now. Please try again in a moment."
        case "not_ready":
            return "The assistant is still starting up. Please try again in a few seconds."
        case "draining":
            return "The assistant is restarting."
        case "engine_failed":
            return "Sorry, something went wrong while answering. Please try again."
        case _:
            return message or "Something went wrong."


class DesktopState:
    """Everything the window shows, updated by ``apply(event)``; ``version`` grows with every
    change so a view redraws only when something changed."""

    def __init__(self) -> None:
        # connecting, listening, thinking, speaking, reconnecting, disconnected, error
        self.state = "connecting"
        self.caption_turn: int | None = None  # the turn the captions belong to
        self.you = ""  # the person's words: live while they speak, then the final transcript
        self.you_final = False
        self.reply = ""  # the assistant's reply as it streams
        self.reply_turn: int | None = None
        self.scene: str | None = None
        self.error: str | None = None
        self.warnings: collections.deque[str] = collections.deque(maxlen=2)  # the newest
        self.models = ""
        self.latency_ms: float | None = None
        self.muted = False
        self.camera_on = True
        self.camera_available = True
        self.log: collections.deque[Line] = collections.deque(maxlen=LOG_LINES)
        self.version = 0

    def _reply_line(self, turn_id: int) -> Line | None:
        for line in reversed(self.log):
            if line.who == "assistant" and line.turn_id == turn_id:
                return line
        return None

    def _new_turn_caption(self, turn_id: int | None) -> None:
        if turn_id is None or turn_id != self.caption_turn:
            self.caption_turn = turn_id
            self.reply = ""

    def apply(self, ev: JsonEvent) -> None:
        """Take one event (the server's or the app's own, as JSON)."""
        match decode_desktop_event(ev):
            case Ready(models=models):
                self.state = "listening"
                self.models = " · ".join(models.values())
                self.error = None
                # a new session (after a reconnection) numbers its turns afresh
                self.caption_turn = self.reply_turn = None
                for earlier in self.log:
                    earlier.turn_id = None
            case SessionClosing(message=message, reconnect=reconnect):
                self.state = "reconnecting" if reconnect else "disconnected"
                self.error = ("The assistant is restarting; reconnecting…" if reconnect
                              else message or "The server ended the session.")
            case Transcript(turn_id, text, final):
                self._new_turn_caption(turn_id)
                self.you, self.you_final = text, final
                if final:
                    self.log.append(Line("you", text, turn_id))
                    self.state = "thinking"
            case ReplyStarted(turn_id):
                # the captions keep the words this reply answers (a typed turn's have no id yet)
                if self.caption_turn is not None and turn_id != self.caption_turn:
                    self.you = ""
                self.caption_turn = turn_id
                self.reply_turn, self.reply = turn_id, ""
                self.log.append(Line("assistant", "", turn_id))
                self.state = "speaking"
            case ReplyText(turn_id, delta):
                line = self._reply_line(turn_id)
                if line is not None:
                    line.text += delta
                if turn_id == self.reply_turn:
                    self.reply += delta
            case ReplyDone(turn_id, text):
                line = self._reply_line(turn_id)
                if line is not None:
                    line.text = text
                if turn_id == self.reply_turn:
                    self.reply = text
            case ReplyInterrupted(turn_id, heard_text=heard):
                # the history keeps what the person heard; so does the window
                line = self._reply_line(turn_id)
                if line is not None:
                    line.text, line.interrupted = heard, True
                if turn_id == self.reply_turn:
                    self.reply = heard
                    if self.state == "speaking":
                        self.state = "listening"
            case Metrics(stages=stages):
                self.latency_ms = stages.get("first_audio_sent")
            case Scene(text=text):
                self.scene = text
            case Error(code=code, message=message, fatal=fatal):
                self.error = plain_error(code, message)
                if fatal:
                    self.state = "error"
            case Typed(text):
                self._new_turn_caption(None)
                self.you, self.you_final = text, True
                self.log.append(Line("you", text))
                self.state = "thinking"
            case Played(turn_id):
                if turn_id == self.reply_turn and self.state == "speaking":
                    self.state = "listening"
            case Muted(muted):
                self.muted = muted
            case CameraChanged(on, available):
                self.camera_available = available
                self.camera_on = on and available
            case AppWarning(message):
                if message in self.warnings:
                    self.warnings.remove(message)
                self.warnings.append(message)
            case Retrying(message=message):
                self.state = "reconnecting"
                self.error = message[:1].upper() + message[1:]
            case Closed(reason):
                if self.state != "error":
                    self.state = "disconnected"
                if reason:
                    self.error = reason
            case _:
                return  # speech.started/stopped and the rest change nothing shown
        self.version += 1

    def summary(self) -> dict[str, Any]:
        """What is shown, as plain data (printed when the app exits)."""
        return {"state": self.state, "you": self.you, "reply": self.reply, "scene": self.scene,
                "error": self.error, "warnings": list(self.warnings), "muted": self.muted,
                "camera_on": self.camera_on, "log": [f"{line.who}: {line.text}" for line in self.log]}


class ReplyGate:
    """Which frames of the reply track belong to which reply.

    The track never stops (silence between replies), so a reply's audio is: from its first
    audible frame after ``reply.started`` until ``reply.interrupted``, the next ``reply.started``,
    or ``end_silence_ms`` of silence once ``reply.done`` has arrived (the server sends
    ``reply.done`` after the last audio of the reply, so silence then means the end; before
    it, a pause while the next sentence is synthesized does not). Time is counted in audio
    frames fed, not on a clock.
    """

    def __init__(self, rate: int, *, end_silence_ms: int = 600, no_audio_ms: int = 3000) -> None:
        self.rate = rate
        self.end_silence_ms = end_silence_ms
        self.no_audio_ms = no_audio_ms  # a finished reply that never sounded ends after this
        self.active: int | None = None  # the reply whose audio is (still) arriving
        self._audible = False
        self._done = False
        self._quiet_ms = 0.0  # silence since the last audible frame (or since reply.done)

    def started(self, turn_id: int) -> None:
        self.active, self._audible, self._done, self._quiet_ms = turn_id, False, False, 0.0

    def done(self, turn_id: int) -> None:
        if turn_id == self.active:
            self._done = True
            if not self._audible:
                self._quiet_ms = 0.0

    def interrupted(self, turn_id: int) -> None:
        if turn_id == self.active:
            self.active = None

    def feed(self, pcm: npt.NDArray[np.int16]) -> int | None:
        """The reply this frame belongs to, or None (silence between replies)."""
        if self.active is None:
            return None
        ms = pcm.size * 1000 / self.rate
        loud = pcm.size > 0 and int(np.abs(pcm.astype(np.int32)).max()) >= SILENT_PEAK
        if loud:
            self._audible, self._quiet_ms = True, 0.0
            return self.active
        if not self._audible:
            if self._done:
                self._quiet_ms += ms
                if self._quiet_ms >= self.no_audio_ms:
                    self.active = None
            return None  # silence before the reply's first sound is not part of it
        self._quiet_ms += ms
        if self._done and self._quiet_ms >= self.end_silence_ms:
            self.active = None
            return None
        return self.active
