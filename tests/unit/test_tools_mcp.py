"""McpTools against a real MCP server (tests/mcp_server.py), over stdio and streamable HTTP."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.engines.tools_mcp import McpTools
from streaming.errors import EngineError
from tests.conftest import free_port

SERVER = Path(__file__).resolve().parents[1] / "mcp_server.py"
STDIO = f"{shlex.quote(sys.executable)} {shlex.quote(str(SERVER))}"


def children() -> set[int]:
    """Live (not zombie) child processes of this process, from /proc."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # ended while we looked
        if fields[0] != "Z" and int(fields[1]) == os.getpid():
            out.add(int(stat.parent.name))
    return out


def other_tasks() -> set[asyncio.Task[object]]:
    return asyncio.all_tasks() - {asyncio.current_task()}


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    """The test server on streamable HTTP on loopback; its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SERVER), "--http", str(port)])
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("the MCP test server did not start listening")
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/mcp"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(params=["stdio", "http"])
def server(request: pytest.FixtureRequest) -> str:
    if request.param == "stdio":
        return STDIO
    return str(request.getfixturevalue("http_server"))


async def test_tools_of_a_server(server: str) -> None:
    async with McpTools([server]) as tools:
        specs = {s.name: s for s in tools.specs()}
        assert set(specs) == {"get_time", "add", "slow", "fail"}
        assert specs["add"].description == "The sum of two integers."
        assert specs["add"].parameters["properties"] == {"a": {"title": "A", "type": "integer"},
                                                         "b": {"title": "B", "type": "integer"}}
        assert sorted(specs["add"].parameters["required"]) == ["a", "b"]
        assert specs["slow"].parameters["properties"]["seconds"]["type"] == "number"

        assert await tools.call("add", '{"a": 2, "b": 3}', timeout_s=10) == "5"
        assert re.fullmatch(r"\d\d:\d\d:\d\d", await tools.call("get_time", "", timeout_s=10))
        with pytest.raises(EngineError, match="failed on purpose"):
            await tools.call("fail", "{}", timeout_s=10)
        with pytest.raises(EngineError, match="timed out"):
            await tools.call("slow", '{"seconds": 5}', timeout_s=0.2)
        assert await tools.call("add", '{"a": 1, "b": 1}', timeout_s=10) == "2"  # still connected
        with pytest.raises(EngineError, match="no such tool"):
            await tools.call("nope", "{}", timeout_s=10)
        with pytest.raises(EngineError, match="not JSON"):
            await tools.call("add", '{"a": 2,', timeout_s=10)
        with pytest.raises(EngineError, match="not a JSON object"):
            await tools.call("add", "[2, 3]", timeout_s=10)

        # cancelling a call abandons it; the connection stays usable
        call = asyncio.create_task(tools.call("slow", '{"seconds": 5}', timeout_s=10))
        await asyncio.sleep(0.2)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await tools.call("add", '{"a": 4, "b": 5}', timeout_s=10) == "9"
    assert tools.specs() == ()
    assert other_tasks() == set()


async def test_close_leaves_no_process_or_task(caplog: pytest.LogCaptureFixture) -> None:
    before = children()
    tools = McpTools([STDIO, STDIO])
    with caplog.at_level(logging.WARNING, logger="pipelines.engines.tools_mcp"):
        await tools.start()
    started = children() - before
    assert len(started) == 2
    assert len(tools.specs()) == 4  # the second server's tools have the first's names: first wins
    assert "an earlier server has one of that name" in caplog.text
    t0 = time.monotonic()
    await tools.aclose()
    assert time.monotonic() - t0 < 2
    assert children() & started == set()
    assert other_tasks() == set()
    with pytest.raises(EngineError, match="no such tool"):
        await tools.call("add", '{"a": 2, "b": 3}', timeout_s=10)
    await tools.aclose()  # idempotent


async def test_missing_command_fails_at_start() -> None:
    before = children()
    tools = McpTools([STDIO, "/nonexistent/voxlens-mcp-server --flag"])
    with pytest.raises(EngineError, match="/nonexistent/voxlens-mcp-server"):
        await tools.start()
    assert tools.specs() == ()
    assert children() - before == set()  # the server that did start was closed
    assert other_tasks() == set()


async def test_cancelled_start_leaves_nothing() -> None:
    before = children()
    start = asyncio.create_task(McpTools([STDIO]).start())
    await asyncio.sleep(0.1)  # the server process is starting
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    assert children() - before == set()
    assert other_tasks() == set()


async def test_unreachable_url_fails_at_start_without_its_secrets() -> None:
    url = f"http://user:pa55@127.0.0.1:{free_port()}/mcp?token=s3cret"
    with pytest.raises(EngineError) as err:
        await McpTools([url]).start()
    assert f"http://127.0.0.1:{url.split(':')[3].split('/')[0]}/mcp" in err.value.message
    assert "s3cret" not in err.value.message and "pa55" not in err.value.message
    assert other_tasks() == set()


async def test_silent_server_times_out_at_start() -> None:
    before = children()
    silent = f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(60)'"
    with pytest.raises(EngineError, match=r"did not answer within 0\.5 s"):
        await McpTools([silent], connect_timeout_s=0.5).start()
    assert children() - before == set()  # it was killed
    assert other_tasks() == set()
