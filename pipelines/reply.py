"""A reply as a handle: one ``Turn`` (pipelines/turn.py) and the task that makes it.

A reply is *held* (prepared from a tentative transcript, not yet allowed to speak), then
*released*, and ends *made* (its task done) or *interrupted* (cut where the person heard
it; its history entry then keeps only that). The session keeps two handles at most: the
held reply and the current one.
"""

from __future__ import annotations

import asyncio

from pipelines.bargein import heard_text
from pipelines.turn import Turn


class ReplyHandle:
    def __init__(self, turn: Turn, task: asyncio.Task[None]) -> None:
        self.turn = turn
        self._task = task

    @property
    def turn_id(self) -> int:
        return self.turn.turn_id

    @property
    def held(self) -> bool:
        return not self.turn.released.is_set()

    @property
    def making(self) -> bool:
        """Its LLM and TTS work is still running (or waiting to be released)."""
        return not self._task.done()

    @property
    def interrupted(self) -> bool:
        return self.turn.heard is not None

    def release(self, speech_end: float | None = None) -> None:
        """Let it speak (``speech_end``: when the person's words ended, for the metrics)."""
        self.turn.release(speech_end)

    def drop(self) -> None:
        """A held reply that will not be said: its work stops."""
        self._task.cancel()

    def interrupt(self, played_ms: float) -> str:
        """Cut it after ``played_ms`` of its audio: the rest is not made, and its history
        entry keeps what was heard (written as its task ends, or now when it has ended).
        Returns the words heard."""
        turn = self.turn
        turn.heard = heard_text(turn.spoken, played_ms)
        if self.making:
            self._task.cancel()
        elif turn.reply_item is not None:
            turn.reply_item.text = turn.reply_for_history()
        return turn.heard

    async def made(self) -> None:
        """Wait until its work ended (made, failed, dropped or cut)."""
        await asyncio.wait([self._task])
