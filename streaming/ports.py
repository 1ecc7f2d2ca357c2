"""What a transport needs from a session. ``pipelines.session.Session`` implements it."""

from __future__ import annotations

from typing import Protocol

from streaming.audio import Float32Array
from streaming.channels import Channel
from streaming.events import Event, SessionReady


class SessionPort(Protocol):
    session_id: str
    events: Channel[Event]

    def ready_event(self) -> SessionReady: ...

    def configure(self, *, input_rate: int, input_channels: int, output_rate: int,
                  language: str | None, instructions: str | None) -> None: ...

    async def push_audio(self, audio: Float32Array) -> None: ...

    def submit_text(self, text: str) -> None: ...

    def close(self) -> None: ...
