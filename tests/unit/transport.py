"""A transport's part for a session in unit tests: the session's events as they come (a turn's
``reply.done`` among them once its audio is taken), and its reply audio taken as a client takes
it (in real time, 200 ms ahead)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pipelines.session import Session
from streaming.events import Event


async def serve(session: Session, on_event: Callable[[Event], None],
                on_audio: Callable[[bytes], None] = lambda pcm: None) -> None:
    """Until the session's events end."""
    async def drain() -> None:
        async for chunk in session.playout.paced(40, 200):
            on_audio(chunk)

    async with asyncio.TaskGroup() as tg:
        audio = tg.create_task(drain())
        async for event in session.events:
            on_event(event)
        audio.cancel()
