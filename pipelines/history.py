"""Per-session conversation history, bounded by tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipelines.engines.base import ChatMessage


@dataclass(slots=True)
class Exchange:
    user: str
    assistant: str


class History:
    """Whole exchanges, oldest dropped first so that the prompt stays within ``max_tokens``."""

    def __init__(self, max_tokens: int, count_tokens: Callable[[str], int]) -> None:
        self.max_tokens = max_tokens
        self._count = count_tokens
        self.exchanges: list[Exchange] = []

    def add(self, user: str, assistant: str) -> Exchange:
        """Append an exchange; it may be amended later (a reply cut off while playing)."""
        exchange = Exchange(user, assistant)
        self.exchanges.append(exchange)
        return exchange

    def prompt(self, system: str, user: str) -> list[ChatMessage]:
        """System prompt, as many recent exchanges as fit, then the new user message."""
        budget = self.max_tokens - self._count(system) - self._count(user)
        kept: list[Exchange] = []
        for ex in reversed(self.exchanges):
            cost = self._count(ex.user) + self._count(ex.assistant)
            if cost > budget:
                break
            budget -= cost
            kept.append(ex)
        if len(kept) < len(self.exchanges):  # forget what no longer fits, for good
            self.exchanges = self.exchanges[len(self.exchanges) - len(kept):]
        messages = [ChatMessage("system", system)]
        for ex in reversed(kept):
            messages.append(ChatMessage("user", ex.user))
            if ex.assistant:
                messages.append(ChatMessage("assistant", ex.assistant))
        messages.append(ChatMessage("user", user))
        return messages
