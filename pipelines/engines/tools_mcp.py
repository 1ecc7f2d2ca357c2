"""Server-side tools from MCP servers (the Model Context Protocol, through the official ``mcp`` SDK).

A server is a string: an ``http://`` or ``https://`` URL is reached over streamable HTTP, anything
else is a command line that the SDK starts as a child process and talks to over its stdio.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
from collections.abc import Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from mcp import Client, StdioServerParameters
from mcp import types as mcp_types

from pipelines.engines.base import ToolSpec
from streaming.errors import EngineError

log = logging.getLogger(__name__)

_MAX_PAGES = 100  # of one server's tools/list: a listing that never ends cannot hang start()


def _is_url(server: str) -> bool:
    return server.startswith(("http://", "https://"))


def server_label(server: str) -> str:
    """How a server is named in logs and errors: a URL without its credentials, query or
    fragment; a command line as it is."""
    if not _is_url(server):
        return server
    parts = urlsplit(server)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _reason(exc: BaseException, server: str) -> str:
    """Why connecting failed, in words, with the server's secrets (if any) left out."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]  # the SDK's task groups wrap the real error
    text = str(exc) or type(exc).__name__
    if _is_url(server):
        parts = urlsplit(server)
        for secret in (parts.query, parts.fragment, parts.netloc.rpartition("@")[0]):
            if secret:
                text = text.replace(secret, "…")
    return text


def _client(server: str) -> Client:
    if _is_url(server):
        return Client(server, cache=None)
    argv = shlex.split(server)
    return Client(StdioServerParameters(command=argv[0], args=argv[1:]), cache=None)


async def _list_tools(client: Client, label: str) -> list[mcp_types.Tool]:
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    for _ in range(_MAX_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools += page.tools
        cursor = page.next_cursor
        if cursor is None:
            return tools
    log.warning("MCP server %s lists more than %d pages of tools; using the first ones", label, _MAX_PAGES)
    return tools


def _result_text(result: mcp_types.CallToolResult) -> str:
    """The text blocks of a tool's result, joined (other content, such as images, is left out);
    its structured content as JSON when it has no text."""
    texts = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            texts.append(block.text)
        elif isinstance(block, mcp_types.EmbeddedResource) and isinstance(
                block.resource, mcp_types.TextResourceContents):
            texts.append(block.resource.text)
    if not texts and result.structured_content is not None:
        return json.dumps(result.structured_content, ensure_ascii=False)
    return "\n".join(texts)


class McpTools:
    """The tools of one or more MCP servers, as one ToolRunner.

    Owns one task, started by ``start()``, that connects to every server and holds the connections
    (the SDK's anyio scopes must be entered and left in one task) until ``aclose()`` cancels it;
    stdio servers are child processes that end with their connection. Calls run in the callers'
    tasks, over the connections that task holds.
    """

    def __init__(self, servers: Sequence[str], *, connect_timeout_s: float = 30.0) -> None:
        if not all(server.strip() for server in servers):
            raise ValueError("an MCP server is given as an empty string")
        self._servers = tuple(servers)
        self._connect_timeout_s = connect_timeout_s
        self._specs: list[ToolSpec] = []
        self._routes: dict[str, Client] = {}  # tool name → the connection to its server
        self._owner: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect to every server and list its tools. Raises EngineError, naming the server,
        when one cannot be started or reached (and then nothing is left running)."""
        if self._owner is not None:
            raise RuntimeError("McpTools is already started")
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        owner = self._owner = asyncio.create_task(self._hold(ready), name="mcp-tools")
        try:
            await asyncio.wait((ready, owner), return_when=asyncio.FIRST_COMPLETED)
            if ready.done() and ready.exception() is not None:
                await asyncio.wait((owner,))  # until it has closed the servers that did connect
        except asyncio.CancelledError:
            await self.aclose()
            raise
        if owner.done():
            self._owner = None
            self._specs, self._routes = [], {}
            if owner.cancelled():
                raise EngineError("MCP tools were closed while they started")
            owner.result()
            ready.result()  # raises why it could not connect

    async def aclose(self) -> None:
        """Disconnect from every server; stdio servers are asked to exit, then killed (the SDK
        bounds each wait). Idempotent."""
        owner, self._owner = self._owner, None
        self._specs, self._routes = [], {}
        if owner is None:
            return
        owner.cancel()
        await asyncio.wait((owner,))
        if not owner.cancelled() and (exc := owner.exception()) is not None:
            log.warning("MCP tools did not close cleanly: %s", _reason(exc, ""))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def specs(self) -> Sequence[ToolSpec]:
        return tuple(self._specs)

    async def call(self, name: str, arguments: str, *, timeout_s: float) -> str:
        client = self._routes.get(name)
        if client is None:
            raise EngineError(f"no such tool: {name}")
        try:
            args: Any = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise EngineError(f"the arguments of tool {name} are not JSON: {exc}") from exc
        if not isinstance(args, dict):
            raise EngineError(f"the arguments of tool {name} are not a JSON object")
        try:
            async with asyncio.timeout(timeout_s):
                result = await client.call_tool(name, args)
        except TimeoutError as exc:
            raise EngineError(f"tool {name} timed out after {timeout_s:g} s") from exc
        except Exception as exc:  # the SDK's and its transports' errors
            raise EngineError(f"tool {name} could not be called: {exc}") from exc
        text = _result_text(result)
        if result.is_error:
            raise EngineError(f"tool {name} failed: {text}")
        return text

    async def _hold(self, ready: asyncio.Future[None]) -> None:
        """The owner task: connect, publish the tools, then hold the connections until cancelled.
        A server that cannot be connected is reported through ``ready`` (an exception raised
        here, inside the SDK's task groups, would come out wrapped in an ExceptionGroup)."""
        async with AsyncExitStack() as stack:
            try:
                for server in self._servers:
                    await self._connect(stack, server)
            except EngineError as exc:
                ready.set_exception(exc)
                return  # leaving the stack closes the servers that did connect
            ready.set_result(None)
            await asyncio.get_running_loop().create_future()  # until aclose() cancels it

    async def _connect(self, stack: AsyncExitStack, server: str) -> None:
        label = server_label(server)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                client = await stack.enter_async_context(_client(server))
                tools = await _list_tools(client, label)
        except TimeoutError as exc:
            raise EngineError(f"MCP server {label} did not answer within {self._connect_timeout_s:g} s"
                              ) from exc
        except Exception as exc:
            raise EngineError(f"MCP server {label} could not be started: {_reason(exc, server)}") from exc
        for tool in tools:
            if tool.name in self._routes:
                log.warning("MCP tool %s of %s is ignored: an earlier server has one of that name",
                            tool.name, label)
                continue
            self._routes[tool.name] = client
            self._specs.append(ToolSpec(tool.name, tool.description or tool.title or "",
                                        tool.input_schema))
        log.info("MCP server %s: %d tools", label, len(tools))
