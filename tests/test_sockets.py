"""tunneld.sockets.take: the reader of a stream fed by another task gets what piled up, in order."""

from __future__ import annotations

from collections import deque

from hypothesis import given
from hypothesis import strategies as st

from tunneld.sockets import take


@given(st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=30), st.integers(1, 120))
def test_take_keeps_every_byte_in_order_in_pieces_no_larger_than_asked(chunks: list[bytes], limit: int) -> None:
    queue = deque(chunks)
    pieces = []
    while queue:
        piece = take(queue, limit)
        assert 0 < len(piece) <= limit
        pieces.append(piece)
    assert b"".join(pieces) == b"".join(chunks)


def test_take_joins_what_fits_and_splits_what_does_not() -> None:
    queue = deque([b"ab", b"cd", b"efghij"])
    assert take(queue, 5) == b"abcd"  # "efghij" would not fit beside them
    assert take(queue, 4) == b"efgh" and list(queue) == [b"ij"]
    first = b"x" * 10
    assert take(deque([first]), 64) is first  # one chunk: handed on as it is, not copied
