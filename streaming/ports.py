"""What a transport needs from a session. ``pipelines.session.Session`` implements it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from streaming.audio import Float32Array, InputConverter
from streaming.channels import Channel, ChannelClosed
from streaming.conversation import ToolSpec
from streaming.errors import ProtocolError
from streaming.events import Event, SessionReady
from streaming.images import Image
from streaming.microphone import EchoMeter, Microphone
from streaming.playout import Playout
from streaming.protocol import (
    MAX_AUDIO_MESSAGE_BYTES,
    ClientMessage,
    Interrupt,
    Playback,
    SessionStart,
    TextTurn,
    Tool,
    ToolResult,
)


class SessionPort(Protocol):
    session_id: str
    events: Channel[Event]  # everything but the reply audio
    playout: Playout  # the reply audio: the transport drains it (pause, cut … are the session's)

    def ready_event(self) -> SessionReady: ...

    def configure(self, *, input_rate: int, input_channels: int, output_rate: int,
                  language: str | None, instructions: str | None,
                  tools: Sequence[ToolSpec] = ()) -> None: ...

    def attach_echo(self, meter: EchoMeter | None) -> None:
        """The microphone side that cancels this client's echo (None: the client cancels its
        own): barge-in asks it whether a sound was more than the reply's echo."""
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

    def tool_result(self, call_id: str, output: str, *, respond: bool = True) -> None:
        """The result of a tool the client ran (``tool.call``)."""
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
        case ToolResult(call_id=call_id, output=output):
            session.tool_result(call_id, output)
        case _:
            return message
    return None


async def pump(session: SessionPort, receive: Callable[[], Awaitable[None]], *,
               send_event: Callable[[Event], Awaitable[None]],
               send_audio: Callable[[bytes], Awaitable[None]],
               hang_up: Callable[[], Awaitable[None]], chunk_ms: int, lead_ms: int) -> None:
    """The life of a transport's connection, for every transport that sends paced audio
    messages (WebSocket, Realtime, MQTT): ``receive`` takes the client's messages in until the
    client leaves or ends the session, while the session's events go out and its playout's
    audio leaves in real time, ``lead_ms`` ahead, in ``chunk_ms`` pieces (a turn's
    ``reply.done`` joins the events once its last audio is taken). When the session ends on
    its own, ``hang_up``. The session is closed on the way out; cancelling stops it all."""
    async def events() -> None:
        try:
            while True:
                await send_event(await session.events.get())
        except ChannelClosed:
            await hang_up()
        except ConnectionResetError:
            return

    async def audio() -> None:
        async for chunk in session.playout.paced(chunk_ms, lead_ms):
            await send_audio(chunk)

    async with asyncio.TaskGroup() as tg:
        pumps = [tg.create_task(events()), tg.create_task(audio())]
        try:
            await receive()
        # the server ended the session (idle, too long) or the client left while one of its
        # messages was being handled or answered: nothing more to do for it
        except (ChannelClosed, ConnectionResetError):
            pass
        finally:
            session.close()
            for task in pumps:
                task.cancel()


class ClientAudio(Microphone):
    """The microphone of a transport that carries raw PCM messages in a format the client
    declares with ``session.start`` (WebSocket, MQTT, Realtime). The server cancels the
    client's echo until the client says it has its own echo canceller."""

    def __init__(self, session: SessionPort, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        ready = session.ready_event()
        super().__init__(session, rate=ready.input.sample_rate, channels=ready.input.channels,
                         cancel_echo=True, clock=clock)
        self._session_port = session

    def start(self, m: SessionStart, *, resumable: bool) -> bool:
        """Apply ``session.start``: its formats to the session, this converter and the playout.

        A started session refuses it, unless ``resumable`` and its formats are the same: a
        client that reconnects repeats its ``session.start`` and the conversation goes on
        (the playout keeps its queue). Returns whether the session was resumed."""
        converter = InputConverter(m.audio.sample_rate, m.audio.channels)  # refuses bad formats
        rate = m.output_audio.sample_rate
        resumed = False
        try:
            self._session_port.configure(
                input_rate=m.audio.sample_rate, input_channels=m.audio.channels,
                output_rate=rate, language=m.language, instructions=m.instructions,
                tools=tool_specs(m.tools))
        except ProtocolError as e:
            if not resumable:
                raise
            ready = self._session_port.ready_event()
            same = (ready.input.sample_rate, ready.input.channels, ready.output.sample_rate) == (
                m.audio.sample_rate, m.audio.channels, rate)
            if e.code != "bad_state" or not same:
                raise ProtocolError("this session is running with another audio format; "
                                    "send session.end first to start a new one",
                                    code="bad_state") from e
            resumed = True
        self.converter = converter
        server_aec = not m.audio.echo_cancellation
        if not resumed or server_aec != (self.echo is not None):
            self.cancel_echo(server_aec)
        return resumed


def tool_specs(tools: Sequence[Tool]) -> list[ToolSpec]:
    return [ToolSpec(t.name, t.description, t.parameters) for t in tools]


def check_audio_message(payload: bytes) -> None:
    """Refuse an audio message over the size limit (before any of it is decoded)."""
    if len(payload) > MAX_AUDIO_MESSAGE_BYTES:
        raise ProtocolError(f"audio message of {len(payload)} bytes exceeds the "
                            f"{MAX_AUDIO_MESSAGE_BYTES}-byte limit", code="too_large")
