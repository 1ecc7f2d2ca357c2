"""What a transport needs from a session. ``pipelines.session.Session`` implements it."""

from __future__ import annotations

from typing import Protocol

from streaming.audio import Float32Array
from streaming.channels import Channel
from streaming.events import Event, Metrics, ReplyAudio, ReplyDone, SessionReady
from streaming.images import Image
from streaming.playout import Playout
from streaming.protocol import ClientMessage, Interrupt, Playback, TextTurn


class SessionPort(Protocol):
    session_id: str
    events: Channel[Event]

    def ready_event(self) -> SessionReady: ...

    def configure(self, *, input_rate: int, input_channels: int, output_rate: int,
                  language: str | None, instructions: str | None) -> None: ...

    def attach_playout(self, playout: Playout) -> None:
        """The transport's reply audio outlet: the session pauses, resumes and cuts it on
        barge-in and asks it what was heard."""
        ...

    async def push_audio(self, audio: Float32Array) -> None: ...

    def submit_text(self, text: str) -> None: ...

    def push_frame(self, image: Image) -> None: ...

    def interrupt(self) -> None:
        """Stop the reply now (a stop button, push-to-talk)."""
        ...

    def playback(self, played_ms: int, turn_id: int | None) -> None:
        """The client's report of how much of a reply it has played."""
        ...

    def close(self) -> None: ...


def apply_client_message(message: ClientMessage, session: SessionPort) -> ClientMessage | None:
    """Handle the client messages every transport treats alike; return the others
    (``session.start``, ``session.end``, ``image``) for the transport to handle."""
    match message:
        case TextTurn(text=text):
            session.submit_text(text)
        case Playback(played_ms=played_ms, turn_id=turn_id):
            session.playback(played_ms, turn_id)
        case Interrupt():
            session.interrupt()
        case _:
            return message
    return None


def route_event(event: Event, playout: Playout) -> Event | None:
    """Reply audio goes into the playout (the session waits for room before it emits audio);
    a turn's ``reply.done`` and ``metrics`` wait in the playout until its audio has been sent
    (``Playout.released``); every other event is returned for the transport to send now."""
    match event:
        case ReplyAudio(turn_id=turn_id, pcm=pcm):
            playout.put(turn_id, pcm)
            return None
        case ReplyDone(turn_id=turn_id) | Metrics(turn_id=turn_id) if playout.defer(turn_id, event):
            return None
    return event
