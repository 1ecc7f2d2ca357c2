"""Text rules that know scripts: Chinese script conversion, script runs, and words.

Chinese is written without spaces, so everything in voxlens that counts or cuts
"words" (chunker, barge-in, endpointing, the voice chosen for a chunk) goes
through this module instead of ``str.split``.
"""

from __future__ import annotations

import functools
import re
from typing import Literal

ZhScript = Literal["simplified", "traditional"]
# Whisper writes Mandarin in the script of the text before it: a prompt in the wanted script
# steers it there (measured on real AISHELL recordings: no traditional characters left, and
# fewer errors than converting afterwards alone); OpenCC then converts what still slips through.
ZH_PROMPT: dict[str, str] = {"simplified": "以下是普通话的句子。", "traditional": "以下是普通話的句子。"}

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
HAN = re.compile(f"[{_HAN}]")


@functools.cache
def _converter(config: str):  # type: ignore[no-untyped-def]
    import opencc  # OpenCC's own bindings, with its dictionaries in the wheel

    return opencc.OpenCC(config)


def zh_script(text: str, script: ZhScript = "simplified") -> str:
    """Chinese text in the wanted script (OpenCC: traditional → simplified, or back, with
    phrase-level rules); text without Han characters is returned as it is."""
    if not HAN.search(text):
        return text
    return str(_converter("t2s" if script == "simplified" else "s2t").convert(text))


Script = Literal["han", "latin"]
_LETTER = re.compile(r"[^\W\d_]")


def script_of(ch: str) -> Script | None:
    """'han' for a Chinese character, 'latin' for any other letter, None for digits,
    punctuation and spaces (they belong to the text around them)."""
    if HAN.match(ch):
        return "han"
    if _LETTER.match(ch) and not ("\u3040" <= ch <= "\u30ff"):  # kana are neither
        return "latin"
    return None


def script_runs(text: str) -> list[tuple[Script | None, str]]:
    """The text cut where its script changes: ``"我喜欢用Python写代码。"`` →
    ``[("han", "我喜欢用"), ("latin", "Python"), ("han", "写代码。")]``. Digits, spaces and
    punctuation stay with the run before them (with the next one at the start); a text without
    letters is one run of script None. Every character is in exactly one run."""
    runs: list[tuple[Script | None, str]] = []
    for ch in text:
        s = script_of(ch)
        if runs and (s is None or s == runs[-1][0]):
            runs[-1] = (runs[-1][0], runs[-1][1] + ch)
        elif runs and runs[-1][0] is None:  # leading neutral text joins the first letters
            runs[-1] = (s, runs[-1][1] + ch)
        else:
            runs.append((s, ch))
    return runs


def main_script(text: str) -> Script | None:
    """The script most of the text's letters are in (a Chinese character counts as much as
    a Latin word: it is one)."""
    han = len(HAN.findall(text))
    latin = len(re.findall(r"[^\W\d_]+", HAN.sub(" ", text)))
    if not han and not latin:
        return None
    return "han" if han >= latin else "latin"


_TOKEN = re.compile(f"[{_HAN}]|[^\\s{_HAN}]+")


def tokens(text: str) -> list[re.Match[str]]:
    """Word-sized pieces of text with their positions: each Chinese character is one, any
    other run without spaces is one (punctuation included)."""
    return list(_TOKEN.finditer(text))


def words(text: str) -> list[str]:
    """Lowercase words without punctuation; Chinese counts one word per character (it has no
    spaces, and a character n-gram is what the echo and backchannel rules compare)."""
    norm = re.sub(r"[^\w\s']", " ", text.lower()).replace("'", "")
    return _WORD.findall(norm)


_WORD = re.compile(f"[{_HAN}\u3040-\u30ff]|[^\\s{_HAN}\u3040-\u30ff]+")
