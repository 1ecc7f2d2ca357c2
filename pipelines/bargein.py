"""Barge-in and turn-taking rules: pure functions over text and timings.

How a reply is interrupted (docs/ARCHITECTURE.md, "Barge-in"):

1. ``voice_ms`` (96 ms) of voiced input while a reply is playing → the reply's
   audio is *paused* at once (nothing more leaves the server). Pausing is
   cheap and undoable, so it can happen long before anyone knows what the
   sound was.
2. The sound is then judged by what it turns out to be:
   * it dies before it is speech (a click, a cough, a 150 ms burst) → resume;
   * its transcript is empty, a Whisper hallucination, only backchannels
     ("yeah", "uh-huh", "嗯", …) or mostly words the reply played just before
     and while it was heard (echo) → resume, and the utterance is not a user turn;
   * a partial or final transcript with at least ``min_words`` other words, or
     ``interrupt_after_ms`` of continuous speech → a real interruption: the
     reply is cut (queued audio dropped, LLM and TTS cancelled), the history
     keeps only what was heard, and the utterance becomes the next turn.
3. When the server cancels the client's echo, words are not enough: what AEC3
   leaves of the echo can be transcribed as anything ("the amp.", "and I do.").
   The sound must also have been louder than the reply's echo can be for
   ``voice_beyond_echo_ms`` (streaming/echo.py), else it is echo: no cut, no
   turn. This also holds for a second after the reply played, while its echo
   can still come back; a person answering then makes a turn and cuts nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pipelines.text import HAN, tokens, words

# Short acknowledgements that mean "go on", not "stop" (normalised: lowercase, no punctuation).
# "no", "wait", "stop" and questions are deliberately absent: they are interruptions.
BACKCHANNELS: dict[str, frozenset[str]] = {
    "en": frozenset({"yeah", "yes", "yep", "yup", "uh huh", "uhhuh", "mhm", "mm hmm", "mmhmm", "mm",
                     "hmm", "hm", "ok", "okay", "right", "sure", "i see", "got it", "cool", "nice",
                     "wow", "oh", "ah", "aha", "alright", "all right", "uh", "um", "yeah yeah",
                     "oh okay", "oh ok", "ok ok", "okay okay", "great", "good", "exactly", "true"}),
    "zh": frozenset({"嗯", "嗯嗯", "对", "对对", "对对对", "好", "好的", "是", "是的", "哦", "啊", "明白",
                     "嗯好", "行"}),
    "fr": frozenset({"oui", "ouais", "daccord", "ok", "ah", "mmh", "hmm", "bien sûr", "voilà", "exact"}),
    "es": frozenset({"sí", "si", "vale", "claro", "ajá", "aja", "ya", "ok", "bueno", "vale vale"}),
    "de": frozenset({"ja", "genau", "okay", "ok", "aha", "mhm", "stimmt", "richtig", "ach so"}),
}

CUT_MARK = "…"  # ends a reply that was cut off, in history

# Echo in an utterance is of reply audio played at most this long before its voice was
# noticed: the voice_ms that takes, the VAD's pre-roll, the room's echo path, and the error
# of the played-position estimate. Words the reply said earlier are the person's if heard.
ECHO_LOOKBACK_MS = 2000


@dataclass(frozen=True, slots=True)
class BargeInConfig:
    enabled: bool = True
    min_words: int = 1  # recognised words (not backchannels, not echo) that interrupt
    interrupt_after_ms: int = 1200  # speech this long interrupts without waiting for words
    echo_overlap: float = 0.7  # an utterance whose words are mostly the reply's is echo
    # with server-side echo cancellation, a sound over the reply is the person's only when
    # it was louder than the reply's echo can be for this long (streaming/echo.py)
    voice_beyond_echo_ms: int = 50
    # audio sent but not yet heard at a client that does not report playback (its jitter
    # buffer): what the person heard of a cut reply is estimated with it
    client_buffer_ms: int = 100
    backchannels: dict[str, frozenset[str]] = field(default_factory=lambda: dict(BACKCHANNELS))


def is_backchannel(text: str, language: str | None, config: BargeInConfig) -> bool:
    """Only acknowledgements ("yeah", "uh-huh", "嗯", "oh okay", "好的好的", "嗯，对"): no
    reason to stop talking. True when the words are all backchannel words, or can be read
    as a row of backchannel phrases ("对对对，好的")."""
    ws = words(text)
    if not ws:
        return True
    sets = ([config.backchannels[language]] if language in config.backchannels
            else list(config.backchannels.values()))
    return any(all(w in s for w in ws) or _covered(ws, s) for s in sets)


def _covered(ws: list[str], phrases: frozenset[str]) -> bool:
    """Whether the words are a sequence of whole phrases of the set (spaced or, for Chinese,
    written together)."""
    ends = {0}
    for i in range(len(ws)):
        if i not in ends:
            continue
        for j in range(i + 1, min(len(ws), i + 4) + 1):
            piece = ws[i:j]
            if " ".join(piece) in phrases or "".join(piece) in phrases:
                ends.add(j)
    return len(ws) in ends


def is_echo(text: str, reply_text: str, config: BargeInConfig) -> bool:
    """Whether an utterance is mostly the assistant's own words (its voice leaking back).

    Echo repeats the reply in its order, so word pairs are compared, not single words: a
    question sharing common words with the reply ("what do you see?" after "do you want…")
    is the person. A one-word utterance is echo when the reply has that word."""
    heard = words(text)
    said = words(reply_text)
    if not heard or not said:
        return False
    if len(heard) == 1:
        return heard[0] in said
    pairs = set(itertools.pairwise(said))
    heard_pairs = list(itertools.pairwise(heard))
    return sum(p in pairs for p in heard_pairs) / len(heard_pairs) >= config.echo_overlap


def content_words(text: str, language: str | None, reply_text: str,
                  config: BargeInConfig) -> int:
    """How many words of an utterance count towards interrupting: 0 for backchannels and echo."""
    if is_backchannel(text, language, config) or is_echo(text, reply_text, config):
        return 0
    return len(words(text))


class Timed(Protocol):
    text: str
    duration_ms: float


def heard_text(spoken: Sequence[Timed], played_ms: float) -> str:
    """The reply text the person heard after ``played_ms`` of its audio: whole chunks, then
    the part of the chunk being played in proportion to its length, cut after the last whole
    word (a Chinese character is one)."""
    out: list[str] = []
    t = 0.0
    for chunk in spoken:
        if played_ms >= t + chunk.duration_ms:
            out.append(chunk.text)
            t += chunk.duration_ms
            continue
        share = max(0.0, played_ms - t) / chunk.duration_ms if chunk.duration_ms else 0.0
        upto = round(len(chunk.text) * share)
        whole = [m for m in tokens(chunk.text) if m.end() <= upto]
        if whole:
            out.append(chunk.text[:whole[-1].end()])
        break
    return _join(out)


def said_between(spoken: Sequence[Timed], start_ms: float, end_ms: float) -> str:
    """The reply's words whose audio lies, even partly, between ``start_ms`` and ``end_ms``
    of it (within a chunk, timing in proportion to characters): what an echo heard over
    that stretch can contain."""
    out: list[str] = []
    t = 0.0
    for chunk in spoken:
        n = len(chunk.text) or 1
        for m in tokens(chunk.text):
            if (t + chunk.duration_ms * m.end() / n >= start_ms
                    and t + chunk.duration_ms * m.start() / n <= end_ms):
                out.append(m.group())
        t += chunk.duration_ms
    return _join(out)


def _join(pieces: list[str]) -> str:
    """Pieces of reply text in order: spaced, except between Chinese characters."""
    out = ""
    for p in (p.strip() for p in pieces):
        if not p:
            continue
        if out and not (HAN.match(out[-1]) or HAN.match(p[0]) or out[-1] in CJK_PUNCT):
            out += " "
        out += p
    return out


CJK_PUNCT = "，。！？；：、"


def endpoint_silence_ms(text: str, *, question_ms: int, normal_ms: int, incomplete_ms: int) -> int:
    """The silence that ends an utterance, judged from its transcript so far: short after a
    complete question, long when it trails off (a filler, a conjunction, a comma), else normal."""
    t = text.strip()
    if not t:
        return normal_ms
    ws = words(t)
    last = ws[-1] if ws else ""
    joined = "".join(ws)
    if (t.endswith((",", "...", "…", "-", "、", "，")) or last in TRAILING
            or any(joined.endswith(w) for w in TRAILING_ZH)):
        return incomplete_ms
    if t.endswith(("?", "？")) or (HAN.search(t) and _asks(joined)):
        return question_ms
    return normal_ms


# Words a finished sentence rarely ends with: fillers, conjunctions, articles, prepositions.
TRAILING = frozenset({
    "um", "uh", "er", "erm", "hmm", "like", "and", "but", "or", "so", "because", "then", "that",
    "the", "a", "an", "to", "of", "in", "on", "at", "for", "with", "about", "from", "my", "your",
    "is", "are", "was", "if", "when", "which", "what", "who", "where", "how", "maybe", "also",
    "et", "mais", "ou", "donc", "le", "la", "les", "un", "une", "de", "und", "aber", "oder", "der",
    "die", "das", "y", "pero", "o", "el", "los", "las", "que",
})
# Mandarin has no spaces: these are matched at the end of the characters. Fillers,
# conjunctions and the words that open a clause ("因为…", "如果…", "比如…").
TRAILING_ZH = ("嗯", "呃", "额", "那个", "这个", "就是", "然后", "还有", "和", "跟", "与", "或者",
               "还是", "但是", "可是", "不过", "而且", "所以", "因为", "如果", "比如", "的话",
               "就", "把", "在", "给", "对于", "关于", "我想", "我觉得")
# Mandarin marks a question with words, not intonation, and Whisper often ends one with "。"
# ("蜘蛛有几条腿。"): an interrogative anywhere in it makes it a question
QUESTION_ZH = ("吗", "呢", "几", "多少", "哪", "谁", "什么", "怎么", "为什么", "是不是", "有没有",
               "多久", "多大", "多远", "多长")
NOT_QUESTION_ZH = ("几乎", "没什么", "什么都", "谁都", "哪都", "多么")  # the words without asking


def _asks(chars: str) -> bool:
    for phrase in NOT_QUESTION_ZH:
        chars = chars.replace(phrase, "")
    return any(w in chars for w in QUESTION_ZH)
