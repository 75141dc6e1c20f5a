"""The one retry delay: capped exponential backoff with "equal jitter".

After ``n`` failures in a row the bound is ``start * 2**(n - 1)``, capped at ``cap``; the pause is
half that bound, plus a random part of up to the other half. The fixed half keeps retries from
hammering a far side that is down; the random half keeps the many clients of one far side (the
forwards sharing a transport, daemons restarted together) from retrying in lockstep (AWS
Architecture Blog, "Exponential Backoff And Jitter", 2015). Each caller keeps its own start and cap:

- the probes of a forward that is not ready: 0.25 s up to its probe interval, at most 5 s;
- SSH reconnects: 0.25 s up to ``ssh.reconnect_max_delay`` (start-up retries: up to 2 s);
- the docker transport refilling its pool of relay streams: 0.2 s up to 5 s;
- ``--auto`` following the Docker event stream again: 0.25 s up to 5 s.
"""

from __future__ import annotations

import random

START = 0.25
# 2**64 times any start is far beyond every cap; the exponent stops there so no float overflows.
_MAX_DOUBLINGS = 64


def ceiling(failures: int, cap: float, start: float = START) -> float:
    """The bound of the pause after ``failures`` failures in a row: ``start``, doubling, at most ``cap``."""
    return min(cap, start * 2.0 ** min(max(0, failures - 1), _MAX_DOUBLINGS))


def backoff(failures: int, cap: float, start: float = START) -> float:
    """The pause after ``failures`` failures in a row: between half of ``ceiling()`` and all of it, at random."""
    bound = ceiling(failures, cap, start)
    return bound / 2 + random.uniform(0, bound / 2)
