"""aiomqtt's calls that wait for the broker (publish, subscribe, unsubscribe), made so that
cancelling the task that waits always cancels it.

aiomqtt bounds each of these waits with ``asyncio.wait_for``. On Python 3.11, ``wait_for``
returns the awaited result instead of raising ``CancelledError`` when its task is cancelled just
as that result arrives (CPython gh-86296, fixed in 3.12). A publisher is cancelled while it
publishes all the time (each connection loss, each shutdown), so now and then it lost its
cancellation, went on to wait for the next message or for a connection that had gone, and the
task group around it never ended: a speaker client that had finished its conversation never
exited (a CI run of tests/e2e/test_speaker.py). These wrappers ask aiomqtt for no deadline
(``math.inf``: it then awaits the broker's answer plainly) and keep the deadline with
``asyncio.timeout``, which never loses a cancellation; its expiry is an ``MqttError`` as
aiomqtt's own would be. (Connecting and disconnecting still wait through aiomqtt's own
``wait_for``: once per connection, a much rarer race, and without a deadline there a broker
that never answers would hold a shutdown forever.)
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt

TIMEOUT_S = 10.0  # aiomqtt's own default


async def publish(client: aiomqtt.Client, topic: str, payload: bytes, *, qos: int,
                  retain: bool = False, timeout_s: float = TIMEOUT_S) -> None:
    async with _deadline(timeout_s, "publish"):
        await client.publish(topic, payload, qos=qos, retain=retain, timeout=math.inf)


async def subscribe(client: aiomqtt.Client, topic: Any, *, timeout_s: float = TIMEOUT_S,
                    **options: Any) -> None:
    """``topic``: a filter, or a list of (filter, qos) pairs as aiomqtt takes them."""
    async with _deadline(timeout_s, "subscribe"):
        await client.subscribe(topic, timeout=math.inf, **options)


async def unsubscribe(client: aiomqtt.Client, topic: str | list[str], *,
                      timeout_s: float = TIMEOUT_S) -> None:
    async with _deadline(timeout_s, "unsubscribe"):
        await client.unsubscribe(topic, timeout=math.inf)


@contextlib.asynccontextmanager
async def _deadline(seconds: float, what: str) -> AsyncIterator[None]:
    """``asyncio.timeout`` whose expiry is an ``aiomqtt.MqttError``."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise aiomqtt.MqttError(f"{what}: no answer from the broker in {seconds:g} s") from None
