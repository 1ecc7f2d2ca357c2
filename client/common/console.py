"""The console side of the command-line clients: typed turns read from standard input, and
lines printed whatever the terminal's encoding (``voxlens talk``, ``speaker``, ``desktop``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any, TextIO


async def stdin_lines() -> AsyncIterator[str]:
    """The non-blank lines of standard input, as they come (a pipe or a terminal: read on
    the loop, so Ctrl-C never waits for one; a file: read at once), until its end."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except ValueError:  # a regular file: reading it never blocks for long
        for line in sys.stdin:
            if line.strip():
                yield line.strip()
        return
    try:
        while raw := await reader.readline():
            if text := raw.decode("utf-8", errors="replace").strip():
                yield text
    finally:
        transport.close()
        with contextlib.suppress(OSError, ValueError):  # the terminal's, as it was
            os.set_blocking(sys.stdin.fileno(), True)


def print_line(text: str, out: TextIO | None = None, escaped: str | None = None) -> None:
    """Print one line on ``out`` (stdout by default). Where ``out`` cannot encode it (Chinese
    on a stdout in a non-UTF-8 locale), print ``escaped`` instead (the JSON with \\u escapes),
    or the text with backslash escapes, rather than failing the conversation."""
    out = sys.stdout if out is None else out
    try:
        print(text, file=out, flush=True)
    except UnicodeEncodeError:
        if escaped is None:
            encoding = getattr(out, "encoding", None) or "ascii"
            escaped = text.encode(encoding, "backslashreplace").decode(encoding)
        print(escaped, file=out, flush=True)


def print_json(event: Mapping[str, Any], out: TextIO | None = None) -> None:
    """One JSON line, with the characters themselves; where ``out`` cannot encode them, with
    \\u escapes."""
    print_line(json.dumps(event, ensure_ascii=False), out, json.dumps(event))


def note(text: str) -> None:
    """A note for the person on stderr, in brackets (stderr escapes what it cannot encode)."""
    print(f"[{text}]", file=sys.stderr, flush=True)
