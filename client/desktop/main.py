"""``voxlens desktop``: the network side (``DesktopApp``) wired to what shows the conversation:
headless (events printed as JSON lines, typed turns from stdin with ``--stdin``) or the Tk
window (client/desktop/window.py).

Threads. ``DesktopApp`` runs on one asyncio loop. With a window, Tk owns the main thread and
the loop runs on a thread of its own ("voxlens-net"); neither ever calls into the other
directly: the app hands each event to a bounded queue that the window drains every 40 ms
(``root.after``), and the window's commands (mute, camera, typed text, stop, quit) are
scheduled on the loop with ``call_soon_threadsafe`` (``LoopCommands``). Headless, the loop runs
on the main thread. Every thread is joined on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from client.common.console import print_json, stdin_lines
from client.common.events import JsonEvent
from client.desktop.app import DesktopApp, DesktopOptions
from client.desktop.events import Closed, print_event
from client.desktop.state import DesktopState

INBOX = 1024  # events waiting for the window; the oldest go when it is full


def main(options: DesktopOptions, *, headless: bool = False) -> int:
    """Run the app until it is closed; returns the exit status."""
    for path in (options.mic_file, options.camera):
        if isinstance(path, Path) and not path.is_file():
            print(f"error: {path} not found", file=sys.stderr)
            return 2
    if headless:
        return asyncio.run(run_headless(options))
    return run_window(options)


# ---- headless -------------------------------------------------------------------------------


async def type_from_stdin(app: DesktopApp) -> None:
    """Each line of standard input, a typed turn (headless ``--stdin``), until its end; a
    line that comes while the app (re)connects is sent once it is connected."""
    async for line in stdin_lines():
        await app.until_connected()
        app.send_text(line)


async def run_headless(options: DesktopOptions) -> int:
    """The app without a window: events printed, a summary line at the end. SIGINT and
    SIGTERM end it cleanly; cancelling it closes everything the same way."""
    state = DesktopState()

    def notify(ev: JsonEvent) -> None:
        state.apply(ev)
        print_event(ev)

    app = DesktopApp(options, notify)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, app.stop)
    typing = asyncio.create_task(type_from_stdin(app)) if options.stdin else None
    try:
        code = await app.run()
    finally:
        if typing is not None:
            typing.cancel()
            await asyncio.wait([typing])
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    print_json({"type": "desktop.exit", **state.summary()})
    return code


# ---- with the window ------------------------------------------------------------------------


class LoopCommands:
    """The window's commands, scheduled on the app's loop from the Tk thread."""

    def __init__(self, app: DesktopApp, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.loop = loop

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has already closed
            self.loop.call_soon_threadsafe(fn, *args)

    def set_muted(self, muted: bool) -> None:
        self._call(self.app.set_muted, muted)

    def set_camera(self, on: bool) -> None:
        self._call(self.app.set_camera, on)

    def send_text(self, text: str) -> None:
        self._call(self.app.send_text, text)

    def interrupt(self) -> None:
        self._call(self.app.interrupt)

    def quit(self) -> None:
        self._call(self.app.stop)


def put_latest(inbox: queue.Queue[JsonEvent], ev: JsonEvent) -> None:
    """Queue an event for the window; when the queue is full (the window hangs), the oldest
    event goes."""
    try:
        inbox.put_nowait(ev)
    except queue.Full:
        with contextlib.suppress(queue.Empty):
            inbox.get_nowait()
        inbox.put_nowait(ev)


def run_window(options: DesktopOptions) -> int:
    """The app with its window; returns when the window is closed (Esc, Ctrl-Q, the close
    button, SIGINT or SIGTERM) and everything has shut down."""
    import tkinter as tk  # Tk only when there is a window

    from client.desktop.window import DesktopWindow

    try:
        root = tk.Tk(className="voxlens")
    except tk.TclError as e:
        print(f"error: no display for the window ({e}); use --headless", file=sys.stderr)
        return 2
    inbox: queue.Queue[JsonEvent] = queue.Queue(maxsize=INBOX)

    def notify(ev: JsonEvent) -> None:
        print_event(ev)
        put_latest(inbox, ev)

    app = DesktopApp(options, notify)
    loop = asyncio.new_event_loop()
    result: list[int] = []

    def network() -> None:
        asyncio.set_event_loop(loop)
        try:
            result.append(loop.run_until_complete(app.run()))
        except Exception as e:
            notify(Closed(f"internal error: {e!r}").json())
            raise
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            asyncio.set_event_loop(None)
            loop.close()

    thread = threading.Thread(target=network, name="voxlens-net")
    commands = LoopCommands(app, loop)
    window = DesktopWindow(root, commands, inbox, app.frames,
                           network_done=lambda: not thread.is_alive())

    def on_signal(signum: int, frame: FrameType | None) -> None:
        window.quit_soon = True  # Tk is not touched inside a signal handler

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread.start()
    try:
        window.start()
        root.mainloop()
    finally:
        commands.quit()
        thread.join()
        window.poll()  # the last events (the connection closed)
        shown = window.shown()
        with contextlib.suppress(tk.TclError):
            root.destroy()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print_json({"type": "desktop.exit", **shown})
    return result[0] if result else 1
