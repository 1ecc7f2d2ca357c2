"""One conversation: owns every task of it (listen, think, speak) in one task group.

The session is the listener's ``Conversation`` and the transports' ``SessionPort``; its
parts live beside it: turn-taking's facts and actions (``pipelines/floor.py``), the
conversation as items for the Realtime endpoint (``pipelines/items.py``), the prompt
(``pipelines/prompt.py``), one reply (``pipelines/reply.py``, ``pipelines/turn.py``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace

from pipelines import turntaking as tt
from pipelines.compute import Dropped
from pipelines.engines.base import (
    ChatMessage,
    ToolCall,
)
from pipelines.floor import FloorActions
from pipelines.history import History, Item
from pipelines.items import ConversationItems
from pipelines.listener import Listener
from pipelines.prompt import compose, fixed_system_prompt
from pipelines.reply import ReplyHandle
from pipelines.session_state import Engines as Engines  # (the session's facade)
from pipelines.session_state import SessionConfig as SessionConfig
from pipelines.text import main_script
from pipelines.tools import APOLOGIES, FILLERS, ToolCalls
from pipelines.turn import Turn
from pipelines.vision import Looker, quote, refers_to_scene
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
    Scene,
    SessionClosing,
    SessionReady,
    SpeechStarted,
    SpeechStopped,
    ToolCancelled,
    Transcript,
)
from streaming.images import Image
from streaming.microphone import EchoMeter
from streaming.playout import Playout

log = logging.getLogger(__name__)

DEFAULT_CONFIG = SessionConfig()


class _Stop(Exception):
    pass


class Session(FloorActions, ConversationItems):
    """Implements the transports' SessionPort (streaming/ports.py) and the listener's Conversation.

    ``run()`` owns every task; ``close()`` (or cancelling ``run``) ends them all.
    """

    def __init__(self, session_id: str, engines: Engines, config: SessionConfig = DEFAULT_CONFIG,
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
        # the reply audio, which the transport drains (the one path it takes out)
        self.playout = Playout(config.output_rate, client_buffer_ms=config.bargein.client_buffer_ms,
                               release=self._emit, clock=clock)
        self._echo: EchoMeter | None = None  # the microphone side cancelling the client's echo
        self._pushed_ms = 0.0  # input audio received (the listener's positions)
        self._echo_from_ms = 0.0  # input position where the echo meter's stream began
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
        self.playout.reconfigure(output_rate)
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

    def attach_echo(self, meter: EchoMeter | None) -> None:
        self._echo = meter
        if meter is not None:
            self._echo_from_ms = self._pushed_ms - meter.position_ms

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
        turn = Turn(turn_id, user_text, self.engines.llm, self.engines.tts, self.events,
                    self.playout, self.config.output_rate, self.config.turn, self.clock,
                    session_id=self.session_id, on_metrics=self.on_metrics, language=language,
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

    def system_prompt(self, instructions: str | None = None) -> str:
        return fixed_system_prompt(instructions or self.config.system_prompt,
                                   vision=self.looker is not None)

    def _compose(self, user_text: str | None, seen: str | None = None,
                 language: str | None = None, instructions: str | None = None) -> list[ChatMessage]:
        camera = (self.looker.prompt_block() if self.looker is not None and user_text is not None
                  and seen is None else None)
        return compose(self.history, self.system_prompt(instructions), user_text, camera=camera,
                       seen=seen, language=language)

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
            await turn.run(await self._prompt(turn))
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
