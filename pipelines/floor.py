"""The session's side of turn-taking (pipelines/turntaking.py decides, this performs): the
facts the state machine is fed (is a reply audible, how much of it was heard, is the sound
only the reply's echo, did the person go on speaking) and the actions it answers with
(pause, resume, hold, release, cut …). A part of ``Session`` (its methods run on it)."""

from __future__ import annotations

import asyncio
import logging

from pipelines import turntaking as tt
from pipelines.bargein import ECHO_LOOKBACK_MS, content_words, said_between
from pipelines.reply import ReplyHandle
from pipelines.session_state import SessionState
from pipelines.turn import Turn
from streaming.events import ReplyInterrupted, Transcript

log = logging.getLogger(__name__)

# A sound over the reply is judged from a little before its voice was noticed (the onset the
# voice detector needs to be sure of it) to its latest voiced frame. Over a long sound the
# echo's prediction misses a frame here and there (20-30 ms in 3 s of echo passing AEC3
# whole): the voice beyond it must also be this share of the stretch.
ONSET_MS = 300
BEYOND_SHARE = 0.04


class FloorActions(SessionState):
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
                    self.playout.pause()
                case tt.Resume():
                    self.playout.resume()
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
        sent = self.playout.sent_ms(turn.turn_id)
        echoed = said_between(turn.spoken, barge.echo_from_ms, sent)
        return (content_words(text, language, echoed, cfg) >= cfg.min_words
                and not self._only_echo(barge))

    def _only_echo(self, barge: tt.Barge) -> bool:
        """Whether the sound so far held nothing the reply's echo cannot account for, when the
        server cancels this client's echo (streaming/echo.py, ``voice_beyond_echo_ms``):
        whatever words AEC3's leftovers were transcribed as, they are not the person's."""
        if self._echo is None or self._listener is None:
            return False
        end = self._listener.voiced_until_ms - self._echo_from_ms
        start = barge.voice_ms - ONSET_MS - self._echo_from_ms
        beyond = self._echo.voice_beyond_echo_ms(start, end)
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
            self.playout.resume()  # nothing left to cut (it may still echo)
            return
        played = self._played_ms(reply.turn)
        heard = reply.interrupt(played)  # its history entry keeps what was heard
        self.playout.cut(reply.turn_id)
        self._emit(ReplyInterrupted(reply.turn_id, round(played), heard))
        self._void_calls()

    def _audible(self, *, echo: bool = False) -> ReplyHandle | None:
        """The released reply while it is being prepared, sent or played (``echo``: or can
        still be heard back in the microphone)."""
        reply = self._current
        if reply is None or reply.interrupted:
            return None
        if reply.making:
            return reply
        if self.playout.echoing(reply.turn_id) if echo else self.playout.audible(reply.turn_id):
            return reply
        return None

    def _played_ms(self, turn: Turn) -> float:
        """How much of the reply's audio the person heard: the client's report, else what was
        sent minus what is probably still in the client's buffers."""
        report = self._played[1] if self._played and self._played[0] == turn.turn_id else None
        if report is not None:
            return min(float(report), self.playout.sent_ms(turn.turn_id))
        return self.playout.heard_ms(turn.turn_id)
