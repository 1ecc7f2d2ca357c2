"""What a client may shape in a conversation, in terms every layer shares: the tools it offers
the assistant, how a reply is made, and the ids of the conversation's items."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the LLM may call: its name, what it does, and its parameters as JSON Schema
    (the OpenAI ``function`` tool shape)."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object",
                                                                   "properties": {}})


@dataclass(frozen=True, slots=True)
class ReplyOptions:
    """How one reply is made: the session's defaults, or a client's overrides for one reply."""

    speak: bool = True  # False: text only, no speech
    max_tokens: int | None = None  # None: the server's limit
    temperature: float | None = None  # None: the LLM engine's
    tool_choice: str = "auto"  # "auto", "none", "required" or a tool's name
    instructions: str | None = None  # instead of the session's instructions
    script: str | None = None  # say exactly this (a filler, an apology): no LLM


# The history's item ids. Turns are numbered per session; tool call ids are the LLM's.
def user_item_id(turn_id: int) -> str:
    return f"item_u{turn_id}"


def reply_item_id(turn_id: int) -> str:
    return f"item_a{turn_id}"


def call_item_id(call_id: str) -> str:
    return f"item_fc_{call_id}"


def output_item_id(call_id: str) -> str:
    return f"item_fo_{call_id}"
