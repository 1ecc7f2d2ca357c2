"""The desktop app's Tk window: the camera preview with live captions (the person's words as
they speak, then the reply as it streams), the state, the conversation, the latest scene
observation, mute and camera toggles, and a box for typed turns.

Tk runs on the main thread only. Every 40 ms the window drains the events the network thread
queued, applies them to a ``DesktopState`` and redraws what changed, and shows the camera
slot's newest frame; what the person does goes out through ``Commands`` (thread-safe). The
window is a view: it knows nothing of the network side (client/desktop/main.py wires the two).
Keys: m mute, c camera, s stop the reply, t type, Enter send, Esc or Ctrl-Q quit (Esc in the
text box leaves it).
"""

from __future__ import annotations

import queue
import tkinter as tk
from collections.abc import Callable
from typing import Any, Protocol

import cv2
import numpy as np

from client.common.events import JsonEvent
from client.desktop.camera import Frame, FrameSlot
from client.desktop.state import DesktopState

POLL_MS = 40
EVENTS_PER_POLL = 200
PREVIEW_W, PREVIEW_H = 640, 480
WINDOW_W, WINDOW_H = PREVIEW_W + 340, PREVIEW_H + 120  # at +0+0 (where screenshots look)
CAPTION_CHARS = 180  # the captions show the tail of a long reply

BG, PANEL, FG, DIM = "#111827", "#1f2937", "#e5e7eb", "#9ca3af"
YOU, ASSISTANT, WARN, ERR = "#f9fafb", "#93c5fd", "#fbbf24", "#f87171"
STATE_COLORS = {"connecting": "#6b7280", "listening": "#16a34a", "thinking": "#d97706",
                "speaking": "#2563eb", "disconnected": "#6b7280", "error": "#dc2626",
                "closing": "#6b7280", "reconnecting": "#d97706"}
FONT = ("Helvetica", 12)
CAPTION_FONT = ("Helvetica", 15)


class Commands(Protocol):
    """What the person can do in the window (thread-safe: called on the Tk thread)."""

    def set_muted(self, muted: bool) -> None: ...
    def set_camera(self, on: bool) -> None: ...
    def send_text(self, text: str) -> None: ...
    def interrupt(self) -> None: ...
    def quit(self) -> None: ...


def tail(text: str, n: int = CAPTION_CHARS) -> str:
    return text if len(text) <= n else "…" + text[-n:].lstrip()


def ppm(frame: Frame, width: int, height: int) -> bytes:
    """The frame scaled to fit width × height, as PPM bytes Tk reads natively (no Pillow)."""
    h, w = frame.shape[:2]
    scale = min(width / w, height / h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
    return b"P6 %d %d 255\n" % size + np.ascontiguousarray(small).tobytes()


class DesktopWindow:
    """The window on ``root``: shows what ``inbox`` (events, drained by ``poll``) and
    ``frames`` (the camera's newest frame) say, and hands what the person does to
    ``commands``. ``network_done``: whether the network side has shut down (the window goes
    once it has, after a quit was asked for)."""

    def __init__(self, root: tk.Tk, commands: Commands, inbox: queue.Queue[JsonEvent],
                 frames: FrameSlot | None, *,
                 network_done: Callable[[], bool] = lambda: True) -> None:
        self.root = root
        self.commands = commands
        self.inbox = inbox
        self.frames = frames
        self.network_done = network_done
        self.state = DesktopState()
        self.closing = False
        self.quit_soon = False  # set by a signal handler; acted on at the next poll
        self._drawn = -1
        self._frame_seq = -1
        self._photo: tk.PhotoImage | None = None
        self._build()
        self._bind_keys()
        root.protocol("WM_DELETE_WINDOW", self.request_quit)

    # ---- layout -----------------------------------------------------------------------

    def _build(self) -> None:
        root = self.root
        root.title("voxlens")
        root.configure(bg=BG)
        root.geometry(f"{WINDOW_W}x{WINDOW_H}+0+0")
        root.option_add("*Font", FONT)

        left = tk.Frame(root, bg=BG)
        left.grid(row=0, column=0, sticky="nsew", padx=(10, 5), pady=10)
        right = tk.Frame(root, bg=BG)
        right.grid(row=0, column=1, sticky="nsew", padx=(5, 10), pady=10)
        root.columnconfigure(1, weight=1)
        root.rowconfigure(0, weight=1)

        self.canvas = tk.Canvas(left, width=PREVIEW_W, height=PREVIEW_H, bg="black",
                                highlightthickness=0, takefocus=1)
        self.canvas.grid(row=0, column=0, columnspan=5)
        self._image = self.canvas.create_image(PREVIEW_W // 2, PREVIEW_H // 2, anchor="center")
        self._placeholder = self.canvas.create_text(PREVIEW_W // 2, PREVIEW_H // 2, fill=DIM,
                                                    text="starting the camera…", font=CAPTION_FONT)
        self._band = self.canvas.create_rectangle(0, PREVIEW_H, PREVIEW_W, PREVIEW_H,
                                                  fill="#0b0f19", outline="")
        self._you = self.canvas.create_text(12, PREVIEW_H - 12, anchor="sw", fill=YOU,
                                            width=PREVIEW_W - 24, font=CAPTION_FONT)
        self._reply = self.canvas.create_text(12, PREVIEW_H - 12, anchor="sw", fill=ASSISTANT,
                                              width=PREVIEW_W - 24, font=CAPTION_FONT)

        self.scene = tk.Label(left, text="", bg=BG, fg=DIM, anchor="w", justify="left",
                              wraplength=PREVIEW_W)
        self.scene.grid(row=1, column=0, columnspan=5, sticky="we", pady=(6, 6))
        button: dict[str, Any] = {"bg": PANEL, "fg": FG, "activebackground": "#374151",
                                  "activeforeground": FG, "relief": "flat", "width": 11,
                                  "takefocus": 0, "highlightthickness": 0}
        self.mute = tk.Button(left, text="Mute (m)", command=self.toggle_mute, **button)
        self.mute.grid(row=2, column=0, sticky="w")
        self.camera = tk.Button(left, text="Camera off (c)", command=self.toggle_camera, **button)
        self.camera.grid(row=2, column=1, sticky="w", padx=(6, 0))
        self.stop = tk.Button(left, text="Stop (s)", command=self.commands.interrupt,
                              **{**button, "width": 7})
        self.stop.grid(row=2, column=4, sticky="e", padx=(6, 0))
        self.entry = tk.Entry(left, bg=PANEL, fg=FG, insertbackground=FG, relief="flat",
                              highlightthickness=1, highlightbackground=PANEL,
                              highlightcolor=ASSISTANT)
        self.entry.grid(row=2, column=2, sticky="we", padx=6, ipady=4)
        left.columnconfigure(2, weight=1)
        self.send = tk.Button(left, text="Send", command=self.send_typed,
                              **{**button, "width": 6})
        self.send.grid(row=2, column=3, sticky="e")

        self.status = tk.Label(right, text="connecting", fg="white", bg=STATE_COLORS["connecting"],
                               font=("Helvetica", 14, "bold"), padx=12, pady=4)
        self.status.grid(row=0, column=0, sticky="w")
        self.info = tk.Label(right, text="", bg=BG, fg=DIM, anchor="w", justify="left",
                             wraplength=320, font=("Helvetica", 10))
        self.info.grid(row=1, column=0, sticky="we", pady=(6, 6))
        self.log = tk.Text(right, bg=PANEL, fg=FG, relief="flat", wrap="word", width=36,
                           padx=8, pady=8, takefocus=0, cursor="arrow", highlightthickness=0)
        self.log.grid(row=2, column=0, sticky="nsew")
        self.log.tag_configure("you", foreground=YOU, font=("Helvetica", 12, "bold"))
        self.log.tag_configure("assistant", foreground=ASSISTANT)
        self.log.tag_configure("note", foreground=DIM, font=("Helvetica", 10, "italic"))
        self.log.configure(state="disabled")
        right.rowconfigure(2, weight=1)
        right.columnconfigure(0, weight=1)
        self.notice = tk.Label(right, text="", bg=BG, fg=ERR, anchor="w", justify="left",
                               wraplength=320)
        self.notice.grid(row=3, column=0, sticky="we", pady=(6, 0))
        tk.Label(right, text="m mute · c camera · s stop · t type · Esc quit", bg=BG, fg=DIM,
                 font=("Helvetica", 10)).grid(row=4, column=0, sticky="w", pady=(6, 0))

    def _bind_keys(self) -> None:
        def unless_typing(action: Callable[[], None]) -> Callable[[tk.Event[Any]], str | None]:
            def handler(event: tk.Event[Any]) -> str | None:
                if event.widget is self.entry:
                    return None  # a letter typed into the box
                action()
                return "break"
            return handler

        self.root.bind("<KeyPress-m>", unless_typing(self.toggle_mute))
        self.root.bind("<KeyPress-c>", unless_typing(self.toggle_camera))
        self.root.bind("<KeyPress-t>", unless_typing(self.entry.focus_set))
        self.root.bind("<KeyPress-s>", unless_typing(self.commands.interrupt))
        self.root.bind("<Control-q>", lambda _e: self.request_quit())
        self.root.bind("<Escape>", self._on_escape)
        self.entry.bind("<Return>", lambda _e: self.send_typed())
        self.canvas.bind("<Button-1>", lambda _e: self.canvas.focus_set())
        self.canvas.focus_set()

    # ---- what the person does -----------------------------------------------------------

    def toggle_mute(self) -> None:
        self.commands.set_muted(not self.state.muted)

    def toggle_camera(self) -> None:
        if self.state.camera_available:
            self.commands.set_camera(not self.state.camera_on)

    def send_typed(self) -> None:
        text = self.entry.get().strip()
        if text:
            self.commands.send_text(text)
            self.entry.delete(0, "end")

    def _on_escape(self, event: tk.Event[Any]) -> str:
        if event.widget is self.entry:
            self.canvas.focus_set()
        else:
            self.request_quit()
        return "break"

    def request_quit(self) -> None:
        """Ask the network side to close; the window goes once it has (see ``poll``)."""
        if not self.closing:
            self.closing = True
            self.commands.quit()
            self.status.configure(text="closing…", bg=STATE_COLORS["closing"])

    # ---- drawing --------------------------------------------------------------------------

    def poll(self) -> None:
        """Apply queued events, redraw what changed, show the newest camera frame."""
        if self.quit_soon:
            self.request_quit()
        for _ in range(EVENTS_PER_POLL):
            try:
                self.state.apply(self.inbox.get_nowait())
            except queue.Empty:
                break
        if self.state.version != self._drawn:
            self._drawn = self.state.version
            self.render()
        self._preview()

    def _tick(self) -> None:
        self.poll()
        if self.closing and self.network_done():
            self.root.quit()
        else:
            self.root.after(POLL_MS, self._tick)

    def start(self) -> None:
        self.root.after(POLL_MS, self._tick)

    def render(self) -> None:
        s = self.state
        if not self.closing:
            self.status.configure(text=s.state, bg=STATE_COLORS.get(s.state, "#6b7280"))
        info = [s.models] if s.models else []
        if s.latency_ms is not None:
            info.append(f"voice-to-voice (server): {round(s.latency_ms)} ms")
        self.info.configure(text="\n".join(info))
        self.scene.configure(text=f"Camera: {s.scene}" if s.scene else "")
        self.notice.configure(text=s.error or "\n".join(s.warnings), fg=ERR if s.error else WARN)
        self.mute.configure(text="Unmute (m)" if s.muted else "Mute (m)")
        self.camera.configure(text="Camera on (c)" if not s.camera_on else "Camera off (c)",
                              state="normal" if s.camera_available else "disabled")
        self._captions()
        self.log.configure(state="normal")
        self.log.delete("1.0", "end")
        for line in s.log:
            self.log.insert("end", "You: " if line.who == "you" else "voxlens: ", line.who)
            self.log.insert("end", line.text, line.who)
            if line.interrupted:
                self.log.insert("end", " (interrupted)", "note")
            self.log.insert("end", "\n\n")
        self.log.see("end")
        self.log.configure(state="disabled")

    def _captions(self) -> None:
        s = self.state
        c = self.canvas
        c.itemconfigure(self._you, text=tail(s.you), fill=YOU if s.you_final else DIM)
        c.itemconfigure(self._reply, text=tail(s.reply))
        bottom = PREVIEW_H - 12
        if s.reply:
            box = c.bbox(self._reply)
            bottom = box[1] - 6 if box else bottom
        c.coords(self._you, 12, bottom)
        top = min((b[1] for b in (c.bbox(self._you), c.bbox(self._reply)) if b), default=PREVIEW_H)
        top = PREVIEW_H if not (s.you or s.reply) else top - 10
        c.coords(self._band, 0, top, PREVIEW_W, PREVIEW_H)

    def _preview(self) -> None:
        s = self.state
        seq, frame = self.frames.get() if self.frames is not None else (0, None)
        if seq == self._frame_seq and self._photo is not None:
            return
        self._frame_seq = seq
        if frame is None:
            self.canvas.itemconfigure(self._image, image="")
            self._photo = None
            text = ("no camera" if not s.camera_available else
                    "camera off" if not s.camera_on else "starting the camera…")
            self.canvas.itemconfigure(self._placeholder, text=text, state="normal")
            return
        self._photo = tk.PhotoImage(data=ppm(frame, PREVIEW_W, PREVIEW_H), format="ppm")
        self.canvas.itemconfigure(self._image, image=self._photo)
        self.canvas.itemconfigure(self._placeholder, state="hidden")

    def _item_text(self, item: int) -> str:
        return str(self.canvas.tk.call(str(self.canvas), "itemcget", item, "-text"))

    def shown(self) -> dict[str, Any]:
        """The texts on screen (printed at exit, read by tests)."""
        return {"state": self.status.cget("text"),
                "you": self._item_text(self._you), "reply": self._item_text(self._reply),
                "scene": self.scene.cget("text"),
                "notice": self.notice.cget("text"),
                "mute": self.mute.cget("text"), "camera": self.camera.cget("text"),
                "log": self.log.get("1.0", "end").strip(),
                "preview": self._photo is not None}
