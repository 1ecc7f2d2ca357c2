"""Token buckets: how often a client may do something, with small bursts allowed.

``TokenBucket`` is the one rate limiter of voxlens (new sessions per client, typed turns and
images per session, error events per MQTT device). ``MessageLimits`` applies the per-session
rates of typed turns and image messages (``limits.texts_per_second``,
``limits.images_per_second``): a message over its rate is dropped and answered with the
non-fatal error ``rate_limited``; the session goes on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from streaming.errors import ProtocolError
from streaming.protocol import ClientMessage, ImageFrame, TextTurn

Clock = Callable[[], float]
BURST_S = 3.0  # per-session message rates allow a burst of this many seconds' worth …
BURST_MIN = 3.0  # … and at least this many messages


class TokenBucket:
    """At most ``burst`` at once, refilled at ``rate`` per second (both > 0).

    It starts full. The clock is injectable (tests run it on a virtual clock)."""

    def __init__(self, rate: float, burst: float, *, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()

    def _refill(self) -> float:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        return self._tokens

    def take(self) -> bool:
        """Spend one token if there is one."""
        if self._refill() >= 1:
            self._tokens -= 1
            return True
        return False

    def retry_after(self) -> float:
        """Seconds until a token is there (0 when one is)."""
        return max(0.0, (1 - self._refill()) / self.rate)

    @property
    def full(self) -> bool:
        """As good as a new bucket (so it can be forgotten)."""
        return self._refill() >= self.burst


class RateLimited(ProtocolError):
    """A message over its rate: dropped, answered to its sender only; the session goes on."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def message_bucket(per_second: float, clock: Clock = time.monotonic) -> TokenBucket | None:
    """A per-session bucket for ``per_second`` messages (0: no limit): a burst of
    ``BURST_S`` seconds' worth, at least ``BURST_MIN``."""
    if per_second <= 0:
        return None
    return TokenBucket(per_second, max(BURST_MIN, per_second * BURST_S), clock=clock)


class MessageLimits:
    """The rates of one session's typed turns and image messages (0: no limit)."""

    def __init__(self, texts_per_second: float = 0.0, images_per_second: float = 0.0, *,
                 clock: Clock = time.monotonic) -> None:
        self._texts = message_bucket(texts_per_second, clock)
        self._images = message_bucket(images_per_second, clock)

    def check(self, message: ClientMessage) -> None:
        """Raise ``RateLimited`` when ``message`` is a typed turn or an image over its rate."""
        match message:
            case TextTurn():
                bucket, what = self._texts, "typed turns"
            case ImageFrame():
                bucket, what = self._images, "image messages"
            case _:
                return
        if bucket is None or bucket.take():
            return
        wait = bucket.retry_after()
        raise RateLimited(f"more than {bucket.rate:g} {what} a second: this one was dropped; "
                          f"send the next in {math.ceil(wait * 10) / 10:g} s", wait)
