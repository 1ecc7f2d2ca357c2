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
from streaming.events import Event, Metrics, ReplyAudio, ReplyDone, SessionReady
from streaming.images import Image
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
    events: Channel[Event]

    def ready_event(self) -> SessionReady: ...

    def configure(self, *, input_rate: int, input_channels: int, output_rate: int,
                  language: str | None, instructions: str | None,
                  tools: Sequence[ToolSpec] = ()) -> None: ...

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


async def pump(session: SessionPort, playout: Playout, receive: Callable[[], Awaitable[None]], *,
               send_event: Callable[[Event], Awaitable[None]],
               send_audio: Callable[[bytes], Awaitable[None]],
               hang_up: Callable[[], Awaitable[None]], chunk_ms: int, lead_ms: int) -> None:
    """The life of a transport's connection, for every transport that drains a Playout
    (WebSocket, Realtime, MQTT): ``receive`` takes the client's messages in until the client
    leaves or ends the session, while the session's events go out (``route_event``: reply
    audio into the playout) and the playout's audio leaves in real time, ``lead_ms`` ahead, in
    ``chunk_ms`` pieces, each turn's ``reply.done`` after its last audio. When the session
    ends on its own, ``hang_up``. The session is closed on the way out; cancelling stops it
    all."""
    async def events() -> None:
        try:
            while True:
                event = route_event(await session.events.get(), playout)
                if event is not None:
                    await send_event(event)
        except ChannelClosed:
            await hang_up()
        except ConnectionResetError:
            return

    async def audio() -> None:
        async for chunk in playout.paced(chunk_ms, lead_ms):
            await send_audio(chunk)
            for event in playout.released():  # reply.done after the reply's last audio
                await send_event(event)

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


class ClientAudio:
    """The audio of a transport that carries raw PCM messages (WebSocket, MQTT): the client's
    microphone in its declared format, with the reply's echo removed when the server cancels
    it, into the session; the reply audio out through a Playout the transport drains."""

    def __init__(self, session: SessionPort, *, client_buffer_ms: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._session = session
        ready = session.ready_event()
        self.converter = InputConverter(ready.input.sample_rate, ready.input.channels)
        # the server cancels echo until the client says it has its own AEC (session.start)
        self.playout = Playout(ready.output.sample_rate, client_buffer_ms=client_buffer_ms,
                               client_aec=False, clock=clock)
        session.attach_playout(self.playout)

    def start(self, m: SessionStart, *, resumable: bool) -> bool:
        """Apply ``session.start``: its formats to the session, this converter and the playout.

        A started session refuses it, unless ``resumable`` and its formats are the same: a
        client that reconnects repeats its ``session.start`` and the conversation goes on
        (the playout keeps its queue). Returns whether the session was resumed."""
        converter = InputConverter(m.audio.sample_rate, m.audio.channels)  # refuses bad formats
        rate = m.output_audio.sample_rate
        resumed = False
        try:
            self._session.configure(
                input_rate=m.audio.sample_rate, input_channels=m.audio.channels,
                output_rate=rate, language=m.language, instructions=m.instructions,
                tools=tool_specs(m.tools))
        except ProtocolError as e:
            if not resumable:
                raise
            ready = self._session.ready_event()
            same = (ready.input.sample_rate, ready.input.channels, ready.output.sample_rate) == (
                m.audio.sample_rate, m.audio.channels, rate)
            if e.code != "bad_state" or not same:
                raise ProtocolError("this session is running with another audio format; "
                                    "send session.end first to start a new one",
                                    code="bad_state") from e
            resumed = True
        self.converter = converter
        client_aec = m.audio.echo_cancellation
        if not resumed or client_aec != (self.playout.echo is None):
            self.playout.reconfigure(rate, client_aec=client_aec)
        return resumed

    async def push(self, pcm: bytes) -> None:
        """Microphone PCM in the declared format; waits while the session is behind."""
        audio = self.playout.mic(self.converter.convert(pcm))
        if audio.size:
            await self._session.push_audio(audio)


def tool_specs(tools: Sequence[Tool]) -> list[ToolSpec]:
    return [ToolSpec(t.name, t.description, t.parameters) for t in tools]


def check_audio_message(payload: bytes) -> None:
    """Refuse an audio message over the size limit (before any of it is decoded)."""
    if len(payload) > MAX_AUDIO_MESSAGE_BYTES:
        raise ProtocolError(f"audio message of {len(payload)} bytes exceeds the "
                            f"{MAX_AUDIO_MESSAGE_BYTES}-byte limit", code="too_large")
