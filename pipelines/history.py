"""Per-session conversation history: items with ids, bounded by tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from pipelines.engines.base import ChatMessage, ToolCall

Kind = Literal["user", "assistant", "call", "output"]


@dataclass(slots=True)
class Item:
    """One entry of the conversation: the user's words, the assistant's (as heard), a tool call
    the assistant made (``call``) or its result (``output``, ``text`` = the result).

    Items are amended in place (a reply cut off while playing keeps only what was heard)."""

    id: str
    kind: Kind
    text: str = ""
    call: ToolCall | None = None  # kind "call": the call; kind "output": the call it answers

    @property
    def call_id(self) -> str | None:
        return None if self.call is None else self.call.call_id

    def cost(self, count: Callable[[str], int]) -> int:
        extra = 0 if self.call is None or self.kind == "output" else count(self.call.arguments)
        return count(self.text) + extra


class History:
    """The items of a conversation in order; the oldest are forgotten so that the prompt stays
    within ``max_tokens``, never leaving a tool's result without its call or an answer without
    its question at the start."""

    def __init__(self, max_tokens: int, count_tokens: Callable[[str], int]) -> None:
        self.max_tokens = max_tokens
        self._count = count_tokens
        self.items: list[Item] = []

    def add(self, item: Item, *, after: str | None = None) -> Item:
        """Append an item (or insert it after the item ``after``; "" puts it first)."""
        if after is None:
            self.items.append(item)
        else:
            self.items.insert(0 if after == "" else self.index(after) + 1, item)
        return item

    def find(self, item_id: str) -> Item | None:
        return next((item for item in self.items if item.id == item_id), None)

    def index(self, item_id: str) -> int:
        for i, item in enumerate(self.items):
            if item.id == item_id:
                return i
        raise KeyError(item_id)

    def delete(self, item_id: str) -> bool:
        item = self.find(item_id)
        if item is None:
            return False
        self.items.remove(item)
        return True

    def pairs(self) -> Iterator[tuple[str, str]]:
        """(kind, text) of every item, in order (for tests and logs at DEBUG)."""
        return ((item.kind, item.text) for item in self.items)

    def prompt(self, system: str, user: str | None) -> list[ChatMessage]:
        """System prompt, as many recent items as fit, then the new user message (if any)."""
        budget = self.max_tokens - self._count(system) - (self._count(user) if user else 0)
        start = len(self.items)
        for i in range(len(self.items) - 1, -1, -1):
            budget -= self.items[i].cost(self._count)
            if budget < 0:
                break
            start = i
        while start < len(self.items) and self.items[start].kind != "user":
            start += 1  # never begin with an answer or a result whose question was forgotten
        if start == len(self.items) and user is None:
            start = _last_user(self.items)  # a reply with no new words needs its question
        self.items = self.items[start:]  # forget what no longer fits, for good
        return [ChatMessage("system", system), *_messages(self.items),
                *([ChatMessage("user", user)] if user else [])]


def _last_user(items: list[Item]) -> int:
    for i in range(len(items) - 1, -1, -1):
        if items[i].kind == "user":
            return i
    return 0


def _messages(items: list[Item]) -> Iterator[ChatMessage]:
    """Chat messages: an assistant's text and the calls that follow it make one message."""
    pending: ChatMessage | None = None
    for item in items:
        if item.kind == "call" and item.call is not None:
            base = pending or ChatMessage("assistant", "")
            pending = ChatMessage("assistant", base.content, (*base.tool_calls, item.call))
            continue
        if pending is not None:
            yield pending
            pending = None
        if item.kind == "assistant":
            if item.text:  # nothing heard: nothing said
                pending = ChatMessage("assistant", item.text)
        elif item.kind == "output":
            yield ChatMessage("tool", item.text, tool_call_id=item.call_id)
        else:
            yield ChatMessage("user", item.text)
    if pending is not None:
        yield pending
