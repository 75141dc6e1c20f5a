"""An image pull as a person follows it: the Engine's progress records in, text out.

``PullRenderer`` is pure (records and a clock in, text out) and writes for one of two readers:

- a terminal: one status line rewritten in place with ``\\r`` (a bar over the bytes of the layers
  known so far, how many layers are done), redrawn at most every ``TTY_INTERVAL`` seconds and
  ended by the summary;
- a log (CI, the daemon's log): ``pulling registry:2`` when it starts; for a layer still
  downloading or extracting, at most one line every ``LOG_INTERVAL`` seconds
  (``pulling registry:2: layer 3f2a1b: downloading 12.0/48.3 MiB``); one line when a layer is done;
  and the summary, ``pulled registry:2 in 4.2s (3 layers, 48.3 MiB)``. A small layer that comes
  and goes within the interval costs one line, however many records the Engine sent about it.

``PullPrinter`` sends that text on: log lines to a callable (provisioning's ``up:`` printer, the
daemon's log), terminal text to a writer. It is what ``ensure_image`` is given as its progress.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

from tunneld.docker.models import PullProgress

LOG_INTERVAL = 5.0  # seconds between two progress lines about one layer, in a log
TTY_INTERVAL = 0.2  # seconds between two redraws of the terminal line
_BAR = 20
_MIB = 1024 * 1024

# What a layer goes through, as the Engine names the steps (moby's distribution/xfer).
_QUIET = frozenset({"Pulling fs layer", "Waiting"})
_DOWNLOADED = frozenset({"Verifying Checksum", "Download complete"})


@dataclass
class _Layer:
    phase: str  # waiting, downloading, downloaded, extracting, done, existed
    said: float  # when its last line was written (or it was first seen)
    current: int = 0
    total: int = 0  # bytes to fetch (compressed), once the Engine has said

    def fetched(self) -> int:
        if self.phase == "downloading":
            return self.current
        return self.total if self.phase in ("downloaded", "extracting", "done") else 0


def mib(n: int) -> str:
    return f"{n / _MIB:.1f}"


class PullRenderer:
    """The text showing one image's pull: for a terminal (``tty``) or for a log, rate-limited."""

    def __init__(self, image: str, *, tty: bool = False, prefix: str = "", width: int = 0,
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        """``prefix`` starts the terminal line ("up: "); ``width`` (when > 0) cuts it to fit the screen."""
        self.image = image
        self.tty = tty
        self.prefix = prefix
        self.width = width
        self.interval = interval if interval is not None else (TTY_INTERVAL if tty else LOG_INTERVAL)
        self._clock = clock
        self._started: float | None = None
        self._layers: dict[str, _Layer] = {}
        self._drawn_at: float | None = None
        self._shown = 0  # length of the terminal line showing now; 0 when none is open
        self._text = ""  # what it shows
        self.finished = False

    def feed(self, record: PullProgress) -> list[str]:
        """What to show for one more record: log lines (no newline), or terminal text to write as is."""
        if self.finished:
            return []
        now = self._clock()
        out: list[str] = []
        if self._started is None:
            self._started = now
            if not self.tty:
                out.append(f"pulling {self.image}")
        status = record.status
        if record.layer:
            out += self._layer(record, now)
        elif status.startswith("Status: "):
            return out + self._summary(status, now)
        elif status and not status.startswith(("Pulling from ", "Digest: ")) and not self.tty:
            out.append(f"pulling {self.image}: {status}")  # rare, and worth reading when it comes
        if self.tty and (self._drawn_at is None or now - self._drawn_at >= self.interval):
            out += self._draw(now)
        return out

    def close(self) -> list[str]:
        """What is still owed when the pull ends without a summary (it failed): the terminal line's end."""
        self.finished = True
        if self._shown:
            self._shown = 0
            return ["\n"]
        return []

    def _layer(self, record: PullProgress, now: float) -> list[str]:
        layer = self._layers.get(record.layer)
        if layer is None:
            layer = self._layers[record.layer] = _Layer("waiting", said=now)
        status = record.status
        if record.total:
            layer.total = record.total
        if status in _QUIET:
            return []
        if status == "Already exists":
            layer.phase = "existed"
            return []
        if status in _DOWNLOADED:
            layer.phase = "downloaded"
            return []
        if status == "Pull complete":
            layer.phase = "done"
            size = f" ({mib(layer.total)} MiB)" if layer.total else ""
            return [] if self.tty else [f"pulling {self.image}: layer {record.layer}: done{size}"]
        if status in ("Downloading", "Extracting"):
            phase = "downloading" if status == "Downloading" else "extracting"
            if layer.phase != phase:
                layer.phase, layer.said = phase, now  # a step that is over within the interval says nothing
            layer.current = record.current or 0
            if not layer.total:
                return []
            text = f"{status.lower()} {mib(layer.current)}/{mib(layer.total)} MiB"
        else:
            text = status[:1].lower() + status[1:]  # "Retrying in 5 seconds", and whatever comes next
        if self.tty or now - layer.said < self.interval:
            return []
        layer.said = now
        return [f"pulling {self.image}: layer {record.layer}: {text}"]

    def _draw(self, now: float) -> list[str]:
        """The terminal line as things stand (nothing when it would show what it shows)."""
        layers = self._layers.values()
        text = f"{self.prefix}pulling {self.image}"
        if layers:
            total = sum(layer.total for layer in layers if layer.phase != "existed")
            fetched = sum(layer.fetched() for layer in layers)
            done = sum(layer.phase in ("done", "existed") for layer in layers)
            filled = min(_BAR, _BAR * fetched // total) if total else 0
            bar = "=" * filled + " " * (_BAR - filled)
            extracting = ", extracting" if any(layer.phase == "extracting" for layer in layers) else ""
            text += f": [{bar}] {mib(fetched)}/{mib(total)} MiB, {done}/{len(self._layers)} layers{extracting}"
        self._drawn_at = now
        if text == self._text:
            return []
        self._text = text
        return [self._line(text)]

    def _summary(self, status: str, now: float) -> list[str]:
        self.finished = True
        took = now - (self._started if self._started is not None else now)
        fetched = [layer for layer in self._layers.values() if layer.phase != "existed"]
        existed = len(self._layers) - len(fetched)
        if "up to date" in status:
            text = f"{self.image} is up to date (checked in {took:.1f}s)"
        elif not fetched:
            text = f"pulled {self.image} in {took:.1f}s (its layers were all there already)"
        else:
            there = f", {existed} already there" if existed else ""
            count = f"{len(fetched)} layer{'' if len(fetched) == 1 else 's'}"
            text = f"pulled {self.image} in {took:.1f}s ({count}, {mib(sum(x.total for x in fetched))} MiB{there})"
        if not self.tty:
            return [text]
        line = self._line(self.prefix + text, cut=False) + "\n"  # it stays: whole, even if it wraps
        self._shown = 0
        return [line]

    def _line(self, text: str, *, cut: bool = True) -> str:
        """``text`` over the terminal line showing now: from its start, blanking what is longer; ``cut``
        to the screen's width (a line that wraps cannot be rewritten)."""
        if cut and self.width > 0 and len(text) > self.width:
            text = text[: max(0, self.width - 3)] + "..."
        pad = " " * max(0, self._shown - len(text))
        self._shown = len(text)
        return f"\r{text}{pad}"


class PullPrinter:
    """Shows image pulls to a person: log lines through ``say``, or, given ``write`` (a terminal), one
    line rewritten in place (``prefix`` starts it). Pass it as ``ensure_image``'s progress and
    ``close()`` it when the pull is over, whatever the outcome: a failed pull's line is ended."""

    def __init__(self, say: Callable[[str], None], *, write: Callable[[str], None] | None = None,
                 prefix: str = "", interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._say = say
        self._write = write
        self._prefix = prefix
        self._interval = interval
        self._clock = clock
        self._renderers: dict[str, PullRenderer] = {}

    def __call__(self, record: PullProgress) -> None:
        renderer = self._renderers.get(record.image)
        if renderer is None or renderer.finished:
            width = shutil.get_terminal_size().columns - 1 if self._write is not None else 0
            renderer = self._renderers[record.image] = PullRenderer(
                record.image, tty=self._write is not None, prefix=self._prefix, width=width,
                interval=self._interval, clock=self._clock)
        self._emit(renderer.feed(record))

    def close(self) -> None:
        """End every pull shown so far (a terminal line left open by a failed one)."""
        for renderer in self._renderers.values():
            self._emit(renderer.close())
        self._renderers.clear()

    def _emit(self, texts: list[str]) -> None:
        for text in texts:
            if self._write is not None:
                self._write(text)
            else:
                self._say(text)
