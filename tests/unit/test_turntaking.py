"""Turn-taking as a state machine (pipelines/turntaking.py): inputs in, actions out, on plain
values — no loop, no clock, no engines. The rows of docs/ARCHITECTURE.md's table."""

from __future__ import annotations

from pipelines.turntaking import (
    Barge,
    CancelTimer,
    Cut,
    DropHeld,
    Final,
    Floor,
    Hold,
    Noise,
    Overtime,
    Partial,
    Pause,
    Prefill,
    Release,
    Reply,
    Resume,
    Resumed,
    SpeechStarted,
    StartTimer,
    Stop,
    Tentative,
    Transcribed,
    TurnTaking,
    Voice,
    Words,
)

BACKCHANNELS = {"uh huh", "yeah", "mm"}
REPLY = 3  # the turn id of the reply being heard
OVER_REPLY = Voice(12_000, REPLY, echo_from_ms=800.0)
QUIET = Voice(12_000, None)


def person(barge: Barge, text: str, language: str | None) -> bool:
    """The judge of these tests: anything but a backchannel is the person's."""
    return text not in BACKCHANNELS


def machine(**kwargs: bool) -> TurnTaking:
    return TurnTaking(person, **kwargs)


def over_the_reply(tt: TurnTaking, utterance: int = 7) -> None:
    assert tt.feed(OVER_REPLY) == [Pause()]
    assert tt.feed(SpeechStarted(utterance, OVER_REPLY)) == [StartTimer(utterance)]
    assert tt.floor is Floor.JUDGING


def test_voice_over_a_reply_pauses_it_and_noise_resumes_it() -> None:
    tt = machine()
    assert tt.feed(QUIET) == [] and tt.floor is Floor.OPEN  # nothing to pause
    assert tt.feed(OVER_REPLY) == [Pause()] and tt.floor is Floor.PAUSED
    assert tt.barge == Barge(REPLY, 800.0, 12_000)
    assert tt.feed(OVER_REPLY) == []  # one sound, one pause
    assert tt.feed(Noise()) == [CancelTimer(), Resume()] and tt.floor is Floor.OPEN
    assert tt.feed(Noise()) == []


def test_speech_with_no_reply_to_hear_starts_no_timer() -> None:
    tt = machine()
    assert tt.feed(SpeechStarted(7, QUIET)) == [] and tt.floor is Floor.OPEN
    assert tt.feed(Partial(7, "what is the", "en")) == [Prefill("what is the")]


def test_words_of_the_person_over_the_reply_cut_it() -> None:
    tt = machine()
    over_the_reply(tt)
    assert tt.feed(Partial(7, "stop please", "en")) == [CancelTimer(), Cut(), Prefill("stop please")]
    assert tt.floor is Floor.OPEN


def test_a_backchannel_over_the_reply_lets_it_go_on() -> None:
    tt = machine()
    over_the_reply(tt)
    assert tt.feed(Partial(7, "uh huh", "en")) == [] and tt.barge is not None
    assert tt.barge.dismissed
    assert tt.feed(Overtime(7, speaking=True)) == []  # dismissed: its length cuts nothing
    assert tt.feed(Tentative(7, "uh huh", "en")) == [Resume()]  # the pause may end it: go on
    assert tt.feed(Resumed(7)) == [Pause()]  # it goes on after all: pause again
    assert tt.feed(Final(7, "uh huh", "en", 5.0)) == [CancelTimer(), Resume()]  # not a turn
    assert tt.floor is Floor.OPEN and tt.held is None


def test_long_speech_over_the_reply_cuts_it_without_words() -> None:
    tt = machine()
    over_the_reply(tt)
    assert tt.feed(Overtime(7, speaking=False)) == []  # it stopped (or was the echo)
    assert tt.feed(Overtime(8, speaking=True)) == []  # another utterance's timer: stale
    assert tt.feed(Overtime(7, speaking=True)) == [CancelTimer(), Cut()]
    assert tt.floor is Floor.OPEN


def test_the_held_reply_is_released_when_the_final_agrees() -> None:
    tt = machine()
    assert tt.feed(Tentative(4, "what time is it", "en")) == [Hold(4, "what time is it", "en")]
    assert tt.feed(Final(4, "what time is it", "en", 9.0)) == [
        Transcribed(4, "what time is it", "en"), Release(9.0)]
    assert tt.held is None


def test_a_different_final_replaces_the_held_reply() -> None:
    tt = machine()
    tt.feed(Tentative(4, "what time", "en"))
    assert tt.feed(Final(4, "what time is it in Paris", "en", 9.0)) == [
        Transcribed(4, "what time is it in Paris", "en"), DropHeld(),
        Reply(4, "what time is it in Paris", "en", 9.0)]


def test_speaking_on_after_the_pause_drops_the_held_reply() -> None:
    tt = machine()
    tt.feed(Tentative(4, "I went home and", "en"))
    assert tt.feed(Resumed(4)) == [DropHeld()] and tt.held is None
    assert tt.feed(Tentative(4, "I went home and slept", "en")) == [
        Hold(4, "I went home and slept", "en")]
    assert tt.feed(Final(4, None, None, 9.0)) == [DropHeld()]  # nothing came of it in the end


def test_a_new_tentative_replaces_the_held_reply() -> None:
    tt = machine()
    tt.feed(Tentative(4, "hello", "en"))
    assert tt.feed(Tentative(5, "hello there", "en")) == [DropHeld(), Hold(5, "hello there", "en")]


def test_a_real_turn_over_the_reply_cuts_it_then_is_answered() -> None:
    tt = machine()
    over_the_reply(tt)
    assert tt.feed(Tentative(7, "no wait", "en")) == [CancelTimer(), Cut(), Hold(7, "no wait", "en")]
    assert tt.feed(Final(7, "no wait", "en", 9.0)) == [Transcribed(7, "no wait", "en"),
                                                      Release(9.0)]


def test_final_words_over_the_reply_that_no_partial_judged() -> None:
    tt = machine()
    over_the_reply(tt)
    assert tt.feed(Final(7, "tell me more", "en", 9.0)) == [
        CancelTimer(), Cut(), Transcribed(7, "tell me more", "en"),
        Reply(7, "tell me more", "en", 9.0)]
    tt = machine()
    over_the_reply(tt)
    assert tt.feed(Final(7, None, None, 9.0)) == [CancelTimer(), Resume()]  # noise after all


def test_without_auto_reply_the_words_join_the_conversation_only() -> None:
    tt = machine(auto_reply=False)
    assert tt.feed(Tentative(4, "hi", "en")) == []
    assert tt.feed(Final(4, "hi", "en", 9.0)) == [Transcribed(4, "hi", "en"), Words(4, "hi", "en")]


def test_without_barge_in_speech_over_the_reply_does_nothing_to_it() -> None:
    tt = machine(bargein=False)
    assert tt.feed(OVER_REPLY) == []
    assert tt.feed(SpeechStarted(7, OVER_REPLY)) == [] and tt.floor is Floor.OPEN


def test_a_stop_cuts_and_ends_the_judging() -> None:
    tt = machine()
    assert tt.feed(Stop()) == [Cut()]
    over_the_reply(tt)
    assert tt.feed(Stop()) == [CancelTimer(), Cut()] and tt.floor is Floor.OPEN
    # the utterance that was over the reply is an ordinary turn now
    assert tt.feed(Partial(7, "and then", "en")) == [Prefill("and then")]
