"""What a transport needs from a session. ``pipelines.session.Session`` implements it."""

from __future__ import annotations

from typing import Protocol

from streaming.audio import Float32Array
from streaming.channels import Channel
from streaming.events import Event, SessionReady
from streaming.images import Image
from streaming.protocol import ClientMessage, Interrupt, Playback, TextTurn


class SessionPort(Protocol):
    session_id: str
    events: Channel[Event]

    def ready_event(self) -> SessionReady: ...

    def configure(self, *, input_rate: int, input_channels: int, output_rate: int,
                  language: str | None, instructions: str | None) -> None: ...

    async def push_audio(self, audio: Float32Array) -> None: ...

    def submit_text(self, text: str) -> None: ...

    def push_frame(self, image: Image) -> None: ...

    def close(self) -> None: ...


def apply_client_message(message: ClientMessage, session: SessionPort) -> ClientMessage | None:
    """Handle the client messages every transport treats alike; return the others
    (``session.start``, ``session.end``, ``image``) for the transport to handle."""
    match message:
        case TextTurn(text=text):
            session.submit_text(text)
        case Playback() | Interrupt():
            pass  # barge-in bookkeeping arrives with the barge-in work; accepted
        case _:
            return message
    return None
