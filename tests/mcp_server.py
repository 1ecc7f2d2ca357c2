"""A tiny real MCP server for the tests: stdio by default, or streamable HTTP on 127.0.0.1 with
``--http PORT`` (endpoint ``/mcp``); ``--calls FILE`` notes each get_time call there."""

from __future__ import annotations

import sys
import time

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

mcp = MCPServer("voxlens-test", log_level="WARNING")
# ``--calls FILE``: get_time notes each call there
CALLS = sys.argv[sys.argv.index("--calls") + 1] if "--calls" in sys.argv else None


@mcp.tool()
def get_time() -> str:
    """The local time now, as HH:MM:SS."""
    now = time.strftime("%H:%M:%S")
    if CALLS:  # lets a test see that it was called
        with open(CALLS, "a", encoding="utf-8") as f:
            f.write(f"get_time {now}\n")
    return now


@mcp.tool()
def add(a: int, b: int) -> int:
    """The sum of two integers."""
    return a + b


@mcp.tool()
async def slow(seconds: float) -> str:
    """Sleeps for a while, then says so."""
    await anyio.sleep(seconds)
    return f"slept {seconds}s"


@mcp.tool()
def fail() -> str:
    """Always fails (an anticipated failure: its message reaches the caller)."""
    raise ToolError("failed on purpose")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--http"]:
        mcp.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        mcp.run()
