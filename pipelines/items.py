"""The conversation as items, for the Realtime endpoint and tool results: messages put in
without a reply, items deleted or truncated to what was heard, replies asked for, audio the
client delimited itself. A part of ``Session`` (its methods run on the session)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

from pipelines.bargein import heard_text
from pipelines.compute import Priority
from pipelines.history import Item, Kind
from pipelines.listener import is_hallucination
from pipelines.session_state import SessionState
from streaming.audio import MODEL_RATE, Float32Array
from streaming.conversation import ReplyOptions, ToolSpec, reply_item_id, user_item_id
from streaming.errors import ProtocolError, VoxlensError
from streaming.events import Transcript


class ConversationItems(SessionState):
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
