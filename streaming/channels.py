"""Bounded channels that say what happens when they are full."""

from __future__ import annotations

import asyncio
import collections
import enum
from typing import Generic, TypeVar

T = TypeVar("T")


class Full(enum.Enum):
    BLOCK = "block"  # the producer waits (audio in, events out)
    DROP_OLDEST = "drop_oldest"  # the oldest item gives way (partials)
    KEEP_LATEST = "keep_latest"  # only the newest item matters (video frames)


class ChannelClosed(Exception):
    """Raised by ``get`` once a closed channel is drained, and by ``put`` on a closed channel."""


class Channel(Generic[T]):
    """An asyncio queue with a hard bound and an explicit full policy.

    ``KEEP_LATEST`` is ``DROP_OLDEST`` with a bound of one.
    """

    def __init__(self, maxsize: int, full: Full = Full.BLOCK) -> None:
        if maxsize < 1:
            raise ValueError("a channel needs room for at least one item")
        self.maxsize = 1 if full is Full.KEEP_LATEST else maxsize
        self.full = full
        self.dropped = 0
        self._items: collections.deque[T] = collections.deque()
        self._closed = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def _update(self) -> None:
        if self._items or self._closed:
            self._readable.set()
        else:
            self._readable.clear()
        if len(self._items) < self.maxsize or self._closed:
            self._writable.set()
        else:
            self._writable.clear()

    def put_nowait(self, item: T) -> bool:
        """Add without waiting. Returns False when a BLOCK channel is full (nothing added)."""
        if self._closed:
            raise ChannelClosed("channel is closed")
        if len(self._items) >= self.maxsize:
            if self.full is Full.BLOCK:
                return False
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._update()
        return True

    async def put(self, item: T) -> None:
        """Add an item; on a full BLOCK channel wait for room. Cancelling it adds nothing."""
        while not self.put_nowait(item):
            await self._writable.wait()

    async def get(self) -> T:
        """Take the oldest item, waiting for one. Cancelling it takes nothing."""
        while not self._items:
            if self._closed:
                raise ChannelClosed("channel is closed")
            await self._readable.wait()
        item = self._items.popleft()
        self._update()
        return item

    def clear(self) -> int:
        """Drop everything queued; returns how many items were dropped."""
        n = len(self._items)
        self._items.clear()
        self._update()
        return n

    def close(self) -> None:
        """No more puts; readers drain what is left, then get ChannelClosed."""
        self._closed = True
        self._update()

    def __aiter__(self) -> Channel[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.get()
        except ChannelClosed:
            raise StopAsyncIteration from None
