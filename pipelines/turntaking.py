"""Turn-taking: who holds the floor, as a state machine with no I/O, no loop and no clock.

The session feeds it what happens (the listener's voice, speech and transcripts, the
client's stop, a timer) and performs the actions it answers with (pause the reply, resume
it, cut it, prepare a reply, release it …). Everything it decides is unit-tested on plain
lists (tests/unit/test_turntaking.py); docs/ARCHITECTURE.md has its table.

State: the *floor* (``Floor``) —

- ``OPEN``: no sound over a reply is being judged (the person may speak, or the assistant
  may be speaking: whether a reply can be heard is a fact the session passes in);
- ``PAUSED``: a sound began over a reply that can be heard; the reply is paused while it is
  unclear whether the sound is speech (a click, a cough, the reply's own echo);
- ``JUDGING``: that sound became an utterance; its words (or its length, when no words come)
  decide whether the person is taking the floor (cut the reply) or not (a backchannel,
  echo: the reply goes on);

and the *held reply*: a reply prepared from the tentative transcript at the first pause,
released when the final transcript agrees, dropped when the person speaks on.

Whether words over a reply are the person's (not a backchannel, not the reply's echo) is a
judgement about audio and text the session makes (``Judge``), asked with the sound's
``Barge`` record.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class Floor(enum.Enum):
    OPEN = "open"
    PAUSED = "paused"
    JUDGING = "judging"


@dataclass(slots=True)
class Barge:
    """A sound over a reply (pipelines/bargein.py has the rules for judging it)."""

    reply: int  # the turn id of the reply it is over
    echo_from_ms: float  # reply audio before this point cannot be echoed in the sound
    voice_ms: int  # input position where the sound began
    utterance: int | None = None  # the listener's turn id once the sound is speech
    dismissed: bool = False  # its latest words were a backchannel or echo


Judge = Callable[[Barge, str, str | None], bool]  # (sound, its words, language) → the person's?


# ---- inputs ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Voice:
    """Voiced input (before it is known to be speech). ``reply``: the reply that can be
    heard (or echoed) now, if any; ``echo_from_ms``: how much of it was heard shortly before."""

    t_ms: int
    reply: int | None
    echo_from_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Noise:
    """The voiced input died before it was speech."""


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """The voiced input is an utterance, ``turn_id``."""

    turn_id: int
    voice: Voice


@dataclass(frozen=True, slots=True)
class Partial:
    turn_id: int
    text: str
    language: str | None


@dataclass(frozen=True, slots=True)
class Tentative:
    """The transcript of the utterance so far, at its first pause (the endpoint may come)."""

    turn_id: int
    text: str
    language: str | None


@dataclass(frozen=True, slots=True)
class Resumed:
    """The person spoke on after the pause: the tentative transcript is void."""

    turn_id: int


@dataclass(frozen=True, slots=True)
class Final:
    turn_id: int
    text: str | None  # None: nothing to transcribe (noise, a hallucination, an ASR error)
    language: str | None
    speech_end: float


@dataclass(frozen=True, slots=True)
class Overtime:
    """The interrupt timer of the utterance ran out; ``speaking``: the person still speaks
    (with more voice than the reply's echo can account for)."""

    utterance: int
    speaking: bool


@dataclass(frozen=True, slots=True)
class Stop:
    """The client (or a newer turn) cuts the reply."""


Input = Voice | Noise | SpeechStarted | Partial | Tentative | Resumed | Final | Overtime | Stop


# ---- actions --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Pause:
    """Pause the reply's audio (the person may be starting to speak)."""


@dataclass(frozen=True, slots=True)
class Resume:
    """The reply's audio goes on where it paused."""


@dataclass(frozen=True, slots=True)
class StartTimer:
    """Feed ``Overtime(utterance, …)`` after ``interrupt_after_ms`` of this utterance."""

    utterance: int


@dataclass(frozen=True, slots=True)
class CancelTimer:
    pass


@dataclass(frozen=True, slots=True)
class Cut:
    """Cut the current reply where the person heard it (or resume its audio when nothing is
    left to cut)."""


@dataclass(frozen=True, slots=True)
class Hold:
    """Prepare a reply to these words, not yet released."""

    turn_id: int
    text: str
    language: str | None


@dataclass(frozen=True, slots=True)
class DropHeld:
    pass


@dataclass(frozen=True, slots=True)
class Release:
    """The held reply is the one: let it speak."""

    speech_end: float


@dataclass(frozen=True, slots=True)
class Reply:
    """Make and release a reply to these words."""

    turn_id: int
    text: str
    language: str | None
    speech_end: float


@dataclass(frozen=True, slots=True)
class Transcribed:
    """The utterance is a user turn with these words (tell the client: a final transcript)."""

    turn_id: int
    text: str
    language: str | None


@dataclass(frozen=True, slots=True)
class Words:
    """The person's words join the conversation with no reply (the client asks for one)."""

    turn_id: int
    text: str
    language: str | None


@dataclass(frozen=True, slots=True)
class Prefill:
    """Warm the LLM with the prompt the next turn will start with (these words so far)."""

    text: str


Action = Pause | Resume | StartTimer | CancelTimer | Cut | Hold | DropHeld | Release | Reply | \
    Transcribed | Words | Prefill


class TurnTaking:
    """Feed it an ``Input``, get the ``Action`` list to perform, in order."""

    def __init__(self, judge: Judge, *, bargein: bool = True, auto_reply: bool = True) -> None:
        self.judge = judge
        self.bargein = bargein  # speech over a reply may cut it
        self.auto_reply = auto_reply  # a finished utterance starts a reply
        self.barge: Barge | None = None
        self.held: tuple[int, str] | None = None  # the held reply's turn id and words

    @property
    def floor(self) -> Floor:
        if self.barge is None:
            return Floor.OPEN
        return Floor.PAUSED if self.barge.utterance is None else Floor.JUDGING

    def barging(self, turn_id: int) -> Barge | None:
        """The sound over the reply that utterance ``turn_id`` is, if any."""
        b = self.barge
        return b if b is not None and b.utterance == turn_id else None

    def feed(self, event: Input) -> list[Action]:
        match event:
            case Voice():
                return self._voice(event)
            case Noise():
                return self._end_barge() if self.floor is Floor.PAUSED else []
            case SpeechStarted(turn_id, voice):
                actions = self._voice(voice)
                if self.floor is Floor.PAUSED:
                    assert self.barge is not None
                    self.barge.utterance = turn_id
                    actions.append(StartTimer(turn_id))
                return actions
            case Partial(turn_id, text, language):
                return self._partial(turn_id, text, language)
            case Tentative(turn_id, text, language):
                return self._tentative(turn_id, text, language)
            case Resumed(turn_id):
                dropped = self._drop_held() if self.held and self.held[0] == turn_id else []
                return [*dropped, Pause()] if self.barging(turn_id) is not None else dropped
            case Final(turn_id, text, language, speech_end):
                return self._final(turn_id, text, language, speech_end)
            case Overtime(utterance, speaking):
                barge = self.barging(utterance)
                if barge is not None and not barge.dismissed and speaking:
                    return self._cut()
                return []
            case Stop():
                return self._cut()
        raise TypeError(f"not a turn-taking input: {event!r}")

    def _voice(self, voice: Voice) -> list[Action]:
        if self.bargein and self.barge is None and voice.reply is not None:
            self.barge = Barge(voice.reply, voice.echo_from_ms, voice.t_ms)
            return [Pause()]
        return []

    def _end_barge(self) -> list[Action]:
        """The sound over the reply was nothing: the reply goes on where it paused."""
        self.barge = None
        return [CancelTimer(), Resume()]

    def _cut(self) -> list[Action]:
        actions: list[Action] = [CancelTimer()] if self.barge is not None else []
        self.barge = None
        return [*actions, Cut()]

    def _drop_held(self) -> list[Action]:
        self.held = None
        return [DropHeld()]

    def _partial(self, turn_id: int, text: str, language: str | None) -> list[Action]:
        actions: list[Action] = []
        if (barge := self.barging(turn_id)) is not None:
            barge.dismissed = not self.judge(barge, text, language)
            if not barge.dismissed:
                actions = self._cut()
        return [*actions, Prefill(text)] if self.barge is None else actions

    def _tentative(self, turn_id: int, text: str, language: str | None) -> list[Action]:
        actions = self._drop_held() if self.held is not None else []
        if (barge := self.barging(turn_id)) is not None:
            if not self.judge(barge, text, language):
                return [*actions, Resume()]  # likely "uh-huh": go on (paused again if it goes on)
            actions += self._cut()
        if self.auto_reply:
            self.held = (turn_id, text)
            actions.append(Hold(turn_id, text, language))
        return actions

    def _final(self, turn_id: int, text: str | None, language: str | None,
               speech_end: float) -> list[Action]:
        actions: list[Action] = []
        barge = self.barging(turn_id)
        if barge is not None and (text is None or not self.judge(barge, text, language)):
            text = None  # a backchannel, noise or the reply's own echo: not a turn
            actions += self._end_barge()
        held = self.held if self.held is not None and self.held[0] == turn_id else None
        if text is None:
            return actions + (self._drop_held() if held is not None else [])
        if barge is not None:
            actions += self._cut()
        actions.append(Transcribed(turn_id, text, language))
        if not self.auto_reply:
            return [*actions, Words(turn_id, text, language)]
        if held is not None and held[1] == text:
            self.held = None
            return [*actions, Release(speech_end)]
        if self.held is not None:
            actions += self._drop_held()
        return [*actions, Reply(turn_id, text, language, speech_end)]
