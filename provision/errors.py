"""Errors provisioning raises: each says what is wrong on which host and what to do about it."""

from __future__ import annotations

from collections.abc import Sequence

from tunneld.errors import ExitCode, TunneldError


class ProvisionError(TunneldError):
    """The registry or the cluster could not be brought to the state asked for."""

    exit_code = ExitCode.PROVISION


class PreflightError(ProvisionError):
    """A check before anything is created failed; nothing was created or changed."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            text = f"pre-flight: {self.problems[0]} (nothing was created)"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            text = f"pre-flight found {len(self.problems)} problems (nothing was created):\n{lines}"
        super().__init__(text)


class KubeError(ProvisionError):
    """The Kubernetes API server refused a request (``status``) or could not be reached (status None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
