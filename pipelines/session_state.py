"""What a session is made of: its engines, its configuration, and the state its parts share.

``Session`` (pipelines/session.py) assigns that state in its ``__init__``; its parts —
turn-taking's facts and actions (pipelines/floor.py) and the conversation as items
(pipelines/items.py) — are written against ``SessionState``, which declares it and the
methods the parts call on each other."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pipelines import turntaking as tt
from pipelines.bargein import BargeInConfig
from pipelines.engines.base import Asr, EndOfTurn, Llm, ToolRunner, Tts, Vad, Vlm
from pipelines.history import History
from pipelines.listener import Listener, ListenerConfig
from pipelines.prompt import DEFAULT_SYSTEM_PROMPT
from pipelines.reply import ReplyHandle
from pipelines.tools import ToolCalls, ToolsConfig
from pipelines.turn import Turn, TurnConfig
from pipelines.vision import VisionConfig
from streaming.channels import Channel
from streaming.conversation import ReplyOptions
from streaming.errors import VoxlensError
from streaming.events import Event
from streaming.microphone import EchoMeter
from streaming.playout import Playout


@dataclass(frozen=True, slots=True)
class Engines:
    vad: Vad
    asr: Asr
    llm: Llm
    tts: Tts
    vlm: Vlm | None = None  # None: camera frames are refused
    turn: EndOfTurn | None = None  # None: the endpoint waits by the transcript's rules only
    tools: ToolRunner | None = None  # the server's own tools (MCP servers), if any

    def names(self) -> dict[str, str]:
        names = {"vad": type(self.vad).__name__, "asr": self.asr.name, "llm": self.llm.name,
                 "tts": self.tts.name}
        if self.vlm is not None:
            names["vision"] = self.vlm.name
        if self.turn is not None:
            names["turn"] = self.turn.name
        return names


@dataclass(frozen=True, slots=True)
class SessionConfig:
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    turn: TurnConfig = field(default_factory=TurnConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    bargein: BargeInConfig = field(default_factory=BargeInConfig)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    history_tokens: int = 1024
    language: str | None = None
    input_rate: int = 16_000
    input_channels: int = 1
    output_rate: int = 24_000
    audio_queue: int = 100  # input chunks buffered before the transport waits
    event_queue: int = 512
    tools: ToolsConfig = field(default_factory=ToolsConfig)


class SessionState:
    """The state of one session, shared by its parts (assigned in ``Session.__init__``)."""

    session_id: str
    engines: Engines
    config: SessionConfig
    clock: Callable[[], float]
    events: Channel[Event]  # everything but the reply audio
    playout: Playout  # the reply audio, which the transport drains
    history: History
    turns: tt.TurnTaking
    tools: ToolCalls
    last_input: float  # when the client last sent audio or a message (idle time)
    _tg: asyncio.TaskGroup | None  # the session's task group while it runs
    _started: bool  # audio or text arrived: the format can no longer change
    _listener: Listener | None
    _held: ReplyHandle | None  # prepared at a tentative transcript
    _current: ReplyHandle | None  # the released reply the person may be hearing
    _recent: deque[Turn]  # released replies (truncating one)
    _played: tuple[int, int] | None  # the client's last playback report: (turn, ms)
    _echo: EchoMeter | None  # the microphone side cancelling the client's echo
    _echo_from_ms: float  # input position where the echo meter's stream began
    _timer: asyncio.Task[None] | None  # the utterance over the reply runs long
    _committing: asyncio.Task[None] | None  # a committed utterance transcribing
    _language: str | None  # the language of the person's latest words

    # ---- what the parts call on each other (each defined once, in its part) -----------

    def _emit(self, event: Event) -> None:
        raise NotImplementedError

    def _new_turn_id(self) -> int:
        raise NotImplementedError

    def _make_reply(self, turn_id: int, user_text: str | None, *, language: str | None = None,
                    options: ReplyOptions | None = None) -> ReplyHandle:
        raise NotImplementedError

    def _release(self, reply: ReplyHandle, speech_end: float | None) -> None:
        raise NotImplementedError

    def _void_calls(self) -> None:
        raise NotImplementedError

    def prepare_llm(self, words: str = "") -> None:
        raise NotImplementedError

    def on_error(self, error: VoxlensError, turn_id: int | None = None) -> None:
        raise NotImplementedError

    def _user_words(self, turn_id: int, text: str, language: str | None) -> None:
        raise NotImplementedError

    def _audible(self, *, echo: bool = False) -> ReplyHandle | None:
        raise NotImplementedError

    def _stop_reply(self) -> None:
        raise NotImplementedError
