"""Cuts a stream of LLM text deltas into speakable chunks for TTS.

The first chunk is cut early so speech starts quickly: at the first clause
boundary, or once it has ``first_words`` complete words, extended past any
trailing function word ("is", "the", "of" ...) so the cut falls where a speaker
could pause. Later chunks are whole sentences. A sentence end is only taken as one when the next
character shows it is one: ``3.5``, ``e.g.`` or ``example.com`` are never cut.

Chinese has no spaces: its first chunk is cut at the first clause mark (，、：；),
or after ``first_chars`` (8) characters at the first one after which a speaker may
pause (a particle or a verb such as 的 了 是 在); numbers and Latin runs inside
it are never cut. Chinese sentences end at 。！？； at once, and a long
sentence is cut at its last clause mark.
"""

from __future__ import annotations

import re

from pipelines.text import HAN

ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e a.m p.m u.s u.k no approx dept est fig inc ltd "
    "co corp jan feb mar apr jun jul aug sep sept oct nov dec mt ft".split()
)
SENTENCE_END = ".!?…"
CJK_SENTENCE_END = "。！？；"
CLAUSE_END = ",;:—"
CJK_CLAUSE_END = "，、："
# a first Chinese chunk may end after these: particles, copulas, prepositions that end a phrase
BREAK_AFTER_ZH = frozenset("的了是在着过吗呢吧啊呀有和说到")
CJK_MAX_CHARS = 60  # a Chinese sentence longer than this is cut at its last clause mark
_WORD = re.compile(r"\S+")
# a first chunk does not end on these (it would sound cut off)
FUNCTION_WORDS = frozenset(
    "a an the of to in on at by for with from and or but is are was were be been am has have "
    "had do does did will would can could should may might must that this these those my your "
    "his her its our their as than so if not no".split()
)


class Chunker:
    def __init__(self, first_words: int = 4, max_chars: int = 250, first_chars: int = 8) -> None:
        self.first_words = first_words
        self.first_chars = first_chars
        self.max_chars = max_chars
        self._buf = ""
        self._emitted = 0

    def feed(self, delta: str) -> list[str]:
        """Add text; return the chunks it completes (possibly none)."""
        self._buf += delta
        out: list[str] = []
        while (cut := self._find_cut()) is not None:
            chunk, self._buf = self._buf[:cut].strip(), self._buf[cut:].lstrip()
            if _speakable(chunk):
                out.append(chunk)
                self._emitted += 1
            elif chunk and out:  # punctuation-only leftovers ride on the previous chunk
                out[-1] += chunk
        return out

    def flush(self) -> list[str]:
        """End of the reply: whatever is left is the last chunk."""
        chunk, self._buf = self._buf.strip(), ""
        if _speakable(chunk):
            self._emitted += 1
            return [chunk]
        return []

    def _find_cut(self) -> int | None:
        buf = self._buf
        first = self._emitted == 0
        for i, ch in enumerate(buf):
            if ch in CJK_SENTENCE_END or ch == "\n":
                return i + 1
            if ch in SENTENCE_END:
                if i + 1 >= len(buf):
                    return None  # need the next character to decide
                if buf[i + 1].isspace() and not _is_abbreviation(buf[: i + 1]):
                    return i + 1
            elif first and (ch in CJK_CLAUSE_END or (ch in CLAUSE_END and i + 1 < len(buf)
                                                      and buf[i + 1].isspace())):
                return i + 1
        han = HAN.search(buf) is not None
        if first and han:
            return self._first_han_cut(buf)
        if first:
            # words followed by more text are complete; the last one may still be growing
            words = list(_WORD.finditer(buf))[:-1]
            for k in range(self.first_words - 1, len(words)):
                if words[k].group().lower() not in FUNCTION_WORDS:
                    return words[k].end()
        if han and len(buf) > CJK_MAX_CHARS:
            marks = [i for i, ch in enumerate(buf) if ch in CJK_CLAUSE_END + CLAUSE_END]
            if marks:
                return marks[-1] + 1
        if len(buf) > self.max_chars:
            space = buf.rfind(" ", 0, self.max_chars)
            return space if space > 0 else self.max_chars
        return None


    def _first_han_cut(self, buf: str) -> int | None:
        """After ``first_chars`` Chinese characters, at the first break character that more
        Chinese text follows (so a number or a Latin word is never split from its end)."""
        count = 0
        for i, ch in enumerate(buf[:-1]):
            if not HAN.match(ch):
                continue
            count += 1
            if count >= self.first_chars and ch in BREAK_AFTER_ZH and HAN.match(buf[i + 1]):
                return i + 1
        return None


def _speakable(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _is_abbreviation(upto_dot: str) -> bool:
    """Whether the text ending in '.' ends with an abbreviation or an initial ("J.")."""
    m = re.search(r"(\S+)\.$", upto_dot)
    if not m:
        return False
    word = m.group(1).lstrip("(\"'")
    return word.lower() in ABBREVIATIONS or (len(word) == 1 and word.isupper())  # "J. Smith"
