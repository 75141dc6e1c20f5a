"""The pull renderer, pure: records and a clock in, text out. For a log, one line per layer or step,
rate-limited per layer, and a summary; for a terminal, one line rewritten with \\r and ended by the
summary (or by close() when the pull failed). The records are shaped as dockerd sends them
(tests/docker/test_pull.py checks them against the lab's real dockerd)."""

from __future__ import annotations

import pytest

from tunneld.docker.models import PullProgress, pull_progress
from tunneld.docker.progress import LOG_INTERVAL, PullPrinter, PullRenderer

pytestmark = pytest.mark.timeout(10)

IMAGE = "registry:2"
MIB = 1 << 20


class Clock:
    """Time as the test says it is."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Screen:
    """A terminal as far as \\r and \\n go: the line being written over, and the lines done."""

    def __init__(self) -> None:
        self.line = ""
        self.col = 0
        self.done: list[str] = []

    def write(self, text: str) -> None:
        for ch in text:
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self.done.append(self.line.rstrip())
                self.line, self.col = "", 0
            else:
                self.line = self.line[: self.col] + ch + self.line[self.col + 1:]
                self.col += 1


def rec(status: str, layer: str = "", current: int | None = None, total: int | None = None) -> PullProgress:
    return PullProgress(image=IMAGE, status=status, layer=layer, current=current, total=total)


def feed(renderer: PullRenderer, clock: Clock, records: list[tuple[float, PullProgress]]) -> list[str]:
    """Feed each record at its time (seconds after the start); every text the renderer gave."""
    start = clock.now
    out: list[str] = []
    for at, record in records:
        clock.now = start + at
        out += renderer.feed(record)
    return out


def slow_pull() -> list[tuple[float, PullProgress]]:
    """Layer 3f2a1b0c9d8e downloads 48.3 MiB over 20 s (a record every 0.5 s) and extracts in 2 s; layer
    aaaaaaaaaaaa (1 MiB) comes and goes in 1 s; bbbbbbbbbbbb is already there."""
    big, small, there = "3f2a1b0c9d8e", "aaaaaaaaaaaa", "bbbbbbbbbbbb"
    total = int(48.3 * MIB)
    out: list[tuple[float, PullProgress]] = [
        (0.0, rec("Pulling from library/registry")),
        (0.0, rec("Pulling fs layer", big)), (0.0, rec("Pulling fs layer", small)),
        (0.0, rec("Already exists", there)),
        (0.1, rec("Downloading", small, 512 * 1024, MIB)), (0.6, rec("Download complete", small)),
    ]
    for i in range(1, 41):
        out.append((i * 0.5, rec("Downloading", big, total * i // 40, total)))
    out += [(20.1, rec("Verifying Checksum", big)), (20.1, rec("Download complete", big))]
    for i in range(1, 21):
        out.append((20.1 + i * 0.1, rec("Extracting", big, total * i // 20, total)))
    out += [(22.2, rec("Pull complete", big)),
            (22.3, rec("Extracting", small, MIB, MIB)), (22.4, rec("Pull complete", small)),
            (22.5, rec("Digest: sha256:" + "1" * 64)),
            (22.5, rec(f"Status: Downloaded newer image for {IMAGE}"))]
    return out


def test_a_log_gets_a_line_per_layer_and_step_every_few_seconds_at_most() -> None:
    clock = Clock()
    lines = feed(PullRenderer(IMAGE, clock=clock), clock, slow_pull())
    assert lines[0] == "pulling registry:2"
    assert lines[-1] == "pulled registry:2 in 22.5s (2 layers, 49.3 MiB, 1 already there)"
    # 19.5 s of downloading (from 0.5 s on), a line at most every 5 s once it has lasted 5 s: 3 lines, not 40.
    # Its extraction took 2 s: no line.
    assert lines[1:5] == [*(f"pulling registry:2: layer 3f2a1b0c9d8e: downloading {mib}/48.3 MiB"
                            for mib in ("13.3", "25.4", "37.4")),
                          "pulling registry:2: layer 3f2a1b0c9d8e: done (48.3 MiB)"]
    # The small layer's steps were each over within the interval: one line for it, however many records
    # it had, and although it waited 20 s to be extracted.
    assert lines[5] == "pulling registry:2: layer aaaaaaaaaaaa: done (1.0 MiB)"
    assert len(lines) == 7
    assert all("\r" not in line and "\n" not in line for line in lines)


def test_a_log_line_per_layer_stays_rate_limited_whatever_the_engine_says() -> None:
    clock = Clock()
    retries = [(0.0, rec("Pulling fs layer", "cccccccccccc"))]
    retries += [(s + 1.0, rec(f"Retrying in {5 - s % 5} seconds", "cccccccccccc")) for s in range(12)]
    lines = feed(PullRenderer(IMAGE, clock=clock), clock, retries)
    assert lines == ["pulling registry:2",
                     "pulling registry:2: layer cccccccccccc: retrying in 1 seconds",
                     "pulling registry:2: layer cccccccccccc: retrying in 1 seconds"]
    # An image-wide status the renderer does not know is passed on as it is.
    assert PullRenderer(IMAGE, clock=clock).feed(rec("Something new")) == ["pulling registry:2",
                                                                           "pulling registry:2: Something new"]


def test_a_terminal_gets_one_line_rewritten_then_the_summary() -> None:
    clock = Clock()
    texts = feed(PullRenderer(IMAGE, tty=True, prefix="up: ", clock=clock), clock, slow_pull())
    # Every text starts over the same line; only the summary ends it.
    assert all(t.startswith("\r") for t in texts)
    assert [t for t in texts if "\n" in t] == [texts[-1]]
    assert texts[-1].rstrip(" \n") == "\rup: pulled registry:2 in 22.5s (2 layers, 49.3 MiB, 1 already there)"
    # Redrawn at most every 0.2 s and only when it changes: not once per record (70 of them).
    assert len(texts) == 45
    assert texts[0] == "\rup: pulling registry:2"
    assert "\rup: pulling registry:2: [==========          ] 25.1/49.3 MiB, 1/3 layers" in texts
    assert "\rup: pulling registry:2: [====================] 49.3/49.3 MiB, 1/3 layers, extracting" in texts
    # On a screen, each text replaces the one before: a shorter one blanks what the longer one left.
    screen = Screen()
    for text in texts[:-1]:
        screen.write(text)
        assert screen.line.rstrip() == text.strip(), (screen.line, text)
    screen.write(texts[-1])
    assert screen.done == ["up: pulled registry:2 in 22.5s (2 layers, 49.3 MiB, 1 already there)"]


def test_a_failed_pull_ends_the_terminal_line_when_closed() -> None:
    clock = Clock()
    renderer = PullRenderer(IMAGE, tty=True, clock=clock)
    assert renderer.feed(rec("Pulling fs layer", "3f2a1b0c9d8e")) == [
        "\rpulling registry:2: [                    ] 0.0/0.0 MiB, 0/1 layers"]
    assert renderer.feed(rec("Waiting", "3f2a1b0c9d8e")) == []  # nothing new to show
    assert renderer.close() == ["\n"]
    assert renderer.close() == [] and renderer.feed(rec("Waiting", "3f2a1b0c9d8e")) == []
    # Nothing shown, nothing owed; a log never owes anything.
    assert PullRenderer(IMAGE, tty=True, clock=clock).close() == []
    log = PullRenderer(IMAGE, clock=clock)
    log.feed(rec("Pulling fs layer", "3f2a1b0c9d8e"))
    assert log.close() == []


def test_a_terminal_line_is_cut_to_the_screen() -> None:
    long = "registry.example.com/" + "x" * 100 + ":1"
    renderer = PullRenderer(long, tty=True, width=60, clock=Clock())
    (text,) = renderer.feed(PullProgress(image=long, status="Pulling fs layer", layer="3f2a1b0c9d8e"))
    assert len(text) == 61 and text.startswith("\rpulling registry.example.com/xxx") and text.endswith("...")


def test_an_image_with_nothing_to_fetch() -> None:
    clock = Clock()
    lines = feed(PullRenderer(IMAGE, clock=clock), clock, [
        (0.0, rec("Pulling from library/registry")), (0.0, rec("Already exists", "bbbbbbbbbbbb")),
        (0.3, rec(f"Status: Image is up to date for {IMAGE}"))])
    assert lines == ["pulling registry:2", "registry:2 is up to date (checked in 0.3s)"]
    # A new name for layers dockerd has: it does not even list them.
    lines = feed(PullRenderer(IMAGE, clock=clock), clock, [
        (0.0, rec("Pulling from library/registry")), (0.1, rec("Digest: sha256:" + "1" * 64)),
        (0.1, rec(f"Status: Downloaded newer image for {IMAGE}"))])
    assert lines == ["pulling registry:2", "pulled registry:2 in 0.1s (its layers were all there already)"]


def test_the_printer_sends_log_lines_to_say_and_terminal_text_to_write() -> None:
    clock = Clock()
    said: list[str] = []
    printer = PullPrinter(said.append, clock=clock)
    for _, record in slow_pull():
        printer(record)
    printer.close()
    assert said[0] == "pulling registry:2" and said[-1].startswith("pulled registry:2 in ")
    written: list[str] = []
    terminal = PullPrinter(said.append, write=written.append, prefix="up: ", clock=clock)
    said.clear()
    terminal(rec("Pulling fs layer", "3f2a1b0c9d8e"))
    terminal.close()  # the pull failed: its line is ended
    assert said == [] and written[0].startswith("\rup: pulling registry:2: [") and written[-1] == "\n"
    # A new pull of the same image after close() starts afresh.
    terminal(rec("Pulling fs layer", "3f2a1b0c9d8e"))
    assert written[-1].startswith("\rup: pulling registry:2")


def test_engine_lines_become_records() -> None:
    assert pull_progress(IMAGE, {"status": "Pulling from library/registry", "id": "2"}) == rec(
        "Pulling from library/registry")
    assert pull_progress(IMAGE, {"status": "Downloading", "id": "3f2a1b0c9d8e", "progress": "[=> ] 1kB/2kB",
                                 "progressDetail": {"current": 1024, "total": 2048}}) == rec(
        "Downloading", "3f2a1b0c9d8e", 1024, 2048)
    assert pull_progress(IMAGE, {"status": "Waiting", "id": "3f2a1b0c9d8e", "progressDetail": {}}) == rec(
        "Waiting", "3f2a1b0c9d8e")
    # Odd shapes do not break it: no status, a detail that is not an object, a total of 0 (unknown).
    assert pull_progress(IMAGE, {"progressDetail": "x"}) == rec("")
    unknown_total = {"status": "Extracting", "id": "a", "progressDetail": {"current": 5, "total": 0}}
    assert pull_progress(IMAGE, unknown_total) == rec("Extracting", "a", 5, None)
    assert LOG_INTERVAL >= 2.0  # "every few seconds", as the docs say
