"""One conversation: owns every task of it (listen, think, speak) in one task group."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from pipelines import turntaking as tt
from pipelines.bargein import (
    ECHO_LOOKBACK_MS,
    BargeInConfig,
    content_words,
    heard_text,
    said_between,
)
from pipelines.compute import Dropped, Priority
from pipelines.engines.base import (
    Asr,
    ChatMessage,
    EndOfTurn,
    Llm,
    ToolCall,
    ToolRunner,
    Tts,
    Vad,
    Vlm,
)
from pipelines.history import History, Item, Kind
from pipelines.listener import Listener, ListenerConfig, is_hallucination
from pipelines.reply import ReplyHandle
from pipelines.text import main_script
from pipelines.tools import APOLOGIES, FILLERS, ToolCalls, ToolsConfig
from pipelines.turn import Turn, TurnConfig
from pipelines.vision import CAMERA_RULE, Looker, VisionConfig, quote, refers_to_scene
from streaming.audio import MODEL_RATE, Float32Array
from streaming.channels import Channel
from streaming.conversation import (
    ReplyOptions,
    ToolSpec,
    call_item_id,
    output_item_id,
    reply_item_id,
    user_item_id,
)
from streaming.errors import ProtocolError, VoxlensError
from streaming.events import (
    AudioFormat,
    Error,
    Event,
    ReplyInterrupted,
    Scene,
    SessionClosing,
    SessionReady,
    SpeechStarted,
    SpeechStopped,
    ToolCancelled,
    Transcript,
)
from streaming.images import Image
from streaming.playout import Playout

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are voxlens, a friendly voice assistant. Your answers are spoken aloud, so reply in "
    "one or two short, plain sentences without lists, markdown or emoji. Answer in the "
    "language the user speaks."
)

# A reminder after the user's words, in their language: the system prompt's "answer in the
# language the user speaks" alone is not enough for the 0.5B LLM, which answered a spoken
# Mandarin statement in English (tests/e2e/test_mandarin.py). The history keeps the words alone.
LANGUAGE_HINTS = {"zh": "（请用简体中文回答。）"}


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


def fixed_system_prompt(instructions: str, *, vision: bool) -> str:
    """The fixed start of every prompt. Kept identical from turn to turn (and for the LLM's
    warm-up) so llama.cpp's prompt cache holds it."""
    return f"{instructions}\n\n{CAMERA_RULE}" if vision else instructions


# A sound over the reply is judged from a little before its voice was noticed (the onset the
# voice detector needs to be sure of it) to its latest voiced frame. Over a long sound the
# echo's prediction misses a frame here and there (20-30 ms in 3 s of echo passing AEC3
# whole): the voice beyond it must also be this share of the stretch.
ONSET_MS = 300
BEYOND_SHARE = 0.04


class _Stop(Exception):
    pass


class Session:
    """Implements the transports' SessionPort (streaming/ports.py) and the listener's Conversation.

    ``run()`` owns every task; ``close()`` (or cancelling ``run``) ends them all.
    """

    def __init__(self, session_id: str, engines: Engines, config: SessionConfig = SessionConfig(),
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self.session_id = session_id
        self.engines = engines
        self.config = config
        self.clock = clock
        self.events: Channel[Event] = Channel(config.event_queue)
        self.history = History(config.history_tokens, engines.llm.count_tokens)
        self._audio: Channel[Float32Array] = Channel(config.audio_queue)
        self._texts: Channel[str] = Channel(4)
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._started = False  # audio or text arrived: format can no longer change
        self.last_input = clock()  # when the client last sent audio or a message (idle time)
        self._next_turn = 0
        self._held: ReplyHandle | None = None  # prepared at a tentative transcript
        self._current: ReplyHandle | None = None  # the released reply the person may be hearing
        self._playout: Playout | None = None  # the transport's reply audio outlet
        self._pushed_ms = 0.0  # input audio received (the listener's positions)
        self._playout_from_ms = 0.0  # input position where the playout's microphone began
        self._played: tuple[int, int] | None = None  # the client's last report: (turn, ms)
        self.turns = tt.TurnTaking(self._judge, bargein=config.bargein.enabled)
        self._timer: asyncio.Task[None] | None = None  # the utterance over the reply runs long
        self._prefill: asyncio.Task[None] | None = None
        self._utterance: int | None = None  # the turn id of the utterance being spoken
        self.reply_options = ReplyOptions()  # how replies are made unless one says otherwise
        self._recent: deque[Turn] = deque(maxlen=8)  # released replies (truncating one)
        self._committing: asyncio.Task[None] | None = None  # a committed utterance transcribing
        self._language: str | None = None  # the language of the person's latest words
        self.tools = ToolCalls(engines.tools, config.tools, on_output=self._tool_output,
                               on_settled=self._tools_settled, on_filler=self._filler)
        self.on_metrics: Callable[[dict[str, float]], None] | None = None  # turn stage timings
        self.looker = (None if engines.vlm is None else
                       Looker(engines.vlm, config.vision, self._on_scene, session_id=session_id,
                              clock=clock))
        self._listener: Listener | None = None

    # ---- SessionPort ------------------------------------------------------------------

    def ready_event(self) -> SessionReady:
        c = self.config
        return SessionReady(self.session_id, AudioFormat(c.input_rate, c.input_channels),
                            AudioFormat(c.output_rate, 1), self.engines.names())

    def configure(self, *, input_rate: int, input_channels: int, output_rate: int,
                  language: str | None, instructions: str | None,
                  tools: Sequence[ToolSpec] = ()) -> None:
        """Apply ``session.start``; only before any audio or text."""
        self.last_input = self.clock()
        if self._started:
            raise ProtocolError("session.start must come before any audio or text",
                                code="bad_state")
        self.config = replace(self.config, input_rate=input_rate, input_channels=input_channels,
                              output_rate=output_rate)
        self.update(instructions=instructions, language=language, tools=tools)

    def update(self, *, instructions: str | None = None, language: str | None = None,
               tools: Sequence[ToolSpec] | None = None) -> None:
        """Change the instructions, language or the client's tools (None: unchanged); at any
        time, for the next reply on."""
        self.config = replace(self.config, system_prompt=instructions or self.config.system_prompt,
                              language=language or self.config.language)
        if self._listener is not None:
            self._listener.language = self.config.language
        if tools is not None:
            self.tools.client = tuple(tools)

    async def push_audio(self, audio: Float32Array) -> None:
        """Queue 16 kHz mono audio; waits while the listener is behind. Cancelling drops it."""
        self._started = True
        self.last_input = self.clock()
        await self._audio.put(audio)
        self._pushed_ms += audio.size * 1000 / MODEL_RATE

    def push_frame(self, image: Image) -> None:
        """A camera frame (RGB); only the newest unread one is kept."""
        self.last_input = self.clock()
        if self.looker is None:
            raise ProtocolError("vision is not enabled on this server", code="unsupported")
        self.looker.push(image)

    def attach_playout(self, playout: Playout) -> None:
        self._playout = playout
        self._playout_from_ms = self._pushed_ms - playout.mic_samples * 1000 / MODEL_RATE

    def interrupt(self) -> None:
        """The client's stop: cut the reply now, whatever is playing or being prepared."""
        self.last_input = self.clock()
        if self._audible() is not None:
            self._stop_reply()

    def playback(self, played_ms: int, turn_id: int | None) -> None:
        self.last_input = self.clock()
        if turn_id is None:
            if self._current is None:
                return
            turn_id = self._current.turn_id
        self._played = (turn_id, played_ms)

    def submit_text(self, text: str) -> None:
        """A typed user turn; raises ProtocolError when typed turns arrive faster than handled."""
        self._started = True
        self.last_input = self.clock()
        if not self._texts.put_nowait(text):
            raise ProtocolError("too many typed turns at once; wait for a reply", code="busy")

    # ---- the conversation as items (the Realtime endpoint; tool results) --------------

    @property
    def auto_reply(self) -> bool:
        """Whether the person's finished utterance starts a reply (else the client asks)."""
        return self.turns.auto_reply

    @auto_reply.setter
    def auto_reply(self, on: bool) -> None:
        self.turns.auto_reply = on

    @property
    def instructions(self) -> str:
        return self.config.system_prompt

    @property
    def client_tools(self) -> Sequence[ToolSpec]:
        return self.tools.client

    def detect_turns(self, *, threshold: float | None, silence_ms: int | None,
                     prefix_ms: int | None, interrupt: bool) -> None:
        """A client's server-VAD settings (None: the server's). A fixed silence replaces the
        adaptive endpoint; ``interrupt``: speech over a reply cuts it."""
        c = self.config
        seg = c.listener.segmenter
        seg = replace(seg, threshold=threshold if threshold is not None else seg.threshold,
                      neg_threshold=min(seg.neg_threshold, threshold or seg.neg_threshold),
                      silence_ms=silence_ms or seg.silence_ms, pad_ms=prefix_ms or seg.pad_ms)
        endpoint = replace(c.listener.endpoint,
                           adaptive=c.listener.endpoint.adaptive and silence_ms is None)
        listener = replace(c.listener, segmenter=seg, endpoint=endpoint)
        self.config = replace(c, listener=listener, bargein=replace(c.bargein, enabled=interrupt))
        self.turns.bargein = interrupt
        if self._listener is not None:
            self._listener.reconfigure(listener)

    def tool_result(self, call_id: str, output: str, *, respond: bool = True) -> None:
        """The client's result of a ``tool.call``; ``respond``: the reply goes on with it once
        every call of that reply has its result. Raises ProtocolError for a call not waiting."""
        self.last_input = self.clock()
        if self.tools.result(call_id, output) is not None and respond:
            self.respond()

    def add_message(self, kind: Kind, text: str, *, item_id: str | None = None,
                    after: str | None = None) -> str:
        """Put words in the conversation without a reply (a client's user or assistant
        message); returns the item's id."""
        self._started = True
        self.last_input = self.clock()
        if item_id is not None and self.history.find(item_id) is not None:
            raise ProtocolError(f"item {item_id!r} exists already", code="bad_item")
        if after is not None and after != "" and self.history.find(after) is None:
            raise ProtocolError(f"no item {after!r} in the conversation", code="bad_item")
        if kind == "user":
            self._void_calls()
        elif kind != "assistant":
            raise ProtocolError("only user and assistant messages can be added", code="bad_item")
        turn_id = self._new_turn_id()
        item = Item(item_id or (user_item_id(turn_id) if kind == "user" else reply_item_id(turn_id)),
                    kind, text)
        self.history.add(item, after=after)
        return item.id

    def delete_item(self, item_id: str) -> None:
        if not self.history.delete(item_id):
            raise ProtocolError(f"no item {item_id!r} in the conversation", code="bad_item")

    def truncate(self, item_id: str, audio_end_ms: int) -> str:
        """The person heard a reply only up to ``audio_end_ms``: the history keeps that much of
        it (a reply still playing is cut there). Returns the text kept."""
        self.last_input = self.clock()
        turn = next((t for t in self._recent if reply_item_id(t.turn_id) == item_id), None)
        if turn is None:
            raise ProtocolError(f"no reply item {item_id!r} to truncate", code="bad_item")
        if self._current is not None and turn is self._current.turn and self._audible() is not None:
            self._played = (turn.turn_id, audio_end_ms)
            self._stop_reply()
            return turn.heard or ""
        heard = heard_text(turn.spoken, audio_end_ms)
        if heard != turn.text.strip():
            turn.heard = heard
            if turn.reply_item is not None:
                turn.reply_item.text = turn.reply_for_history()
        return heard

    def respond(self, options: ReplyOptions | None = None) -> int:
        """Reply to the conversation as it stands (no new words); returns the reply's turn
        id. A reply being made is cut first."""
        self._started = True
        self.last_input = self.clock()
        turn_id = self._new_turn_id()
        self._release(self._make_reply(turn_id, None, options=options), None)
        return turn_id

    def commit_audio(self, audio: Float32Array) -> int:
        """An utterance the client delimited itself (no server VAD): transcribed into a user
        item (``transcript`` event); no reply until ``respond``. Returns its turn id."""
        if self._tg is None:
            raise ProtocolError("session is not running", code="bad_state")
        self._started = True
        self.last_input = self.clock()
        turn_id = self._new_turn_id()
        previous = self._committing
        self._committing = self._tg.create_task(self._transcribe(turn_id, audio, previous))
        return turn_id

    async def _transcribe(self, turn_id: int, audio: Float32Array,
                          previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])  # in the order committed
        try:
            result = await self.engines.asr.transcribe(
                audio, language=self.config.language, priority=Priority.ASR_FINAL,
                session=self.session_id)
        except VoxlensError as e:
            self.on_error(e)
            return
        voiced_ms = audio.size * 1000 // MODEL_RATE
        text = "" if is_hallucination(result, voiced_ms) else result.text
        self._emit(Transcript(turn_id, text, True, result.language))
        if text:
            self._user_words(turn_id, text, result.language)

    def _user_words(self, turn_id: int, text: str, language: str | None) -> None:
        """The person's words join the conversation with no reply (yet): a tool result still
        awaited comes too late now."""
        self._void_calls()
        self._language = language
        self.history.add(Item(user_item_id(turn_id), "user", text))

    def close(self, error: Error | SessionClosing | None = None) -> None:
        """End the session; a fatal ``error`` or ``session.closing`` (why the server ends it)
        is the client's last event."""
        if error is not None and not self._stop.is_set():
            self._last_word(error)
        self._stop.set()

    def _last_word(self, event: Error | SessionClosing) -> None:
        """Queue the last event even when the event queue is full (what is queued is dropped)."""
        if self.events.closed:
            return
        if not self.events.put_nowait(event):
            self.events.clear()
            self.events.put_nowait(event)

    async def run(self) -> None:
        """Run the session until ``close()``. Cancelling it (or closing) cancels every task
        of the session; the event channel is closed on the way out."""
        self._listener = Listener(self.engines.vad, self.engines.asr, self,
                                  self.config.listener, language=self.config.language,
                                  session_id=self.session_id, clock=self.clock,
                                  turn=self.engines.turn)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._listener.run(self._audio, tg))
                tg.create_task(self._read_texts())
                if self.looker is not None:
                    tg.create_task(self.looker.run())
                await self._stop.wait()
                raise _Stop
        except* _Stop:
            pass
        except* Exception as group:  # a bug or a dead engine: tell the client, end this session
            log.error("session %s failed", self.session_id, exc_info=group)
            self._last_word(Error("internal", "the session failed and was closed", True))
        finally:
            self._tg = None
            self._audio.close()
            self._texts.close()
            self.events.close()

    async def _read_texts(self) -> None:
        async for text in self._texts:
            self._release(self._make_reply(self._new_turn_id(), text), self.clock())

    # ---- Conversation (called by the listener) ----------------------------------------

    def _emit(self, event: Event) -> None:
        """Queue an event without waiting; a client that stops reading loses the oldest
        transcripts rather than stalling the listener."""
        if not self.events.put_nowait(event):
            self.events.dropped += 1

    def _new_turn_id(self) -> int:
        self._next_turn += 1
        return self._next_turn

    def on_voice(self, t_ms: int) -> None:
        self._take(self.turns.feed(self._voice(t_ms)))

    def on_noise(self, t_ms: int) -> None:
        self._take(self.turns.feed(tt.Noise()))

    def on_speech_started(self, t_ms: int) -> int:
        self._started = True
        turn_id = self._utterance = self._new_turn_id()
        self._emit(SpeechStarted(t_ms, turn_id))
        self._take(self.turns.feed(tt.SpeechStarted(turn_id, self._voice(t_ms))))
        return turn_id

    def on_speech_stopped(self, t_ms: int) -> None:
        self._emit(SpeechStopped(t_ms, self._utterance))

    def on_partial(self, turn_id: int, text: str, language: str | None, audio_ms: int) -> None:
        self._emit(Transcript(turn_id, text, False, language, audio_ms))
        self._take(self.turns.feed(tt.Partial(turn_id, text, language)))

    def on_tentative(self, turn_id: int, text: str, language: str | None) -> None:
        self._take(self.turns.feed(tt.Tentative(turn_id, text, language)))

    def on_resumed(self, turn_id: int) -> None:
        self._take(self.turns.feed(tt.Resumed(turn_id)))

    def on_final(self, turn_id: int, text: str | None, language: str | None,
                 speech_end: float) -> None:
        self._take(self.turns.feed(tt.Final(turn_id, text, language, speech_end)))

    def _on_scene(self, scene: Scene) -> None:
        self._emit(scene)
        if self._listener is None or not self._listener.speaking:
            self.prepare_llm()  # the camera lines of the next prompt changed

    def on_error(self, error: VoxlensError, turn_id: int | None = None) -> None:
        self._emit(Error(error.code, error.message, not error.recoverable, turn_id=turn_id))

    # ---- turn-taking: the facts it is fed, the actions it answers with -----------------

    def _voice(self, t_ms: int) -> tt.Voice:
        """Voice at ``t_ms``, with the reply it may be over (one that can still be heard, or
        echoed) and how much of that reply was heard shortly before it."""
        reply = self._audible(echo=True)
        if reply is None:
            return tt.Voice(t_ms, None)
        return tt.Voice(t_ms, reply.turn_id, self._played_ms(reply.turn) - ECHO_LOOKBACK_MS)

    def _take(self, actions: list[tt.Action]) -> None:
        """Perform what turn-taking decided, in order."""
        for action in actions:
            match action:
                case tt.Pause():
                    if self._playout is not None:
                        self._playout.pause()
                case tt.Resume():
                    if self._playout is not None:
                        self._playout.resume()
                case tt.StartTimer(utterance) if self._tg is not None:
                    self._timer = self._tg.create_task(self._overtime(utterance))
                case tt.CancelTimer():
                    if self._timer is not None:
                        self._timer.cancel()
                        self._timer = None
                case tt.Cut():
                    self._cut()
                case tt.Hold(turn_id, text, language):
                    self._held = self._make_reply(turn_id, text, language=language)
                case tt.DropHeld():
                    if self._held is not None:
                        self._held.drop()
                        self._held = None
                case tt.Release(speech_end):
                    held, self._held = self._held, None
                    assert held is not None
                    self._release(held, speech_end)
                case tt.Reply(turn_id, text, language, speech_end):
                    self._release(self._make_reply(turn_id, text, language=language), speech_end)
                case tt.Transcribed(turn_id, text, language):
                    self._emit(Transcript(turn_id, text, True, language))
                case tt.Words(turn_id, text, language):
                    self._user_words(turn_id, text, language)
                case tt.Prefill(text):
                    self.prepare_llm(text)

    def _stop_reply(self) -> None:
        """Cut the reply now (the client's stop, a truncation, a newer turn)."""
        self._take(self.turns.feed(tt.Stop()))

    def _judge(self, barge: tt.Barge, text: str, language: str | None) -> bool:
        """Whether words over a reply are an interruption (not a backchannel, not echo)."""
        cfg = self.config.bargein
        turn = next((t for t in self._recent if t.turn_id == barge.reply), None)
        if turn is None:
            return True
        # echo can only be of the audio sent since shortly before the voice
        sent = self._playout.sent_ms(turn.turn_id) if self._playout is not None else math.inf
        echoed = said_between(turn.spoken, barge.echo_from_ms, sent)
        return (content_words(text, language, echoed, cfg) >= cfg.min_words
                and not self._only_echo(barge))

    def _only_echo(self, barge: tt.Barge) -> bool:
        """Whether the sound so far held nothing the reply's echo cannot account for, when the
        server cancels this client's echo (streaming/echo.py, ``voice_beyond_echo_ms``):
        whatever words AEC3's leftovers were transcribed as, they are not the person's."""
        if self._playout is None or self._listener is None:
            return False
        end = self._listener.voiced_until_ms - self._playout_from_ms
        start = barge.voice_ms - ONSET_MS - self._playout_from_ms
        beyond = self._playout.voice_beyond_echo_ms(start, end)
        log.debug("barge-in: %s ms of voice beyond the echo over %.0f..%.0f ms", beyond, start, end)
        return beyond is not None and beyond < max(self.config.bargein.voice_beyond_echo_ms,
                                                   BEYOND_SHARE * (end - start))

    async def _overtime(self, utterance: int) -> None:
        """The utterance over the reply went on for ``interrupt_after_ms``."""
        await asyncio.sleep(self.config.bargein.interrupt_after_ms / 1000)
        self._timer = None
        barge = self.turns.barging(utterance)
        speaking = (barge is not None and self._listener is not None and self._listener.voicing
                    and not self._only_echo(barge))
        self._take(self.turns.feed(tt.Overtime(utterance, speaking)))

    def _cut(self) -> None:
        """Cut the current reply: drop its unsent audio, cancel its LLM and TTS work, keep
        only what was heard in the history, and tell the client."""
        reply = self._current
        if reply is None or reply.interrupted or self._audible() is None:
            if self._playout is not None:  # nothing left to cut (it may still echo)
                self._playout.resume()
            return
        played = self._played_ms(reply.turn)
        heard = reply.interrupt(played)  # its history entry keeps what was heard
        if self._playout is not None:
            self._playout.cut(reply.turn_id)
        self._emit(ReplyInterrupted(reply.turn_id, round(played), heard))
        self._void_calls()

    # ---- replies -----------------------------------------------------------------------

    def prepare_llm(self, words: str = "") -> None:
        """Warm the LLM's prompt cache with the prompt the next turn will start with (the
        user's words so far, or none yet): the final prompt then costs only what differs.
        Called on each partial transcript, after each turn and on each new observation."""
        if self._tg is None or self._stop.is_set():
            return
        job = self._prefill_llm(self._compose(words), self.tools.offered())
        try:
            self._prefill = self._tg.create_task(job)
        except RuntimeError:  # the session is shutting down
            job.close()

    async def _prefill_llm(self, prompt: list[ChatMessage], tools: Sequence[ToolSpec]) -> None:
        try:
            await self.engines.llm.prefill(prompt, session=self.session_id, tools=tools)
        except Dropped:
            pass  # a newer partial's prefill replaced it
        except VoxlensError as e:
            # the detail may quote the model's output: only at DEBUG (privacy)
            log.warning("LLM prefill failed (%s); log_level=DEBUG says why", e.code)
            log.debug("LLM prefill failed: %s", e.message)


    def _make_reply(self, turn_id: int, user_text: str | None, *, language: str | None = None,
                    options: ReplyOptions | None = None) -> ReplyHandle:
        """A reply to ``user_text`` (None: to the conversation as it stands), held until
        released."""
        if self._tg is None:
            raise ProtocolError("session is not running", code="bad_state")
        if user_text is None:  # a reply to the conversation so far: the latest words' language
            language = self.config.language or self._language
        elif language is None:  # a typed turn: the session's language, else Chinese by script
            language = self.config.language or ("zh" if main_script(user_text) == "han" else None)
        turn = Turn(turn_id, user_text, [], self.engines.llm, self.engines.tts, self.events,
                    self.config.output_rate, self.config.turn, self.clock,
                    session_id=self.session_id, on_metrics=self.on_metrics,
                    audio_room=self._audio_room, language=language,
                    options=options or self.reply_options, tools=self.tools.offered(),
                    server_tools=self.tools.server_names())
        return ReplyHandle(turn, self._tg.create_task(self._run_turn(turn)))

    def _release(self, reply: ReplyHandle, speech_end: float | None) -> None:
        if self._current is not None and self._current.making:
            self._stop_reply()  # a newer turn replaces the reply still being made
        # (a reply already made plays out its last queued audio; the new one follows it)
        if reply.turn.user_text is not None:
            self._void_calls()  # the person spoke: the results of earlier calls come too late
            self._language = reply.turn.language
        self._current = reply
        self._recent.append(reply.turn)
        reply.release(speech_end)

    async def _audio_room(self) -> None:
        if self._playout is not None:
            await self._playout.room()

    def _audible(self, *, echo: bool = False) -> ReplyHandle | None:
        """The released reply while it is being prepared, sent or played (``echo``: or can
        still be heard back in the microphone)."""
        reply = self._current
        if reply is None or reply.interrupted:
            return None
        if reply.making:
            return reply
        if self._playout is not None and (self._playout.echoing(reply.turn_id) if echo
                                          else self._playout.audible(reply.turn_id)):
            return reply
        return None

    def _played_ms(self, turn: Turn) -> float:
        """How much of the reply's audio the person heard: the client's report, else what was
        sent minus what is probably still in the client's buffers."""
        report = self._played[1] if self._played and self._played[0] == turn.turn_id else None
        if self._playout is None:
            total = sum(c.duration_ms for c in turn.spoken)
            return float(report) if report is not None else total
        if report is not None:
            return min(float(report), self._playout.sent_ms(turn.turn_id))
        return self._playout.heard_ms(turn.turn_id)

    def system_prompt(self, instructions: str | None = None) -> str:
        return fixed_system_prompt(instructions or self.config.system_prompt,
                                   vision=self.looker is not None)

    def _compose(self, user_text: str | None, seen: str | None = None,
                 language: str | None = None, instructions: str | None = None) -> list[ChatMessage]:
        """Fixed system prompt, history, then the user message: the recent camera lines, then
        the user's words (followed by the fresh observation ``seen`` for a turn about the
        scene). Everything before the words changes rarely (coarse ages), so the prefill from
        a partial transcript has already put it in the LLM's cache when the final comes."""
        said = user_text
        if user_text is None:
            pass  # a reply to the conversation as it stands
        elif seen is not None:
            said = f"{user_text}\n[camera, now: {quote(seen)}]"
        elif self.looker is not None and (block := self.looker.prompt_block()):
            said = f"{block}\n{user_text}"
        if said is not None and language in LANGUAGE_HINTS:  # last: the prefill is a prefix
            said = f"{said}\n{LANGUAGE_HINTS[language]}"
        return self.history.prompt(self.system_prompt(instructions), said)

    async def _prompt(self, turn: Turn) -> list[ChatMessage]:
        """Look at the scene first when the turn is about it, then compose the prompt. The
        history keeps the observation with the question, so later answers stay grounded."""
        seen = None
        if self.looker is not None and turn.user_text and refers_to_scene(turn.user_text):
            seen = await self.looker.look_now(turn.user_text)
        if seen is not None:
            turn.history_text = f"{turn.user_text}\n[camera: {quote(seen)}]"
        return self._compose(turn.user_text, seen, turn.language, turn.options.instructions)

    async def _run_turn(self, turn: Turn) -> None:
        completed = False
        try:
            if turn.user_text is None and self._committing is not None:
                await asyncio.wait([self._committing])  # the words committed before this reply
            turn.messages = await self._prompt(turn)
            await turn.run()
            completed = True
        except* VoxlensError as group:
            for e in group.exceptions:
                assert isinstance(e, VoxlensError)
                self.on_error(e, turn.turn_id if turn.released.is_set() else None)
        finally:
            if turn.released.is_set():
                self._remember(turn, completed)
                self.prepare_llm()

    def _remember(self, turn: Turn, completed: bool) -> None:
        """The released reply joins the history: the person's words, the reply as heard, and
        the tools it called; a completed reply's calls start (the server's) or wait for the
        client's results; the calls of a reply cut short are void."""
        if turn.user_text is not None:
            self.history.add(Item(user_item_id(turn.turn_id), "user",
                                  turn.history_text or turn.user_text))
        if turn.options.script is None:  # fillers and apologies are not part of it
            turn.reply_item = self.history.add(Item(reply_item_id(turn.turn_id), "assistant",
                                                    turn.reply_for_history()))
        calls = (turn.calls if completed else  # cut short: only the calls the client was told of
                 [c for c in turn.calls if c.name not in turn.server_tools][:turn.calls_sent])
        for call in calls:
            self.history.add(Item(call_item_id(call.call_id), "call", "", call))
        if calls:
            self.tools.start(turn.turn_id, calls, self._tg if completed else None)
            if not completed or self._tg is None:
                self._void_calls()

    def _void_calls(self) -> None:
        for turn_id, call in self.tools.void():
            self._emit(ToolCancelled(turn_id, call.call_id))

    def _tool_output(self, call: ToolCall, text: str) -> None:
        after = call_item_id(call.call_id)
        self.history.add(Item(output_item_id(call.call_id), "output", text, call),
                         after=after if self.history.find(after) is not None else None)

    def _tools_settled(self, turn_id: int, failed: bool) -> None:
        """Every server tool of a reply has its result: go on (or apologise)."""
        if self._stop.is_set() or self._tg is None:
            return
        apology = APOLOGIES.get(self._language, APOLOGIES[None])
        self.respond(replace(self.reply_options, script=apology) if failed else None)

    def _filler(self) -> None:
        """A server tool runs long: say so, unless something is being said."""
        if self._audible() is None and self._tg is not None and not self._stop.is_set():
            self.respond(replace(self.reply_options,
                                 script=FILLERS.get(self._language, FILLERS[None])))
