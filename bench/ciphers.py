"""What sealing and opening one SSH packet costs the lanes, per cipher and packet size, in-process.

    python3 -m bench.ciphers              # the table
    python3 -m bench.ciphers --number 5000

For chacha20-poly1305@openssh.com it times the lanes' cipher both ways: with ``cryptography`` alone
(new cipher contexts per packet) and with libsodium (tunneld/ssh/sodium.py, when the host has it),
which takes packets up to ``SMALL`` bytes and leaves larger ones to ``cryptography``: the sizes on each
side of it show where ``SMALL`` comes from. AES-GCM's one ``AESGCM`` per key for comparison. Each
figure is the best of 5 repeats of ``--number`` calls, in µs per packet. A benchmark, not a test:
nothing gates CI.
"""

from __future__ import annotations

import argparse
import os
import timeit
from collections.abc import Callable, Sequence
from typing import Any

from tunneld.ssh import sodium
from tunneld.ssh.ciphers import FastChachaCipher, FastGCMCipher

SIZES = (64, 1024, 4096, 8192, 16384, 32768)


def _per_call(call: Callable[[], Any], number: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6


def _row(name: str, cipher: Any, size: int, number: int) -> str:
    header = (size + 16).to_bytes(4, "big")
    body = memoryview(bytearray(os.urandom(size)))
    wire = memoryview(b"".join(cipher.seal(7, header, body)))
    seal = _per_call(lambda: cipher.seal(7, header, body), number)
    if isinstance(cipher, FastGCMCipher):  # its nonce moves on per packet: step back before each open
        def open_one() -> Any:
            cipher.rewind()
            return cipher.open(7, wire[:4], wire[4:])
        cipher.open(7, wire[:4], wire[4:])  # one step ahead, so the first rewind lands on the right nonce
    else:
        def open_one() -> Any:
            return cipher.open(7, wire[:4], wire[4:])
    opened = _per_call(open_one, number)
    length = _per_call(lambda: cipher.length(7, wire[:4]), number)
    return f"| {name} | {size} | {seal:.2f} | {length:.2f} | {opened:.2f} |"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.ciphers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=20000, help="calls per repeat (default: %(default)s)")
    args = parser.parse_args(argv)
    key, adkey = os.urandom(32), os.urandom(32)
    calls = sodium.load()
    rows: list[tuple[str, Callable[[], Any]]] = [
        ("chacha20-poly1305, cryptography", lambda: FastChachaCipher(key, adkey)),
        ("aes128-gcm", lambda: FastGCMCipher(key[:16], os.urandom(12))),
    ]
    if calls is not None:
        rows.insert(1, (f"chacha20-poly1305, libsodium (up to {sodium.SMALL // 1024} KiB)",
                        lambda: FastChachaCipher(key, adkey, calls)))
    print("| cipher | packet bytes | seal µs | length µs | open µs |")
    print("|---|---:|---:|---:|---:|")
    for size in SIZES:
        for name, make in rows:
            print(_row(name, make(), size, args.number))
    if calls is None:
        print("\nlibsodium is not installed here: chacha20 goes through cryptography alone.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
