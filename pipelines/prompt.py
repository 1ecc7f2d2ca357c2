"""What the LLM is given for a reply: a fixed system prompt (kept identical from turn to turn
so llama.cpp's prompt cache holds it), the history, and the user's words with the camera's
recent lines and the language reminder around them."""

from __future__ import annotations

from pipelines.engines.base import ChatMessage
from pipelines.history import History
from pipelines.vision import CAMERA_RULE, quote

DEFAULT_SYSTEM_PROMPT = (
    "You are voxlens, a friendly voice assistant. Your answers are spoken aloud, so reply in "
    "one or two short, plain sentences without lists, markdown or emoji. Answer in the "
    "language the user speaks."
)

# A reminder after the user's words, in their language: the system prompt's "answer in the
# language the user speaks" alone is not enough for the 0.5B LLM, which answered a spoken
# Mandarin statement in English (tests/e2e/test_mandarin.py). The history keeps the words alone.
LANGUAGE_HINTS = {"zh": "（请用简体中文回答。）"}




def fixed_system_prompt(instructions: str, *, vision: bool) -> str:
    """The fixed start of every prompt. Kept identical from turn to turn (and for the LLM's
    warm-up) so llama.cpp's prompt cache holds it."""
    return f"{instructions}\n\n{CAMERA_RULE}" if vision else instructions




def compose(history: History, system: str, user_text: str | None, *, camera: str | None = None,
            seen: str | None = None, language: str | None = None) -> list[ChatMessage]:
    """The system prompt, the history, then the user message: the recent camera lines
    (``camera``), then the user's words (followed by the fresh observation ``seen`` for a turn
    about the scene, in place of the camera lines), then the language reminder. Everything
    before the words changes rarely (coarse ages), so the prefill from a partial transcript
    has already put it in the LLM's cache when the final comes. ``user_text`` None: a reply
    to the conversation as it stands."""
    said = user_text
    if user_text is None:
        pass
    elif seen is not None:
        said = f"{user_text}\n[camera, now: {quote(seen)}]"
    elif camera:
        said = f"{camera}\n{user_text}"
    if said is not None and language in LANGUAGE_HINTS:  # last: the prefill is a prefix
        said = f"{said}\n{LANGUAGE_HINTS[language]}"
    return history.prompt(system, said)
