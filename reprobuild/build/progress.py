"""Build progress for people: a live status line on a terminal, plain lines otherwise.

The live line shows steps done/running/queued and the last line of the log of the most
recently started running step; it is redrawn by a small thread (the sandbox runner is a
fork server started before it, so threads are safe here).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from typing import TextIO


class Progress:
    """Receives engine events; ``live`` redraws one status line, else prints a line each."""

    def __init__(self, *, enabled: bool = True, live: bool | None = None,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and (self.stream.isatty() if live is None else live)
        self.total = 0
        self.done = 0
        self.failed = 0
        self.running: dict[str, tuple[str, str]] = {}
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, *, total: int) -> None:
        self.total = total
        if self.live and self.thread is None:
            self.stop_event.clear()
            self.thread = threading.Thread(target=self._redraw_loop, daemon=True)
            self.thread.start()

    def started(self, key: str, display: str, log: str) -> None:
        with self.lock:
            self.running[key] = (display or key, log)

    def finished(self, key: str, *, ok: bool, state: str | None = None) -> None:
        with self.lock:
            display, _log = self.running.pop(key, (key, ""))
            self.done += 1
            self.failed += 0 if ok else 1
            if self.enabled:
                state = state or ("done" if ok else "FAILED")
                clear = "\r\x1b[K" if self.live else ""
                print(f"{clear}[{self.done}/{self.total}] {display}: {state}",
                      file=self.stream, flush=True)

    def stop(self) -> None:
        if self.thread is not None:
            self.stop_event.set()
            self.thread.join()
            self.thread = None
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _status(self) -> str:
        with self.lock:
            running = list(self.running.values())
            queued = self.total - self.done - len(running)
            text = f"[{self.done}/{self.total} done, {len(running)} running, {queued} queued]"
            if running:
                display, log = running[-1]
                text += f" {display}"
                last = _last_line(log)
                if last:
                    text += f": {last}"
        width = shutil.get_terminal_size((80, 24)).columns
        return text[: max(10, width - 1)]

    def _redraw_loop(self) -> None:
        while not self.stop_event.wait(0.1):
            status = self._status()
            with self.lock:  # never in the middle of a finished() line
                self.stream.write("\r\x1b[K" + status)
                self.stream.flush()


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 512))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.strip():
            return "".join(ch for ch in line.strip() if ch.isprintable())
    return ""
