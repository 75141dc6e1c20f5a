"""`python3 -m tests.lab up|down|status|env` from the repository root."""

from __future__ import annotations

import sys

from .lab import main

sys.exit(main())
