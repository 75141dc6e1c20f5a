"""What the daemon tests share: systemd's side of sd_notify, played by a datagram socket."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass


@dataclass
class Message:
    at: float
    fields: dict[str, str]


class NotifyListener:
    """What systemd does for NOTIFY_SOCKET: a datagram socket collecting KEY=VALUE messages."""

    def __init__(self, address: str, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.env_value = env_value
        self.messages: list[Message] = []

    def wait_for(self, key: str, value: str | None = None, *, timeout: float, since: int = 0) -> Message:
        """Collect messages until one (from index ``since`` on) has key (=value); return it."""
        deadline = time.monotonic() + timeout
        for m in self.messages[since:]:
            if key in m.fields and (value is None or m.fields[key] == value):
                return m
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            m = Message(time.monotonic(), _fields(data))
            self.messages.append(m)
            if key in m.fields and (value is None or m.fields[key] == value):
                return m
        got = [m.fields for m in self.messages]
        raise AssertionError(f"no {key}={value or '*'} within {timeout:g}s; got {got}")

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return
            self.messages.append(Message(time.monotonic(), _fields(data)))

    def close(self) -> None:
        self.sock.close()


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines() if "=" in line)
